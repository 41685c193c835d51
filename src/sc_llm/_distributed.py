"""Run per-chunk work on a dask.distributed cluster, with results handed back in completion order.

The client process reads the data (a backed file needs to be readable only there) and sends each
worker a chunk's input; the worker runs the model and returns the chunk's result. A worker loads a
model once and keeps it: models named by string go through the per-process loader caches
(``load_text_encoder`` and friends), and a model object is scattered once to every worker.
At most a few chunks per worker are in flight, so client memory stays bounded by the chunk size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import PurePath
from typing import Any

from ._utils import import_optional

Scheduler = Any  # None | "local" | "tcp://host:port" | distributed.Client | distributed.LocalCluster


def require_distributed():
    return import_optional("distributed", "scale", "Execution(scheduler=...)")


@contextlib.contextmanager
def client_for(scheduler: Scheduler) -> Iterator[Any]:
    """A ``distributed.Client`` for ``scheduler``; clusters and clients made here are closed on exit.

    ``"local"`` starts a ``LocalCluster`` of single-threaded worker processes (one per core, each
    model forward then uses one core); ``"cuda"`` starts one worker per visible GPU, each pinned to
    its GPU by ``CUDA_VISIBLE_DEVICES`` (see :func:`gpu_cluster`); a string is a scheduler address;
    a ``Client`` is used as is; a cluster object gets a client of its own.
    """
    distributed = require_distributed()
    if isinstance(scheduler, distributed.Client):
        yield scheduler
        return
    with contextlib.ExitStack() as stack:
        if isinstance(scheduler, str) and scheduler == "local":
            cluster = stack.enter_context(distributed.LocalCluster(processes=True, threads_per_worker=1))
            client = stack.enter_context(distributed.Client(cluster))
        elif isinstance(scheduler, str) and scheduler == "cuda":
            client = stack.enter_context(distributed.Client(stack.enter_context(gpu_cluster())))
        elif isinstance(scheduler, str):
            client = stack.enter_context(distributed.Client(scheduler))
        elif hasattr(scheduler, "scheduler_address"):
            client = stack.enter_context(distributed.Client(scheduler))
        else:
            raise TypeError(
                f"scheduler must be None, 'local', a scheduler address or a distributed.Client, got {scheduler!r}."
            )
        yield client


def gpu_cluster(n_gpus: int | None = None):
    """A local cluster with one single-threaded worker process per GPU, each seeing only its own GPU.

    Uses dask-cuda's ``LocalCUDACluster`` when it is installed; otherwise each worker's nanny sets
    ``CUDA_VISIBLE_DEVICES`` to one GPU index, so ``device=None`` (``"cuda"``) in a worker is that GPU.
    Models named by path are loaded once per worker; the client process reads and tokenizes chunks.
    """
    distributed = require_distributed()
    if n_gpus is None:
        import torch

        n_gpus = torch.cuda.device_count()
    if n_gpus < 1:
        raise ValueError("scheduler='cuda' needs at least one CUDA GPU, and none is visible; use scheduler='local'.")
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        workers = {
            f"gpu-{i}": {
                "cls": distributed.Nanny,
                "options": {"nthreads": 1, "env": {"CUDA_VISIBLE_DEVICES": str(i)}},
            }
            for i in range(n_gpus)
        }
        scheduler = {"cls": distributed.Scheduler, "options": {"dashboard_address": None, "host": "127.0.0.1"}}
        return distributed.SpecCluster(workers=workers, scheduler=scheduler)
    return LocalCUDACluster(CUDA_VISIBLE_DEVICES=list(range(n_gpus)), threads_per_worker=1)


def share(client, obj: Any) -> Any:
    """Ship a model object to every worker once; names, numbers and ``None`` travel as they are."""
    if obj is None or isinstance(obj, str | int | float | bool | PurePath):
        return obj
    return client.scatter(obj, broadcast=True, hash=False)


def map_chunks(
    client,
    func: Callable[..., Any],
    items: Iterable[tuple[int, tuple]],
    on_result: Callable[[int, Any], None],
    *,
    per_worker: int = 2,
) -> None:
    """Run ``func(*args)`` for each ``(chunk_id, args)`` and call ``on_result(chunk_id, result)``.

    Inputs are produced lazily and at most ``per_worker`` chunks per worker are submitted at a time.
    Results arrive in completion order; a failing chunk cancels the rest and re-raises its error
    (chunks already handed to ``on_result`` stay done, so an on-disk store can resume).
    """
    distributed = require_distributed()
    window = per_worker * max(len(client.nthreads()), 1)
    items = iter(items)
    in_flight: dict[Any, tuple[int, Any]] = {}
    pending = distributed.as_completed()
    try:
        for chunk_id, args in items:
            _submit(client, func, args, chunk_id, in_flight, pending)
            if len(in_flight) >= window:
                break
        for future in pending:
            chunk_id, _ = in_flight.pop(future.key)
            on_result(chunk_id, future.result())
            for next_id, args in items:
                _submit(client, func, args, next_id, in_flight, pending)
                break
    finally:
        for _, future in in_flight.values():
            future.cancel()


def _submit(client, func, args, chunk_id, in_flight, pending) -> None:
    # pure=False: hashing a chunk's inputs to build a key would cost as much as sending them.
    future = client.submit(func, *args, pure=False)
    in_flight[future.key] = (chunk_id, future)
    pending.add(future)
