"""pbmc68k with sentences, a split and the bundled text embedding: the data tests and benchmarks share."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anndata as ad

import sc_llm as scl


def pbmc68k_embedded(
    model: Any = None, precision: str = "auto", cache_dir: str | Path | None = None
) -> ad.AnnData:
    """:func:`sc_llm.datasets.pbmc68k` with ``obs['cell_sentence']``, an 80/20 ``obs['split']`` and ``obsm['X_text']``.

    Parameters
    ----------
    model
        Text encoder for :func:`sc_llm.tl.embed_text` (``None``: the bundled all-MiniLM-L6-v2).
    precision
        Precision of the embedding.
    cache_dir
        Folder keeping the result between runs, one file per precision (default: the
        ``SC_LLM_TEST_CACHE`` environment variable; unset: nothing is kept).

    Returns
    -------
    adata : anndata.AnnData
        The embedded AnnData (read back from the cache when it is there).
    """
    cache_dir = cache_dir or os.environ.get("SC_LLM_TEST_CACHE")
    path = Path(cache_dir) / f"pbmc68k_text_{precision}.h5ad" if cache_dir else None
    if path is not None and path.exists():
        return ad.read_h5ad(path)
    adata = scl.datasets.pbmc68k()
    scl.pp.cell_sentences(adata)
    scl.pp.train_test_split(adata, "cell_type", test_size=0.2, random_state=0)
    scl.tl.embed_text(adata, model, precision=precision)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        adata.write_h5ad(path)
    return adata
