"""scl.tl.map_labels: transfer labels from a labelled reference to a query, with an honest "unknown".

The classifier is ``knn_annotate``'s (same neighbour search, votes, tie rule and candidate
columns) across two AnnData objects. What it adds is rejection: a query cell whose vote is weak, or
which lies farther from its predicted type (or from the reference as a whole) than the reference's
own cells do, is called ``"unknown"`` instead of being forced into a reference label. The automatic
threshold is set on the quantity users pay for: the accuracy lost on known types, estimated by
leave-one-out on the reference.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from sc_llm._utils import format_examples, logger, maybe_copy, uns_params, warn_overwrite

from ._candidates import label_categories, top3_accuracy, write_candidates
from ._heads import UNKNOWN
from ._knn import APPROX_THRESHOLD, TIE_RULE, nearest_reference, rank_votes
from ._metrics import classification_metrics, get_rep

AUTO_LOSS = 0.025
AUTO_RULE = (
    "the largest threshold at which at most {pct:g} % of the reference's cells are classified correctly "
    "by leave-one-out yet rejected (the leave-one-out estimate of the accuracy lost on known types, in "
    "the reference, is at most {pct:g} points)"
)
CONFIDENCE_RULE = (
    "top vote fraction × typicality; typicality = min(1, 2 min(p_label, p_all)), conformal shares "
    "(1 + m) / (n + 1) of reference cells (leave-one-out, correctly classified) that lie at least as far "
    "from their neighbours as the cell: p_label among the predicted label's n cells (mean distance to the "
    "neighbours with that label), p_all among all n such cells (mean distance to all k neighbours)"
)
# Settings of uns[use_rep] that change the embedding besides the model itself.
_EMBED_SETTINGS = (
    "mode", "weighting", "prefix", "normalize", "max_length", "emb_layer", "emb_mode", "special_tokens", "n_genes",
)  # fmt: skip


def map_labels(
    query: AnnData,
    reference: AnnData,
    use_rep: str,
    labels_key: str,
    *,
    k: int = 10,
    metric: str = "cosine",
    min_confidence: float | str | None = "auto",
    key_added: str = "mapped",
    approx: bool | None = None,
    approx_threshold: int = APPROX_THRESHOLD,
    random_state: int = 0,
    copy: bool = False,
) -> AnnData | None:
    """Label query cells by their ``k`` nearest labelled reference cells, or call them ``"unknown"``.

    Both objects must hold the same embedding in ``obsm[use_rep]``, made by the same encoder
    (the model identity in ``uns[use_rep]["model"]`` is compared when both record it).

    Each query cell gets the majority label of its ``k`` nearest reference cells (ties: {tie_rule})
    and a confidence in [0, 1]: {confidence_rule} (with ``min_confidence=None`` no reference profile
    is fitted and the confidence is the top vote fraction). Cells below ``min_confidence`` are ``"unknown"``;
    their candidates stay in the ``_top{{i}}`` columns, so :func:`sc_llm.tl.llm_annotate`
    (``candidates_key=key_added``) can re-rank them.

    Parameters
    ----------
    query
        Cells to label.
    reference
        Labelled cells.
    use_rep
        ``obsm`` key of the embedding in both objects.
    labels_key
        ``reference.obs`` column with the labels (cells with a missing label are not used). When
        ``query.obs`` has the same column, metrics are computed.
    k
        Number of neighbours.
    metric
        Distance for the neighbour search (scikit-learn / pynndescent name).
    min_confidence
        ``"auto"``: from the reference itself, {auto_rule}; a float in [0, 1] sets the threshold;
        ``None`` disables rejection.
    key_added
        Prefix of the outputs.
    approx, approx_threshold, random_state
        Neighbour search as in :func:`sc_llm.tl.knn_annotate`: approximate (pynndescent) from
        ``approx_threshold`` reference cells when ``approx=None``.
    copy
        Return a copy of ``query`` instead of writing into it.

    Returns
    -------
    query : anndata.AnnData or None
        ``None`` or a copy of ``query``. Sets

        - ``obs[key_added]``: the label or ``"unknown"``;
        - ``obs[f"{{key_added}}_confidence"]``: the confidence (float in [0, 1]);
        - ``obs[f"{{key_added}}_top{{i}}"]`` / ``_top{{i}}_frac`` for i = 1..3: the three most voted labels
          and their vote fractions, as :func:`sc_llm.tl.knn_annotate` writes them;
        - ``uns[key_added]``: ``params``, ``threshold``, ``threshold_rule`` (how it was chosen),
          ``confidence_rule``, ``rejection_rate``, ``reference_loo`` (the threshold applied to the
          reference itself, leave-one-out: its ``accuracy``, share ``rejected`` and share
          ``correct_rejected``, an estimate of the accuracy the threshold costs on known types; empty with
          ``min_confidence=None``), ``n_reference``, ``reference_labels``, ``index``, and with query
          labels ``metrics``: ``accuracy`` (``"unknown"`` counts as wrong), ``accuracy_without_rejection``,
          ``accuracy_accepted``, ``known``/``novel`` (cells whose label is / is not in the reference:
          their accuracy with and without rejection, share rejected) and ``novel_labels``.

    Examples
    --------
    Half of pbmc68k is the reference, without its B cells; the other half is the query:

    >>> import sc_llm as scl
    >>> adata = scl.datasets.pbmc68k()
    >>> reference, query = adata[::2].copy(), adata[1::2].copy()
    >>> reference = reference[reference.obs["cell_type"] != "CD19+ B"].copy()
    >>> scl.tl.map_labels(query, reference, use_rep="X_pca", labels_key="cell_type")
    >>> query.obs.loc[query.obs["cell_type"] == "CD19+ B", "mapped"].value_counts().index[0]
    'unknown'
    """
    if k < 1:
        raise ValueError(f"k must be positive, got {k}.")
    query = maybe_copy(query, copy)
    Xq, Xr = get_rep(query, use_rep), get_rep(reference, use_rep)
    check_same_embedding(query, reference, use_rep, Xq, Xr)
    ref_labels = _reference_labels(reference, labels_key)
    keep = ref_labels.notna().to_numpy()
    Xr = Xr[keep]
    classes, codes = np.unique(ref_labels[keep].astype(str).to_numpy(), return_inverse=True)
    k = _effective_k(k, Xr.shape[0], min_confidence)
    use_approx = bool(Xr.shape[0] >= approx_threshold) if approx is None else bool(approx)
    search = {"metric": metric, "approx": use_approx, "random_state": random_state}

    idx, dist = nearest_reference(Xq, Xr, k, **search)
    ranked, fractions = rank_votes(codes[idx], len(classes), k)
    profile = None
    if min_confidence is not None:
        profile = _ReferenceProfile.fit(Xr, codes, len(classes), k, search)
    confidence = (
        fractions[:, 0] if profile is None else profile.confidence(ranked, fractions, idx, dist, codes)
    )
    threshold, rule = _threshold(min_confidence, profile)
    rejected = confidence < threshold if threshold is not None else np.zeros(len(confidence), dtype=bool)

    query_labels = query.obs[labels_key] if labels_key in query.obs else None
    categories = [*label_categories(classes, query_labels), UNKNOWN]
    write_candidates(query, key_added, classes, ranked, fractions, list(dict.fromkeys(categories)))
    best = query.obs[key_added].astype(object).to_numpy()
    best[rejected] = UNKNOWN
    query.obs[key_added] = pd.Categorical(best, categories=query.obs[key_added].cat.categories)
    warn_overwrite(query.obs, f"{key_added}_confidence", "adata.obs")
    query.obs[f"{key_added}_confidence"] = confidence.astype(np.float32)

    warn_overwrite(query.uns, key_added, "adata.uns")
    query.uns[key_added] = {
        "params": {
            "use_rep": use_rep, "labels_key": labels_key, "k": k, "metric": metric,
            "min_confidence": "none" if min_confidence is None else min_confidence, "random_state": random_state,
        },
        "threshold": float("nan") if threshold is None else float(threshold),
        "threshold_rule": rule,
        "confidence_rule": CONFIDENCE_RULE if profile is not None else "top vote fraction",
        "rejection_rate": float(rejected.mean()),
        "reference_loo": {} if profile is None else profile.effect(threshold),
        "n_reference": int(Xr.shape[0]),
        "reference_labels": [str(c) for c in classes],
        "index": "pynndescent (approximate)" if use_approx else "exact",
        "tie_rule": TIE_RULE,
        "metrics": {} if query_labels is None else _metrics(query_labels, classes, ranked, fractions, rejected),
    }  # fmt: skip
    logger.info("map_labels: %d query cells, %.1f %% unknown.", query.n_obs, 100 * rejected.mean())
    return query if copy else None


map_labels.__doc__ = map_labels.__doc__.format(
    tie_rule=TIE_RULE,
    confidence_rule=CONFIDENCE_RULE,
    auto_rule=AUTO_RULE.format(pct=100 * AUTO_LOSS),
)


def check_same_embedding(
    query: AnnData, reference: AnnData, use_rep: str, Xq: np.ndarray, Xr: np.ndarray
) -> None:
    """Refuse embeddings of different dimension or from different encoders (as recorded in ``uns``)."""
    if Xq.shape[1] != Xr.shape[1]:
        raise ValueError(
            f"obsm[{use_rep!r}] has {Xq.shape[1]} dimensions in the query but {Xr.shape[1]} in the reference: "
            "embed both with the same model."
        )
    q_info, r_info = uns_params(query, use_rep), uns_params(reference, use_rep)
    if not (q_info and r_info):
        return
    q_model, r_model = _model_key(q_info.get("model")), _model_key(r_info.get("model"))
    if q_model is not None and r_model is not None and q_model != r_model:
        raise ValueError(
            f"obsm[{use_rep!r}] comes from different encoders: query {q_model}, reference {r_model} "
            f"(uns[{use_rep!r}]['params']['model']). Embed the query with the reference's model."
        )
    # embed_text records no "mode"; embed_text_genes records "gene" (same model, another embedding).
    q_info, r_info = ({"mode": "sentence", **info} for info in (q_info, r_info))
    differ = [s for s in _EMBED_SETTINGS if s in q_info and s in r_info and str(q_info[s]) != str(r_info[s])]
    if differ:
        raise ValueError(
            f"obsm[{use_rep!r}] was made with different settings in query and reference: "
            + ", ".join(f"{s} {q_info[s]!r} vs {r_info[s]!r}" for s in differ)
            + ". Embed both the same way."
        )


def _model_key(model: Any) -> tuple | None:
    """What identifies an encoder: its weights digest when recorded, else its name (or path) and size."""
    if not isinstance(model, Mapping):
        return None
    if "weights_sha256" in model:
        return ("weights_sha256", str(model["weights_sha256"]))
    name = model.get("name", model.get("path"))
    return None if name is None else ("name", str(name), str(model.get("dim")))


def _reference_labels(reference: AnnData, labels_key: str) -> pd.Series:
    if labels_key not in reference.obs:
        raise KeyError(
            f"Column {labels_key!r} not found in reference.obs; available: {list(reference.obs.columns)}."
        )
    labels = reference.obs[labels_key]
    n = int(labels.notna().sum())
    if n < 2:
        raise ValueError(
            f"map_labels needs at least 2 reference cells with a label in obs[{labels_key!r}], found {n}."
        )
    if str(UNKNOWN) in set(labels.dropna().astype(str)):
        raise ValueError(
            f"reference.obs[{labels_key!r}] uses the label {UNKNOWN!r}, which map_labels writes for rejected "
            "cells: rename it or set those cells' labels to NaN."
        )
    return labels


def _effective_k(k: int, n_ref: int, min_confidence) -> int:
    # Leave-one-out on the reference needs k + 1 reference cells.
    limit = n_ref - 1 if min_confidence is not None else n_ref
    if k > limit:
        logger.warning("map_labels: only %d reference cells for k=%d; using k=%d.", n_ref, k, limit)
        return limit
    return k


class _ReferenceProfile:
    """How far the reference's own correctly classified cells lie from their neighbours (leave-one-out).

    Two yardsticks: per label (distance to the neighbours carrying that label) and over all labels
    (distance to all k neighbours). A label whose cells are spread out makes the first lenient; the
    second still flags a cell far from every reference cell, e.g. a missing type next to a diffuse one.
    """

    def __init__(self, label_dists: list[np.ndarray], all_dists: np.ndarray):
        self.label_dists = label_dists
        self.all_dists = all_dists
        self.loo_confidence = np.empty(0)
        self.loo_correct = np.empty(0, dtype=bool)

    @classmethod
    def fit(
        cls, Xr: np.ndarray, codes: np.ndarray, n_classes: int, k: int, search: dict
    ) -> _ReferenceProfile:
        idx, dist = nearest_reference(Xr, Xr, k, self_pos=np.arange(Xr.shape[0]), **search)
        ranked, fractions = rank_votes(codes[idx], n_classes, k)
        d = _same_label_distance(ranked, idx, dist, codes)
        correct = ranked[:, 0] == codes
        ok = correct if correct.any() else np.ones_like(correct)
        pooled = np.sort(d[ok])
        # A label with fewer than 3 correctly classified cells borrows the pooled distribution.
        dists = [np.sort(d[ok & (codes == c)]) for c in range(n_classes)]
        profile = cls([x if x.size >= 3 else pooled for x in dists], np.sort(dist[ok].mean(axis=1)))
        profile.loo_correct = correct
        profile.loo_confidence = profile.confidence(ranked, fractions, idx, dist, codes, in_profile=ok)
        return profile

    def confidence(self, ranked, fractions, idx, dist, codes, in_profile=None) -> np.ndarray:
        """Confidence of cells with these neighbours.

        ``in_profile``: cells whose own distances are in the profile (reference cells, leave-one-out).
        """
        d = _same_label_distance(ranked, idx, dist, codes)
        inside = np.zeros(d.size, dtype=bool) if in_profile is None else in_profile
        p = np.empty(d.size)
        for c, ref in enumerate(self.label_dists):
            m = ranked[:, 0] == c
            p[m] = _conformal_p(ref, d[m], inside[m])
        p = np.minimum(p, _conformal_p(self.all_dists, dist.mean(axis=1), inside))
        return fractions[:, 0] * np.minimum(1.0, 2 * p)

    def auto_threshold(self) -> float:
        """Largest threshold rejecting at most AUTO_LOSS of the reference's cells, among those correct.

        "Correct": classified correctly by leave-one-out.
        """
        conf, correct = self.loo_confidence, self.loo_correct
        ok = np.sort(conf[correct]) if correct.any() else np.sort(conf)
        # Rejection is `confidence < threshold`: at most n cells lie below ok[n].
        n = int(np.floor(AUTO_LOSS * conf.size))
        return float(ok[min(n, ok.size - 1)])

    def effect(self, threshold: float) -> dict[str, float]:
        """What the threshold does to the reference itself (leave-one-out): an estimate of its cost."""
        rejected = self.loo_confidence < threshold
        return {
            "accuracy": float(self.loo_correct.mean()),
            "rejected": float(rejected.mean()),
            "correct_rejected": float((rejected & self.loo_correct).mean()),
        }


def _conformal_p(ref: np.ndarray, d: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Share of the sorted ``ref`` at least ``d`` (conformal p-value).

    A new cell counts itself among the n + 1, so p is never 0 and a small reference cannot reject on
    distance alone; a cell inside ``ref`` (leave-one-out) is already counted.
    """
    at_least = ref.size - np.searchsorted(ref, d, side="left")
    return np.where(inside, at_least / ref.size, (at_least + 1) / (ref.size + 1))


