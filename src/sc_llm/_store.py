"""Resumable on-disk results of chunked per-cell work (embeddings, sentences) in a zarr group.

Layout of a store written by :class:`ChunkStore`::

    path.zarr/
      <name>       one array per result, rows = cells, zarr chunks = work chunks
      input_digest   str, per work chunk: digest of the data the chunk was computed from
      output_digest  str, per work chunk: digest of the rows written
      done         bool, one flag per work chunk, set only after the chunk's rows and digests are written
      attrs        {"sc_llm": fingerprint}: what was computed (model, parameters, cells, chunk size)

A run killed at any point loses at most the chunks in flight: a chunk's ``done`` flag is written
after its rows, so a rerun with the same fingerprint recomputes exactly the chunks without a flag.
A rerun whose fingerprint differs (another model, other cells, other parameters) is refused instead
of mixing two computations in one array, and so is a rerun whose input data changed under a finished
chunk (the input digests differ). A finished chunk whose rows no longer match their output digest
(a chunk file deleted or damaged on disk) is recomputed, with a warning.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ._utils import import_optional, logger

_ATTR = "sc_llm"
#: Version of the store layout, part of the fingerprint: a store of another layout is never resumed.
STORE_FORMAT = 2


def require_zarr():
    return import_optional("zarr", "scale", "A resumable store (Execution(store=...))")


def names_digest(names) -> str:
    """Short digest of cell names, so a store is never resumed for other cells."""
    h = hashlib.sha256()
    for start in range(0, len(names), 100_000):
        h.update("\n".join(map(str, names[start : start + 100_000])).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


class ChunkStore:
    """Per-cell arrays filled chunk by chunk, with a done-mask so an interrupted run can resume.

    Parameters
    ----------
    path
        Folder of the zarr group; created when missing, resumed when it holds the same fingerprint.
    n_obs
        Number of cells (rows of every array).
    chunk_size
        Cells per work chunk (also the zarr chunk length, so one chunk is one write).
    fingerprint
        JSON-serializable description of the computation; a store is only resumed with an equal one.
    arrays
        ``name -> (trailing shape, dtype)`` of the per-cell arrays; dtype ``str`` stores text.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        n_obs: int,
        chunk_size: int,
        fingerprint: Mapping[str, Any],
        arrays: Mapping[str, tuple[tuple[int, ...], Any]],
    ):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
        zarr = require_zarr()
        self.path = Path(path)
        self.n_obs, self.chunk_size = int(n_obs), int(chunk_size)
        self.n_chunks = -(-self.n_obs // self.chunk_size)
        full = {
            **_jsonable(fingerprint),
            "n_obs": self.n_obs,
            "chunk_size": self.chunk_size,
            "arrays": sorted(arrays),
        }
        self.group = zarr.open_group(str(self.path), mode="a")
        self._check_fingerprint(full)
        for name, (trailing, dtype) in arrays.items():
            if name in self.group:  # same fingerprint, so same shape and dtype
                continue
            self.group.create_array(
                name,
                shape=(self.n_obs, *trailing),
                chunks=(self.chunk_size, *trailing) if self.n_obs else (1, *trailing),
                dtype=dtype,
                fill_value="" if dtype is str else 0,
            )
        self._dtypes = {name: dtype for name, (_, dtype) in arrays.items()}
        per_chunk = {"done": (bool, False), "input_digest": (str, ""), "output_digest": (str, "")}
        for name, (dtype, fill) in per_chunk.items():
            if name not in self.group:
                self.group.create_array(
                    name,
                    shape=(self.n_chunks,),
                    chunks=(max(self.n_chunks, 1),),
                    dtype=dtype,
                    fill_value=fill,
                )
        self.done = self.group["done"]
        self._done = np.asarray(self.done[:], dtype=bool)
        self._inputs = np.asarray(self.group["input_digest"][:], dtype=object)
        self._outputs = np.asarray(self.group["output_digest"][:], dtype=object)
        if self._done.any():
            self._recheck_outputs()
            logger.info(
                "Resuming %s: %d of %d chunks already done.", self.path, self._done.sum(), self.n_chunks
            )

    def _check_fingerprint(self, full: dict[str, Any]) -> None:
        full = {**full, "store_format": STORE_FORMAT}
        old = self.group.attrs.get(_ATTR)
        if old is None:
            if len(list(self.group.keys())):
                raise ValueError(f"{self.path} holds a zarr group not written by sc_llm; pass a new path.")
            self.group.attrs[_ATTR] = full
            return
        if old != full:
            differ = sorted(k for k in set(old) | set(full) if old.get(k) != full.get(k))
            raise ValueError(
                f"The store {str(self.path)!r} holds another computation (differs in {differ}: "
                f"stored {[old.get(k) for k in differ]}, now {[full.get(k) for k in differ]}). "
                "Delete it or pass a new path to start over."
            )

    def bounds(self, i: int) -> tuple[int, int]:
        """Row range ``(start, stop)`` of chunk ``i``."""
        start = i * self.chunk_size
        return start, min(start + self.chunk_size, self.n_obs)

    def pending(self) -> list[int]:
        """Chunks not finished yet, in order."""
        return [int(i) for i in np.flatnonzero(~self._done)]

    @property
    def n_done_cells(self) -> int:
        return sum(b - a for a, b in map(self.bounds, np.flatnonzero(self._done)))

    @property
    def complete(self) -> bool:
        return bool(self._done.all())

    def is_done(self, i: int, input_digest: str) -> bool:
        """Whether chunk ``i`` is finished; refuse when it was computed from other input data."""
        if not self._done[i]:
            return False
        if self._inputs[i] != input_digest:
            start, stop = self.bounds(i)
            raise ValueError(
                f"The store {str(self.path)!r} holds results computed from other input data: cells {start}–{stop - 1} "
                f"(chunk {i}) changed since they were written. Delete the store or pass a new path to start over."
            )
        return True

    def write(self, i: int, input_digest: str = "", **values: np.ndarray) -> None:
        """Write chunk ``i``'s rows of each named array and its digests, then mark the chunk done."""
        start, stop = self.bounds(i)
        for name, value in values.items():
            self.group[name][start:stop] = value
        output = self._output_digest(values)
        self.group["input_digest"][i] = input_digest
        self.group["output_digest"][i] = output
        self._inputs[i], self._outputs[i] = input_digest, output
        self.done[i] = True
        self._done[i] = True

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` of an array (text comes back as a numpy array of Python ``str`` objects)."""
        try:
            out = self.group[name][start : self.n_obs if stop is None else stop]
        except Exception as e:  # zarr/numcodecs raise many types for a damaged chunk file
            raise OSError(
                f"Cannot read rows {start}:{stop} of {name!r} from the store {str(self.path)!r}: {e}"
            ) from e
        if out.dtype.kind in "TU":
            out = out.astype(object)
        return out

    def _output_digest(self, values: Mapping[str, np.ndarray]) -> str:
        from .models._encoder import array_digest

        return array_digest(
            *(
                np.asarray(values[n], dtype=object if self._dtypes[n] is str else self._dtypes[n])
                for n in sorted(values)
            )
        )

    def _recheck_outputs(self) -> None:
        """Mark finished chunks whose rows no longer match their digest (deleted or damaged files) as not done."""
        bad = []
        for i in np.flatnonzero(self._done):
            start, stop = self.bounds(int(i))
            try:
                rows = {name: self.read(name, start, stop) for name in self._dtypes}
                ok = self._output_digest(rows) == self._outputs[i]
            except OSError:
                ok = False
            if not ok:
                bad.append(int(i))
        if bad:
            logger.warning(
                "The store %s has %d finished chunks whose rows are missing or damaged on disk (chunks %s); "
                "they are computed again.", self.path, len(bad), bad[:10],
            )  # fmt: skip
            self._done[bad] = False
            self.done[bad] = False


def _jsonable(value: Any) -> Any:
    """Round-trip through JSON so a fingerprint compares equal to the one read back from disk."""
    return json.loads(json.dumps(value, default=str))


class ChunkedResults:
    """Per-cell results filled chunk by chunk: in memory, or in a resumable :class:`ChunkStore`.

    The embedding functions share this so that ``store=`` behaves the same everywhere: ``todo()``
    lists the chunks left, ``put`` records one, ``arrays`` returns the finished arrays.
    """

    def __init__(
        self,
        n_obs: int,
        chunk_size: int,
        arrays: Mapping[str, tuple[tuple[int, ...], Any]],
        *,
        store: str | Path | None = None,
        fingerprint: Mapping[str, Any] | None = None,
    ):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
        self.n_obs, self.chunk_size = int(n_obs), int(chunk_size)
        self.store = None
        self._mem: dict[str, np.ndarray] = {}
        if store is not None:
            self.store = ChunkStore(
                store, n_obs=n_obs, chunk_size=chunk_size, fingerprint=fingerprint or {}, arrays=arrays
            )
        else:
            self._mem = {
                name: np.empty((self.n_obs, *trailing), dtype=object if dtype is str else dtype)
                for name, (trailing, dtype) in arrays.items()
            }

    def bounds(self, i: int) -> tuple[int, int]:
        start = i * self.chunk_size
        return start, min(start + self.chunk_size, self.n_obs)

    @property
    def n_chunks(self) -> int:
        return -(-self.n_obs // self.chunk_size)

    def todo(self) -> list[int]:
        if self.store is not None:
            return self.store.pending()
        return list(range(self.n_chunks))

    def is_done(self, i: int, input_digest: str) -> bool:
        """Whether chunk ``i`` is already in the store (refused if computed from other input data)."""
        return self.store is not None and self.store.is_done(i, input_digest)

    @property
    def n_done_cells(self) -> int:
        return 0 if self.store is None else self.store.n_done_cells

    def put(self, i: int, input_digest: str = "", **values: np.ndarray) -> None:
        if self.store is not None:
            self.store.write(i, input_digest, **values)
            return
        start, stop = self.bounds(i)
        for name, value in values.items():
            self._mem[name][start:stop] = value

    def array(self, name: str) -> np.ndarray:
        if self.store is None:
            return self._mem[name]
        if not self.store.complete:  # pragma: no cover - callers only read after every chunk is put
            raise RuntimeError(f"{self.store.path} is missing chunks {self.store.pending()[:5]}.")
        return self.store.read(name)
