"""Evaluation metrics shared by every annotator (kNN, MLP heads, fusion, LLM re-ranking)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData
from sklearn.cluster import KMeans
from sklearn.metrics import (
    accuracy_score,
    adjusted_mutual_info_score,
    adjusted_rand_score,
    precision_recall_fscore_support,
)

from sc_llm._docs import doc_params, doc_random_state
from sc_llm._utils import check_key, format_examples, warn_overwrite


def classification_metrics(y_true, y_pred) -> dict[str, float]:
    """Accuracy and macro precision/recall/F1 (labels: union of true and predicted; 0 where undefined).

    Parameters
    ----------
    y_true
        True labels of the evaluated cells.
    y_pred
        Predicted labels, same length and order.

    Returns
    -------
    metrics : dict
        ``accuracy``, ``precision``, ``recall``, ``f1`` and ``n_cells``.
    """
    y_true, y_pred = np.asarray(y_true, dtype=object), np.asarray(y_pred, dtype=object)
    if y_true.size == 0:
        raise ValueError("No labelled held-out cells to evaluate.")
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision": float(p),
        "recall": float(r),
        "f1": float(f),
        "n_cells": int(y_true.size),
    }


def get_rep(adata: AnnData, use_rep: str) -> np.ndarray:
    """``obsm[use_rep]`` as a 2-D float array, with errors naming the key or the bad cells."""
    if use_rep not in adata.obsm:
        raise KeyError(f"{use_rep!r} not found in adata.obsm; available: {list(adata.obsm)}.")
    X = adata.obsm[use_rep]
    X = X.to_numpy() if isinstance(X, pd.DataFrame) else np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"adata.obsm[{use_rep!r}] must be 2-D, got shape {X.shape}.")
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        raise ValueError(f"adata.obsm[{use_rep!r}] has NaN/inf for cells {format_examples(adata.obs_names[bad])}.")
    return X


def get_labels(adata: AnnData, labels_key: str) -> pd.Series:
    if labels_key not in adata.obs:
        raise KeyError(f"Column {labels_key!r} not found in adata.obs.")
    return adata.obs[labels_key]


def train_mask(adata: AnnData, split_key: str, train_value: str) -> np.ndarray:
    """Boolean mask of the training cells, with errors naming the column and its values."""
    if split_key not in adata.obs:
        raise KeyError(
            f"Column {split_key!r} not found in adata.obs; create one with sc_llm.pp.train_test_split."
        )
    split = adata.obs[split_key].astype(str).to_numpy()
    mask = split == str(train_value)
    if not mask.any():
        raise ValueError(f"No cell has obs[{split_key!r}] == {train_value!r}; values: {sorted(set(split))[:10]}.")
    return mask


@doc_params(doc_random_state=doc_random_state)
def cluster_metrics(
    adata: AnnData,
    use_rep: str,
    labels_key: str,
    *,
    random_state: int = 0,
    n_init: int = 10,
    key_added: str | None = None,
) -> dict[str, float]:
    """k-means on ``obsm[use_rep]`` with k = number of labels; ARI and AMI against the labels.

    The paper's (and GenePT's) clustering evaluation. Cells without a label are left out.

    Parameters
    ----------
    adata
        Annotated data matrix.
    use_rep
        ``obsm`` key of the representation to cluster.
    labels_key
        ``obs`` column with the labels.
    {doc_random_state}
    n_init
        k-means restarts (the best inertia is kept).
    key_added
        ``uns`` key; default ``f"cluster_metrics_{use_rep}"``, so each representation keeps its own
        record (in 0.1 all of them shared ``uns["cluster_metrics"][use_rep]``).

    Returns
    -------
    metrics : dict
        ``{"ari", "ami", "n_clusters", "n_cells"}``, also stored in ``uns[key_added]`` beside
        ``"params"`` (``use_rep``, ``labels_key``, ``random_state``, ``n_init``).
    """
    key_added = check_key(f"cluster_metrics_{use_rep}" if key_added is None else key_added)
    X = get_rep(adata, use_rep)
    labels = get_labels(adata, labels_key)
    keep = labels.notna().to_numpy()
    y = labels[keep].astype(str).to_numpy()
    n_clusters = len(np.unique(y))
    if n_clusters < 2:
        raise ValueError(f"obs[{labels_key!r}] needs at least two labels for clustering metrics.")
    clusters = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=random_state).fit_predict(X[keep])
    result = {
        "ari": float(adjusted_rand_score(y, clusters)),
        "ami": float(adjusted_mutual_info_score(y, clusters)),
        "n_clusters": int(n_clusters),
        "n_cells": int(keep.sum()),
    }
    params = {"use_rep": use_rep, "labels_key": labels_key, "random_state": random_state, "n_init": n_init}
    warn_overwrite(adata.uns, key_added, "adata.uns")
    adata.uns[key_added] = {"params": params, **result}
    return result


def mean_sd(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; NaN for a single run) of a metric over runs.

    The one definition of "mean (sd) over seeds" in every table sc_llm writes.
    """
    values = np.asarray(values, dtype=float)
    sd = float(values.std(ddof=1)) if values.size > 1 else float("nan")
    return float(values.mean()), sd

