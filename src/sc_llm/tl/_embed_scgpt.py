"""scl.tl.embed_scgpt: scGPT cell embeddings from a released checkpoint folder."""

from __future__ import annotations

import logging
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from anndata import AnnData

from .._distributed import Scheduler, run_embedding, worker_model
from .._progress import progress
from .._store import ChunkedResults, names_digest
from .._utils import as_csr, format_examples, gene_names, get_matrix, maybe_copy, warn_overwrite
from ..models._runtime import Precision, resolve_precision

logger = logging.getLogger("sc_llm")

_CELL_CHUNK = 1024


def embed_scgpt(
    adata: AnnData,
    model_dir: str | Path | Any,
    *,
    gene_col: str | None = None,
    layer: str | None = None,
    max_length: int = 1200,
    batch_size: int = 64,
    device: Any = None,
    precision: Precision = "auto",
    random_state: int = 0,
    min_gene_fraction: float = 0.1,
    key_added: str = "X_scgpt",
    chunk_size: int = _CELL_CHUNK,
    store: str | Path | None = None,
    scheduler: Scheduler = None,
    copy: bool = False,
) -> AnnData | None:
    """Embed cells with a pretrained scGPT model (the ``<cls>`` output, L2-normalized).

    Reproduces upstream ``scgpt.tasks.embed_data``: genes are matched by exact symbol to the
    model vocabulary; per cell only expressed matched genes are used, in ``var`` order; their
    values are binned per cell into the checkpoint's ``n_bins`` by quantiles of that cell's
    non-zero values (bin 0 is reserved for zero, ties at a bin edge are broken at random);
    ``<cls>`` comes first with the pad value; when a cell has more than ``max_length - 1``
    expressed genes a random subset is kept.

    Unlike upstream, the matrix is read in row chunks (never densified), ``adata`` keeps all its
    genes and cells, and randomness is reproducible: each cell draws from its own generator
    seeded by ``(random_state, crc32(obs_name))``, first the bin tie-breaks, then the subset.
    A cell's embedding therefore does not depend on the other cells, their order or the batching.

    Parameters
    ----------
    adata
        Annotated data matrix with non-negative expression (counts or log-normalized; binning
        per cell is rank-based, so either works).
    model_dir
        Folder with ``args.json``, ``vocab.json`` and ``best_model.pt`` as released
        (e.g. ``scGPT_human/``), or an encoder from :func:`sc_llm.models.load_scgpt`.
    gene_col
        ``var`` column with gene symbols; ``None`` uses ``var_names``.
    layer
        Layer with the expression values; ``None`` uses ``adata.X``.
    max_length
        Maximum tokens per cell including ``<cls>`` (upstream default 1200).
    batch_size
        Cells per forward pass (batches group cells of similar length).
    device
        Torch device; ``None`` picks CUDA, then MPS, then CPU.
    precision
        ``"auto"`` (fp16 on CUDA, fp32 on CPU), ``"fp32"``, ``"bf16"`` (a bf16 copy of the
        weights; used on CPUs with native bf16, else fp32) or ``"fp16"`` (CUDA).
    random_state
        Seed for bin tie-breaking and gene subsampling.
    min_gene_fraction
        Error when fewer than this fraction of ``adata``'s genes are in the vocabulary
        (usually a sign of Ensembl IDs or another species in ``gene_col``).
    key_added
        ``obsm`` key for the embedding; details go to ``uns[key_added]``.
    chunk_size
        Cells read and tokenized at a time (the unit of resuming and of distributed work).
    store
        Path of a resumable zarr store for the embeddings (see :func:`sc_llm.tl.embed_text`).
    scheduler
        Run the forward passes on a dask.distributed cluster (``"local"``, an address or a
        ``Client``, see :func:`sc_llm.tl.embed_text`); this process reads and tokenizes the
        chunks. Workers load ``model_dir`` once each, so the folder must be readable there.
    copy
        Return a copy instead of writing into ``adata``.

    Returns
    -------
    ``None`` or a copy. Sets ``adata.obsm[key_added]`` (float32, cells × embsize) and
    ``adata.uns[key_added]`` with the model identity, precision, matched genes (count, fraction,
    column), genes per cell (mean, min, max) and the number of subsampled cells.
    """
    from ..models._scgpt import load_scgpt

    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (<cls> and one gene), got {max_length}.")
    adata = maybe_copy(adata, copy)
    encoder = load_scgpt(model_dir, device)
    used_precision = resolve_precision(precision, encoder.device)
    X, var = get_matrix(adata, layer=layer)
    cols, token_ids = _match_genes(gene_names(var, gene_col), encoder.vocab, gene_col, min_gene_fraction)

    names = np.asarray(adata.obs_names.astype(str))
    params = {"precision": used_precision, "max_length": max_length, "random_state": random_state}
    fingerprint = {"function": "embed_scgpt", "model": encoder.identity(), **params, "layer": layer}
    if store is not None:
        fingerprint |= {"cells": names_digest(names), "genes": names_digest(gene_names(var, gene_col)[cols])}
    results = ChunkedResults(
        adata.n_obs,
        chunk_size,
        {"embedding": ((encoder.dim,), np.float32), "n_genes": ((), np.int64)},
        store=store,
        fingerprint=fingerprint,
    )

    def tokenize(start: int, stop: int):
        chunk = as_csr(X[start:stop])[:, cols]
        genes, values, n = _tokenize_chunk(chunk, token_ids, names[start:stop], encoder, max_length, random_state, layer)
        return (genes, values), {"n_genes": n}

    with progress(adata.n_obs, "embed_scgpt", unit="cell") as bar:
        run_embedding(
            results,
            tokenize,
            encode_scgpt_chunk,
            shared=(worker_model(model_dir, encoder, scheduler), device, batch_size, precision),
            scheduler=scheduler,
            bar=bar,
        )
    emb, n_genes = results.array("embedding"), results.array("n_genes")

    n_empty = int((n_genes == 0).sum())
    if n_empty:
        logger.warning(
            "embed_scgpt: %d cells express no vocabulary gene; they get the <cls>-only embedding.", n_empty
        )
    warn_overwrite(adata.obsm, key_added, "adata.obsm")
    adata.obsm[key_added] = emb
    adata.uns[key_added] = {
        "model": encoder.identity(),
        "precision": used_precision,
        "max_length": max_length,
        "random_state": random_state,
        "gene_col": gene_col or "var_names",
        "n_genes_matched": len(cols),
        "fraction_genes_matched": len(cols) / max(len(var), 1),
        "genes_per_cell": _stats(np.minimum(n_genes, max_length - 1)),
        "n_cells_subsampled": int((n_genes > max_length - 1).sum()),
        "n_cells_without_genes": n_empty,
    }
    return adata if copy else None


