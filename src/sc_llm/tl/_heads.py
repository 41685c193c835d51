"""What every trained annotation head shares (fusion, MLP, comparisons, MuData).

Reading representations from AnnData or MuData, picking training cells, writing predictions and
candidates like ``knn_annotate`` does, and evaluating them (per run, with optional rejection to
``"unknown"``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData

from sc_llm._utils import format_examples, warn_overwrite

from ._candidates import N_CANDIDATES, label_categories, top3_accuracy, write_candidates
from ._metrics import classification_metrics, get_rep, mean_sd, train_mask

#: Label of cells whose highest class probability is below ``min_confidence``.
UNKNOWN = "unknown"


def training_cells(
    adata, labels: pd.Series, split_key: str, train_value: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mask of labelled training cells, their labels as ``str``, and the sorted classes (at least two)."""
    train = train_mask(adata, split_key, train_value) & labels.notna().to_numpy()
    if not train.any():
        raise ValueError(f"No training cell has a label in obs[{labels.name!r}].")
    y_train = labels.to_numpy()[train].astype(str)
    classes = np.unique(y_train)
    if classes.size < 2:
        raise ValueError(
            f"Training cells of obs[{labels.name!r}] carry a single label {classes.tolist()}; need at least two."
        )
    return train, y_train, classes


def write_predictions(
    adata,
    key: str,
    classes: np.ndarray,
    proba: np.ndarray,
    labels: pd.Series | None,
    train: np.ndarray | None,
    *,
    min_confidence: float | None = None,
) -> tuple[dict[str, float], list[str]]:
    """Write predictions/top-3/probabilities; return metrics on labelled non-training cells and unseen labels.

    With ``min_confidence``, ``obs[key]`` is :data:`UNKNOWN` where the highest probability is below it;
    the top-3 columns keep the model's ranking (for re-ranking with an LLM).
    """
    classes = np.asarray(classes, dtype=object)
    order = np.argsort(-proba, axis=1, kind="stable")[:, :N_CANDIDATES]
    top_p = np.take_along_axis(proba, order, axis=1)
    categories = label_categories(classes, labels)
    if min_confidence is not None and UNKNOWN not in categories:
        categories = [*categories, UNKNOWN]
    write_candidates(adata, key, classes, order, top_p, categories)
    confidence = proba.max(axis=1).astype(np.float32)
    if min_confidence is not None:
        pred = adata.obs[key].astype(object).to_numpy()
        pred[confidence < min_confidence] = UNKNOWN
        adata.obs[key] = pd.Categorical(pred, categories=categories)
    warn_overwrite(adata.obs, f"{key}_confidence", "adata.obs")
    adata.obs[f"{key}_confidence"] = confidence
    warn_overwrite(adata.obsm, f"{key}_proba", "adata.obsm")
    adata.obsm[f"{key}_proba"] = proba.astype(np.float32)
    if labels is None:
        return {}, []
    held_out = labels.notna().to_numpy() & (np.ones(len(labels), bool) if train is None else ~train)
    return evaluate(labels, classes, order, held_out, confidence=proba_confidence(proba, min_confidence))


def proba_confidence(proba: np.ndarray, min_confidence: float | None):
    """The ``confidence`` argument of :func:`evaluate` for a rejection threshold (``None``: no rejection)."""
    return None if min_confidence is None else (proba.max(axis=1), min_confidence)


def check_runs(n_runs: int = 1, min_confidence: float | None = None) -> None:
    """Refuse a number of runs below one and a rejection threshold outside [0, 1]."""
    if int(n_runs) != n_runs or n_runs < 1:
        raise ValueError(f"Invalid n_runs={n_runs!r}.")
    if min_confidence is not None and not 0 <= min_confidence <= 1:
        raise ValueError(f"min_confidence must be in [0, 1] or None, got {min_confidence!r}.")


def held_out_metrics(
    proba: np.ndarray, labels: pd.Series, train: np.ndarray, classes, min_confidence: float | None = None
) -> dict[str, float]:
    """Metrics of one run's probabilities on the labelled non-training cells.

    The unseen-label warning is left to :func:`write_predictions`, which is called once per call.
    """
    held_out = labels.notna().to_numpy() & ~train
    order = np.argsort(-proba, axis=1, kind="stable")[:, :N_CANDIDATES]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        metrics, _ = evaluate(
            labels,
            np.asarray(classes, dtype=object),
            order,
            held_out,
            confidence=proba_confidence(proba, min_confidence),
        )
    return metrics


