"""Per-cell-type top attributed genes with known markers highlighted (Table 1 as a figure)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
from anndata import AnnData

from ._utils import finish


def attributions(
    data: AnnData | pd.DataFrame,
    *,
    key: str = "attributions_integrated_gradients",
    markers=None,
    mapping: Mapping[str, str] | None = None,
    groups: Sequence[str] | None = None,
    ncols: int = 3,
    marker_color: str = "C3",
    other_color: str = "0.6",
    save: str | Path | None = None,
    show: bool | None = None,
):
    """One horizontal bar panel per cell type: its top genes by summed attribution, markers highlighted.

    Parameters
    ----------
    data
        The table returned by :func:`sc_llm.tl.attribute` or an AnnData holding it in ``uns[key]``.
    key
        ``uns`` key of the attribution results.
    markers
        Marker genes per cell type (dict, long DataFrame or GMT path; see
        :func:`sc_llm.tl.read_markers`). Markers of the panel's type are drawn in ``marker_color``
        with bold labels.
    mapping
        ``{group: marker cell type}`` where names differ (as in :func:`sc_llm.tl.marker_overlap`).
    groups
        Panels to draw (default: every group of the table).
    ncols
        Panels per row.
    marker_color, other_color
        Bar colours of markers and of other genes.
    save
        Path of a figure file to write.
    show
        Show the figure (default: only when not saving).

    Returns
    -------
    The matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    from ..tl._markers import _match_groups, read_markers

    table = _table(data, key)
    groups = list(groups) if groups is not None else list(dict.fromkeys(table["group"].astype(str)))
    absent = [g for g in groups if g not in set(table["group"].astype(str))]
    if absent:
        raise KeyError(f"Groups {absent} not in the attribution table.")
    marker_sets = read_markers(markers) if markers is not None else {}
    matched = _match_groups(groups, list(marker_sets), mapping)
    ncols = max(1, min(ncols, len(groups)))
    nrows = math.ceil(len(groups) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 0.28 * table.groupby("group").size().max() * nrows + 1.2 * nrows),
                             squeeze=False, constrained_layout=True)
    for ax, group in zip(axes.ravel(), groups, strict=False):
        rows = table[table["group"].astype(str) == group].sort_values("rank")
        known = {m.upper() for m in marker_sets.get(matched.get(group, ""), [])}
        is_marker = [g.upper() in known for g in rows["gene"]]
        ax.barh(range(len(rows)), rows["attribution"], color=[marker_color if m else other_color for m in is_marker])
        ax.set_yticks(range(len(rows)), list(rows["gene"]))
        for label, m in zip(ax.get_yticklabels(), is_marker, strict=True):
            if m:
                label.set_fontweight("bold")
                label.set_color(marker_color)
        ax.invert_yaxis()
        ax.set_title(group, fontsize="medium")
        ax.set_xlabel("summed attribution", fontsize="small")
    for ax in axes.ravel()[len(groups):]:
        ax.set_visible(False)
    method = str(table["method"].iloc[0]) if "method" in table and len(table) else ""
    fig.suptitle(method.replace("_", " ") + (" (markers in bold)" if marker_sets else ""), fontsize="medium")
    finish(fig, save, show)
    return fig


def _table(data, key: str) -> pd.DataFrame:
    if isinstance(data, pd.DataFrame):
        table = data
    else:
        if key not in data.uns or "genes" not in data.uns[key]:
            raise KeyError(f"uns[{key!r}]['genes'] not found; run sc_llm.tl.attribute first.")
        table = data.uns[key]["genes"]
    for col in ("group", "rank", "gene", "attribution"):
        if col not in table.columns:
            raise KeyError(f"The attribution table lacks column {col!r}; columns: {list(table.columns)}.")
    if table.empty:
        raise ValueError("The attribution table is empty (no gene with a positive attribution).")
    return table
