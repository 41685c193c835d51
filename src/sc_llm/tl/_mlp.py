"""scl.tl.mlp_annotate: the paper's "encoder + MLP" baseline (scikit-learn's default ``MLPClassifier``)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from sc_llm._docs import doc_copy, doc_params, doc_random_state, doc_split
from sc_llm._utils import logger, maybe_copy

from ._heads import check_runs, held_out_metrics, summarize_runs, training_cells, write_predictions
from ._metrics import get_labels, get_rep


@doc_params(doc_split=doc_split, doc_random_state=doc_random_state, doc_copy=doc_copy)
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
    {doc_split}
    n_runs
        Number of fits with seeds ``random_state, random_state + 1, …``; held-out metrics per run
        are in ``uns[key_added]["runs"]`` with their mean and sample standard deviation (ddof=1).
        Predictions come from the first run.
    min_confidence
        Cells whose highest class probability is below this are labelled ``"unknown"`` in
        ``obs[key_added]`` (they count as errors in the metrics; the rejected fraction is
        ``metrics["rejection_rate"]``). ``None`` never rejects. The highest probability is written to
        ``obs[f"{key_added}_confidence"]`` either way.
    {doc_random_state}
    key_added
        Prefix of the outputs.
    {doc_copy}
    **mlp_kwargs
        Passed to ``sklearn.neural_network.MLPClassifier`` (leave empty for the paper's defaults).

    Returns
    -------
    adata : anndata.AnnData or None
        ``None`` or a copy. Sets, as :func:`sc_llm.tl.knn_annotate` does,

        - ``obs[key_added]``: prediction for every cell (``"unknown"`` below ``min_confidence``);
          ``obs[f"{key_added}_confidence"]``: its highest class probability;
        - ``obs[f"{key_added}_top{i}"]`` and ``obs[f"{key_added}_top{i}_frac"]`` (i = 1..3): the three
          most probable labels and their probabilities;
        - ``obsm[f"{key_added}_proba"]``: class probabilities, columns in ``uns[key_added]["classes"]`` order;
        - ``uns[key_added]``: ``"params"`` (this call's settings, with the classifier's in
          ``"mlp_params"``), ``"classes"``, ``"unseen_labels"`` (labels seen only outside training),
          ``"n_iter"`` and ``"converged"`` of the first run, ``"metrics"``
          (accuracy, macro precision/recall/F1, top-3 accuracy) on the labelled non-training cells,
          ``"runs"`` (metrics per seed), ``"metrics_mean"`` and ``"metrics_sd"``.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    check_runs(n_runs, min_confidence)
    adata = maybe_copy(adata, copy)
    X = get_rep(adata, use_rep)
    labels = get_labels(adata, labels_key)
    train, y_train, classes = training_cells(adata, labels, split_key, train_value)
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
            metrics_i = held_out_metrics(proba, labels, train, classes, min_confidence)
            rows.append({"run": i, "seed": random_state + i, **metrics_i})
    clf, converged, proba = fits[0]
    if not converged:
        logger.info("mlp_annotate: MLPClassifier stopped at max_iter=%d before converging.", clf.max_iter)
    metrics, unseen = write_predictions(
        adata, key_added, classes, proba, labels, train, min_confidence=min_confidence
    )
    runs = pd.DataFrame([{"run": 0, "seed": random_state, **metrics}, *rows])
    adata.uns[key_added] = {
        "params": {
            "use_rep": use_rep,
            "labels_key": labels_key,
            "split_key": split_key,
            "train_value": train_value,
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
        **summarize_runs(runs),
    }
    return adata if copy else None
