"""scl.tl.compare_annotators: the paper's Table 3 (fused vs each encoder + MLP vs kNN) from one call."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from anndata import AnnData

from sc_llm._docs import doc_params, doc_random_state, doc_split

from ._heads import collect_reps
from ._metrics import get_labels, mean_sd, train_mask

if TYPE_CHECKING:
    from sc_llm.models._training import FusionConfig

METHODS = ("knn", "mlp", "head", "fusion")
METRICS = ("accuracy", "precision", "recall", "f1")


@doc_params(doc_split=doc_split, doc_random_state=doc_random_state)
def compare_annotators(
    adata: AnnData,
    use_reps: Sequence[str],
    labels_key: str,
    *,
    split_key: str = "split",
    train_value: str = "train",
    methods: Sequence[str] = ("knn", "mlp", "fusion"),
    n_runs: int = 5,
    random_state: int = 0,
    k: int = 10,
    mlp_kwargs: Mapping[str, Any] | None = None,
    fusion_config: FusionConfig | None = None,
    fusion_kwargs: Mapping[str, Any] | None = None,
    key_added: str = "annotator_comparison",
) -> pd.DataFrame:
    """Held-out metrics of kNN, MLP and fused annotators on the same split, as in the paper's Table 3.

    Rows, in order: ``"<rep> + kNN"`` for each representation (:func:`~sc_llm.tl.knn_annotate`,
    deterministic: one run), ``"<rep> + MLP"`` (:func:`~sc_llm.tl.mlp_annotate`, scikit-learn's
    default ``MLPClassifier``, one run per seed), ``"<rep> + fusion head"`` (only with
    ``"head"`` in ``methods``: :func:`~sc_llm.tl.fuse_train` on that representation alone), and
    ``"scMPT (<rep> + <rep>…)"`` (:func:`~sc_llm.tl.fuse_train` on all of them).

    Parameters
    ----------
    adata
        AnnData or MuData (representations resolved as in :func:`~sc_llm.tl.fuse_train`).
    use_reps
        Representations to compare and fuse (two or more for a fused row).
    labels_key
        ``obs`` column with the labels.
    {doc_split}
    methods
        Any of ``"knn"``, ``"mlp"``, ``"head"``, ``"fusion"``.
    n_runs
        Seeds ``random_state, …, random_state + n_runs - 1`` for the trained annotators.
    {doc_random_state}
    k
        Neighbours of the kNN rows.
    mlp_kwargs
        Extra arguments of :func:`~sc_llm.tl.mlp_annotate`, i.e. of scikit-learn's ``MLPClassifier``
        (e.g. ``max_iter``).
    fusion_config
        Training settings of the fused (and ``"head"``) rows, passed to :func:`~sc_llm.tl.fuse_train`
        as ``config`` (e.g. ``FusionConfig(architecture="paper", hidden=4096)``).
    fusion_kwargs
        Other arguments of :func:`~sc_llm.tl.fuse_train` (e.g. ``report_inputs``, ``device``).
    key_added
        ``uns`` key of the result.

    Returns
    -------
    table : pandas.DataFrame
        One row per annotator (index ``model``) with columns ``method``, ``use_reps``, ``n_runs``, and for
        each of accuracy, precision, recall and F1 (macro) the mean over runs and its sample standard
        deviation (``<metric>_sd``, ddof=1; NaN for a single run). Also stored, with the per-run table
        (``runs``: one row per annotator and seed) and, with a fused row, ``paired`` (the fused model
        minus each other trained row over the shared seeds, see ``sc_llm.tl._compare.paired_comparison``), in
        ``uns[key_added]``. ``adata``'s ``obs`` and
        ``obsm`` are left untouched: the annotators write into a light copy holding only labels, split
        and representations.
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {list(METHODS)}; unknown: {unknown}.")
    if n_runs < 1:
        raise ValueError(f"n_runs must be positive, got {n_runs}.")
    use_reps = list(use_reps) if not isinstance(use_reps, str) else [use_reps]
    light = _light_copy(adata, use_reps, labels_key, split_key, train_value)
    seeds = [random_state + i for i in range(n_runs)]
    rows: list[dict] = []
    with warnings.catch_warnings():
        # Each annotator re-warns about the same unseen labels; warn once below instead.
        warnings.filterwarnings("ignore", message=".*labels absent from training.*")
        # The light copy is private; successive annotators reuse its keys.
        warnings.filterwarnings("ignore", message=".*already exists and will be overwritten.*")
        if "knn" in methods:
            rows += [_knn_row(light, rep, labels_key, k) for rep in use_reps]
        if "mlp" in methods:
            rows += [_mlp_row(light, rep, labels_key, seed, mlp_kwargs) for rep in use_reps for seed in seeds]
        if "head" in methods:
            rows += [
                r
                for rep in use_reps
                for r in _fusion_rows(light, [rep], labels_key, seeds, fusion_config, fusion_kwargs)
            ]
        if "fusion" in methods:
            if len(use_reps) < 2:
                raise ValueError(f"A fused row needs at least two representations, got {use_reps}.")
            rows += _fusion_rows(light, use_reps, labels_key, seeds, fusion_config, fusion_kwargs)
    runs = pd.DataFrame(rows)
    summary = _summarize(runs)
    _warn_unseen(light, labels_key)
    adata.uns[key_added] = {
        "params": {
            "use_reps": use_reps,
            "labels_key": labels_key,
            "split_key": split_key,
            "train_value": train_value,
            "methods": list(methods),
            "n_runs": n_runs,
            "random_state": random_state,
            "k": k,
        },
        "summary": summary.reset_index(),
        "runs": runs,
    }
    fused = summary.index[summary["method"] == "fusion"]
    if len(fused):
        # Same seeds for every trained row: the fused model's paired differences to each of them.
        adata.uns[key_added]["paired"] = paired_comparison(runs, fused[0]).reset_index()
    return summary


