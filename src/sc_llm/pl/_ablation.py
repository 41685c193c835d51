"""Plots of the ablation study: Table 2 as grouped bars, Figures 6–8 as metric vs sentence length."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from sc_llm._docs import doc_axes_show_save, doc_params, doc_show_save
from sc_llm.tl._ablate import column_label

from ._utils import finish, panels, uns_table

_ROW_LABELS = {
    "accuracy": "Accuracy",
    "precision": "Precision",
    "recall": "Recall",
    "f1": "F1",
    "kmeans_ari": "k-means ARI",
    "kmeans_ami": "k-means AMI",
}


def _study(data, key: str) -> tuple[pd.DataFrame, dict]:
    """The study table and its ``kinds`` record (empty when given the table alone)."""
    table = uns_table(data, key, "table", "ablation_study")
    return table, {} if isinstance(data, pd.DataFrame) else dict(data.uns[key].get("kinds", {}))


@doc_params(doc_show_save=doc_show_save)
def ablation(
    data: AnnData | pd.DataFrame,
    *,
    key: str = "ablation_study",
    metrics: Sequence[str] | None = None,
    columns: Sequence[str] | None = None,
    ax=None,
    save: str | Path | None = None,
    show: bool | None = None,
):
    """Grouped bars of the ablation study: one group per metric, one bar per ablation (Table 2).

    Parameters
    ----------
    data
        The DataFrame returned by :func:`sc_llm.tl.ablation_study` or an AnnData holding it in
        ``uns[key]``.
    key
        ``uns`` key of the study.
    metrics
        Rows to draw (default: all).
    columns
        Ablations to draw (default: all, baseline first).
    {doc_show_save}

    Returns
    -------
    ax : matplotlib.axes.Axes
        The matplotlib Axes.
    """
    table, kinds = _study(data, key)
    metrics = list(metrics) if metrics is not None else list(table.index)
    columns = list(columns) if columns is not None else list(table.columns)
    missing = [m for m in metrics if m not in table.index] + [c for c in columns if c not in table.columns]
    if missing:
        raise KeyError(
            f"{missing} not in the ablation table (rows {list(table.index)}, columns {list(table.columns)})."
        )
    fig, (ax,), own = panels(ax, figsize=(2 + 1.3 * len(metrics), 4))
    width = 0.8 / len(columns)
    x = np.arange(len(metrics))
    for i, col in enumerate(columns):
        values = table.loc[metrics, col].to_numpy(dtype=float)
        ax.bar(x + (i - (len(columns) - 1) / 2) * width, values, width, label=column_label(col, kinds))
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(x, [_ROW_LABELS.get(m, m) for m in metrics])
    ax.set_ylim(min(0.0, float(np.nanmin(table.loc[metrics, columns].to_numpy(dtype=float)))), 1)
    ax.set_ylabel("score (held-out cells; clustering: all cells)")
    ax.legend(fontsize="small", frameon=False, loc="upper left", bbox_to_anchor=(1, 1))
    finish(fig, save, show, own)
    return ax


@doc_params(doc_axes_show_save=doc_axes_show_save)
def sentence_length(
    data: AnnData | pd.DataFrame,
    *,
    key: str = "ablation_study",
    metrics: Sequence[str] = ("accuracy", "f1"),
    baselines: Mapping[str, Mapping[str, float] | float] | None = None,
    include_full: bool = True,
    axes=None,
    save: str | Path | None = None,
    show: bool | None = None,
):
    """Metric against the fraction of in-context genes kept (``truncate`` ablations; Figures 6–8).

    Parameters
    ----------
    data
        The study table (:func:`sc_llm.tl.ablation_study` with ``("truncate", fraction)`` kinds) or
        an AnnData holding it in ``uns[key]``.
    key
        ``uns`` key of the study.
    metrics
        One panel per metric, top to bottom (the paper: accuracy, then F1).
    baselines
        Horizontal reference lines, ``{name: {metric: value}}`` or ``{name: value}`` for every
        panel, e.g. another encoder or scGPT with full sentences.
    include_full
        Draw the unablated sentences (``"baseline"`` column) at fraction 1.0.
    {doc_axes_show_save}

    Returns
    -------
    axes : list of matplotlib.axes.Axes
        One panel per metric, top to bottom.
    """
    table, kinds = _study(data, key)
    fractions = _truncation_points(table, kinds, include_full)
    if not fractions:
        raise ValueError(
            "The ablation table has no 'truncate' columns; run ablation_study with ('truncate', f) kinds."
        )
    absent = [m for m in metrics if m not in table.index]
    if absent:
        raise KeyError(f"Metrics {absent} not in the ablation table; rows: {list(table.index)}.")
    fig, axes, own = panels(axes, len(metrics), figsize=(5, 2.6 * len(metrics)))
    xs = sorted(fractions)
    for ax, metric in zip(axes, metrics, strict=True):
        ys = [float(table.loc[metric, fractions[f]]) for f in xs]
        ax.plot([100 * f for f in xs], ys, marker="o", label="text encoder")
        for j, (name, value) in enumerate((baselines or {}).items()):
            v = value.get(metric) if isinstance(value, Mapping) else value
            if v is not None:
                ax.axhline(float(v), linestyle="--", color=f"C{j + 1}", label=name)
        ax.set_xlabel("% of in-context genes kept")
        ax.set_ylabel(_ROW_LABELS.get(metric, metric))
        ax.set_xticks([100 * f for f in xs])
        ax.legend(fontsize="small", frameon=False)
    finish(fig, save, show, own)
    return axes


def _truncation_points(table: pd.DataFrame, kinds: dict, include_full: bool) -> dict[float, str]:
    points = {}
    for col in table.columns:
        info = kinds.get(col, {})
        kind = info.get("kind") or (col.rsplit("_", 1)[0] if col.startswith("truncate") else col)
        if kind == "truncate":
            fraction = info.get("fraction")
            points[float(fraction if fraction is not None else col.rsplit("_", 1)[-1])] = col
    if include_full and "baseline" in table.columns and points:
        points.setdefault(1.0, "baseline")
    return points
