"""Shared inference plumbing for every encoder: device, precision, token-capped batches, no gradients.

Encoders stay thin (see :mod:`sc_llm.models._encoder`): they turn cells into token arrays on the host
and a padded batch into vectors on the device; :func:`encode_tokens` does the rest.
"""

from __future__ import annotations

import functools
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
    """``None`` picks CUDA if available, then MPS, else CPU.

    Returns
    -------
    device : torch.device
        The device to run on.
    """
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

    Returns
    -------
    precision : str
        ``"fp32"``, ``"bf16"`` or ``"fp16"``.
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


def token_batches(lengths: np.ndarray, batch_size: int, max_tokens: int) -> list[np.ndarray]:
    """Cells sorted by length (longest first) in batches of at most ``batch_size * max_tokens`` padded tokens.

    The cap is on tokens, not cells: a batch of short cells holds proportionally more of them, so the
    device gets the same amount of work per call, and no batch is padded beyond its longest cell.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    cap = batch_size * max(int(max_tokens), 1)
    batches, i = [], 0
    while i < len(order):
        take = max(1, cap // max(int(lengths[order[i]]), 1))
        batches.append(order[i : i + take])
        i += take
    return batches


def encode_tokens(
    encoder,
    tokens,
    *,
    precision: str,
    batch_size: int,
    max_tokens: int,
    options: dict[str, Any] | None = None,
    bar=None,
) -> np.ndarray:
    """Run ``encoder.forward`` over token-capped batches of ``tokens``; float32 rows in input order.

    ``precision`` must be resolved already. The weights are ``encoder.model_in(precision)``. On CUDA,
    batches are copied from pinned memory without blocking and outputs stay on the device until the
    end, so the host pads the next batch while the device runs the current one. Cells without tokens
    get NaN rows. No gradients are recorded.

    Returns
    -------
    embeddings : numpy.ndarray
        float32, one row per cell of ``tokens`` in input order (NaN for cells without tokens).
    """
    torch = require_torch()
    model = encoder.model_in(precision)
    device = encoder.device
    lengths = tokens.lengths
    out = np.full((len(tokens), encoder.dim), np.nan, dtype=np.float32)
    todo = np.flatnonzero(lengths > 0)
    batches = [todo[b] for b in token_batches(lengths[todo], batch_size, max_tokens)]
    outputs = []
    with torch.inference_mode():
        for idx in batches:
            arrays = tokens.padded(idx, encoder.pad_id, encoder.pad_value)
            ids, mask, values = (None if a is None else to_device(a, device) for a in arrays)
            outputs.append(encoder.forward(model, ids, mask, values, **(options or {})).float())
            if bar is not None:
                bar.update(len(idx))
        if outputs:
            out[np.concatenate(batches)] = torch.cat(outputs).cpu().numpy()
    if bar is not None:
        bar.update(len(tokens) - len(todo))
    return out


def to_device(array: np.ndarray, device):
    """A numpy array as a tensor on ``device``; on CUDA through pinned memory without blocking."""
    torch = require_torch()
    t = torch.from_numpy(array)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@functools.cache
def file_digest(path: str, n_hex: int = 16) -> str:
    """Short SHA-256 of a weights file, so ``uns`` records exactly which checkpoint made an embedding."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:n_hex]


def pad_batch(seqs, pad_id: int, device):
    """Right-padded ``(ids, attention_mask)`` tensors on ``device`` for a list of token sequences."""
    from ._encoder import Tokens

    tokens = Tokens.from_lists(list(seqs))
    ids, mask, _ = tokens.padded(np.arange(len(tokens)), pad_id)
    return to_device(ids, device), to_device(mask, device)
