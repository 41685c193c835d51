"""scl.tl.fuse_train / scl.tl.fuse_predict: train and apply fusion heads on frozen embeddings.

Paper §3.2, §4.2, Figure 1 and Appendix A.2. This module is the AnnData/MuData side: it reads the
representations, labels and split, calls :func:`sc_llm.models.train_fusion` (the network is
:class:`sc_llm.models.FusionModel`; the training procedures, grid search, folds and seeds live in
``sc_llm/models/_training.py``), and writes predictions to ``obs``/``obsm`` and parameters, metrics
per run and the per-input comparison to ``uns``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from anndata import AnnData

from sc_llm._docs import doc_params, doc_random_state, doc_split
from sc_llm.models._training import FusionConfig, FusionFit, train_fusion

from ._compare import paired_comparison
from ._heads import (
    check_runs,
    collect_reps,
    held_out_metrics,
    summarize_runs,
    training_cells,
    write_predictions,
)
from ._metrics import get_labels, train_mask

if TYPE_CHECKING:
    from sc_llm.models._fusion import FusionModel

@doc_params(doc_split=doc_split, doc_random_state=doc_random_state)
def fuse_train(
    adata: AnnData,
    use_reps: Sequence[str],
    labels_key: str,
    *,
    split_key: str = "split",
    train_value: str = "train",
    config: FusionConfig | None = None,
    n_runs: int = 1,
    report_inputs: bool = True,
    min_confidence: float | None = None,
    random_state: int = 0,
    device: str | None = None,
    key_added: str = "fusion",
) -> FusionModel:
    """Train a fusion classifier on any set of frozen embeddings and label every cell.

    Two architectures (``config.architecture``; see :class:`~sc_llm.models.FusionModel`):

    ``"stacked"`` (default)
        One expert per representation (``Linear(dim, hidden) + ReLU + Linear``). The training cells
        are split into ``n_folds`` stratified folds; experts trained on the other folds predict each
        fold, every epoch, so every training cell gets an out-of-fold prediction. Each expert's
        number of epochs is the one with the lowest out-of-fold loss (all training cells, not a small
        validation split), and the fused logits ``sum_m mix[m] * log_softmax(expert_m)`` get their
        non-negative weights from the out-of-fold predictions (cross-entropy, L-BFGS). The weights
        are kept only if, fitted fold by fold and scored on the held-out fold, they classify more
        training cells correctly than the best expert alone does out of fold; otherwise the fused
        model is that expert (``uns[key_added]["mix_used"]``). The experts are then retrained on
        all training cells. An input that adds nothing gets a weight near zero, so the fused model
        stays close to its best input; complementary inputs add up.
    ``"paper"``
        scMPT as in the paper (Figure 1, Appendix A.2): each representation through its own
        ``Linear(dim, 4096) + ReLU``, outputs concatenated, a linear output layer; AdamW with an
        exponential learning-rate decay (stepped once per epoch), mini-batch cross-entropy, early
        stopping on the loss of a stratified validation split carved from the training cells (best
        weights restored), and the grid search of ``param_grid``. One representation gives the
        single-encoder "+ MLP" head.

    Parameters
    ----------
    adata
        AnnData, or MuData with one modality per representation (see Notes).
    use_reps
        Representations to fuse, e.g. ``["X_text", "X_scgpt"]``; any number (one = single head).
    labels_key
        ``obs`` column with the labels (cell type, phenotype…). Cells with NaN are never trained on.
    {doc_split}
    config
        Training settings (architecture, width, epochs, learning rate and its decay, batch size,
        weight decay, standardization, folds, validation split, patience, grid search, class
        weights): a :class:`~sc_llm.models.FusionConfig`; ``None`` uses its defaults (the stacked
        architecture). ``FusionConfig(architecture="paper")`` is the paper's recipe.
    n_runs
        Number of final trainings with seeds ``random_state, random_state + 1, …``; held-out
        metrics are reported per run, with mean and sample standard deviation (ddof=1). The seed
        changes initialisation and batch order (``"stacked"``: also the folds; ``"paper"``: the
        validation split drawn with ``random_state`` is shared by all runs).
    report_inputs
        With several representations, also report each one alone, trained the same way and with
        the same seeds, next to the fused model (``uns[key_added]["inputs"]`` and
        ``["comparison"]``, with a paired comparison across seeds). Free for ``"stacked"`` (its
        experts are those single-input models); ``"paper"`` trains one extra head per input and run.
    min_confidence
        Cells whose highest class probability is below this are labelled ``"unknown"`` in
        ``obs[key_added]`` (and count as errors in the metrics); ``None`` never rejects. The top-3
        columns and ``obs[f"{key_added}_confidence"]`` (the highest probability) are always written.
    {doc_random_state}
    device
        Torch device; ``None`` picks CUDA, then MPS, else CPU.
    key_added
        Prefix of the outputs.

    Returns
    -------
    model : sc_llm.models.FusionModel
        The trained :class:`~sc_llm.models.FusionModel` of the first run (seed ``random_state``), in
        eval mode. Also sets, in ``adata`` (``mdata`` for MuData):

        - ``obs[key_added]``: prediction for every cell; ``obs[f"{key_added}_confidence"]``;
          ``obs[f"{key_added}_top{i}"]`` and ``obs[f"{key_added}_top{i}_frac"]`` (i = 1..3): the three
          most probable labels and their probabilities;
        - ``obsm[f"{key_added}_proba"]``: class probabilities, columns in ``uns[key_added]["classes"]``;
        - ``uns[key_added]``: ``params`` (the call's settings, with the config's fields resolved;
          ``None`` is written as ``-1`` or ``"None"`` and mappings as text, for h5ad), the chosen ``hyperparameters``, ``classes``, ``unseen_labels``
          (held-out labels absent from training), ``n_train``, ``n_validation``, ``metrics`` (accuracy, macro precision/recall/F1,
          top-3 accuracy of the returned model, rejection rate), ``runs`` (metrics per seed),
          ``metrics_mean`` and ``metrics_sd`` over runs, ``history`` (``"paper"``: per-epoch train and
          validation loss, validation accuracy and learning rate of the returned model; ``"stacked"``:
          per-epoch out-of-fold loss and accuracy of each expert), ``grid`` (``"paper"``), ``mix``
          (``"stacked"``: the weight, epochs and out-of-fold accuracy of each input; with ``mix_used``
          and ``oof_accuracy_mix``, the nested out-of-fold accuracy of the mix), and with ``report_inputs``
          ``inputs`` (per run and model: metrics) and ``comparison`` (per model: mean and sd of each
          metric over runs; for each single input, the paired difference fused − input over seeds:
          mean, sd, wins/ties/losses and the paired t-test p-value).

    Notes
    -----
    With a MuData, each name in ``use_reps`` is resolved as follows: the name of a modality means
    that modality's ``X`` (densified); ``"modality:key"`` means ``mdata.mod[modality].obsm[key]``;
    any other name is a key of ``mdata.obsm``. Rows are aligned to ``mdata.obs_names`` (every cell
    must be present in each modality used); labels and split are read from ``mdata.obs`` and
    results are written to ``mdata.obs`` / ``mdata.obsm`` / ``mdata.uns``.

    Examples
    --------
    >>> import sc_llm as scl
    >>> adata = scl.datasets.pbmc68k()
    >>> scl.pp.train_test_split(adata, "cell_type", random_state=0)
    >>> config = scl.tl.FusionConfig(hidden=32, epochs=10)  # small and quick, for the example
    >>> model = scl.tl.fuse_train(adata, ["X_pca", "X_umap"], "cell_type", config=config)
    >>> adata.obsm["fusion_proba"].shape  # cells × classes
    (700, 10)
    >>> sorted(adata.uns["fusion"]["metrics"])
    ['accuracy', 'f1', 'n_cells', 'precision', 'recall', 'top3_accuracy']
    """
    config = (FusionConfig() if config is None else config).resolved()
    check_runs(n_runs, min_confidence)
    reps = collect_reps(adata, use_reps)
    labels = get_labels(adata, labels_key)
    train, y_train, classes = training_cells(adata, labels, split_key, train_value)
    train_pos = np.flatnonzero(train)
    fit = train_fusion(
        [X[train_pos] for X in reps],
        np.searchsorted(classes, y_train),
        classes,
        use_reps,
        config,
        n_runs=n_runs,
        report_inputs=report_inputs,
        random_state=random_state,
        device=device,
    )
    model, history = fit.runs[0]
    metrics, unseen = write_predictions(
        adata, key_added, classes, model.predict_proba(reps), labels, train, min_confidence=min_confidence
    )
    runs = pd.DataFrame(
        [
            {
                "run": i,
                "seed": random_state + i,
                **held_out_metrics(m.predict_proba(reps), labels, train, classes, min_confidence),
            }
            for i, (m, _) in enumerate(fit.runs)
        ]
    )
    call = {
        "use_reps": list(use_reps),
        "labels_key": labels_key,
        "split_key": split_key,
        "train_value": train_value,
        "n_runs": n_runs,
        "report_inputs": report_inputs,
        "min_confidence": min_confidence,
        "random_state": random_state,
    }
    uns = {
        "params": {**_h5ad_safe(call), **config_params(config), "device": str(fit.device)},
        "hyperparameters": fit.hyperparameters,
        "classes": list(classes),
        "unseen_labels": unseen,
        "n_train": fit.n_train,
        "n_validation": fit.n_validation,
        "metrics": metrics,
        "runs": runs,
        **summarize_runs(runs),
        "history": history,
        **_architecture_results(model, fit, use_reps),
    }
    if report_inputs and len(reps) > 1:
        inputs = _input_table(fit, use_reps, reps, labels, train, classes, random_state)
        uns["inputs"] = inputs
        uns["comparison"] = paired_comparison(inputs, reference="fused")
    adata.uns[key_added] = uns
    return model


def fuse_predict(
    adata: AnnData,
    model: FusionModel | str | Path,
    *,
    use_reps: Sequence[str] | None = None,
    labels_key: str | None = None,
    split_key: str | None = None,
    train_value: str = "train",
    batch_size: int = 1024,
    min_confidence: float | None = None,
    device: str | None = None,
    key_added: str = "fusion",
) -> None:
    """Apply a trained fusion model (or a directory written by ``model.save``) to new cells.

    Parameters
    ----------
    adata
        AnnData or MuData holding the representations the model was trained on.
    model
        A :class:`~sc_llm.models.FusionModel` or the path of a saved one.
    use_reps
        Keys to read, in the model's order, when they are named differently here than in training
        (default: ``model.use_reps``).
    labels_key
        Optional ``obs`` column with true labels; when given, metrics are stored in ``uns``.
    split_key, train_value
        With ``labels_key``: leave cells with ``obs[split_key] == train_value`` out of the metrics.
    batch_size
        Cells per forward pass.
    min_confidence
        Cells whose highest class probability is below this are labelled ``"unknown"`` in
        ``obs[key_added]`` (they count as errors in the metrics; the rejected fraction is
        ``uns[key_added]["metrics"]["rejection_rate"]``). ``None`` never rejects. The highest
        probability is written to ``obs[f"{key_added}_confidence"]`` either way.
    device
        Torch device to move the model to (default: keep it where it is).
    key_added
        Prefix of the outputs.

    Returns
    -------
    None
        Writes ``obs[key_added]``, ``obs[f"{key_added}_confidence"]``, the top-3 columns,
        ``obsm[f"{key_added}_proba"]`` and
        ``uns[key_added]`` (``params``: this call's settings; the model's ``model_use_reps``,
        ``architecture``, ``hyperparameters`` and ``classes``; and ``metrics``/``unseen_labels`` with
        labels) as :func:`fuse_train` does.
    """
    from sc_llm.models._fusion import FusionModel

    check_runs(min_confidence=min_confidence)
    if isinstance(model, str | Path):
        model = FusionModel.load(model)
    if not isinstance(model, FusionModel):
        raise TypeError(
            f"model must be a FusionModel or the path of a saved one, got {type(model).__name__}."
        )
    keys = list(model.use_reps if use_reps is None else use_reps)
    if len(keys) != len(model.use_reps):
        raise ValueError(
            f"The model fuses {len(model.use_reps)} representations {model.use_reps}; got {keys}."
        )
    reps = collect_reps(adata, keys)
    for key, name, dim, X in zip(keys, model.use_reps, model.input_dims, reps, strict=True):
        if X.shape[1] != dim:
            raise ValueError(
                f"Representation {key!r} has {X.shape[1]} dimensions, but the model's {name!r} input expects {dim}; "
                "embed the cells with the same encoder (and settings) as the training data."
            )
    if device is not None:
        model.to(device)
    proba = model.predict_proba(reps, batch_size=batch_size)
    labels = get_labels(adata, labels_key) if labels_key is not None else None
    train = None
    if labels is not None and split_key is not None:
        train = train_mask(adata, split_key, train_value)
    metrics, unseen = write_predictions(
        adata, key_added, np.asarray(model.classes), proba, labels, train, min_confidence=min_confidence
    )
    adata.uns[key_added] = {
        "params": _h5ad_safe(
            {
                "use_reps": keys,
                "labels_key": labels_key,
                "split_key": split_key,
                "train_value": train_value,
                "batch_size": batch_size,
                "min_confidence": min_confidence,
            }
        ),
        "model_use_reps": list(model.use_reps),
        "architecture": model.architecture,
        "hyperparameters": dict(model.hyperparameters),
        "classes": list(model.classes),
        "unseen_labels": unseen,
        "metrics": metrics,
    }


def config_params(config: FusionConfig) -> dict[str, Any]:
    """A resolved config as ``uns[...]["params"]`` entries that h5ad can write (no ``None``, no mappings).

    Settings the architecture does not use are recorded as off (``n_folds=0`` for ``"paper"``,
    ``validation_fraction=0.0`` for ``"stacked"``).
    """
    params = _h5ad_safe(dataclasses.asdict(config.resolved()))
    if config.paper:
        params["n_folds"] = 0
    else:
        params["validation_fraction"] = 0.0
    return params


def _h5ad_safe(settings: dict[str, Any]) -> dict[str, Any]:
    """``None`` as -1 for numbers (``patience``, ``min_confidence``) or ``"None"``; mappings as ``k=v`` text."""
    out = {}
    for key, value in settings.items():
        if value is None:
            value = -1.0 if key == "min_confidence" else -1 if key == "patience" else "None"
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        out[key] = float(value) if key == "min_confidence" else value
    return out


def _architecture_results(model, fit: FusionFit, use_reps: Sequence[str]) -> dict[str, Any]:
    """``"paper"``: the grid search table; ``"stacked"``: the mixing weights and their out-of-fold check."""
    if model.architecture == "paper":
        return {"grid": fit.grid}
    hp = model.hyperparameters
    mix = pd.DataFrame(
        {
            "input": list(use_reps),
            "weight": model.mix.cpu().numpy().astype(float),
            "epochs": hp["expert_epochs"],
            "oof_accuracy": hp["oof_accuracy_inputs"],
        }
    )
    return {"mix": mix, "mix_used": hp["mix_used"], "oof_accuracy_mix": hp["oof_accuracy_mix"]}


def _input_table(fit: FusionFit, use_reps, reps, labels, train, classes, seed0: int) -> pd.DataFrame:
    """Held-out metrics per run of the fused model and of each input trained the same way."""
    rows = []
    for i, (model, _) in enumerate(fit.runs):
        probas = {"fused": model.predict_proba(reps)}
        if model.architecture == "stacked":
            probas.update(zip(use_reps, model.predict_expert_proba(reps), strict=True))
        else:
            probas.update(
                (name, fit.single_runs[m][i][0].predict_proba([reps[m]])) for m, name in enumerate(use_reps)
            )
        rows += [
            {"run": i, "seed": seed0 + i, "model": name, **held_out_metrics(proba, labels, train, classes)}
            for name, proba in probas.items()
        ]
    return pd.DataFrame(rows)
