"""Small helpers shared by every namespace: AnnData access, key bookkeeping, chunked iteration."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

logger = logging.getLogger("sc_llm")


def warn_overwrite(mapping: Mapping[str, Any], key: str, where: str) -> None:
    """Warn (once per call) that ``key`` already exists in ``where`` and will be replaced."""
    if key in mapping:
        warnings.warn(f"{where}[{key!r}] already exists and will be overwritten.", UserWarning, stacklevel=3)


def get_matrix(adata: AnnData, *, layer: str | None = None, use_raw: bool = False):
    """Return ``(X, var)`` for the requested expression source, with clear errors for bad keys."""
    if layer is not None and use_raw:
        raise ValueError("Pass either `layer` or `use_raw=True`, not both.")
    if use_raw:
        if adata.raw is None:
            raise KeyError("use_raw=True but adata.raw is None.")
        return adata.raw.X, adata.raw.var
    if layer is not None:
        if layer not in adata.layers:
            raise KeyError(f"Layer {layer!r} not found in adata.layers; available: {sorted(adata.layers)}.")
        return adata.layers[layer], adata.var
    if adata.X is None:
        raise ValueError("adata.X is None; pass `layer=` or `use_raw=True`.")
    return adata.X, adata.var


def gene_names(var: pd.DataFrame, gene_symbols: str | None) -> np.ndarray:
    """Gene names as a numpy array of ``str``: ``var_names`` or the ``gene_symbols`` column."""
    if gene_symbols is None:
        return np.asarray(var.index.astype(str))
    if gene_symbols not in var.columns:
        raise KeyError(f"Column {gene_symbols!r} not found in var; available: {list(var.columns)}.")
    col = var[gene_symbols]
    missing = col.isna().to_numpy()
    if missing.any():
        examples = list(var.index[missing][:5])
        raise ValueError(f"var[{gene_symbols!r}] has {int(missing.sum())} missing names (e.g. for {examples}).")
    return np.asarray(col.astype(str))


def iter_row_chunks(X, chunk_size: int) -> Iterator[tuple[int, int, sparse.csr_matrix]]:
    """Yield ``(start, stop, csr_chunk)`` over rows; only one chunk is ever materialized (dense or backed)."""
    n = X.shape[0]
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        yield start, stop, as_csr(X[start:stop])


def as_csr(block) -> sparse.csr_matrix:
    """Turn one block of rows (dense, sparse, dask or backed) into CSR without touching other rows."""
    if hasattr(block, "compute"):
        block = block.compute()
    if sparse.issparse(block):
        return sparse.csr_matrix(block)
    return sparse.csr_matrix(np.asarray(block))


def maybe_copy(adata: AnnData, copy: bool) -> AnnData:
    return adata.copy() if copy else adata


def format_examples(values, n: int = 5) -> str:
    values = list(values)
    shown = ", ".join(repr(v) for v in values[:n])
    return shown + (f", … ({len(values)} in all)" if len(values) > n else "")