def encode_scgpt_chunk(model_dir, device, batch_size, precision, genes, values, bar=None) -> np.ndarray:
    """One chunk's forward passes; runs here or on a dask worker (which loads the model once)."""
    from ..models._scgpt import load_scgpt

    encoder = load_scgpt(model_dir, device)
    used = resolve_precision(precision, encoder.device)  # on a worker: that worker's device
    return encoder.encode(genes, values, batch_size=batch_size, precision=used, bar=bar)


def _match_genes(names: np.ndarray, vocab: dict[str, int], gene_col, min_fraction: float):
    """Columns of genes found in the vocabulary (var order) and their token ids."""
    ids = np.fromiter((vocab.get(g, -1) for g in names), dtype=np.int64, count=len(names))
    cols = np.flatnonzero(ids >= 0)
    fraction = len(cols) / max(len(names), 1)
    if len(cols) == 0 or fraction < min_fraction:
        where = f"var[{gene_col!r}]" if gene_col else "var_names"
        unmatched = names[ids < 0]
        raise ValueError(
            f"Only {len(cols)} of {len(names)} genes in {where} are in the scGPT vocabulary "
            f"(fraction {fraction:.3f} < min_gene_fraction={min_fraction}). Unmatched names: "
            f"{format_examples(unmatched)}. scGPT matches exact gene symbols (e.g. 'CD3E'); pass "
            "gene_col= with the column that holds symbols."
        )
    if fraction < 0.5:
        logger.warning("embed_scgpt: only %d of %d genes match the vocabulary.", len(cols), len(names))
    return cols, ids[cols]


def _tokenize_chunk(csr, token_ids, names, encoder, max_length, random_state, layer):
    """Per cell: ``<cls>`` + expressed genes and ``pad_value`` + binned values; also expressed-gene counts."""
    csr.eliminate_zeros()
    csr.sort_indices()  # var order, so the seeded tie-breaks and subsets do not depend on storage order
    if csr.nnz and csr.data.min() < 0:
        bad = names[np.unique(np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr))[csr.data < 0])]
        where = f"layer {layer!r}" if layer else "adata.X"
        raise ValueError(
            f"{where} has negative values (cells {format_examples(bad)}); scGPT needs counts or "
            "log-normalized expression, not scaled data."
        )
    keep = max_length - 1
    genes, values = [], []
    n_expr = np.diff(csr.indptr)
    for i in range(csr.shape[0]):
        lo, hi = csr.indptr[i], csr.indptr[i + 1]
        rng = np.random.default_rng([random_state, zlib.crc32(names[i].encode())])
        binned = bin_values(csr.data[lo:hi], encoder.n_bins, rng)
        tok = token_ids[csr.indices[lo:hi]]
        if hi - lo > keep:
            chosen = np.sort(rng.choice(hi - lo, size=keep, replace=False))
            tok, binned = tok[chosen], binned[chosen]
        genes.append(np.concatenate(([encoder.cls_id], tok)))
        values.append(np.concatenate(([encoder.pad_value], binned)).astype(np.float32))
    return genes, values, n_expr


def bin_values(x: np.ndarray, n_bins: int, rng: np.random.Generator) -> np.ndarray:
    """Bin one cell's positive values into ``1..n_bins-1`` by its own quantiles (scGPT's binning).

    Edges are the ``n_bins - 1`` evenly spaced quantiles. A value lying on several equal edges
    gets a uniformly random bin among those edges, as upstream does; ``rng`` makes it reproducible.
    """
    if x.size == 0:
        return np.zeros(0, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)  # float32 quantile edges would move values across edges
    edges = np.quantile(x, np.linspace(0, 1, n_bins - 1))
    left = np.digitize(x, edges)
    right = np.digitize(x, edges, right=True)
    return np.ceil(rng.random(x.size) * (right - left) + left).astype(np.float64)


def _stats(n: np.ndarray) -> dict[str, float]:
    if n.size == 0:
        return {"mean": 0.0, "min": 0, "max": 0}
    return {"mean": float(n.mean()), "min": int(n.min()), "max": int(n.max())}
