"""scl.tl.knn_annotate: the paper's zero-shot 10-nearest-neighbour classifier."""

from __future__ import annotations

import warnings

import numpy as np
from anndata import AnnData
from sklearn.neighbors import NearestNeighbors

from .._utils import maybe_copy
from ._candidates import N_CANDIDATES, label_categories, write_candidates
from ._metrics import classification_metrics, get_labels, get_rep, train_mask

TIE_RULE = "among labels with equal votes, the one with the nearer closest neighbour wins"


def knn_annotate(
    adata: AnnData,
    use_rep: str,
    labels_key: str,
    *,
    split_key: str = "split",
    train_value: str = "train",
    k: int = 10,
    metric: str = "cosine",
    key_added: str = "knn",
    copy: bool = False,
) -> AnnData | None:
    """Label every cell by majority vote of its ``k`` nearest training cells.

    Parameters
    ----------
    adata
        Annotated data matrix.
    use_rep
        ``obsm`` key of the embedding (e.g. ``"X_text"``).
    labels_key
        ``obs`` column with the labels of the training cells.
    split_key, train_value
        Training cells are those with ``obs[split_key] == train_value`` and a label.
    k
        Number of neighbours (the paper uses 10).
    metric
        Distance for scikit-learn's ``NearestNeighbors`` (the paper: cosine).
    key_added
        Prefix of the outputs.
    copy
        Return a copy instead of writing into ``adata``.

    Returns
    -------
    ``None`` or a copy. Sets

    - ``obs[key_added]``: prediction for every cell (training cells: leave-one-out, their own
      label is never a vote);
    - ``obs[f"{key_added}_top{i}"]`` and ``obs[f"{key_added}_top{i}_frac"]`` for i = 1..3: the
      three most voted labels and their vote fractions (candidates for LLM re-ranking);
    - ``uns[key_added]``: parameters, tie rule and ``"metrics"`` (accuracy, macro
      precision/recall/F1, top-3 accuracy, cell count) on the labelled non-training cells.

    Notes
    -----
    Ties: {tie_rule}.
    """
    if k < 1:
        raise ValueError(f"k must be positive, got {k}.")
    adata = maybe_copy(adata, copy)
    X = get_rep(adata, use_rep)
    labels = get_labels(adata, labels_key)
    train = train_mask(adata, split_key, train_value) & labels.notna().to_numpy()
    if not train.any():
        raise ValueError(f"No training cell has a label in obs[{labels_key!r}].")
    train_idx = np.flatnonzero(train)
    if train_idx.size <= k:
        warnings.warn(f"Only {train_idx.size} training cells for k={k}; using k={train_idx.size - 1 or 1}.", stacklevel=2)
        k = max(train_idx.size - 1, 1)
    classes, codes = np.unique(labels.iloc[train_idx].astype(str).to_numpy(), return_inverse=True)
    neighbours = _neighbours(X, train_idx, k, metric)
    ranked, fractions = _rank_votes(codes[neighbours], len(classes), k)
    write_candidates(adata, key_added, classes, ranked, fractions, label_categories(classes, labels))
    eval_mask = ~train & labels.notna().to_numpy()
    metrics = {}
    if eval_mask.any():
        y_true = labels[eval_mask].astype(str).to_numpy()
        metrics = classification_metrics(y_true, classes[ranked[eval_mask, 0]])
        in_top = (classes[ranked[eval_mask, :N_CANDIDATES]] == y_true[:, None]) & (fractions[eval_mask] > 0)
        metrics["top3_accuracy"] = float(in_top.any(axis=1).mean())
    adata.uns[key_added] = {
        "params": {"use_rep": use_rep, "labels_key": labels_key, "split_key": split_key, "k": k, "metric": metric},
        "tie_rule": TIE_RULE,
        "metrics": metrics,
    }
    return adata if copy else None


knn_annotate.__doc__ = knn_annotate.__doc__.replace("{tie_rule}", TIE_RULE)


def _neighbours(X: np.ndarray, train_idx: np.ndarray, k: int, metric: str) -> np.ndarray:
    """Positions (into ``train_idx``) of each cell's k nearest training cells, nearest first; no self votes."""
    nn = NearestNeighbors(n_neighbors=k + 1, metric=metric, algorithm="brute").fit(X[train_idx])
    _, idx = nn.kneighbors(X)
    is_train = np.zeros(X.shape[0], dtype=bool)
    is_train[train_idx] = True
    pos_of = np.full(X.shape[0], -1)
    pos_of[train_idx] = np.arange(train_idx.size)
    own = idx == pos_of[:, None]
    # Drop the cell itself when it is a training cell; otherwise drop the (k+1)-th neighbour.
    drop = np.where(own.any(axis=1), own.argmax(axis=1), k)
    keep = np.ones_like(idx, dtype=bool)
    keep[np.arange(idx.shape[0]), drop] = False
    return idx[keep].reshape(idx.shape[0], k)


def _rank_votes(votes: np.ndarray, n_classes: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Classes ordered by votes (ties: nearest first occurrence) and the matching vote fractions."""
    n = votes.shape[0]
    rows = np.repeat(np.arange(n), votes.shape[1])
    counts = np.zeros((n, n_classes), dtype=np.int64)
    np.add.at(counts, (rows, votes.ravel()), 1)
    first = np.full((n, n_classes), votes.shape[1], dtype=np.int64)
    for j in range(votes.shape[1] - 1, -1, -1):
        first[np.arange(n), votes[:, j]] = j
    score = counts * (votes.shape[1] + 1) - first
    ranked = np.argsort(-score, axis=1, kind="stable")[:, :N_CANDIDATES]
    fractions = np.take_along_axis(counts, ranked, axis=1) / k
    return ranked, fractions
