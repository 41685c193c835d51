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


def check_key(key: Any, what: str = "key_added") -> str:
    """Return ``key`` if it can be written to h5ad and zarr and read back, else raise naming ``what``.

    Keys become group names in both formats: an empty name cannot be stored, and ``"/"`` nests a
    group inside another, so the file would not read back into the same slot.
    """
    if not isinstance(key, str):
        raise TypeError(f"{what} must be a string, got {type(key).__name__} {key!r}.")
    if not key:
        raise ValueError(f"{what} must not be empty: an empty name cannot be written to h5ad or zarr.")
    if "/" in key:
        suggestion = key.replace("/", "_")
        raise ValueError(
            f"{what} {key!r} contains '/', which h5ad and zarr read as a sub-group, so the saved file "
            f"would not read back. Use e.g. {suggestion!r}."
        )
    return key


def warn_overwrite(mapping: Mapping[str, Any], key: str, where: str) -> None:
    """Check that ``key`` can be saved (:func:`check_key`) and warn if it exists in ``where`` and will be replaced.

    Every function calls this before writing a result, so no result is ever written under a key
    that would make the AnnData unreadable after ``write_h5ad``.
    """
    check_key(key, f"{where} key")
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
        raise ValueError(
            f"var[{gene_symbols!r}] has {int(missing.sum())} missing names (e.g. for {examples})."
        )
    return np.asarray(col.astype(str))


def iter_row_chunks(X, chunk_size: int) -> Iterator[tuple[int, int, sparse.csr_matrix]]:
    """Yield ``(start, stop, csr_chunk)`` over rows; only one chunk is ever materialized (dense or backed)."""
    n = X.shape[0]
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        yield start, stop, as_csr(X[start:stop])


def as_csr(block) -> sparse.csr_matrix:
    """Turn one block of rows (dense, sparse, dask or backed) into CSR without touching other rows.

    float16 (which scipy.sparse does not support) becomes float32, which holds every float16 exactly.
    """
    if hasattr(block, "compute"):
        block = block.compute()
    if sparse.issparse(block):
        return sparse.csr_matrix(block)
    block = np.asarray(block)
    if block.dtype == np.float16:
        block = block.astype(np.float32)
    return sparse.csr_matrix(block)


def _first_cell(chunk: sparse.csr_matrix, bad: np.ndarray, obs_names) -> tuple[int, Any]:
    """Position in ``chunk.data`` of the first flagged entry and the name of its cell."""
    first = int(np.argmax(bad))
    row = int(np.searchsorted(chunk.indptr, first, side="right") - 1)
    return first, str(obs_names[row])


def check_values(
    chunk: sparse.csr_matrix,
    obs_names,
    where: str = "Expression",
    needs: str = "cell sentences need non-negative, finite values such as counts or log-normalized data, "
    "not scaled data",
) -> None:
    """Raise for NaN, +inf, -inf or negative entries, naming the kind and the first offending cell.

    Every entry is tested on its own, so a NaN never hides a negative value (as ``data.min() < 0``
    would, being False when the minimum is NaN).

    Parameters
    ----------
    chunk
        A block of cells in CSR form (see :func:`as_csr`).
    obs_names
        Names of the block's cells (row order).
    where
        What the values are, for the message (e.g. ``"adata.layers['counts']"``).
    needs
        What the caller needs, for the message.
    """
    data = chunk.data
    if data.size == 0 or data.dtype == bool:
        return
    if np.issubdtype(data.dtype, np.unsignedinteger):
        return
    finite = np.isfinite(data)
    bad = ~finite | (data < 0)
    if bad.any():
        first, cell = _first_cell(chunk, bad, obs_names)
        value = data[first]
        if np.isnan(value):
            kind = "NaN"
        elif np.isinf(value):
            kind = "+inf" if value > 0 else "-inf"
        else:
            kind = "negative"
        raise ValueError(
            f"{where} contains {kind} values (first in cell {cell!r}); {needs}. "
            f"{int(bad.sum())} bad entries in this block of {chunk.shape[0]} cells."
        )


