"""Shared inference plumbing for every encoder: device, precision, length-sorted batches, no gradients.

Encoders stay thin: they say how to turn a list of items into a batch and a batch into vectors;
:func:`run_batched` does the rest.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np

Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def require_torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a hard dependency
        raise ImportError("sc_llm needs PyTorch: pip install torch") from e
    return torch


def resolve_device(device: str | Any | None = None):
    """``None`` picks CUDA if available, then MPS, else CPU."""
    torch = require_torch()
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 matrix units (AVX512-BF16 or AMX); otherwise bf16 is emulated (slow)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: Precision, device) -> str:
    """Map a user precision to the one actually used on ``device``.

    ``"auto"`` is fp16 on CUDA and fp32 elsewhere (reduced precision on CPU is opt-in).
    ``"bf16"`` on a CPU without native bf16 falls back to fp32, since emulation is slower.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
    kind = device.type
    if precision == "auto":
        return "fp16" if kind == "cuda" else "fp32"
    if kind == "cpu" and precision == "fp16":
        raise ValueError("fp16 is not supported on CPU; use precision='bf16' or 'fp32'.")
    if kind == "cpu" and precision == "bf16" and not cpu_has_bf16():
        return "fp32"
    return precision


def autocast(device, precision: str):
    """Autocast context for reduced precision; matmuls in low precision, norms and softmax in fp32."""
    torch = require_torch()
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Indices grouped into batches of similar length, longest first, so padding stays small."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def run_batched(
    n_items: int,
    lengths: Sequence[int],
    forward: Callable[[np.ndarray], Any],
    *,
    batch_size: int,
    device,
    precision: str,
    desc: str,
    out_dim: int,
    bar=None,
) -> np.ndarray:
    """Run ``forward(indices) -> tensor[len(indices), out_dim]`` over length-sorted batches.

    Returns a float32 array in the original item order. No gradients are recorded. Pass ``bar``
    (a tqdm bar) to report into an outer progress bar instead of opening one.
    """
    from .._progress import progress

    torch = require_torch()
    out = np.empty((n_items, out_dim), dtype=np.float32)
    own_bar = progress(n_items, desc, unit="cell") if bar is None else contextlib.nullcontext(bar)
    with torch.inference_mode(), autocast(device, precision), own_bar as pbar:
        for idx in length_sorted_batches(lengths, batch_size):
            out[idx] = forward(idx).float().cpu().numpy()
            pbar.update(len(idx))
    return out


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, device, pin: bool = False):
    """Right-pad integer sequences; returns ``(ids, attention_mask)`` tensors on ``device``."""
    torch = require_torch()
    width = max((len(s) for s in seqs), default=0)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    if pin and device.type == "cuda":
        ids_t, mask_t = ids_t.pin_memory(), mask_t.pin_memory()
    return ids_t.to(device, non_blocking=pin), mask_t.to(device, non_blocking=pin)


@functools.cache
def file_digest(path: str, n_hex: int = 16) -> str:
    """Short SHA-256 of a weights file, so ``uns`` records exactly which checkpoint made an embedding."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:n_hex]


def reduced_copy(model, precision: str):
    """``model`` itself for fp32, else a bf16/fp16 copy of it in eval mode.

    Casting the weights once is cheaper than autocast, which re-casts weights on every call.
    """
    if precision == "fp32":
        return model
    import copy

    torch = require_torch()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return copy.deepcopy(model).to(dtype).eval()
