"""The cell-encoder protocol: every encoder is a host-side tokenizer plus a device-side forward.

An encoder (text, GenePT-w gene mode, scGPT, Geneformer, the next one) states only what differs:

- ``identity()``: name, version, weights digest (also for a model passed as an object), dim, token limit;
- a host tokenizer (``tokenizer_for(...)``) whose ``tokenize(chunk) -> Tokens`` turns a chunk of cells
  into flat numpy token arrays with numpy alone (picklable, cheap to ship to a worker);
- ``forward(model, batch, **options) -> tensor[cells, dim]`` on the device, for a padded batch;
- ``model_in(precision)``: the weights in fp32/bf16/fp16, the reduced copy made once per
  (model, device, precision) and reused across calls.

:func:`sc_llm.models._runtime.encode_tokens` runs ``forward`` over token-capped batches;
``sc_llm.tl._embedding`` owns chunks, stores, schedulers and writing results.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass
class Tokens:
    """Tokenized cells in CSR layout: cell ``i`` is ``ids[ptr[i]:ptr[i + 1]]``.

    ``values`` (optional) runs parallel to ``ids`` (scGPT's binned values, gene-mode weights);
    ``per_cell`` holds side results stored next to the embedding (e.g. genes that fit).
    """

    ids: np.ndarray
    ptr: np.ndarray
    values: np.ndarray | None = None
    per_cell: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ptr) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.ptr)

    @classmethod
    def from_lists(cls, seqs, values=None, **per_cell) -> Tokens:
        """Build from per-cell sequences (tests and the sentence fallback)."""
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        ptr = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=ptr[1:])
        ids = (
            np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs])
            if len(seqs)
            else np.zeros(0, np.int64)
        )
        vals = None
        if values is not None:
            vals = np.concatenate([np.asarray(v, dtype=np.float32) for v in values]) if len(values) else None
        return cls(ids, ptr, vals, {k: np.asarray(v) for k, v in per_cell.items()})

    def padded(self, idx: np.ndarray, pad_id: int, pad_value: float = 0.0):
        """Right-padded ``(ids, mask, values)`` arrays of the cells ``idx`` (no wider than the longest)."""
        lens = self.lengths[idx]
        width = int(lens.max(initial=0))
        n = len(idx)
        total = int(lens.sum())
        row_start = np.cumsum(lens) - lens
        rows = np.repeat(np.arange(n), lens)
        cols = np.arange(total) - np.repeat(row_start, lens)
        src = np.repeat(self.ptr[:-1][idx], lens) + cols
        ids = np.full((n, width), pad_id, dtype=np.int64)
        ids[rows, cols] = self.ids[src]
        mask = np.zeros((n, width), dtype=np.int64)
        mask[rows, cols] = 1
        values = None
        if self.values is not None:
            values = np.full((n, width), pad_value, dtype=np.float32)
            values[rows, cols] = self.values[src]
        return ids, mask, values


@runtime_checkable
class CellEncoder(Protocol):
    """What the runner needs from an encoder (see the module docstring)."""

    device: Any
    dim: int
    max_tokens: int
    pad_id: int
    pad_value: float

    def identity(self) -> dict[str, Any]: ...

    def model_in(self, precision: str) -> Any: ...

    def forward(self, model: Any, ids, mask, values, **options) -> Any: ...


# -- reduced-precision copies and digests of in-memory modules ----------------------------------
# Keyed weakly by the user's module, so a copy lives as long as the model it was made from.
_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _param_versions(module) -> tuple[int, ...]:
    # A tensor's _version grows with every in-place change, so edited weights invalidate copies/digests.
    return tuple(t._version for t in module.state_dict(keep_vars=True).values())


def reduced_copy(module, precision: str):
    """``module`` itself for fp32, else its bf16/fp16 copy: made once per (module, device, precision).

    Casting the weights once is cheaper than autocast, which re-casts weights on every call (on a
    2-core CPU that copying took 40 % of a bf16 forward pass). The copy is remade if the original
    weights were changed in place since.
    """
    if precision == "fp32":
        return module
    import copy

    import torch

    device = next(module.parameters()).device
    versions = _param_versions(module)
    cached = _COPIES.setdefault(module, {})
    key = (str(device), precision)
    if key not in cached or cached[key][0] != versions:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        cached[key] = (versions, copy.deepcopy(module).to(dtype).eval())
    return cached[key][1]


def module_digest(module, n_hex: int = 16) -> str:
    """SHA-256 of a module's parameters and buffers (names, dtypes, shapes, bytes), cached per version.

    Identifies a model passed as an object, so a store written with one set of weights is never
    resumed with another.
    """
    import torch

    versions = _param_versions(module)
    cached = _DIGESTS.get(module)
    if cached is not None and cached[0] == versions:
        return cached[1]
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    digest = h.hexdigest()[:n_hex]
    _DIGESTS[module] = (versions, digest)
    return digest


def array_digest(*arrays: np.ndarray | None, n_hex: int = 16) -> str:
    """Digest of numpy arrays (dtype, shape and bytes), e.g. a CSR chunk's data/indices/indptr."""
    h = hashlib.blake2b(digest_size=n_hex // 2)
    for a in arrays:
        if a is None:
            h.update(b"none")
            continue
        a = np.ascontiguousarray(a)
        if a.dtype == object:
            h.update("\x1f".join(map(str, a.ravel())).encode())
        else:
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.view(np.uint8).ravel().data)
    return h.hexdigest()
