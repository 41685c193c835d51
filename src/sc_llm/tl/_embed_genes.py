"""scl.tl.embed_text_genes: gene-level text mode (GenePT-w style), cost grows with genes, not cells."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .._utils import as_csr, gene_names, get_matrix, maybe_copy, warn_overwrite
from ..models._runtime import Precision, resolve_precision
from ..models._text import load_text_encoder
from ..pp._cell_sentences import check_values, rank_csr_rows

Weighting = Literal["expression", "rank"]
WEIGHTINGS = ("expression", "rank")


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
    batch_size: int = 64,
    device: Any = None,
    precision: Precision = "auto",
    normalize: bool = True,
    chunk_size: int = 4096,
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
        Encoder batch size, device and precision for the gene texts (see :func:`sc_llm.tl.embed_text`).
    normalize
        L2-normalize the cell embeddings (gene embeddings are always L2-normalized, so every gene
        counts by its weight alone). Without it a cell is the weighted mean of its genes.
    chunk_size
        Cells read at a time.
    copy
        Return a copy instead of writing into ``adata``.

    Returns
    -------
    ``None`` or a copy. Sets ``obsm[key_added]`` (float32, cells × dim), the gene embedding and
    ``uns[key_added]`` (model identity, weighting, number of genes described, empty cells).
    Cells with no expressed gene get a zero vector.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}.")
    if n_genes is not None and n_genes < 1:
        raise ValueError(f"n_genes must be positive, got {n_genes}.")
    adata = maybe_copy(adata, copy)
    X, var = get_matrix(adata, layer=layer, use_raw=use_raw)
    names = gene_names(var, gene_symbols)
    texts, n_described = gene_texts(names, descriptions)
    encoder = load_text_encoder(model, device)
    used_precision = resolve_precision(precision, encoder.device)
    genes = encoder.encode(texts, batch_size=batch_size, precision=used_precision, normalize=True, desc="genes")
    cells = np.zeros((adata.n_obs, encoder.dim), dtype=np.float32)
    for start in range(0, adata.n_obs, chunk_size):
        stop = min(start + chunk_size, adata.n_obs)
        block = as_csr(X[start:stop])
        check_values(block, adata.obs_names[start:stop])
        cells[start:stop] = weighted_mean(cell_weights(block, weighting, n_genes), genes)
    empty = ~cells.any(axis=1)
    if normalize:
        norms = np.linalg.norm(cells, axis=1, keepdims=True)
        cells = np.divide(cells, norms, out=np.zeros_like(cells), where=norms > 0)
    warn_overwrite(adata.obsm, key_added, "adata.obsm")
    adata.obsm[key_added] = cells
    adata.uns[key_added] = {
        "model": encoder.identity(),
        "mode": "gene",
        "weighting": weighting,
        "n_genes": n_genes,
        "layer": layer,
        "use_raw": use_raw,
        "gene_symbols": gene_symbols,
        "precision": used_precision,
        "normalize": normalize,
        "n_genes_described": n_described,
        "n_empty_cells": int(empty.sum()),
    }
    if use_raw:
        adata.uns[key_added]["gene_embedding"] = genes
    else:
        adata.varm[key_added] = genes
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


def cell_weights(block: sparse.csr_matrix, weighting: str, n_genes: int | None) -> sparse.csr_matrix:
    """Per-cell gene weights as CSR (same shape as ``block``)."""
    if weighting == "expression" and n_genes is None:
        block = block.copy()
        block.eliminate_zeros()
        return block.astype(np.float32)
    cols, indptr = rank_csr_rows(block, n_genes)
    if weighting == "rank":
        rank = np.arange(cols.size) - np.repeat(indptr[:-1], np.diff(indptr))
        data = (1.0 / (rank + 1)).astype(np.float32)
    else:
        data = _values_at(block, cols, indptr).astype(np.float32)
    return sparse.csr_matrix((data, cols, indptr), shape=block.shape)


def _values_at(block: sparse.csr_matrix, cols: np.ndarray, indptr: np.ndarray) -> np.ndarray:
    rows = np.repeat(np.arange(block.shape[0]), np.diff(indptr))
    return np.asarray(block[rows, cols]).ravel()


def weighted_mean(weights: sparse.csr_matrix, genes: np.ndarray) -> np.ndarray:
    """Row-wise weighted mean of gene embeddings; rows without weight stay zero."""
    total = np.asarray(weights.sum(axis=1)).ravel()
    summed = np.asarray(weights @ genes, dtype=np.float32)
    return np.divide(summed, total[:, None], out=np.zeros_like(summed), where=total[:, None] > 0)
