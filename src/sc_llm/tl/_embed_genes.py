"""scl.tl.embed_text_genes: gene-level text mode (GenePT-w style), cost grows with genes, not cells."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from sc_llm._docs import doc_copy, doc_execution, doc_params
from sc_llm._execution import Execution, resolve_execution
from sc_llm._sources import MatrixSource
from sc_llm._utils import check_key, gene_names, maybe_copy
from sc_llm.models._gene_mode import GeneModeEncoder, GeneModeTokenizer
from sc_llm.models._runtime import Precision, resolve_precision
from sc_llm.models._text import load_text_encoder

from ._embedding import run_encoder, write_embedding

Weighting = Literal["expression", "rank"]
_CELL_CHUNK = 4096


@doc_params(doc_execution=doc_execution, chunk=f"{_CELL_CHUNK:,}", doc_copy=doc_copy)
def embed_text_genes(
    adata: AnnData,
    model: Any = None,
    *,
    descriptions: Mapping[str, str] | pd.Series | None = None,
    weighting: Weighting = "expression",
    n_genes: int | None = None,
    layer: str | None = None,
    use_raw: bool = False,
    gene_symbols: str | None = None,
    key_added: str = "X_text_genes",
    batch_size: int | None = None,
    device: Any = None,
    precision: Precision = "auto",
    normalize: bool = True,
    execution: Execution | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Embed each gene's text once; a cell is the weighted average of its genes' embeddings.

    The GenePT-w recipe: instead of one encoder pass per cell (:func:`sc_llm.tl.embed_text`), the
    encoder reads each gene once (its symbol, or a description you supply) and every cell's
    embedding is a sparse matrix product. Encoder cost grows with the number of genes, not cells;
    the cell step reads the matrix chunk by chunk (backed and dask ``X`` work).

    Parameters
    ----------
    adata
        Annotated data matrix with non-negative values (counts or log-normalized).
    model
        Text encoder as in :func:`sc_llm.tl.embed_text` (``None``: bundled all-MiniLM-L6-v2).
    descriptions
        Optional text per gene name (a dict or a ``pd.Series`` indexed by gene name), e.g. NCBI
        gene summaries as in GenePT. Genes without one are embedded by their name.
    weighting
        ``"expression"``: weights are the values in the matrix (GenePT-w). ``"rank"``: the gene
        ranked r-th (0-based, descending expression, ties by var order) gets weight ``1 / (r + 1)``,
        which only uses the order of the genes, as a cell sentence does.
    n_genes
        Use only each cell's top ``n_genes`` genes; ``None`` uses every expressed gene.
    layer, use_raw, gene_symbols
        Expression source and gene names (see :func:`sc_llm.pp.cell_sentences`).
    key_added
        ``obsm`` key of the cell embedding; the gene embedding goes to ``varm[key_added]`` (or to
        ``uns[key_added]["gene_embedding"]`` with ``use_raw=True``), details to ``uns[key_added]``.
    batch_size, device, precision
        Batch size, device and precision for the gene texts (see :func:`sc_llm.tl.embed_text`); the
        weighted means are computed in fp32.
    normalize
        L2-normalize the cell embeddings (gene embeddings are always L2-normalized, so every gene
        counts by its weight alone). Without it a cell is the weighted mean of its genes.
    {doc_execution}
    {doc_copy}

    Returns
    -------
    adata : anndata.AnnData or None
        ``None`` or a copy. Sets ``obsm[key_added]`` (float32, cells × dim), the gene embedding and
        ``uns[key_added]``: ``"params"`` (model identity, ``mode="gene"``, weighting, expression source,
        precision, ``normalize``, execution settings) beside ``"n_genes_described"`` and ``"n_empty_cells"``.
        Cells with no expressed gene get a zero vector.
    """
    check_key(key_added)
    execution = resolve_execution(execution, _CELL_CHUNK)
    adata = maybe_copy(adata, copy)
    source = MatrixSource(adata, layer=layer, use_raw=use_raw)
    names = gene_names(source.var, gene_symbols)
    tokenizer = GeneModeTokenizer(names, weighting, n_genes)
    texts, n_described = gene_texts(names, descriptions)
    text_encoder = load_text_encoder(model, device)
    used = resolve_precision(precision, text_encoder.device)
    genes = text_encoder.encode(texts, batch_size=batch_size or 64, precision=used, normalize=True)
    encoder = GeneModeEncoder(genes, text_encoder.identity(), text_encoder.device)
    run = run_encoder(
        adata, encoder, tokenizer, source, function="embed_text_genes", spec=encoder, device=device,
        precision=used, batch_size=batch_size, options={"normalize": normalize}, execution=execution,
        params={"gene_symbols": gene_symbols},
    )  # fmt: skip
    cells = np.nan_to_num(run.embedding, nan=0.0)  # cells with no expressed gene: a zero vector
    params = {
        "model": text_encoder.identity(),
        "mode": "gene",
        "weighting": weighting,
        "n_genes": n_genes,
        "layer": layer,
        "use_raw": use_raw,
        "gene_symbols": gene_symbols,
        "precision": used,
        "normalize": normalize,
    }
    results = {"n_genes_described": n_described, "n_empty_cells": int((~cells.any(axis=1)).sum())}
    if use_raw:
        results["gene_embedding"] = genes
    else:
        adata.varm[key_added] = genes
    write_embedding(adata, key_added, cells, params, results, execution)
    return adata if copy else None


def gene_texts(names: np.ndarray, descriptions: Mapping[str, str] | pd.Series | None) -> tuple[list[str], int]:
    """The text to embed per gene (its description if given, else its name) and how many were described."""
    if descriptions is None:
        return [str(n) for n in names], 0
    lookup = descriptions.dropna() if isinstance(descriptions, pd.Series) else descriptions
    texts = [str(lookup[n]) if n in lookup and str(lookup[n]).strip() else str(n) for n in names]
    n_described = sum(t != n for t, n in zip(texts, names, strict=True))
    if n_described == 0:
        raise ValueError(
            f"No gene name matches `descriptions` (e.g. {list(names[:3])} vs {list(lookup)[:3]}); "
            "index the descriptions by the names in use (var_names or `gene_symbols`)."
        )
    return texts, n_described
