"""Per-cell-type top attributed genes with known markers highlighted (Table 1 as a figure)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
from anndata import AnnData

from sc_llm._docs import doc_axes_show_save, doc_params

from ._utils import finish, panels, uns_table


@doc_params(doc_axes_show_save=doc_axes_show_save)
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
    axes=None,
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
        Panels per row of a new figure.
    marker_color, other_color
        Bar colours of markers and of other genes.
    {doc_axes_show_save}

    Returns
    -------
    fig : matplotlib.figure.Figure
        The figure, one panel per group.
    """
    from sc_llm.tl._markers import _match_groups, read_markers

    table = uns_table(data, key, "genes", "attribute", columns=("group", "rank", "gene", "attribution"))
    groups = list(groups) if groups is not None else list(dict.fromkeys(table["group"].astype(str)))
    absent = [g for g in groups if g not in set(table["group"].astype(str))]
    if absent:
        raise KeyError(f"Groups {absent} not in the attribution table.")
    marker_sets = read_markers(markers) if markers is not None else {}
    matched = _match_groups(groups, list(marker_sets), mapping)
    ncols = max(1, min(ncols, len(groups)))
    size = (3.4 * ncols, (0.28 * table.groupby("group").size().max() + 1.2) * math.ceil(len(groups) / ncols))
    fig, axes, own = panels(axes, len(groups), figsize=size, ncols=ncols)
    for ax, group in zip(axes, groups, strict=True):
        rows = table[table["group"].astype(str) == group].sort_values("rank")
        known = {m.upper() for m in marker_sets.get(matched.get(group, ""), [])}
        is_marker = [g.upper() in known for g in rows["gene"]]
        ax.barh(
            range(len(rows)),
            rows["attribution"],
            color=[marker_color if m else other_color for m in is_marker],
        )
        ax.set_yticks(range(len(rows)), list(rows["gene"]))
        for label, m in zip(ax.get_yticklabels(), is_marker, strict=True):
            if m:
                label.set_fontweight("bold")
                label.set_color(marker_color)
        ax.invert_yaxis()
        ax.set_title(group, fontsize="medium")
        ax.set_xlabel("summed attribution", fontsize="small")
    if own:  # a caller's figure keeps its own title
        method = str(table["method"].iloc[0]) if "method" in table else ""
        fig.suptitle(
            method.replace("_", " ") + (" (markers in bold)" if marker_sets else ""), fontsize="medium"
        )
    finish(fig, save, show, own)
    return fig
