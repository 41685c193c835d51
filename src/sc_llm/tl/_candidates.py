"""Per-cell candidate labels shared by every annotator (kNN votes, MLP and fusion probabilities).

The three best labels and their scores are what LLM re-ranking reads (``obs[f"{key}_top{i}"]``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData

from sc_llm._utils import warn_overwrite

N_CANDIDATES = 3


def label_categories(classes, labels: pd.Series | None) -> list[str]:
    """Categories for prediction columns: the predicted classes, then any other label of ``labels``."""
    cats = [str(c) for c in classes]
    if labels is not None and isinstance(labels.dtype, pd.CategoricalDtype):
        cats = list(dict.fromkeys([*cats, *labels.cat.categories.astype(str)]))
    return cats


def write_candidates(
    adata: AnnData, key: str, classes, ranked: np.ndarray, scores: np.ndarray, categories: list[str]
) -> None:
    """Write ``obs[key]`` (best label) and ``obs[f"{key}_top{i}"]`` / ``_top{i}_frac`` for i = 1..3.

    ``ranked`` holds class indices best first and ``scores`` their vote fractions or probabilities;
    a zero score is no candidate (its label is missing).
    """
    classes = np.asarray(classes, dtype=object)
    warn_overwrite(adata.obs, key, "adata.obs")
    adata.obs[key] = pd.Categorical(classes[ranked[:, 0]], categories=categories)
    for i in range(N_CANDIDATES):
        has = i < ranked.shape[1]
        score = scores[:, i] if has else np.zeros(adata.n_obs)
        names = np.where(score > 0, classes[ranked[:, i]], None) if has else np.full(adata.n_obs, None)
        adata.obs[f"{key}_top{i + 1}"] = pd.Categorical(names, categories=categories)
        adata.obs[f"{key}_top{i + 1}_frac"] = np.asarray(score, dtype=np.float32)


def top3_accuracy(classes, ranked: np.ndarray, y_true: np.ndarray, scores: np.ndarray | None = None) -> float:
    """Share of cells whose true label is among their (up to) three best candidates.

    ``ranked`` holds class indices best first; with ``scores``, a candidate scored zero does not count.
    """
    top = ranked[:, :N_CANDIDATES]
    hit = np.asarray(classes, dtype=object)[top] == np.asarray(y_true, dtype=object)[:, None]
    if scores is not None:
        hit &= scores[:, : top.shape[1]] > 0
    return float(hit.any(axis=1).mean()) if len(hit) else float("nan")
