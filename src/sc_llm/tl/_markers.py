"""Marker-gene analyses of attributions (paper Table 1, Table 32) and of gene-name embeddings (Table 33)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from sc_llm._utils import check_key, format_examples, warn_overwrite

_TYPE_COLUMNS = ("cell_type", "celltype", "cell type", "source", "set", "term")
_GENE_COLUMNS = ("genesymbol", "gene", "gene_symbol", "official gene symbol", "target", "symbol")


def read_markers(
    markers: Mapping[str, Sequence[str]] | pd.DataFrame | str | Path,
    *,
    type_column: str | None = None,
    gene_column: str | None = None,
) -> dict[str, list[str]]:
    """Marker genes per cell type as ``{cell_type: [genes, in the given order]}``.

    Parameters
    ----------
    markers
        A mapping ``{cell_type: genes}``; a long DataFrame with one row per (cell type, gene), such
        as decoupler's PanglaoDB resource (``cell_type``, ``genesymbol``) or a decoupler network
        (``source``, ``target``); or the path of a GMT file (one set per line: name, description,
        genes, tab-separated).
    type_column, gene_column
        Columns of a DataFrame; by default the first of ``cell_type``/``celltype``/``source``/…
        and ``genesymbol``/``gene``/``target``/… found (case-insensitive).

    Returns
    -------
    markers : dict
        Dict of de-duplicated gene lists (first occurrence kept; the first gene is the "top" marker
        for :func:`marker_similarity`).
    """
    if isinstance(markers, str | Path):
        return _read_gmt(Path(markers))
    if isinstance(markers, pd.DataFrame):
        tcol = type_column or _find_column(markers, _TYPE_COLUMNS, "cell type")
        gcol = gene_column or _find_column(markers, _GENE_COLUMNS, "gene")
        for col in (tcol, gcol):
            if col not in markers.columns:
                raise KeyError(f"Column {col!r} not in the marker table; columns: {list(markers.columns)}.")
        long = markers[[tcol, gcol]].dropna()
        out: dict[str, list[str]] = {}
        for t, g in zip(long[tcol].astype(str), long[gcol].astype(str), strict=True):
            out.setdefault(t, []).append(g)
        return {t: list(dict.fromkeys(g)) for t, g in out.items()}
    if isinstance(markers, Mapping):
        out = {}
        for t, genes in markers.items():
            if isinstance(genes, str):
                raise TypeError(f"Markers of {t!r} must be a list of genes, got the string {genes!r}.")
            out[str(t)] = list(dict.fromkeys(str(g) for g in genes))
        return out
    raise TypeError(f"markers must be a dict, a DataFrame or a GMT path, got {type(markers).__name__}.")


def _find_column(df: pd.DataFrame, candidates: Sequence[str], what: str) -> str:
    lower = {str(c).lower(): c for c in df.columns}
    for c in candidates:
        if c in lower:
            return lower[c]
    raise KeyError(f"No {what} column in the marker table (tried {list(candidates)}); columns: {list(df.columns)}.")


def _read_gmt(path: Path) -> dict[str, list[str]]:
    if not path.is_file():
        raise FileNotFoundError(f"GMT file {path} not found.")
    out: dict[str, list[str]] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.rstrip("\n").split("\t")
        if len(fields) < 3:
            raise ValueError(f"{path}:{lineno}: a GMT line needs name, description and genes, tab-separated.")
        genes = [g.strip() for g in fields[2:] if g.strip()]
        out.setdefault(fields[0], []).extend(genes)
    return {t: list(dict.fromkeys(g)) for t, g in out.items()}


def _match_groups(groups: Sequence[str], marker_types: Sequence[str], mapping: Mapping[str, str] | None):
    """Marker cell type of each group: ``mapping``, else the same name, else a case-insensitive match."""
    lower = {t.lower(): t for t in marker_types}
    matched = {}
    for g in groups:
        if mapping and g in mapping:
            if mapping[g] not in marker_types:
                raise KeyError(f"mapping[{g!r}] = {mapping[g]!r} is not a cell type of the markers.")
            matched[g] = mapping[g]
        elif g in marker_types:
            matched[g] = g
        elif g.lower() in lower:
            matched[g] = lower[g.lower()]
    return matched


def marker_overlap(
    adata: AnnData,
    markers: Mapping[str, Sequence[str]] | pd.DataFrame | str | Path,
    *,
    keys: Sequence[str] = ("attributions_lime", "attributions_integrated_gradients"),
    mapping: Mapping[str, str] | None = None,
    key_added: str = "marker_overlap",
) -> pd.DataFrame:
    """Which top-attributed genes are known markers of their cell type, per method (Table 1).

    Parameters
    ----------
    adata
        AnnData holding the results of :func:`sc_llm.tl.attribute` in ``uns``.
    markers
        Marker genes per cell type (see :func:`read_markers`).
    keys
        ``uns`` keys of the attribution results to compare (one or more methods; the methods are
        the column names of the summary).
    mapping
        ``{group: marker cell type}`` for groups whose names differ from the marker table's
        (default: same name, else case-insensitive match). Unmatched groups warn and get no markers.
    key_added
        ``uns`` key of the results.

    Returns
    -------
    summary : pandas.DataFrame
        Summary with one row per group: for each method, the markers among its top genes (in rank
        order) and their count; ``"shared"``, the markers highlighted by every method (Table 1's bold
        rule); and ``"marker_type"``. Stored in ``uns[key_added]["summary"]``; ``uns[key_added]["genes"]``
        is the concatenated attribution table with ``is_marker`` and ``shared`` columns added.
        Genes match case-insensitively.
    """
    check_key(key_added)
    marker_sets = read_markers(markers)
    tables = []
    for key in keys:
        if key not in adata.uns or "genes" not in adata.uns[key]:
            raise KeyError(f"uns[{key!r}]['genes'] not found; run sc_llm.tl.attribute first.")
        tables.append(adata.uns[key]["genes"])
    genes = pd.concat(tables, ignore_index=True)
    methods = list(dict.fromkeys(genes["method"].astype(str)))
    groups = list(dict.fromkeys(genes["group"].astype(str)))
    matched = _match_groups(groups, list(marker_sets), mapping)
    unmatched = [g for g in groups if g not in matched]
    if unmatched:
        warnings.warn(
            f"No markers for groups {format_examples(unmatched)}; pass mapping={{group: marker cell type}}.",
            UserWarning,
            stacklevel=2,
        )
    upper = {g: {m.upper() for m in marker_sets[t]} for g, t in matched.items()}
    genes["is_marker"] = [
        gene.upper() in upper.get(group, ()) for group, gene in zip(genes["group"], genes["gene"], strict=True)
    ]
    rows, shared_pairs = [], set()
    for g in groups:
        row: dict[str, Any] = {"group": g, "marker_type": matched.get(g)}
        per_method = []
        for m in methods:
            sel = genes[(genes["group"] == g) & (genes["method"] == m) & genes["is_marker"]]
            found = list(sel.sort_values("rank")["gene"])
            row[m], row[f"n_{m}"] = found, len(found)
            per_method.append({x.upper() for x in found})
        shared = set.intersection(*per_method) if per_method else set()
        row["shared"] = [x for x in row[methods[0]] if x.upper() in shared] if methods else []
        shared_pairs |= {(g, x) for x in shared}
        rows.append(row)
    genes["shared"] = [(g, x.upper()) in shared_pairs for g, x in zip(genes["group"], genes["gene"], strict=True)]
    summary = pd.DataFrame(rows).set_index("group")
    warn_overwrite(adata.uns, key_added, "adata.uns")
    # Lists are stored as comma-joined strings in uns so the result can be written to h5ad.
    adata.uns[key_added] = {
        "summary": summary.apply(lambda c: c.map(_join) if c.dtype == object else c),
        "genes": genes,
        "params": {"keys": list(keys), "methods": methods},
    }
    return summary


def _join(value):
    return ", ".join(value) if isinstance(value, list) else ("" if value is None else value)


def marker_similarity(
    markers: Mapping[str, Sequence[str]] | pd.DataFrame | str | Path,
    model: Any = None,
    *,
    types: Sequence[str] | None = None,
    device: Any = None,
) -> dict[str, Any]:
    """Intra- vs inter-type cosine similarity of gene-name embeddings (the paper's Table 33).

    For each cell type, the top marker (the first gene listed) is embedded with the text encoder
    and compared with the type's other markers (intra) and with the markers of every other type
    that are not also markers of this type (inter); both are averaged over types.

    Parameters
    ----------
    markers
        Marker genes per cell type (see :func:`read_markers`); order matters (first = top).
    model
        Text encoder (as in :func:`sc_llm.tl.embed_text`).
    types
        Cell types to use (default: all with at least two markers).
    device
        Torch device of the encoder.

    Returns
    -------
    similarity : dict
        ``{"intra": float, "inter": float, "per_type": DataFrame}``; ``per_type`` has one row per
        type with its top marker, ``intra``, ``inter`` and marker counts. Types with fewer than two
        markers are left out (no intra pair).
    """
    from sc_llm.models._text import load_text_encoder

    sets = read_markers(markers)
    chosen = list(types) if types is not None else [t for t, g in sets.items() if len(g) >= 2]
    missing = [t for t in chosen if t not in sets]
    if missing:
        raise KeyError(f"Cell types not in the markers: {format_examples(missing)}.")
    chosen = [t for t in chosen if len(sets[t]) >= 2]
    if len(chosen) < 2:
        raise ValueError("marker_similarity needs at least two cell types with two or more markers each.")
    encoder = load_text_encoder(model, device)
    vocab = list(dict.fromkeys(g for t in chosen for g in sets[t]))
    emb = encoder.encode(vocab, precision="fp32", normalize=True)
    row_of = {g: i for i, g in enumerate(vocab)}
    rows = []
    for t in chosen:
        top, own = sets[t][0], set(sets[t])
        others = [g for u in chosen if u != t for g in sets[u] if g not in own]
        sim = emb @ emb[row_of[top]]
        rows.append({
            "cell_type": t, "top_marker": top,
            "intra": float(np.mean([sim[row_of[g]] for g in sets[t][1:]])),
            "inter": float(np.mean([sim[row_of[g]] for g in others])) if others else np.nan,
            "n_intra": len(sets[t]) - 1, "n_inter": len(others),
        })
    per_type = pd.DataFrame(rows).set_index("cell_type")
    return {"intra": float(per_type["intra"].mean()), "inter": float(per_type["inter"].mean()), "per_type": per_type}
