"""How a chunked computation runs (chunk size, resumable store, dask scheduler): one object for all of them.

``pp.cell_sentences`` and every ``embed_*`` function work chunk by chunk; these settings change how
the work is done, never its result, so they travel together as :class:`Execution` instead of adding
three parameters to each function.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from os import PathLike
from typing import Any

from ._distributed import Scheduler


@dataclass(frozen=True)
class Execution:
    """How a chunked computation runs; pass as ``execution=`` to ``pp.cell_sentences`` and ``tl.embed_*``.

    Parameters
    ----------
    chunk_size
        Cells read and processed at a time: the unit of resuming and of distributed work. Memory
        besides the result is proportional to two chunks (on an accelerator the next one is prepared
        while the current one runs). ``None`` takes the function's default.
    store
        Path of a zarr store (``"X_emb.zarr"``, needs ``sc-llm[scale]``). Each finished chunk's rows
        are written there with a done flag and digests of its input data and of its rows; a rerun with
        the same store computes only the chunks left (a killed run resumes). A store holding another
        computation (model, weights, parameters, cells) or computed from other data is refused, and a
        finished chunk whose file was deleted or damaged is computed again with a warning.
    scheduler
        ``embed_*`` only: run the forward passes on a dask.distributed cluster: ``"local"`` (a
        ``LocalCluster`` started and closed here), ``"cuda"`` (one worker per visible GPU, each pinned to
        its GPU), a scheduler address (``"tcp://host:8786"``) or a ``distributed.Client``. This process
        reads and tokenizes each chunk and sends its token arrays; a model given by name or folder is
        loaded once per worker (the folder must be readable there), a model object is sent once to
        every worker. Results equal a single-process run. ``None`` runs here.

    Examples
    --------
    >>> import sc_llm as scl
    >>> scl.Execution(store="X_text.zarr", chunk_size=4096)
    Execution(chunk_size=4096, store='X_text.zarr', scheduler=None)
    """

    chunk_size: int | None = None
    store: str | PathLike | None = None
    scheduler: Scheduler = None

    def __post_init__(self) -> None:
        size = self.chunk_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"Execution.chunk_size must be a positive integer or None, got {size!r}.")
        if self.store is not None and not isinstance(self.store, str | PathLike):
            raise TypeError(f"Execution.store must be a path, got {type(self.store).__name__}.")


def resolve_execution(execution: Any, default_chunk_size: int) -> Execution:
    """``execution`` checked and with its chunk size filled in (``None`` → all defaults)."""
    if execution is None:
        execution = Execution()
    if not isinstance(execution, Execution):
        raise TypeError(
            f"execution must be an sc_llm.Execution (e.g. scl.Execution(store='x.zarr')), "
            f"got {type(execution).__name__}."
        )
    if execution.chunk_size is None:
        execution = replace(execution, chunk_size=default_chunk_size)
    return execution
