"""scl.tl.fuse_train / scl.tl.fuse_predict: train and apply fusion heads on frozen embeddings.

Paper §3.2, §4.2, Figure 1 and Appendix A.2. The network is :class:`sc_llm.models.FusionModel`;
this module holds data handling, the two training procedures (``"paper"``: AdamW, exponential
learning-rate decay, early stopping on a validation split, grid search; ``"stacked"``: per-input
experts cross-fitted on folds of the training cells, then combined by weights fitted on their
out-of-fold predictions) and the repeated runs over seeds with the per-input comparison.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from anndata import AnnData

from .._progress import progress
from ._compare import paired_comparison
from ._heads import collect_reps, training_cells, write_predictions
from ._metrics import get_labels

if TYPE_CHECKING:
    from ..models._fusion import FusionModel

from .._utils import logger

GRID_KEYS = ("lr", "epochs", "batch_size", "lr_decay", "weight_decay")
#: Grid used by ``param_grid="default"``. The paper grid-searched these four settings per dataset
#: (Appendix A.2) without listing the values; these span the usual range for a wide one-layer head.
DEFAULT_GRID: dict[str, list] = {
    "lr": [1e-4, 1e-3],
    "epochs": [30, 100],
    "batch_size": [32, 128],
    "lr_decay": [0.9, 0.99],
}


def fuse_train(
    adata: AnnData,
    use_reps: Sequence[str],
    labels_key: str,
    *,
    split_key: str = "split",
    train_value: str = "train",
    architecture: str = "stacked",
    hidden: int | None = None,
    epochs: int = 50,
    lr: float = 1e-3,
    batch_size: int = 64,
    lr_decay: float = 0.95,
    weight_decay: float = 0.01,
    standardize: bool | None = None,
    n_folds: int = 5,
    validation_fraction: float = 0.1,
    patience: int | None = 5,
    param_grid: Mapping[str, Sequence] | str | None = None,
    class_weight: str | Mapping[str, float] | None = None,
    n_runs: int = 1,
    report_inputs: bool = True,
    min_confidence: float | None = None,
    random_state: int = 0,
    device: str | None = None,
    key_added: str = "fusion",
) -> FusionModel:
    """Train a fusion classifier on any set of frozen embeddings and label every cell.

    Two architectures (see :class:`~sc_llm.models.FusionModel`):

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
    split_key, train_value
        Training cells are those with ``obs[split_key] == train_value`` and a label; metrics are
        computed on the other labelled cells.
    architecture
        ``"stacked"`` or ``"paper"`` (above).
    hidden
        Width of each per-representation dense layer. Default: 4096 for ``"paper"`` (the paper's),
        256 for ``"stacked"`` (a few hundred cells do not need more; see the fusion how-to).
    epochs
        Maximum number of epochs.
    lr
        Initial AdamW learning rate.
    batch_size
        Mini-batch size.
    lr_decay
        Factor (``gamma`` of ``ExponentialLR``) applied to the learning rate after every epoch.
    weight_decay
        AdamW decoupled weight decay.
    standardize
        Centre each representation on its training-cell mean and divide it by one scale (root mean
        variance over its dimensions), inside the model so that saved models apply it to new cells.
        Not in the paper; it lets one learning rate suit encoders whose outputs differ by orders of
        magnitude (unit-norm text embeddings vs PCA coordinates). Default: ``True`` for
        ``"stacked"``, ``False`` (the paper's raw inputs) for ``"paper"``.
    n_folds
        ``"stacked"``: folds of the cross-fitting (at least 2; classes with fewer cells than folds
        still work, their cells land in the first folds).
    validation_fraction
        ``"paper"``: fraction of each training class held out for early stopping and the grid
        search (at least one cell per class stays in training). ``0`` trains on all training cells
        for ``epochs``.
    patience
        ``"paper"``: stop after this many epochs without a lower validation loss; ``None`` runs all
        epochs (the weights of the best epoch are still restored).
    param_grid
        ``"paper"``: grid search, a mapping from any of ``lr``, ``epochs``, ``batch_size``,
        ``lr_decay``, ``weight_decay`` to candidate values (other settings come from the arguments),
        or ``"default"`` for :data:`DEFAULT_GRID`. The combination with the lowest validation loss
        (seed ``random_state``) is used for the final runs. Needs ``validation_fraction > 0``.
    class_weight
        ``None`` (plain cross-entropy), ``"balanced"`` (weights ``n / (n_classes * n_c)`` from the
        training cells, for imbalanced labels), or a mapping from label to weight.
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
    random_state
        Seed of the folds / validation split, weight initialisation and batch shuffling.
    device
        Torch device; ``None`` picks CUDA, then MPS, else CPU.
    key_added
        Prefix of the outputs.

    Returns
    -------
    The trained :class:`~sc_llm.models.FusionModel` of the first run (seed ``random_state``), in
    eval mode. Also sets, in ``adata`` (``mdata`` for MuData):

    - ``obs[key_added]``: prediction for every cell; ``obs[f"{key_added}_confidence"]``;
      ``obs[f"{key_added}_top{i}"]`` and ``obs[f"{key_added}_top{i}_frac"]`` (i = 1..3): the three
      most probable labels and their probabilities;
    - ``obsm[f"{key_added}_proba"]``: class probabilities, columns in ``uns[key_added]["classes"]``;
    - ``uns[key_added]``: ``params``, chosen ``hyperparameters``, ``classes``, ``unseen_labels``
      (held-out labels absent from training), ``metrics`` (accuracy, macro precision/recall/F1,
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
    """
    from ..models._fusion import ARCHITECTURES
    from ..models._runtime import resolve_device

    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {list(ARCHITECTURES)}, got {architecture!r}.")
    paper = architecture == "paper"
    hidden = (4096 if paper else 256) if hidden is None else hidden
    standardize = (not paper) if standardize is None else bool(standardize)
    _check_settings(
        epochs, lr, batch_size, lr_decay, weight_decay, validation_fraction, patience, n_runs, hidden
    )
    if not paper and (int(n_folds) != n_folds or n_folds < 2):
        raise ValueError(f"Invalid n_folds={n_folds!r}; the stacked architecture needs at least 2 folds.")
    if not paper and param_grid is not None:
        raise ValueError(
            "param_grid applies to architecture='paper' (its validation-loss grid search); the stacked "
            "architecture picks its epochs on out-of-fold predictions."
        )
    _check_min_confidence(min_confidence)
    reps = collect_reps(adata, use_reps)
    labels = get_labels(adata, labels_key)
    train, y_train, classes = training_cells(adata, labels, split_key, train_value)
    codes = np.searchsorted(classes, y_train)
    weights = _class_weights(class_weight, classes, codes)
    fit_idx, val_idx = (
        _stratified_split(codes, validation_fraction, random_state)
        if paper
        else (np.arange(codes.size), np.empty(0, dtype=np.int64))
    )
    base = {
        "lr": lr,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr_decay": lr_decay,
        "weight_decay": weight_decay,
    }
    grid = _expand_grid(param_grid, base, has_validation=val_idx.size > 0)
    train_pos = np.flatnonzero(train)
    data = _Data([X[train_pos] for X in reps], codes, fit_idx, val_idx, weights, resolve_device(device))
    spec = {
        "use_reps": list(use_reps),
        "input_dims": [X.shape[1] for X in reps],
        "classes": classes,
        "hidden": hidden,
        "architecture": architecture,
    }
    spec["standardize_on"] = [X[train_pos[fit_idx]] for X in reps] if standardize else None
    singles = report_inputs and len(reps) > 1
    per_fit = max(p["epochs"] for p in grid)
    if paper:
        fits = n_runs * (1 + len(reps) * singles)
        total = sum(p["epochs"] for p in grid) * (len(grid) > 1) + fits * per_fit
    else:
        total = n_runs * (n_folds + 1) * per_fit
    with progress(total, "fuse_train", unit="epoch") as bar:
        if paper:
            grid_table, best = _grid_search(data, spec, grid, patience, random_state, bar)
            runs = [_fit(data, spec, best, patience, random_state + i, bar) for i in range(n_runs)]
            single_runs = [
                [
                    _fit(data.select(m), _single_spec(spec, m), best, patience, random_state + i, bar)
                    for i in range(n_runs)
                ]
                for m in range(len(reps) * singles)
            ]
        else:
            grid_table, best = None, grid[0]
            runs = [_fit_stacked(data, spec, best, n_folds, random_state + i, bar) for i in range(n_runs)]
            single_runs = []
    model, history = runs[0]
    proba = model.predict_proba(reps)
    metrics, unseen = write_predictions(
        adata, key_added, classes, proba, labels, train, min_confidence=min_confidence
    )
    run_table = _run_metrics([m for m, _ in runs], reps, labels, train, classes, random_state, min_confidence)
    uns = {
        "params": {
            "use_reps": list(use_reps),
            "labels_key": labels_key,
            "split_key": split_key,
            "train_value": train_value,
            "architecture": architecture,
            "hidden": hidden,
            "standardize": standardize,
            "n_folds": n_folds if not paper else 0,
            "validation_fraction": validation_fraction if paper else 0.0,
            "patience": -1 if patience is None else patience,
            "class_weight": _describe_weights(class_weight),
            "n_runs": n_runs,
            "min_confidence": -1.0 if min_confidence is None else float(min_confidence),
            "random_state": random_state,
            "device": str(data.device),
        },
        "hyperparameters": dict(best),
        "classes": list(classes),
        "unseen_labels": unseen,
        "n_train": int(fit_idx.size),
        "n_validation": int(val_idx.size),
        "metrics": metrics,
        "runs": run_table,
        "metrics_mean": _summary(run_table, "mean"),
        "metrics_sd": _summary(run_table, "sd"),
        "history": history,
    }
    if paper:
        uns["grid"] = grid_table
    else:
        hp = model.hyperparameters
        uns["mix"] = pd.DataFrame(
            {
                "input": list(use_reps),
                "weight": model.mix.cpu().numpy().astype(float),
                "epochs": hp["expert_epochs"],
                "oof_accuracy": hp["oof_accuracy_inputs"],
            }
        )
        uns["mix_used"] = hp["mix_used"]
        uns["oof_accuracy_mix"] = hp["oof_accuracy_mix"]
    if singles:
        inputs = _input_table(runs, single_runs, use_reps, reps, labels, train, classes, random_state)
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
    ``None``. Writes ``obs[key_added]``, ``obs[f"{key_added}_confidence"]``, the top-3 columns,
    ``obsm[f"{key_added}_proba"]`` and
    ``uns[key_added]`` (``params``, ``classes``, and ``metrics``/``unseen_labels`` with labels) exactly
    as :func:`fuse_train` does.
    """
    from ..models._fusion import FusionModel

    _check_min_confidence(min_confidence)
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
        from ._metrics import train_mask

        train = train_mask(adata, split_key, train_value)
    metrics, unseen = write_predictions(
        adata, key_added, np.asarray(model.classes), proba, labels, train, min_confidence=min_confidence
    )
    adata.uns[key_added] = {
        "params": {
            "use_reps": keys,
            "model_use_reps": list(model.use_reps),
            "labels_key": labels_key or "",
            "architecture": model.architecture,
            "min_confidence": -1.0 if min_confidence is None else float(min_confidence),
        },
        "hyperparameters": dict(model.hyperparameters),
        "classes": list(model.classes),
        "unseen_labels": unseen,
        "metrics": metrics,
    }


class _Data:
    """Training tensors on the device, the fit/validation positions and optional class weights."""

    def __init__(self, reps, codes, fit_idx, val_idx, weights, device) -> None:
        import torch

        self.device = device
        self.reps = [torch.as_tensor(X, dtype=torch.float32).to(device) for X in reps]
        self.codes = torch.as_tensor(codes, dtype=torch.long).to(device)
        self.fit_idx = torch.as_tensor(fit_idx, dtype=torch.long)
        self.val_idx = torch.as_tensor(val_idx, dtype=torch.long)
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float32).to(device)

    def batch(self, idx):
        idx = idx.to(self.device)
        return [X[idx] for X in self.reps], self.codes[idx]

    def select(self, m: int) -> _Data:
        """The same cells and split with only representation ``m`` (for single-input baselines)."""
        view = object.__new__(_Data)
        view.__dict__.update(self.__dict__)
        view.reps = [self.reps[m]]
        return view


def _single_spec(spec: dict, m: int) -> dict:
    std = spec["standardize_on"]
    return {
        **spec,
        "use_reps": [spec["use_reps"][m]],
        "input_dims": [spec["input_dims"][m]],
        "standardize_on": None if std is None else [std[m]],
    }


def _fit(
    data: _Data, spec: dict, params: dict, patience: int | None, seed: int, bar
) -> tuple[Any, pd.DataFrame]:
    """One training run; returns the model with the best validation weights restored, and its history."""
    import torch

    from ..models._fusion import FusionModel

    torch.manual_seed(seed)
    model = FusionModel(
        spec["use_reps"],
        spec["input_dims"],
        spec["classes"],
        hidden=spec["hidden"],
        hyperparameters=params,
        architecture=spec["architecture"],
    )
    if spec["standardize_on"] is not None:
        model.set_standardization(spec["standardize_on"])
    model.to(data.device)
    opt, sched, loss_fn, gen = _training_setup(model, params, data, seed)
    best_loss, best_state, since_best, rows = np.inf, None, 0, []
    for epoch in range(params["epochs"]):
        current_lr = opt.param_groups[0]["lr"]
        train_loss = _train_epoch(model, data, opt, loss_fn, params["batch_size"], gen)
        sched.step()
        val_loss, val_acc = _validate(model, data, loss_fn)
        rows.append((epoch + 1, train_loss, val_loss, val_acc, current_lr))
        bar.update(1)
        # Without a validation split the last epoch is kept.
        score = val_loss if data.val_idx.numel() else -epoch
        if score < best_loss:
            best_loss, since_best = score, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            since_best += 1
            if patience is not None and since_best >= patience:
                bar.update(params["epochs"] - epoch - 1)
                break
    model.load_state_dict(best_state)
    history = pd.DataFrame(rows, columns=["epoch", "train_loss", "val_loss", "val_accuracy", "lr"])
    best_epoch = (
        int(history["epoch"].iloc[int(np.nanargmin(history["val_loss"]))])
        if data.val_idx.numel()
        else epoch + 1
    )
    model.hyperparameters = {**params, "best_epoch": best_epoch, "seed": seed}
    return model.eval(), history


#: Out-of-fold predictions kept per epoch are capped at this many floats; beyond it, only a spread of
#: candidate epochs is evaluated (large data sets pick among fewer epochs instead of running out of memory).
_OOF_BUDGET = 64_000_000


def _fit_stacked(
    data: _Data, spec: dict, params: dict, n_folds: int, seed: int, bar
) -> tuple[Any, pd.DataFrame]:
    """Cross-fit the experts, pick their epochs and mixing weights out of fold, retrain them on all cells."""
    import torch

    codes = data.codes.cpu().numpy()
    folds = _stratified_folds(codes, n_folds, seed)
    n, n_reps, n_classes, epochs = codes.size, len(spec["use_reps"]), len(spec["classes"]), params["epochs"]
    n_eval = max(1, min(epochs, _OOF_BUDGET // max(n * n_reps * n_classes, 1)))
    eval_epochs = np.unique(np.round(np.linspace(1, epochs, n_eval)).astype(int))
    oof = np.zeros((eval_epochs.size, n_reps, n, n_classes), dtype=np.float32)
    for k in range(n_folds):
        held = np.flatnonzero(folds == k)
        if held.size == 0:
            continue
        cells = torch.as_tensor(np.flatnonzero(folds != k), dtype=torch.long)

        def record(model, epoch, held=held):
            if epoch in eval_epochs:
                j = int(np.searchsorted(eval_epochs, epoch))
                oof[j, :, held] = np.stack(_expert_log_proba(model, data, held), axis=1)

        _train_stacked(data, spec, params, cells, epochs, seed + 1000 * (k + 1), bar, record)
    weights = None if data.weights is None else data.weights.cpu().numpy()[codes]
    nll = -np.take_along_axis(oof, codes[None, None, :, None], axis=3)[..., 0]  # epochs x reps x cells
    losses = np.average(nll, axis=2, weights=weights)
    accs = (oof.argmax(3) == codes).mean(axis=2)
    best = losses.argmin(axis=0)
    expert_epochs = [int(eval_epochs[j]) for j in best]
    chosen = [oof[best[m], m] for m in range(n_reps)]
    mix, check = _choose_mix(chosen, codes, weights, folds)
    snapshots: dict[int, dict] = {}

    def keep(model, epoch):
        for m, e in enumerate(expert_epochs):
            if e == epoch:
                snapshots[m] = {k: v.detach().clone() for k, v in model.branches[m].state_dict().items()}

    model = _train_stacked(
        data,
        spec,
        params,
        data.fit_idx,
        max(expert_epochs),
        seed,
        bar,
        keep,
        skip=epochs - max(expert_epochs),
    )
    for m, state in snapshots.items():
        model.branches[m].load_state_dict(state)
    model.mix.copy_(torch.as_tensor(mix, dtype=torch.float32))
    model.hyperparameters = {
        **params,
        "expert_epochs": expert_epochs,
        "n_folds": n_folds,
        "seed": seed,
        **check,
    }
    history = pd.DataFrame(
        [
            (int(e), spec["use_reps"][m], float(losses[j, m]), float(accs[j, m]))
            for j, e in enumerate(eval_epochs)
            for m in range(n_reps)
        ],
        columns=["epoch", "input", "oof_loss", "oof_accuracy"],
    )
    return model.eval(), history


def _train_stacked(data, spec, params, cells, epochs, seed, bar, callback, skip=0):
    """Train all experts of a stacked model on ``cells`` for ``epochs``, calling ``callback(model, epoch)``."""
    import torch

    from ..models._fusion import FusionModel

    torch.manual_seed(seed)
    model = FusionModel(
        spec["use_reps"], spec["input_dims"], spec["classes"], hidden=spec["hidden"], architecture="stacked"
    )
    if spec["standardize_on"] is not None:
        model.set_standardization(spec["standardize_on"])
    model.to(data.device)
    opt, sched, loss_fn, gen = _training_setup(model, params, data, seed)
    for epoch in range(1, epochs + 1):
        _train_epoch(model, data, opt, loss_fn, params["batch_size"], gen, cells=cells)
        sched.step()
        callback(model, epoch)
        bar.update(1)
    bar.update(skip)
    return model


def _expert_log_proba(model, data: _Data, cells: np.ndarray) -> list[np.ndarray]:
    import torch

    model.eval()
    with torch.inference_mode():
        xs, _ = data.batch(torch.as_tensor(cells, dtype=torch.long))
        out = [lp.float().cpu().numpy() for lp in model.expert_log_proba(*xs)]
    model.train()
    return out


def _choose_mix(
    log_probas: list[np.ndarray], codes: np.ndarray, weights: np.ndarray | None, folds: np.ndarray
) -> tuple[np.ndarray, dict[str, Any]]:
    """Mixing weights, kept only if they beat the best single expert out of sample; else that expert alone.

    Weights fitted on all out-of-fold predictions minimise cross-entropy, which can trade a little
    accuracy for calibration (HSMM: -0.015 accuracy with the text expert mixed in). So the mix is
    also fitted fold by fold on the other folds' out-of-fold predictions and scored on the held-out
    fold; it is used only when that nested accuracy is strictly higher than the best expert's own
    out-of-fold accuracy.
    """
    single_acc = [float((lp.argmax(1) == codes).mean()) for lp in log_probas]
    best = int(np.argmax(single_acc))
    hits = np.zeros(codes.size, dtype=bool)
    for k in np.unique(folds):
        out = folds == k
        w = _fit_mix([lp[~out] for lp in log_probas], codes[~out], None if weights is None else weights[~out])
        fused = sum(wm * lp[out] for wm, lp in zip(w, log_probas, strict=True))
        hits[out] = fused.argmax(1) == codes[out]
    nested_acc = float(hits.mean())
    mix = _fit_mix(log_probas, codes, weights)
    use_mix = len(log_probas) > 1 and nested_acc > single_acc[best]
    if not use_mix:
        # The best expert alone, with its own fitted temperature (argmax unchanged, probabilities calibrated).
        mix = np.zeros_like(mix)
        mix[best] = _fit_mix([log_probas[best]], codes, weights)[0]
    check = {
        "oof_accuracy_mix": nested_acc,
        "oof_accuracy_inputs": single_acc,
        "mix_used": bool(use_mix),
    }
    return mix, check


def _fit_mix(log_probas: list[np.ndarray], codes: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """Non-negative weights minimising the out-of-fold cross-entropy of ``sum_m w_m * log_proba_m``."""
    import torch

    lp = torch.as_tensor(np.stack(log_probas), dtype=torch.float64)
    y = torch.as_tensor(codes, dtype=torch.long)
    w_cell = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    theta = torch.zeros(lp.shape[0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = (torch.nn.functional.softplus(theta)[:, None, None] * lp).sum(0)
        nll = -torch.log_softmax(logits, dim=1).gather(1, y[:, None])[:, 0]
        loss = nll.mean() if w_cell is None else (w_cell * nll).sum() / w_cell.sum()
        loss.backward()
        return loss

    opt.step(closure)
    return torch.nn.functional.softplus(theta).detach().numpy()


def _stratified_folds(codes: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold number per cell: each class dealt round-robin over the folds after a seeded shuffle."""
    rng = np.random.default_rng(seed)
    folds = np.empty(codes.size, dtype=np.int64)
    offset = 0
    for c in np.unique(codes):
        members = rng.permutation(np.flatnonzero(codes == c))
        # Rotating the start keeps small classes from all landing in fold 0.
        folds[members] = (np.arange(members.size) + offset) % n_folds
        offset += members.size
    return folds


def _training_setup(model, params: dict, data, seed: int):
    """The paper's optimizer (AdamW with exponential decay), weighted loss and a seeded batch order."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=params["lr"], weight_decay=params["weight_decay"])
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=params["lr_decay"])
    return opt, sched, torch.nn.CrossEntropyLoss(weight=data.weights), torch.Generator().manual_seed(seed)


def _train_epoch(model, data: _Data, opt, loss_fn, batch_size: int, gen, cells=None) -> float:
    import torch

    model.train()
    cells = data.fit_idx if cells is None else cells
    perm = cells[torch.randperm(cells.numel(), generator=gen)]
    total = 0.0
    for idx in perm.split(batch_size):
        xs, y = data.batch(idx)
        opt.zero_grad(set_to_none=True)
        if model.architecture == "stacked":
            # Experts have disjoint parameters: the summed loss trains each one on its own input.
            loss = sum(loss_fn(lp, y) for lp in model.expert_log_proba(*xs))
        else:
            loss = loss_fn(model(*xs), y)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * idx.numel()
    return total / max(perm.numel(), 1)


def _validate(model, data: _Data, loss_fn) -> tuple[float, float]:
    import torch

    if not data.val_idx.numel():
        return float("nan"), float("nan")
    model.eval()
    with torch.inference_mode():
        xs, y = data.batch(data.val_idx)
        logits = model(*xs)
        return float(loss_fn(logits, y)), float((logits.argmax(1) == y).float().mean())


def _grid_search(
    data: _Data, spec: dict, grid: list[dict], patience, seed: int, bar
) -> tuple[pd.DataFrame, dict]:
    """Validation loss of every combination (one run each, same seed); the best combination."""
    if len(grid) == 1:
        return pd.DataFrame([{**grid[0], "val_loss": np.nan, "best_epoch": 0}]), grid[0]
    rows = []
    for params in grid:
        model, history = _fit(data, spec, params, patience, seed, bar)
        rows.append(
            {
                **params,
                "val_loss": float(history["val_loss"].min()),
                "best_epoch": model.hyperparameters["best_epoch"],
            }
        )
        logger.info("fuse_train grid %s: validation loss %.4f", params, rows[-1]["val_loss"])
    table = pd.DataFrame(rows)
    best = grid[int(table["val_loss"].to_numpy().argmin())]
    return table, best


def _run_metrics(models, reps, labels, train, classes, seed0: int, min_confidence=None) -> pd.DataFrame:
    rows = [
        {
            "run": i,
            "seed": seed0 + i,
            **_held_out_metrics(model.predict_proba(reps), labels, train, classes, min_confidence),
        }
        for i, model in enumerate(models)
    ]
    return pd.DataFrame(rows)


def _held_out_metrics(proba, labels, train, classes, min_confidence=None) -> dict[str, float]:
    from ._heads import evaluate

    held_out = labels.notna().to_numpy() & ~train
    order = np.argsort(-proba, axis=1, kind="stable")[:, :3]
    with warnings.catch_warnings():
        # The unseen-label warning is raised once, for the returned model.
        warnings.simplefilter("ignore", UserWarning)
        metrics, _ = evaluate(
            labels,
            np.asarray(classes, dtype=object),
            order,
            held_out,
            confidence=_confidence(proba, min_confidence),
        )
    return metrics


def _confidence(proba: np.ndarray, min_confidence):
    return None if min_confidence is None else (proba.max(axis=1), min_confidence)


def _input_table(runs, single_runs, use_reps, reps, labels, train, classes, seed0: int) -> pd.DataFrame:
    """Held-out metrics per run of the fused model and of each input trained the same way."""
    rows = []
    for i, (model, _) in enumerate(runs):
        seed = seed0 + i
        rows.append(
            {
                "run": i,
                "seed": seed,
                "model": "fused",
                **_held_out_metrics(model.predict_proba(reps), labels, train, classes),
            }
        )
        for m, name in enumerate(use_reps):
            if model.architecture == "stacked":
                proba = _expert_proba(model, reps, m)
            else:
                proba = single_runs[m][i][0].predict_proba([reps[m]])
            rows.append(
                {"run": i, "seed": seed, "model": name, **_held_out_metrics(proba, labels, train, classes)}
            )
    return pd.DataFrame(rows)


def _expert_proba(model, reps, m: int, batch_size: int = 4096) -> np.ndarray:
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, reps[0].shape[0], batch_size):
            xs = [torch.as_tensor(X[start : start + batch_size], device=model.device) for X in reps]
            out.append(model.expert_log_proba(*xs)[m].exp().float().cpu().numpy())
    return np.concatenate(out)


def _check_min_confidence(min_confidence) -> None:
    if min_confidence is not None and not 0 <= min_confidence <= 1:
        raise ValueError(f"min_confidence must be in [0, 1] or None, got {min_confidence!r}.")


def _summary(table: pd.DataFrame, how: str) -> dict[str, float]:
    cols = [c for c in ("accuracy", "precision", "recall", "f1", "top3_accuracy") if c in table]
    if how == "mean":
        return {c: float(table[c].mean()) for c in cols}
    return {c: float(table[c].std(ddof=1)) if len(table) > 1 else float("nan") for c in cols}


def _stratified_split(codes: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, ``round(fraction * n_c)`` cells to validation, always leaving one in training."""
    if fraction == 0:
        return np.arange(codes.size), np.empty(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(codes):
        members = rng.permutation(np.flatnonzero(codes == c))
        val.append(members[: min(int(round(fraction * members.size)), members.size - 1)])
    val_idx = np.sort(np.concatenate(val))
    fit_idx = np.setdiff1d(np.arange(codes.size), val_idx)
    if val_idx.size == 0:
        warnings.warn(
            f"validation_fraction={fraction} leaves no validation cell; training without early stopping.",
            UserWarning,
            stacklevel=3,
        )
    return fit_idx, val_idx


def _expand_grid(param_grid, base: dict, *, has_validation: bool) -> list[dict]:
    if param_grid is None:
        return [base]
    if isinstance(param_grid, str):
        if param_grid != "default":
            raise ValueError(f"param_grid must be a mapping, 'default' or None, got {param_grid!r}.")
        param_grid = DEFAULT_GRID
    unknown = sorted(set(param_grid) - set(GRID_KEYS))
    if unknown:
        raise ValueError(f"param_grid has unknown settings {unknown}; allowed: {list(GRID_KEYS)}.")
    empty = [k for k, v in param_grid.items() if len(list(v)) == 0]
    if empty:
        raise ValueError(f"param_grid[{empty[0]!r}] has no candidate values.")
    if not has_validation:
        raise ValueError("param_grid needs a validation split: set validation_fraction > 0.")
    keys = list(param_grid)
    grid = [
        {**base, **dict(zip(keys, combo, strict=True))} for combo in itertools.product(*param_grid.values())
    ]
    for params in grid:
        _check_settings(
            params["epochs"], params["lr"], params["batch_size"], params["lr_decay"], params["weight_decay"]
        )
    return grid


def _check_settings(
    epochs, lr, batch_size, lr_decay, weight_decay, validation_fraction=0.1, patience=1, n_runs=1, hidden=1
):
    checks = {
        "epochs": (epochs, int(epochs) == epochs and epochs >= 1),
        "lr": (lr, lr > 0),
        "batch_size": (batch_size, int(batch_size) == batch_size and batch_size >= 1),
        "lr_decay": (lr_decay, 0 < lr_decay <= 1),
        "weight_decay": (weight_decay, weight_decay >= 0),
        "validation_fraction": (validation_fraction, 0 <= validation_fraction < 1),
        "patience": (patience, patience is None or patience >= 1),
        "n_runs": (n_runs, int(n_runs) == n_runs and n_runs >= 1),
        "hidden": (hidden, int(hidden) == hidden and hidden >= 1),
    }
    for name, (value, ok) in checks.items():
        if not ok:
            raise ValueError(f"Invalid {name}={value!r}.")


def _class_weights(class_weight, classes: np.ndarray, codes: np.ndarray) -> np.ndarray | None:
    if class_weight is None:
        return None
    if isinstance(class_weight, str):
        if class_weight != "balanced":
            raise ValueError(f"class_weight must be None, 'balanced' or a mapping, got {class_weight!r}.")
        counts = np.bincount(codes, minlength=classes.size)
        return codes.size / (classes.size * counts)
    missing = [c for c in classes if c not in class_weight]
    if missing:
        raise ValueError(f"class_weight lacks training labels {missing[:5]}.")
    weights = np.array([float(class_weight[c]) for c in classes])
    bad = ~np.isfinite(weights) | (weights <= 0)
    if bad.any():
        raise ValueError(f"class_weight must be positive and finite; got {dict(zip(classes[bad], weights[bad], strict=True))}.")
    return weights


def _describe_weights(class_weight) -> str:
    if class_weight is None or isinstance(class_weight, str):
        return str(class_weight)
    return ", ".join(f"{k}={v}" for k, v in class_weight.items())
