"""Training :class:`~sc_llm.models.FusionModel` on arrays: settings, the two procedures, seeds and folds.

Kept apart from the network (``models/_fusion.py``) and from the AnnData-facing API
(:func:`sc_llm.tl.fuse_train`, which reads the representations and writes the results), as
scvi-tools keeps its module, training loop and model API apart. Nothing here knows about AnnData:
:func:`train_fusion` takes one float array per representation for the training cells and their
class codes.

``"paper"`` (paper §3.2, Figure 1, Appendix A.2): AdamW, exponential learning-rate decay, early
stopping on a stratified validation split, grid search. ``"stacked"``: per-input experts cross-fitted
on folds of the training cells, then combined by weights fitted on their out-of-fold predictions.
torch is imported inside the functions so that ``import sc_llm`` stays free of it.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sc_llm._progress import progress
from sc_llm._utils import logger

if TYPE_CHECKING:
    from ._fusion import FusionModel

ARCHITECTURES = ("stacked", "paper")
GRID_KEYS = ("lr", "epochs", "batch_size", "lr_decay", "weight_decay")
#: Grid used by ``param_grid="default"``. The paper grid-searched these four settings per dataset
#: (Appendix A.2) without listing the values; these span the usual range for a wide one-layer head.
DEFAULT_GRID: dict[str, list] = {
    "lr": [1e-4, 1e-3],
    "epochs": [30, 100],
    "batch_size": [32, 128],
    "lr_decay": [0.9, 0.99],
}
#: Out-of-fold predictions kept per epoch are capped at this many floats; beyond it, only a spread of
#: candidate epochs is evaluated (large data sets pick among fewer epochs instead of running out of memory).
_OOF_BUDGET = 64_000_000

_VALID: dict[str, Callable[[Any], bool]] = {
    "epochs": lambda v: int(v) == v and v >= 1,
    "lr": lambda v: v > 0,
    "batch_size": lambda v: int(v) == v and v >= 1,
    "lr_decay": lambda v: 0 < v <= 1,
    "weight_decay": lambda v: v >= 0,
    "validation_fraction": lambda v: 0 <= v < 1,
    "patience": lambda v: v is None or v >= 1,
    "n_runs": lambda v: int(v) == v and v >= 1,
    "hidden": lambda v: v is None or (int(v) == v and v >= 1),
}


@dataclass(frozen=True)
class FusionConfig:
    """Training settings of :func:`sc_llm.tl.fuse_train` (architecture, optimisation, model selection).

    Frozen: derive variants with :func:`dataclasses.replace`. Invalid values are refused when the
    config is built. ``FusionConfig(architecture="paper")`` is the paper's recipe.

    Parameters
    ----------
    architecture
        ``"stacked"`` (per-representation experts cross-fitted on folds and combined by fitted
        weights) or ``"paper"`` (the paper's concatenation network); see :func:`sc_llm.tl.fuse_train`.
    hidden
        Width of each per-representation dense layer. ``None``: 4096 for ``"paper"`` (the paper's),
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
        magnitude (unit-norm text embeddings vs PCA coordinates). ``None``: ``True`` for
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
        ``lr_decay``, ``weight_decay`` to candidate values (other settings come from the fields
        above), or ``"default"`` for ``sc_llm.models.DEFAULT_GRID`` (lr 1e-4 / 1e-3, epochs 30 / 100,
        batch size 32 / 128, lr decay 0.9 / 0.99). The combination with the lowest validation loss
        (first seed) is used for the final runs. Needs ``validation_fraction > 0``.
    class_weight
        ``None`` (plain cross-entropy), ``"balanced"`` (weights ``n / (n_classes * n_c)`` from the
        training cells, for imbalanced labels), or a mapping from label to weight.
    """

    architecture: str = "stacked"
    hidden: int | None = None
    epochs: int = 50
    lr: float = 1e-3
    batch_size: int = 64
    lr_decay: float = 0.95
    weight_decay: float = 0.01
    standardize: bool | None = None
    n_folds: int = 5
    validation_fraction: float = 0.1
    patience: int | None = 5
    param_grid: Mapping[str, Sequence] | str | None = None
    class_weight: str | Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {list(ARCHITECTURES)}, got {self.architecture!r}.")
        check_settings(
            **{k: getattr(self, k) for k in (*GRID_KEYS, "validation_fraction", "patience", "hidden")}
        )
        if not self.paper and (int(self.n_folds) != self.n_folds or self.n_folds < 2):
            raise ValueError(
                f"Invalid n_folds={self.n_folds!r}; the stacked architecture needs at least 2 folds."
            )
        if self.param_grid is not None:
            if not self.paper:
                raise ValueError(
                    "param_grid applies to architecture='paper' (its validation-loss grid search); the "
                    "stacked architecture picks its epochs on out-of-fold predictions."
                )
            self.grid()
        if isinstance(self.class_weight, str) and self.class_weight != "balanced":
            raise ValueError(
                f"class_weight must be None, 'balanced' or a mapping, got {self.class_weight!r}."
            )

    @property
    def paper(self) -> bool:
        """Whether this is the paper's architecture."""
        return self.architecture == "paper"

    def resolved(self) -> FusionConfig:
        """A copy with the architecture-dependent defaults (``hidden``, ``standardize``) filled in."""
        return dataclasses.replace(
            self,
            hidden=(4096 if self.paper else 256) if self.hidden is None else int(self.hidden),
            standardize=(not self.paper) if self.standardize is None else bool(self.standardize),
        )

    def grid(self) -> list[dict[str, Any]]:
        """Every combination of the optimisation settings to try (one, without ``param_grid``)."""
        base = {k: getattr(self, k) for k in GRID_KEYS}
        param_grid = self.param_grid
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
        keys = list(param_grid)
        grid = [
            {**base, **dict(zip(keys, combo, strict=True))}
            for combo in itertools.product(*param_grid.values())
        ]
        for params in grid:
            check_settings(**params)
        return grid


def check_settings(**values: Any) -> None:
    """Raise ``ValueError("Invalid name=value.")`` for the first out-of-range training setting."""
    for name, value in values.items():
        if not _VALID[name](value):
            raise ValueError(f"Invalid {name}={value!r}.")


@dataclass
class FusionFit:
    """What :func:`~sc_llm.models.train_fusion` returns.

    Parameters
    ----------
    runs
        ``(model, history)`` per seed ``random_state + i``, models in eval mode.
    single_runs
        ``"paper"`` with ``report_inputs``: for each representation, ``(model, history)`` per seed of
        the head trained on it alone (``"stacked"``: empty, its experts are those models).
    hyperparameters
        The optimisation settings used by the runs (the grid search's choice).
    grid
        ``"paper"``: validation loss and best epoch of every grid combination; else ``None``.
    n_train, n_validation
        Training cells fitted on, and held out for early stopping.
    device
        The torch device trained on.
    """

    runs: list[tuple[FusionModel, pd.DataFrame]]
    single_runs: list[list[tuple[FusionModel, pd.DataFrame]]]
    hyperparameters: dict[str, Any]
    grid: pd.DataFrame | None
    n_train: int
    n_validation: int
    device: Any


def train_fusion(
    reps: Sequence[np.ndarray],
    codes: np.ndarray,
    classes: np.ndarray,
    use_reps: Sequence[str],
    config: FusionConfig,
    *,
    n_runs: int = 1,
    report_inputs: bool = True,
    random_state: int = 0,
    device: str | None = None,
) -> FusionFit:
    """Train ``n_runs`` fusion models (seeds ``random_state + i``) on the training cells.

    Parameters
    ----------
    reps
        One float array per representation, training cells only, rows aligned with ``codes``.
    codes
        Class index of each training cell in ``classes``.
    classes
        Sorted class labels (the model's output order).
    use_reps
        Names of the representations (recorded in the models).
    config
        Training settings; architecture-dependent defaults are resolved here.
    n_runs
        Number of final trainings.
    report_inputs
        ``"paper"`` with several representations: also train one head per representation alone.
    random_state
        Seed of the folds / validation split, weight initialisation and batch shuffling.
    device
        Torch device; ``None`` picks CUDA, then MPS, else CPU.

    Returns
    -------
    fit : sc_llm.models.FusionFit
        The trained models, histories and the settings chosen (:class:`FusionFit`).
    """
    from ._runtime import resolve_device

    config = config.resolved()
    check_settings(n_runs=n_runs)
    weights = class_weights(config.class_weight, classes, codes)
    fit_idx, val_idx = (
        stratified_split(codes, config.validation_fraction, random_state)
        if config.paper
        else (np.arange(codes.size), np.empty(0, dtype=np.int64))
    )
    grid = config.grid()
    if config.param_grid is not None and val_idx.size == 0:
        raise ValueError("param_grid needs a validation split: set validation_fraction > 0.")
    data = _Data(reps, codes, fit_idx, val_idx, weights, resolve_device(device))
    spec = {
        "use_reps": list(use_reps),
        "input_dims": [X.shape[1] for X in reps],
        "classes": classes,
        "hidden": config.hidden,
        "architecture": config.architecture,
        "standardize_on": [X[fit_idx] for X in reps] if config.standardize else None,
    }
    singles = report_inputs and len(reps) > 1
    per_fit = max(p["epochs"] for p in grid)
    if config.paper:
        fits = n_runs * (1 + len(reps) * singles)
        total = sum(p["epochs"] for p in grid) * (len(grid) > 1) + fits * per_fit
    else:
        total = n_runs * (config.n_folds + 1) * per_fit
    patience, seeds = config.patience, [random_state + i for i in range(n_runs)]
    with progress(total, "fuse_train", unit="epoch") as bar:
        if config.paper:
            grid_table, best = _grid_search(data, spec, grid, patience, random_state, bar)
            runs = [_fit(data, spec, best, patience, seed, bar) for seed in seeds]
            single_runs = [
                [_fit(data.select(m), _single_spec(spec, m), best, patience, seed, bar) for seed in seeds]
                for m in range(len(reps) * singles)
            ]
        else:
            grid_table, best = None, grid[0]
            runs = [_fit_stacked(data, spec, best, config.n_folds, seed, bar) for seed in seeds]
            single_runs = []
    return FusionFit(
        runs, single_runs, dict(best), grid_table, int(fit_idx.size), int(val_idx.size), data.device
    )


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


def _new_model(spec: dict, params: dict, data: _Data, seed: int):
    """A seeded, standardized model on the device with the paper's optimizer, loss and batch order."""
    import torch

    from ._fusion import FusionModel

    torch.manual_seed(seed)
    model = FusionModel(
        spec["use_reps"],
        spec["input_dims"],
        spec["classes"],
        hidden=spec["hidden"],
        architecture=spec["architecture"],
    )
    if spec["standardize_on"] is not None:
        model.set_standardization(spec["standardize_on"])
    model.to(data.device)
    return (model, *_training_setup(model, params, data, seed))


def _fit(
    data: _Data, spec: dict, params: dict, patience: int | None, seed: int, bar
) -> tuple[Any, pd.DataFrame]:
    """One training run; returns the model with the best validation weights restored, and its history."""
    model, opt, sched, loss_fn, gen = _new_model(spec, params, data, seed)
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


def _fit_stacked(
    data: _Data, spec: dict, params: dict, n_folds: int, seed: int, bar
) -> tuple[Any, pd.DataFrame]:
    """Cross-fit the experts, pick their epochs and mixing weights out of fold, retrain them on all cells."""
    import torch

    codes = data.codes.cpu().numpy()
    folds = stratified_folds(codes, n_folds, seed)
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
    mix, check = choose_mix(chosen, codes, weights, folds)
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
    model, opt, sched, loss_fn, gen = _new_model(spec, params, data, seed)
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


def choose_mix(
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
        w = fit_mix([lp[~out] for lp in log_probas], codes[~out], None if weights is None else weights[~out])
        fused = sum(wm * lp[out] for wm, lp in zip(w, log_probas, strict=True))
        hits[out] = fused.argmax(1) == codes[out]
    nested_acc = float(hits.mean())
    mix = fit_mix(log_probas, codes, weights)
    use_mix = len(log_probas) > 1 and nested_acc > single_acc[best]
    if not use_mix:
        # The best expert alone, with its own fitted temperature (argmax unchanged, probabilities calibrated).
        mix = np.zeros_like(mix)
        mix[best] = fit_mix([log_probas[best]], codes, weights)[0]
    check = {
        "oof_accuracy_mix": nested_acc,
        "oof_accuracy_inputs": single_acc,
        "mix_used": bool(use_mix),
    }
    return mix, check


def fit_mix(log_probas: list[np.ndarray], codes: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
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


def stratified_folds(codes: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
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


def stratified_split(codes: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
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
            stacklevel=5,  # the caller of fuse_train (through its deprecation wrapper)
        )
    return fit_idx, val_idx


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


def class_weights(class_weight, classes: np.ndarray, codes: np.ndarray) -> np.ndarray | None:
    """Per-class loss weights from ``FusionConfig.class_weight`` (``None`` for plain cross-entropy)."""
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
        raise ValueError(
            f"class_weight must be positive and finite; got {dict(zip(classes[bad], weights[bad], strict=True))}."
        )
    return weights
