"""Bar chart of annotator metrics (the paper's Table 3 as a figure)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from sc_llm._docs import doc_params, doc_show_save

from ._utils import finish, panels, uns_table

METRICS = ("accuracy", "precision", "recall", "f1")


@doc_params(doc_show_save=doc_show_save)
def annotation_metrics(
    data: AnnData | pd.DataFrame,
    *,
    key: str = "annotator_comparison",
    metrics: Sequence[str] = METRICS,
    ax=None,
    save: str | Path | None = None,
    show: bool | None = None,
):
    """Grouped bars of held-out metrics per annotator, with sample-standard-deviation error bars.

    Parameters
    ----------
    data
        The DataFrame returned by :func:`sc_llm.tl.compare_annotators`, or an AnnData/MuData whose
        ``uns[key]["summary"]`` it wrote.
    key
        ``uns`` key of the comparison when ``data`` is an AnnData.
    metrics
        Metric columns to draw (each needs a ``<metric>_sd`` column; NaN sd draws no error bar).
    {doc_show_save}

    Returns
    -------
    ax : matplotlib.axes.Axes
        The matplotlib Axes.
    """
    summary = _summary(data, key)
    missing = [m for m in metrics if m not in summary or f"{m}_sd" not in summary]
    if missing or not len(metrics):
        raise KeyError(
            f"Metrics {missing or list(metrics)} not in the comparison; columns: {list(summary.columns)}."
        )
    fig, (ax,), own = panels(ax, figsize=(1.2 + 1.1 * len(metrics) * max(len(summary), 2) / 3, 4))
    width = 0.8 / len(summary)
    x = np.arange(len(metrics))
    for i, (model, row) in enumerate(summary.iterrows()):
        means = row[list(metrics)].to_numpy(dtype=float)
        sds = np.nan_to_num(row[[f"{m}_sd" for m in metrics]].to_numpy(dtype=float))
        ax.bar(x + (i - (len(summary) - 1) / 2) * width, means, width, yerr=sds, capsize=2, label=str(model))
    ax.set_xticks(x, list(metrics))
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out score (macro for P/R/F1)")
    ax.legend(fontsize="small", frameon=False, loc="upper left", bbox_to_anchor=(1, 1))
    finish(fig, save, show, own)
    return ax


def _summary(data, key: str) -> pd.DataFrame:
    summary = uns_table(data, key, "summary", "compare_annotators")
    return summary.set_index("model") if "model" in summary.columns else summary