def summarize_runs(runs: pd.DataFrame) -> dict[str, dict[str, float]]:
    """``metrics_mean`` and ``metrics_sd`` (sample sd, ddof=1; NaN for one run) of a per-run table."""
    stats = {c: mean_sd(runs[c]) for c in ("accuracy", "precision", "recall", "f1", "top3_accuracy") if c in runs}
    return {
        "metrics_mean": {c: mean for c, (mean, _) in stats.items()},
        "metrics_sd": {c: sd for c, (_, sd) in stats.items()},
    }


def evaluate(
    labels: pd.Series,
    classes: np.ndarray,
    order: np.ndarray,
    held_out: np.ndarray,
    *,
    confidence: tuple[np.ndarray, float] | None = None,
) -> tuple[dict[str, float], list[str]]:
    """Metrics on the ``held_out`` cells; labels never seen in training are reported and warned about.

    ``confidence=(per-cell highest probability, threshold)`` turns predictions below the threshold
    into :data:`UNKNOWN` (errors) and adds ``rejection_rate``.
    """
    if not held_out.any():
        return {}, []
    y_true = labels.to_numpy()[held_out].astype(str)
    unseen = warn_unseen(y_true, classes, stacklevel=4)
    pred = classes[order[held_out, 0]].astype(object)
    if confidence is not None:
        rejected = confidence[0][held_out] < confidence[1]
        pred[rejected] = UNKNOWN
    metrics = classification_metrics(y_true, pred.astype(str))
    if confidence is not None:
        metrics["rejection_rate"] = float(rejected.mean())
    metrics["top3_accuracy"] = top3_accuracy(classes, order[held_out], y_true)
    return metrics, unseen


def collect_reps(data, use_reps: Sequence[str]) -> list[np.ndarray]:
    """One float array per representation, rows in ``data.obs_names`` order.

    AnnData: each name is an ``obsm`` key. MuData: a name that is a modality means that modality's
    ``X``; ``"mod:key"`` means ``mdata.mod["mod"].obsm["key"]``; any other name is a key of the
    MuData's own ``obsm``. Every cell of the MuData must be present in each modality used.
    """
    if isinstance(use_reps, str):
        raise TypeError(f"use_reps must be a list of keys, e.g. [{use_reps!r}], not a string.")
    use_reps = list(use_reps)
    if not use_reps:
        raise ValueError("use_reps must name at least one representation.")
    if len(set(use_reps)) != len(use_reps):
        raise ValueError(f"use_reps has duplicates: {use_reps}.")
    if not is_mudata(data):
        return [np.asarray(get_rep(data, k), dtype=np.float32) for k in use_reps]
    return [_mudata_rep(data, name) for name in use_reps]


def is_mudata(data) -> bool:
    """Duck-typed so that mudata stays an optional import."""
    return hasattr(data, "mod") and not isinstance(data, AnnData)


def _mudata_rep(mdata, name: str) -> np.ndarray:
    if name in mdata.mod:
        mod, X, where = mdata.mod[name], mdata.mod[name].X, f"mdata.mod[{name!r}].X"
    elif ":" in name and name.split(":", 1)[0] in mdata.mod:
        mod_name, key = name.split(":", 1)
        mod = mdata.mod[mod_name]
        if key not in mod.obsm:
            raise KeyError(f"{key!r} not found in mdata.mod[{mod_name!r}].obsm; available: {list(mod.obsm)}.")
        X, where = mod.obsm[key], f"mdata.mod[{mod_name!r}].obsm[{key!r}]"
    elif name in mdata.obsm:
        return np.asarray(get_rep(mdata, name), dtype=np.float32)
    else:
        raise KeyError(
            f"{name!r} is neither a modality ({list(mdata.mod)}), 'modality:obsm_key', nor a key of mdata.obsm "
            f"({list(mdata.obsm)})."
        )
    X = X.toarray() if hasattr(X, "toarray") else np.asarray(X)
    pos = mod.obs_names.get_indexer(mdata.obs_names)
    if (pos < 0).any():
        raise ValueError(f"{where} lacks cells {format_examples(mdata.obs_names[pos < 0])} of the MuData.")
    X = np.asarray(X[pos], dtype=np.float32)
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        raise ValueError(f"{where} has NaN/inf for cells {format_examples(mdata.obs_names[bad])}.")
    return X


def warn_unseen(y_true: np.ndarray, classes, stacklevel: int = 3) -> list[str]:
    """Warn (as mlp_annotate and fuse_train do) about held-out labels that no training cell has."""
    unseen = sorted(set(y_true) - set(map(str, classes)))
    if unseen:
        n_unseen = int(np.isin(y_true, unseen).sum())
        warnings.warn(
            f"{n_unseen} held-out cells carry labels absent from training ({format_examples(unseen)}); "
            "they count as errors in the metrics.",
            UserWarning,
            stacklevel=stacklevel,
        )
    return unseen
