"""Fusion networks over frozen cell embeddings as plain ``torch.nn.Module`` s.

Two architectures share one class, :class:`FusionModel`:

``"paper"``
    scMPT exactly as the paper describes it (Figure 1, Appendix A.2): each representation goes
    through its own ``Linear(dim, hidden) + ReLU`` branch; the branch outputs are concatenated and a
    final ``Linear`` gives one logit per class.
``"stacked"``
    One small expert per representation (``Linear(dim, hidden) + ReLU + Linear(hidden, n_classes)``);
    the fused logits are ``sum_m mix[m] * log_softmax(expert_m)``, a weighted product of the experts'
    class probabilities. The non-negative weights ``mix`` are fitted on out-of-fold predictions of the
    training cells (see :func:`sc_llm.tl.fuse_train` and ``models/_training.py``): an input that does not help gets a weight near
    zero, so the fused model cannot fall far below its best input, and complementary inputs add up.

In both, each representation is first centred and divided by one scale (identity unless set from
training cells: encoders differ by orders of magnitude in scale, e.g. unit-norm text embeddings vs
PCA coordinates). ``forward`` returns logits so that training uses a numerically stable
cross-entropy and attribution methods (integrated gradients) can pick any target; softmax is
applied only in :meth:`FusionModel.predict_proba`.

With a single representation the same module is the "encoder + MLP" head of the paper's tables.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._training import ARCHITECTURES

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "sc_llm.fusion/1"


class FusionModel(nn.Module):
    """Late-fusion classifier over frozen cell embeddings.

    Parameters
    ----------
    use_reps
        Names of the representations (``obsm`` keys or MuData modalities), in ``forward`` order.
    input_dims
        Width of each representation.
    classes
        Class labels, in the order of the logits.
    hidden
        Output width of each per-representation dense layer (the paper: 4096).
    hyperparameters
        Training settings recorded with the model (saved in ``config.json``).
    architecture
        ``"stacked"`` (per-representation experts combined by fitted weights) or ``"paper"``
        (the paper's concatenation network); see the module docstring.

    Attributes
    ----------
    use_reps, input_dims, classes, hidden, hyperparameters, architecture
        As passed.
    inputs
        One ``Standardize`` module per representation (identity until :meth:`set_standardization`).
    branches
        One ``Sequential(Linear(dim, hidden), ReLU())`` per representation (``"stacked"``: followed
        by ``Linear(hidden, n_classes)``, so each branch is a complete classifier).
    head
        ``"paper"``: ``Linear(hidden * len(use_reps), len(classes))``; ``"stacked"``: ``None``.
    mix
        ``"stacked"``: buffer of one non-negative weight per representation (ones until fitted).
    """

    def __init__(
        self,
        use_reps: Sequence[str],
        input_dims: Sequence[int],
        classes: Sequence[str],
        *,
        hidden: int = 4096,
        hyperparameters: Mapping[str, Any] | None = None,
        architecture: str = "paper",
    ) -> None:
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {list(ARCHITECTURES)}, got {architecture!r}.")
        use_reps, input_dims, classes = (
            list(map(str, use_reps)),
            [int(d) for d in input_dims],
            list(map(str, classes)),
        )
        _check_config(use_reps, input_dims, classes, hidden)
        self.use_reps, self.input_dims, self.classes, self.hidden = use_reps, input_dims, classes, int(hidden)
        self.hyperparameters = dict(hyperparameters or {})
        self.architecture = architecture
        self.inputs = nn.ModuleList(Standardize(d) for d in input_dims)
        n_classes = len(classes)
        if architecture == "paper":
            self.branches = nn.ModuleList(
                nn.Sequential(nn.Linear(d, self.hidden), nn.ReLU()) for d in input_dims
            )
            self.head = nn.Linear(self.hidden * len(input_dims), n_classes)
        else:
            self.branches = nn.ModuleList(
                nn.Sequential(nn.Linear(d, self.hidden), nn.ReLU(), nn.Linear(self.hidden, n_classes))
                for d in input_dims
            )
            self.head = None
            self.register_buffer("mix", torch.ones(len(input_dims)))

    def forward(self, *reps: torch.Tensor) -> torch.Tensor:
        """Logits ``[n_cells, n_classes]`` from one float tensor per representation (``use_reps`` order)."""
        if len(reps) != len(self.branches):
            raise ValueError(f"Expected {len(self.branches)} tensors ({self.use_reps}), got {len(reps)}.")
        if self.architecture == "stacked":
            return self.combine(self.expert_log_proba(*reps))
        parts = [branch(std(x)) for std, branch, x in zip(self.inputs, self.branches, reps, strict=True)]
        return self.head(torch.cat(parts, dim=1))

    def expert_log_proba(self, *reps: torch.Tensor) -> list[torch.Tensor]:
        """``"stacked"`` only: each expert's class log-probabilities, one tensor per representation."""
        return [
            torch.log_softmax(branch(std(x)), dim=1)
            for std, branch, x in zip(self.inputs, self.branches, reps, strict=True)
        ]

    def combine(self, log_probas: Sequence[torch.Tensor]) -> torch.Tensor:
        """``"stacked"`` only: fused logits ``sum_m mix[m] * log_proba_m``."""
        return sum(w * lp for w, lp in zip(self.mix, log_probas, strict=True))

    def set_standardization(self, arrays: Sequence[np.ndarray]) -> None:
        """Centre each input on the mean of ``arrays`` (training cells) and divide it by one scale per input.

        The scale is the root mean variance over the input's dimensions: it puts encoders of very
        different magnitude on one footing while keeping each embedding's geometry (low-variance
        dimensions stay small, unlike per-dimension z-scoring, which measurably hurt the fused head).
        """
        self.check_inputs(arrays, "standardization")
        for std, X in zip(self.inputs, arrays, strict=True):
            X = np.asarray(X, dtype=np.float64)
            scale = float(np.sqrt(X.var(axis=0).mean()))
            # A constant input carries no signal; leave it unscaled rather than divide by zero.
            scale = scale if scale > 0 else 1.0
            std.shift.copy_(torch.as_tensor(X.mean(axis=0), dtype=torch.float32))
            std.scale.fill_(scale)

    @property
    def device(self) -> torch.device:
        return self.inputs[0].shift.device

    def check_inputs(self, arrays: Sequence[np.ndarray], where: str = "input") -> None:
        """Raise a clear error when the number, widths or row counts of ``arrays`` do not fit the model."""
        if len(arrays) != len(self.use_reps):
            raise ValueError(
                f"The model needs {len(self.use_reps)} representations {self.use_reps}, got {len(arrays)}."
            )
        for name, dim, X in zip(self.use_reps, self.input_dims, arrays, strict=True):
            if X.ndim != 2 or X.shape[1] != dim:
                raise ValueError(
                    f"{where} representation {name!r} has shape {X.shape}, but the model was trained on width {dim}."
                )
        n_rows = {X.shape[0] for X in arrays}
        if len(n_rows) > 1:
            raise ValueError(f"Representations have different numbers of cells: {sorted(n_rows)}.")

    def predict_logits(self, arrays: Sequence[np.ndarray], *, batch_size: int = 1024) -> np.ndarray:
        """Logits as a float32 array, computed in batches without gradients."""
        parts = self._in_batches(arrays, batch_size, lambda *xs: self(*xs).float().cpu().numpy())
        return np.concatenate(parts) if parts else np.empty((0, len(self.classes)), dtype=np.float32)

    def predict_proba(self, arrays: Sequence[np.ndarray], *, batch_size: int = 1024) -> np.ndarray:
        """Class probabilities (softmax of the logits), columns in ``classes`` order."""
        logits = torch.from_numpy(self.predict_logits(arrays, batch_size=batch_size))
        return torch.softmax(logits, dim=1).numpy()

    def predict_expert_proba(
        self, arrays: Sequence[np.ndarray], *, batch_size: int = 4096
    ) -> list[np.ndarray]:
        """``"stacked"`` only: each expert's class probabilities on its own input, one array per input."""

        def experts(*xs: torch.Tensor) -> list[np.ndarray]:
            return [lp.exp().float().cpu().numpy() for lp in self.expert_log_proba(*xs)]

        parts = self._in_batches(arrays, batch_size, experts)
        return [np.concatenate([p[m] for p in parts]) for m in range(len(arrays))]

    def _in_batches(self, arrays: Sequence[np.ndarray], batch_size: int, fn) -> list:
        """``fn(*tensors)`` on successive batches of rows, in eval mode and without gradients."""
        self.check_inputs(arrays)
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                return [
                    fn(*[_as_tensor(X[start : start + batch_size], self.device) for X in arrays])
                    for start in range(0, arrays[0].shape[0], batch_size)
                ]
        finally:
            self.train(was_training)

    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild the module (written to ``config.json``)."""
        from importlib.metadata import PackageNotFoundError, version

        try:
            sc_llm_version = version("sc-llm")
        except PackageNotFoundError:  # pragma: no cover - source tree without install
            sc_llm_version = "0.0.0"
        return {
            "format": FORMAT,
            "use_reps": self.use_reps,
            "input_dims": self.input_dims,
            "hidden": self.hidden,
            "architecture": self.architecture,
            "classes": self.classes,
            "hyperparameters": _jsonable(self.hyperparameters),
            "sc_llm_version": sc_llm_version,
        }

    def save(self, path: str | Path) -> Path:
        """Write ``model.safetensors`` (weights) and ``config.json`` (architecture, label order) into ``path``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS_NAME), metadata={"format": FORMAT})
        (path / CONFIG_NAME).write_text(json.dumps(self.config(), indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device | None = None) -> FusionModel:
        """Rebuild a model written by :meth:`save` (no pickle: JSON config + safetensors weights)."""
        from safetensors.torch import load_file

        path = Path(path)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (path / name).is_file():
                raise FileNotFoundError(
                    f"{path / name} not found; is {path} a directory written by FusionModel.save?"
                )
        config = json.loads((path / CONFIG_NAME).read_text())
        if config.get("format") != FORMAT:
            raise ValueError(
                f"{path / CONFIG_NAME} has format {config.get('format')!r}, expected {FORMAT!r}."
            )
        model = cls(
            config["use_reps"],
            config["input_dims"],
            config["classes"],
            hidden=config["hidden"],
            hyperparameters=config.get("hyperparameters"),
            # Models saved before the stacked architecture existed are the paper's network.
            architecture=config.get("architecture", "paper"),
        )
        missing, unexpected = model.load_state_dict(load_file(str(path / WEIGHTS_NAME)), strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path / WEIGHTS_NAME} does not match config.json: missing {missing}, unexpected {unexpected}."
            )
        if device is not None:
            model.to(device)
        return model.eval()

    def extra_repr(self) -> str:
        return (
            f"architecture={self.architecture!r}, use_reps={self.use_reps}, input_dims={self.input_dims}, "
            f"n_classes={len(self.classes)}"
        )


class Standardize(nn.Module):
    """``(x - shift) / scale`` with per-dimension buffers (saved with the weights, never trained)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("shift", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


def _check_config(use_reps: list[str], input_dims: list[int], classes: list[str], hidden: int) -> None:
    if not use_reps:
        raise ValueError("use_reps must name at least one representation.")
    if len(set(use_reps)) != len(use_reps):
        raise ValueError(f"use_reps has duplicates: {use_reps}.")
    if len(input_dims) != len(use_reps):
        raise ValueError(f"{len(use_reps)} representations but {len(input_dims)} input dims.")
    if any(d < 1 for d in input_dims):
        raise ValueError(f"input_dims must be positive, got {input_dims}.")
    if len(classes) < 2:
        raise ValueError(f"A classifier needs at least two classes, got {classes}.")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes has duplicates: {classes}.")
    if hidden < 1:
        raise ValueError(f"hidden must be positive, got {hidden}.")


def _as_tensor(X: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(X, dtype=np.float32), device=device)


def _jsonable(value: Any) -> Any:
    """Hyperparameters with numpy scalars turned into plain Python values."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