def paired_comparison(
    runs: pd.DataFrame,
    reference: str,
    *,
    by: str = "model",
    pair: str = "seed",
    metrics: Sequence[str] = METRICS,
) -> pd.DataFrame:
    """Mean (sd) per model over runs, and each model's paired difference to ``reference`` over seeds.

    ``runs`` has one row per model and seed (columns ``by``, ``pair`` and the metrics). For every
    model other than ``reference`` and every metric in ``("accuracy", "f1")``, ``delta_<metric>`` is
    the mean over shared seeds of reference − model (positive: the reference is better),
    ``delta_<metric>_sd`` its sample sd, ``wins``/``ties``/``losses`` count seeds where the reference's
    accuracy is higher/equal/lower, and ``p_accuracy`` is the paired t-test p-value (NaN with fewer
    than two seeds or identical differences). Rows without a seed (kNN) get no paired columns.
    """
    from scipy.stats import ttest_rel

    ref = runs[runs[by] == reference].dropna(subset=[pair]).set_index(pair)
    rows = []
    for model, group in runs.groupby(by, sort=False):
        row: dict[str, Any] = {by: model, "n_runs": len(group)}
        for m in metrics:
            row[m], row[f"{m}_sd"] = mean_sd(group[m])
        paired = group.dropna(subset=[pair]).set_index(pair)
        common = ref.index.intersection(paired.index)
        if model != reference and len(common):
            for m in ("accuracy", "f1"):
                d = ref.loc[common, m].to_numpy(float) - paired.loc[common, m].to_numpy(float)
                row[f"delta_{m}"], row[f"delta_{m}_sd"] = mean_sd(d)
            d = ref.loc[common, "accuracy"].to_numpy(float) - paired.loc[common, "accuracy"].to_numpy(float)
            row.update(wins=int((d > 0).sum()), ties=int((d == 0).sum()), losses=int((d < 0).sum()))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                same = d.size < 2 or np.allclose(d, d[0])
                row["p_accuracy"] = (
                    float("nan")
                    if same
                    else float(ttest_rel(ref.loc[common, "accuracy"], paired.loc[common, "accuracy"]).pvalue)
                )
        rows.append(row)
    return pd.DataFrame(rows).set_index(by)


def format_table(summary: pd.DataFrame, metrics: Sequence[str] = METRICS, digits: int = 3) -> pd.DataFrame:
    """The summary as strings ``"mean (sd)"`` per metric, as the paper prints its tables."""
    out = pd.DataFrame(index=summary.index)
    for m in metrics:
        mean, sd = summary[m], summary[f"{m}_sd"]
        out[m] = [
            f"{a:.{digits}f}" if np.isnan(s) else f"{a:.{digits}f} ({s:.{digits + 1}f})"
            for a, s in zip(mean, sd, strict=True)
        ]
    return out