def _same_label_distance(ranked, idx, dist, codes) -> np.ndarray:
    """Mean distance to those of the k neighbours that carry the cell's top label."""
    same = codes[idx] == ranked[:, [0]]
    return (dist * same).sum(axis=1) / np.maximum(same.sum(axis=1), 1)


def _threshold(min_confidence, profile: _ReferenceProfile | None) -> tuple[float | None, str]:
    if min_confidence is None:
        return None, "none (rejection disabled)"
    if isinstance(min_confidence, str):
        if min_confidence != "auto":
            raise ValueError(
                f"min_confidence must be 'auto', a float in [0, 1] or None, got {min_confidence!r}."
            )
        return profile.auto_threshold(), "auto: " + AUTO_RULE.format(pct=100 * AUTO_LOSS)
    value = float(min_confidence)
    if not 0 <= value <= 1:
        raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence!r}.")
    return value, "given"


def _metrics(labels: pd.Series, classes, ranked, fractions, rejected) -> dict[str, Any]:
    has = labels.notna().to_numpy()
    if not has.any():
        return {}
    y = labels.to_numpy()[has].astype(str)
    top = np.asarray(classes, dtype=object)[ranked[has, 0]]
    pred = np.where(rejected[has], UNKNOWN, top)
    known = np.isin(y, np.asarray(classes, dtype=str))
    metrics: dict[str, Any] = classification_metrics(y, pred)
    metrics |= {
        "accuracy_without_rejection": float((top == y).mean()),
        "accuracy_accepted": float((pred == y)[~rejected[has]].mean())
        if (~rejected[has]).any()
        else float("nan"),
        "top3_accuracy": top3_accuracy(classes, ranked[has], y, fractions[has]),
        "known": _group(y, top, pred, known),
        "novel": _group(y, top, pred, ~known),
        "novel_labels": sorted(set(y[~known])),
    }
    if (~known).any():
        logger.info(
            "map_labels: %d query cells carry labels absent from the reference (%s); %.0f %% of them are unknown.",
            int((~known).sum()), format_examples(sorted(set(y[~known]))), 100 * (pred[~known] == UNKNOWN).mean(),
        )  # fmt: skip
    return metrics


def _group(y, top, pred, mask) -> dict[str, float]:
    if not mask.any():
        return {"n_cells": 0}
    return {
        "n_cells": int(mask.sum()),
        "accuracy": float((pred[mask] == y[mask]).mean()),
        "accuracy_without_rejection": float((top[mask] == y[mask]).mean()),
        "rejected": float((pred[mask] == UNKNOWN).mean()),
    }
