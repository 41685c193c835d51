"""scl.tl.mlp_annotate: the paper's "encoder + MLP" baseline (scikit-learn's default ``MLPClassifier``).

Also holds the pieces every probabilistic annotator shares (fusion, MLP): reading representations
from AnnData or MuData, picking training cells, and writing predictions like ``knn_annotate`` does.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from .._utils import format_examples, logger, maybe_copy, warn_overwrite
from ._candidates import N_CANDIDATES, label_categories, write_candidates
from ._metrics import classification_metrics, get_labels, get_rep, train_mask

#: Label of cells whose highest class probability is below ``min_confidence``.
UNKNOWN = "unknown"


def mlp_annotate(
    adata: AnnData,
    use_rep: str,
    labels_key: str,
    *,
    split_key: str = "split",
    train_value: str = "train",
    n_runs: int = 1,
    min_confidence: float | None = None,
    random_state: int = 0,
    key_added: str = "mlp",
    copy: bool = False,
    **mlp_kwargs: Any,
) -> AnnData | None:
    """Train scikit-learn's ``MLPClassifier`` (default architecture) on one embedding and label every cell.

    This is the paper's "Ember-V1 + MLP" / "scGPT + MLP" baseline (Appendix A.2): a frozen encoder's
    embedding and ``MLPClassifier()`` with scikit-learn's defaults (one hidden layer of 100 ReLU
    units, Adam, up to 200 iterations).

    Parameters
    ----------
    adata
        Annotated data matrix.
    use_rep
        ``obsm`` key of the embedding (e.g. ``"X_text"``).
    labels_key
        ``obs`` column with the labels; cells without a label (NaN) are not trained on.
    split_key, train_value
        Training cells are those with ``obs[split_key] == train_value`` and a label.
    n_runs
        Number of fits with seeds ``random_state, random_state + 1, …``; held-out metrics per run
        are in ``uns[key_added]["runs"]`` with their mean and sample standard deviation (ddof=1).
        Predictions come from the first run.
    min_confidence
        Cells whose highest class probability is below this are labelled ``"unknown"`` in
        ``obs[key_added]`` (they count as errors in the metrics; the rejected fraction is
        ``metrics["rejection_rate"]``). ``None`` never rejects. The highest probability is written to
        ``obs[f"{key_added}_confidence"]`` either way.
    random_state
        Seed of the weight initialisation and batch shuffling.
    key_added
        Prefix of the outputs.
    copy
        Return a copy instead of writing into ``adata``.
    **mlp_kwargs
        Passed to ``sklearn.neural_network.MLPClassifier`` (leave empty for the paper's defaults).

    Returns
    -------
    ``None`` or a copy. Sets, as :func:`sc_llm.tl.knn_annotate` does,

    - ``obs[key_added]``: prediction for every cell (``"unknown"`` below ``min_confidence``);
      ``obs[f"{key_added}_confidence"]``: its highest class probability;
    - ``obs[f"{key_added}_top{i}"]`` and ``obs[f"{key_added}_top{i}_frac"]`` (i = 1..3): the three
      most probable labels and their probabilities;
    - ``obsm[f"{key_added}_proba"]``: class probabilities, columns in ``uns[key_added]["classes"]`` order;
    - ``uns[key_added]``: parameters, classes, labels seen only outside training, ``"metrics"``
      (accuracy, macro precision/recall/F1, top-3 accuracy) on the labelled non-training cells,
      ``"runs"`` (metrics per seed), ``"metrics_mean"`` and ``"metrics_sd"``.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    if int(n_runs) != n_runs or n_runs < 1:
        raise ValueError(f"Invalid n_runs={n_runs!r}.")
    if min_confidence is not None and not 0 <= min_confidence <= 1:
        raise ValueError(f"min_confidence must be in [0, 1] or None, got {min_confidence!r}.")
    adata = maybe_copy(adata, copy)
    X = get_rep(adata, use_rep)
    labels = get_labels(adata, labels_key)
    train, y_train, classes = training_cells(adata, labels, split_key, train_value)
    held_out = labels.notna().to_numpy() & ~train
    fits, rows = [], []
    for i in range(int(n_runs)):
        clf = MLPClassifier(random_state=random_state + i, **mlp_kwargs)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            clf.fit(X[train], y_train)
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        # predict_proba columns follow clf.classes_, which np.unique also sorts: same order as `classes`.
        proba = clf.predict_proba(X).astype(np.float32)
        fits.append((clf, converged, proba))
        if i > 0:
            order = np.argsort(-proba, axis=1, kind="stable")[:, :N_CANDIDATES]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                metrics_i, _ = evaluate(
                    labels, classes.astype(object), order, held_out, confidence=_conf(proba, min_confidence)
                )
            rows.append({"run": i, "seed": random_state + i, **metrics_i})
    clf, converged, proba = fits[0]
    if not converged:
        logger.info("mlp_annotate: MLPClassifier stopped at max_iter=%d before converging.", clf.max_iter)
    metrics, unseen = write_predictions(
        adata, key_added, classes, proba, labels, train, min_confidence=min_confidence
    )
    runs = pd.DataFrame([{"run": 0, "seed": random_state, **metrics}, *rows])
    cols = [c for c in ("accuracy", "precision", "recall", "f1", "top3_accuracy") if c in runs]
    adata.uns[key_added] = {
        "params": {
            "use_rep": use_rep,
            "labels_key": labels_key,
            "split_key": split_key,
            "random_state": random_state,
            "n_runs": int(n_runs),
            "min_confidence": -1.0 if min_confidence is None else float(min_confidence),
            "mlp_params": {
                k: v for k, v in clf.get_params().items() if isinstance(v, int | float | str | bool)
            },
        },
        "classes": list(classes),
        "unseen_labels": unseen,
        "n_iter": int(clf.n_iter_),
        "converged": converged,
        "metrics": metrics,
        "runs": runs,
        "metrics_mean": {c: float(runs[c].mean()) for c in cols},
        "metrics_sd": {c: float(runs[c].std(ddof=1)) if len(runs) > 1 else float("nan") for c in cols},
    }
    return adata if copy else None


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
    return evaluate(labels, classes, order, held_out, confidence=_conf(proba, min_confidence))


def _conf(proba: np.ndarray, min_confidence: float | None):
    return None if min_confidence is None else (proba.max(axis=1), min_confidence)


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
    unseen = sorted(set(y_true) - set(map(str, classes)))
    if unseen:
        n_unseen = int(np.isin(y_true, unseen).sum())
        warnings.warn(
            f"{n_unseen} held-out cells carry labels absent from training ({format_examples(unseen)}); "
            "they count as errors in the metrics.",
            UserWarning,
            stacklevel=3,
        )
    pred = classes[order[held_out, 0]].astype(object)
    if confidence is not None:
        rejected = confidence[0][held_out] < confidence[1]
        pred[rejected] = UNKNOWN
    metrics = classification_metrics(y_true, pred.astype(str))
    if confidence is not None:
        metrics["rejection_rate"] = float(rejected.mean())
    metrics["top3_accuracy"] = float((classes[order[held_out]] == y_true[:, None]).any(axis=1).mean())
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