def _light_copy(adata, use_reps, labels_key, split_key, train_value) -> AnnData:
    """Labels, split and representations only: no expression matrix is copied."""
    labels = get_labels(adata, labels_key)
    train_mask(adata, split_key, train_value)
    reps = collect_reps(adata, use_reps)
    if labels_key == split_key:
        raise ValueError(f"labels_key and split_key are both {labels_key!r}.")
    obs = pd.DataFrame(
        {labels_key: labels.to_numpy(), split_key: adata.obs[split_key].to_numpy()}, index=adata.obs_names
    )
    if isinstance(labels.dtype, pd.CategoricalDtype):
        obs[labels_key] = pd.Categorical(obs[labels_key], categories=labels.cat.categories)
    light = AnnData(obs=obs, obsm=dict(zip(use_reps, reps, strict=True)))
    light.uns["_train_value"] = train_value
    light.uns["_split_key"] = split_key
    return light


def _annotate(light: AnnData, fn, reps, labels_key: str, key: str, **kwargs) -> Mapping:
    """Run one annotator on the light copy's split; return its ``uns`` record."""
    split = {"split_key": light.uns["_split_key"], "train_value": light.uns["_train_value"]}
    fn(light, reps, labels_key, **split, key_added=key, **kwargs)
    return light.uns[key]


def _knn_row(light: AnnData, rep: str, labels_key: str, k: int) -> dict:
    from ._knn import knn_annotate

    record = _annotate(light, knn_annotate, rep, labels_key, "knn", k=k)
    return _row(f"{rep} + kNN", "knn", rep, np.nan, record["metrics"])


def _mlp_row(light: AnnData, rep: str, labels_key: str, seed: int, kwargs) -> dict:
    from ._mlp import mlp_annotate

    record = _annotate(light, mlp_annotate, rep, labels_key, "mlp", random_state=seed, **dict(kwargs or {}))
    return _row(f"{rep} + MLP", "mlp", rep, seed, record["metrics"])


def _fusion_rows(
    light: AnnData, reps: list[str], labels_key: str, seeds: list[int], config, kwargs
) -> list[dict]:
    from ._fusion import fuse_train

    kwargs = dict(kwargs or {})
    if config is not None:
        if "config" in kwargs:
            raise ValueError("Pass the fusion config once: as fusion_config or as fusion_kwargs['config'].")
        kwargs["config"] = config
    for reserved in ("n_runs", "random_state", "key_added", "split_key", "train_value"):
        if reserved in kwargs:
            raise ValueError(f"fusion_kwargs must not set {reserved!r}; compare_annotators sets it.")
    record = _annotate(
        light, fuse_train, reps, labels_key, "fusion", n_runs=len(seeds), random_state=seeds[0], **kwargs
    )
    name, method = (
        (f"{reps[0]} + fusion head", "head") if len(reps) == 1 else (f"scMPT ({' + '.join(reps)})", "fusion")
    )
    return [_row(name, method, " + ".join(reps), int(r["seed"]), r) for _, r in record["runs"].iterrows()]


def _row(model: str, method: str, reps: str, seed, metrics: Mapping) -> dict:
    return {
        "model": model,
        "method": method,
        "use_reps": reps,
        "seed": seed,
        **{m: float(metrics[m]) for m in METRICS},
    }


def _summarize(runs: pd.DataFrame) -> pd.DataFrame:
    grouped = runs.groupby("model", sort=False)
    summary = grouped[["method", "use_reps"]].first()
    summary["n_runs"] = grouped.size()
    for m in METRICS:
        summary[m] = grouped[m].mean()
        summary[f"{m}_sd"] = grouped[m].std(ddof=1)
    return summary


def _warn_unseen(light: AnnData, labels_key: str) -> None:
    labels = light.obs[labels_key]
    train = (light.obs[light.uns["_split_key"]].astype(str) == str(light.uns["_train_value"])).to_numpy()
    known = labels.notna().to_numpy()
    unseen = sorted(set(labels[known & ~train].astype(str)) - set(labels[known & train].astype(str)))
    if unseen:
        warnings.warn(
            f"Held-out labels absent from training count as errors in every row: {list(unseen)}.",
            UserWarning,
            stacklevel=3,
        )
