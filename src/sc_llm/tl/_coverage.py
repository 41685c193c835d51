"""scl.tl.vocab_coverage: how much of a dataset a model can read, before spending compute on it.

scGPT reads genes by symbol from ``vocab.json``; Geneformer by Ensembl ID from its token
dictionary; text encoders split gene names into sub-word tokens. A gene outside the vocabulary is
silently dropped by the first two; for text encoders unknown tokens and long token splits waste
the context. The helpers here are also what ``embed_scgpt`` / ``embed_geneformer`` call to record
coverage and convert identifiers.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from sc_llm._utils import as_csr, gene_names, get_matrix, iter_row_chunks
from sc_llm.pp._gene_ids import convert_gene_ids, id_kind

LOW_COVERAGE = 0.5
_KINDS = {"symbol": "gene symbols", "ensembl": "Ensembl IDs"}
_CHUNK = 4096


def to_model_ids(
    names, want: Literal["symbol", "ensembl"], species: str = "human"
) -> tuple[np.ndarray, dict[str, Any]]:
    """Gene names in the identifier kind a model reads, with a report of what was converted.

    Names already of kind ``want`` are returned as they are (Ensembl IDs without version suffix);
    otherwise they are converted with the shipped gene table (see :func:`sc_llm.pp.map_gene_ids`).

    Parameters
    ----------
    names
        Gene names (symbols or Ensembl IDs, with or without version suffix).
    want
        The kind the model reads: ``"symbol"`` (scGPT, text encoders) or ``"ensembl"`` (Geneformer).
    species
        ``"human"`` or ``"mouse"``: the gene table used.

    Returns
    -------
    names : numpy.ndarray
        Object array of the converted identifiers, ``None`` where no unique conversion exists.
    report : dict
        ``from`` (``"symbol"`` or ``"ensembl"``), ``to``, ``converted`` (bool), ``n_genes``,
        ``n_converted``, ``n_ambiguous``, ``n_unmatched``.
    """
    names = np.asarray([str(n) for n in names], dtype=object)
    ids = id_kind(names)
    is_id = np.array([e is not None for e in ids], dtype=bool)
    have = "ensembl" if is_id.mean() > 0.5 else "symbol"
    report: dict[str, Any] = {"from": have, "to": want, "n_genes": int(len(names))}
    if have == want:
        out = np.where(is_id, ids, names) if want == "ensembl" else names
        return out.astype(object), {
            **report,
            "converted": False,
            "n_converted": 0,
            "n_ambiguous": 0,
            "n_unmatched": 0,
        }
    conv = convert_gene_ids(names, want, species)
    counts = conv.counts()
    return conv.converted, {
        **report,
        "converted": True,
        "n_converted": int(conv.matched.sum()),
        "n_ambiguous": counts["ambiguous"],
        "n_unmatched": counts["unmatched"] + counts["no_symbol"],
    }


class CoverageCounter:
    """Accumulates coverage over row chunks, for engines that already iterate over chunks.

    ``counter = CoverageCounter(matched, n_cells)``; ``counter.add(start, csr_chunk)`` per chunk
    (any order); ``counter.summary()`` gives the dict of :func:`coverage_summary`.
    """

    def __init__(self, matched: np.ndarray, n_cells: int):
        self.matched = np.asarray(matched, dtype=bool)
        self.gene_totals = np.zeros(self.matched.size)
        self.per_cell = np.zeros(n_cells)

    def add(self, start: int, chunk) -> None:
        chunk = abs(as_csr(chunk))  # abs() keeps a log or scaled layer from cancelling out
        if chunk.shape[1] != self.matched.size:
            raise ValueError(f"chunk has {chunk.shape[1]} genes, expected {self.matched.size}.")
        self.gene_totals += np.asarray(chunk.sum(axis=0)).ravel()
        totals = np.asarray(chunk.sum(axis=1)).ravel()
        covered = np.asarray(chunk[:, self.matched].sum(axis=1)).ravel()
        share = np.divide(covered, totals, out=np.zeros_like(covered), where=totals > 0)
        self.per_cell[start : start + chunk.shape[0]] = share

    def summary(self) -> dict[str, Any]:
        matched, per_cell, gene_totals = self.matched, self.per_cell, self.gene_totals
        total = gene_totals.sum()
        expressed = gene_totals > 0
        return {
            "n_genes": int(matched.size),
            "n_genes_matched": int(matched.sum()),
            "fraction_genes_matched": float(matched.mean()) if matched.size else 0.0,
            "n_expressed_genes": int(expressed.sum()),
            "n_expressed_genes_matched": int((expressed & matched).sum()),
            "fraction_counts_covered": float(gene_totals[matched].sum() / total) if total > 0 else 0.0,
            "cell_fraction_counts_covered": {
                "min": float(per_cell.min()) if per_cell.size else 0.0,
                "median": float(np.median(per_cell)) if per_cell.size else 0.0,
                "mean": float(per_cell.mean()) if per_cell.size else 0.0,
            },
            "n_cells_without_matched_genes": int((per_cell == 0).sum()),
        }


def coverage_from_cells(covered: np.ndarray, total: np.ndarray, matched: np.ndarray) -> dict[str, Any]:
    """The coverage record of :func:`coverage_summary` from per-cell counts in matched and in all genes.

    These are what the embedding functions collect chunk by chunk, also across resumed stores.
    """
    matched = np.asarray(matched, dtype=bool)
    share = np.divide(covered, total, out=np.zeros_like(covered, dtype=np.float64), where=total > 0)
    all_counts = float(total.sum())
    return {
        "n_genes": int(matched.size),
        "n_genes_matched": int(matched.sum()),
        "fraction_genes_matched": float(matched.mean()) if matched.size else 0.0,
        "fraction_counts_covered": float(covered.sum() / all_counts) if all_counts > 0 else 0.0,
        "cell_fraction_counts_covered": {
            "min": float(share.min()) if share.size else 0.0,
            "median": float(np.median(share)) if share.size else 0.0,
            "mean": float(share.mean()) if share.size else 0.0,
        },
        "n_cells_without_matched_genes": int((covered == 0).sum()),
    }


def cell_counts(rows, matched: np.ndarray) -> dict[str, np.ndarray]:
    """Per cell of a CSR chunk: absolute counts in matched genes and in all genes."""
    rows = abs(as_csr(rows))
    return {
        "counts_covered": np.asarray(rows[:, matched].sum(axis=1), dtype=np.float64).ravel(),
        "counts_total": np.asarray(rows.sum(axis=1), dtype=np.float64).ravel(),
    }


def warn_on_first_chunk(source, matched: np.ndarray, chunk_size: int, what: str, ids: str) -> bool:
    """Coverage of the first chunk of cells, warned about before any compute; returns whether it warned."""
    rows = source.chunk(0, min(chunk_size, source.X.shape[0])).rows
    if rows.data.size and not (np.isfinite(rows.data).all() and rows.data.min() >= 0):
        return False  # invalid values: the tokenizer refuses them with the cell's name, no "nan %" warning first
    counts = cell_counts(rows, matched)
    return warn_low_coverage(coverage_from_cells(counts["counts_covered"], counts["counts_total"], matched), what, ids)


def coverage_of_run(per_cell: Mapping[str, np.ndarray], matched: np.ndarray, warned: bool, what: str, ids: str):
    """Coverage over all cells of an embedding run, from its per-cell counts.

    It is warned about unless the first-chunk check already did.
    """
    coverage = coverage_from_cells(per_cell["counts_covered"], per_cell["counts_total"], matched)
    if not warned:
        warn_low_coverage(coverage, what, ids)
    return coverage


def coverage_summary(X, matched: np.ndarray, chunk_size: int = _CHUNK) -> dict[str, Any]:
    """Genes matched and the share of expressed counts they hold, over a whole matrix (read in row chunks).

    Parameters
    ----------
    X
        Cells × genes counts (dense, sparse, backed or dask; never densified whole).
    matched
        Boolean mask over genes: those the model can read.
    chunk_size
        Rows read at a time.

    Returns
    -------
    dict with ``n_genes``, ``n_genes_matched``, ``fraction_genes_matched``, ``n_expressed_genes``
    (genes with a count in some cell), ``n_expressed_genes_matched``, ``fraction_counts_covered``
    (counts in matched genes / all counts), ``cell_fraction_counts_covered`` (per-cell share:
    ``min``, ``median``, ``mean``) and ``n_cells_without_matched_genes``.
    """
    matched = np.asarray(matched, dtype=bool)
    if matched.shape != (X.shape[1],):
        raise ValueError(f"matched has shape {matched.shape}, expected ({X.shape[1]},) (one flag per gene).")
    counter = CoverageCounter(matched, X.shape[0])
    for start, _, chunk in iter_row_chunks(X, chunk_size):
        counter.add(start, chunk)
    return counter.summary()


def warn_low_coverage(
    summary: Mapping[str, Any], what: str, ids: str, threshold: float = LOW_COVERAGE
) -> bool:
    """Warn, with the numbers and the fix, when matched genes hold less than ``threshold`` of the counts.

    ``what`` names the model (e.g. ``"embed_scgpt: the scGPT vocabulary"``), ``ids`` the identifier
    kind it reads (``"symbol"`` or ``"ensembl"``). Returns whether it warned.
    """
    frac = summary["fraction_counts_covered"]
    if frac >= threshold:
        return False
    warnings.warn(
        f"{what} covers {summary['n_genes_matched']} of {summary['n_genes']} genes, holding only {frac:.1%} "
        f"of the expressed counts (median cell {summary['cell_fraction_counts_covered']['median']:.1%}). "
        f"If your genes are not {_KINDS.get(ids, ids)}, convert them first: sc_llm.pp.map_gene_ids(adata, to={ids!r}) "
        "and pass the new column.",
        UserWarning,
        stacklevel=3,
    )
    return True


def vocab_coverage(
    adata: AnnData,
    model: Any,
    *,
    layer: str | None = None,
    gene_symbols: str | None = None,
    species: Literal["human", "mouse"] = "human",
    convert: bool = True,
) -> pd.DataFrame:
    """How many genes, and how much of the expression, a model's vocabulary covers.

    Parameters
    ----------
    adata
        Annotated data matrix with counts (or any non-negative expression).
    model
        An scGPT folder (with ``vocab.json``) or loaded :class:`~sc_llm.models.ScGPTEncoder`; a
        Geneformer token dictionary (a ``.pkl`` path or a mapping of Ensembl ID → token id); or a
        text encoder (a :class:`~sc_llm.models.TextEncoder`, a sentence-transformers name or
        folder, or ``"text"`` for the bundled default).
    layer
        Layer to read instead of ``X``.
    gene_symbols
        ``var`` column with the gene names (``None``: ``var_names``).
    species
        For converting identifiers (``"human"`` or ``"mouse"``).
    convert
        Also count genes that match after converting symbols ↔ Ensembl IDs with the shipped table
        (what ``embed_*`` can do for you, or :func:`sc_llm.pp.map_gene_ids` beforehand).

    Returns
    -------
    coverage : pandas.DataFrame
        One-row DataFrame (index: the model kind) with ``ids`` (identifier kind the model reads),
        ``n_genes``, ``n_genes_matched`` (as the names are), ``n_genes_matched_converted`` (after
        conversion), ``fraction_genes_matched``, ``n_expressed_genes``, ``n_expressed_genes_matched``,
        ``fraction_counts_covered`` and ``median_cell_fraction_counts_covered`` (the best of as-is and
        converted), and for text encoders ``unk_token_rate`` (share of gene-name tokens that are the
        tokenizer's unknown token), ``tokens_per_gene`` (mean) and ``fraction_single_token``.
    """
    X, var = get_matrix(adata, layer=layer)
    names = gene_names(var, gene_symbols)
    kind, vocab = _vocabulary(model)
    row: dict[str, Any] = {"model": kind}
    if kind == "text":
        encoder = vocab
        row["ids"] = "symbol"
        matched = np.ones(len(names), dtype=bool)
        row |= {"n_genes_matched_converted": len(names)} | _token_stats(encoder, names)
    else:
        ids = "symbol" if kind == "scgpt" else "ensembl"
        row["ids"] = ids
        as_is = np.array([n in vocab for n in names], dtype=bool)
        matched = as_is
        if convert:
            converted, _ = to_model_ids(names, ids, species)
            conv = np.array([c is not None and c in vocab for c in converted], dtype=bool)
            row["n_genes_matched_converted"] = int(conv.sum())
            matched = conv if conv.sum() > as_is.sum() else as_is
        row["n_genes_matched_as_is"] = int(as_is.sum())
    summary = coverage_summary(X, matched)
    row |= {
        "n_genes": summary["n_genes"],
        "n_genes_matched": summary["n_genes_matched"],
        "fraction_genes_matched": summary["fraction_genes_matched"],
        "n_expressed_genes": summary["n_expressed_genes"],
        "n_expressed_genes_matched": summary["n_expressed_genes_matched"],
        "fraction_counts_covered": summary["fraction_counts_covered"],
        "median_cell_fraction_counts_covered": summary["cell_fraction_counts_covered"]["median"],
    }
    return pd.DataFrame([row]).set_index("model")


def _vocabulary(model: Any) -> tuple[str, Any]:
    """``("scgpt", vocab)``, ``("geneformer", token dictionary)`` or ``("text", encoder)``."""
    from sc_llm.models._text import TextEncoder

    if isinstance(model, TextEncoder):
        return "text", model
    if isinstance(model, Mapping):
        return "geneformer", dict(model)
    if hasattr(model, "vocab") and hasattr(model, "cls_id"):  # a loaded ScGPTEncoder
        return "scgpt", model.vocab
    if isinstance(model, str | Path):
        path = Path(model)
        if path.is_dir() and (path / "vocab.json").exists() and (path / "args.json").exists():
            from sc_llm.models._scgpt import read_vocab

            return "scgpt", read_vocab(path / "vocab.json")
        if path.suffix == ".pkl":
            from sc_llm.models._geneformer import read_dictionary

            return "geneformer", read_dictionary(path, "token_dictionary")
        if path.is_dir() and (path / "config.json").exists() and not (path / "modules.json").exists():
            raise ValueError(
                f"{path} looks like a Geneformer model folder: pass its token dictionary (.pkl) instead."
            )
    from sc_llm.models._text import load_text_encoder

    return "text", load_text_encoder(None if model == "text" else model)


def _token_stats(encoder, names: np.ndarray) -> dict[str, float]:
    tok = encoder.tokenizer
    ids = tok(list(map(str, names)), add_special_tokens=False)["input_ids"]
    lengths = np.array([len(x) for x in ids])
    unk = tok.unk_token_id
    n_unk = sum(sum(t == unk for t in x) for x in ids) if unk is not None else 0
    return {
        "unk_token_rate": float(n_unk / max(lengths.sum(), 1)),
        "tokens_per_gene": float(lengths.mean()) if lengths.size else 0.0,
        "fraction_single_token": float((lengths == 1).mean()) if lengths.size else 0.0,
    }