def check_counts(chunk: sparse.csr_matrix, obs_names, where: str = "adata.X", *, warn: bool = True) -> bool:
    """Check a block of raw counts: raise for NaN/inf/negative values, warn when values are not integers.

    For models that normalize raw counts themselves (Geneformer): log-normalized or scaled input
    is accepted by the arithmetic but gives wrong embeddings, so non-integer values are reported.
    Non-integer counts can be genuine (e.g. EM-based quantification), hence a warning, not an error.

    Parameters
    ----------
    chunk
        A block of cells in CSR form.
    obs_names
        Names of the block's cells.
    where
        What the values are, for the message (e.g. ``"adata.layers['counts']"``).
    warn
        Emit the warning (callers checking many blocks pass ``False`` once they have warned).

    Returns
    -------
    ``True`` when every value is an integer, else ``False``.
    """
    check_values(chunk, obs_names, where, "raw counts must be non-negative and finite")
    data = chunk.data
    if data.size == 0 or not np.issubdtype(data.dtype, np.floating):
        return True
    fractional = data != np.floor(data)
    if not fractional.any():
        return True
    if warn:
        first, cell = _first_cell(chunk, fractional, obs_names)
        looks_log = float(data.max()) < 20
        hint = " They look log-normalized (all below 20)." if looks_log else ""
        warnings.warn(
            f"{where} holds non-integer values (e.g. {float(data[first]):.4g} in cell {cell!r}), but raw counts "
            f"are expected.{hint} Pass the layer with raw counts; ignore this only for genuinely fractional "
            "counts (e.g. EM-based quantification).",
            UserWarning,
            stacklevel=3,
        )
    return False


def check_unique_obs_names(adata: AnnData, why: str) -> None:
    """Raise when ``obs_names`` repeat, naming examples, for functions that address cells by name."""
    names = adata.obs_names
    if names.is_unique:
        return
    dup = names[names.duplicated()].unique()
    raise ValueError(
        f"obs_names are not unique ({format_examples(dup)} repeat), but {why}. "
        "Call adata.obs_names_make_unique() first."
    )


def maybe_copy(adata: AnnData, copy: bool) -> AnnData:
    return adata.copy() if copy else adata


def format_examples(values, n: int = 5) -> str:
    values = list(values)
    shown = ", ".join(repr(v) for v in values[:n])
    return shown + (f", … ({len(values)} in all)" if len(values) > n else "")


def import_optional(module: str, extra: str | None, purpose: str) -> Any:
    """Import an optional dependency, or raise an ImportError that says how to get it.

    The one pattern for optional back ends: imported when first needed, so ``import sc_llm`` stays light.
    A package that is installed but fails to import is reported with its own error, since installing
    it again would not help.

    Parameters
    ----------
    module
        Module to import (e.g. ``"zarr"`` or ``"captum.attr"``).
    extra
        The sc-llm extra that installs it (``None``: a plain ``pip install`` of the package).
    purpose
        What needs it, for the message (e.g. ``"execution=Execution(store=...)"``).
    """
    import importlib
    import importlib.util

    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if importlib.util.find_spec(top) is not None:
            raise ImportError(
                f"{top} is installed but failed to import ({type(e).__name__}: {e}). This is not a missing "
                f"package: fix that error (e.g. pip install -U 'sc-llm[{extra}]', whose lower bounds are known "
                "to import)."
                if extra
                else f"{top} is installed but failed to import ({type(e).__name__}: {e})."
            ) from e
        how = f"pip install 'sc-llm[{extra}]'" if extra else f"pip install {top}"
        raise ImportError(f"{purpose} needs the optional dependency {top!r}: {how}.") from e


def uns_params(adata: AnnData, key: str) -> dict[str, Any]:
    """The settings a function recorded in ``uns[key]["params"]`` (``{}`` when there is no such record)."""
    entry = adata.uns.get(key)
    params = entry.get("params") if isinstance(entry, Mapping) else None
    return dict(params) if isinstance(params, Mapping) else {}


def obs_sentences(adata: AnnData, key: str, cells: Any = None) -> list[str]:
    """Cell sentences from ``obs[key]`` (of ``cells``: names, a mask or positions); missing ones are refused.

    The one reader of a sentence column for the functions that take ``sentence_key``, so a missing
    column or a missing sentence (which would otherwise be read as the word "nan") gives the same error.
    """
    if key not in adata.obs:
        raise KeyError(f"Column {key!r} not found in adata.obs; create it with sc_llm.pp.cell_sentences.")
    col = adata.obs[key]
    if cells is not None:
        positions = np.asarray(cells).dtype.kind in "iu"
        col = col.iloc[cells] if positions else col.loc[cells]
    missing = col.isna().to_numpy()
    if missing.any():
        raise ValueError(
            f"obs[{key!r}] is missing for {int(missing.sum())} cells: {format_examples(col.index[missing])}."
        )
    return list(col.astype(str))
