"""One runner for every ``embed_*`` function: chunks, stores, schedulers, progress, precision, results.

An ``embed_*`` function is a thin adapter: it loads an encoder (:mod:`sc_llm.models._encoder`),
builds the encoder's host tokenizer for the AnnData's genes, says where a chunk's input comes from
(:class:`MatrixSource` or :class:`SentenceSource`) and what to record, and calls :func:`run_encoder`.

Per chunk, the runner reads the input (only those rows), digests it when a store is used (a resumed
store must have been computed from the same data), tokenizes it on the host, and encodes it on the
device, here or on a dask worker. On an accelerator, the next chunk is read and tokenized in a
background thread while the current one runs on the device (on a CPU both would share the same cores).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

import numpy as np
from anndata import AnnData

from sc_llm._distributed import Scheduler, client_for, map_chunks, share
from sc_llm._execution import Execution
from sc_llm._progress import progress
from sc_llm._sources import MatrixSource, SentenceSource
from sc_llm._store import ChunkedResults, names_digest
from sc_llm._utils import logger, warn_overwrite
from sc_llm.models._encoder import Tokens
from sc_llm.models._runtime import encode_tokens, resolve_device, resolve_precision


@dataclass
class EmbedRun:
    """What :func:`run_encoder` returns: the embedding, per-cell side results and the precision used."""

    embedding: np.ndarray
    per_cell: dict[str, np.ndarray] = field(default_factory=dict)
    precision: str = "fp32"


def run_encoder(
    adata: AnnData,
    encoder: Any,
    tokenizer: Any,
    source: MatrixSource | SentenceSource,
    *,
    function: str,
    spec: Any,
    device: Any,
    precision: str,
    batch_size: int | None,
    options: Mapping[str, Any] | None = None,
    per_cell: Mapping[str, Any] | None = None,
    execution: Execution,
    params: Mapping[str, Any] | None = None,
) -> EmbedRun:
    """Embed every cell of ``adata`` chunk by chunk; see the module docstring.

    ``tokenizer.tokenize(chunk) -> Tokens`` (its ``per_cell`` keys listed in ``per_cell`` with their
    dtypes) and ``tokenizer.max_tokens`` (longest token sequence, for token-capped batches);
    ``tokenizer.describe()`` joins the store fingerprint with the model identity, ``params`` and
    ``options`` (forward options such as normalization), so a store is resumed only for the same
    computation. ``spec`` is what a dask worker loads the encoder from (a name or path travels as is;
    an object is sent once to every worker).
    """
    used = resolve_precision(precision, encoder.device)
    batch_size = batch_size or default_batch_size(encoder.device)
    options = dict(options or {})
    fingerprint = {
        "function": function,
        "model": encoder.identity(),
        "precision": used,
        **options,
        **(params or {}),
        **source.describe(),
        **tokenizer.describe(),
        "cells": names_digest(adata.obs_names),
    }
    arrays = {
        "embedding": ((encoder.dim,), np.float32),
        **{k: ((), dt) for k, dt in (per_cell or {}).items()},
    }
    store = execution.store
    results = ChunkedResults(
        adata.n_obs, execution.chunk_size, arrays, store=store, fingerprint=fingerprint if store is not None else None
    )
    with progress(adata.n_obs, function, unit="cell") as bar:
        bar.update(results.n_done_cells)
        inputs = _pending_inputs(results, source, tokenizer)
        if execution.scheduler is None:
            _run_here(results, inputs, encoder, used, batch_size, tokenizer.max_tokens, options, bar)
            precisions = {used}
        else:
            precisions = _run_on_cluster(
                results,
                inputs,
                spec,
                device,
                precision,
                batch_size,
                tokenizer.max_tokens,
                options,
                execution.scheduler,
                bar,
            )
    return EmbedRun(
        results.array("embedding"),
        {k: results.array(k) for k in per_cell or {}},
        "/".join(sorted(precisions)) if precisions else used,
    )


def default_batch_size(device) -> int:
    """Cells per batch at full length: larger on an accelerator, where small batches leave it idle."""
    return 512 if resolve_device(device).type == "cuda" else 64


def _pending_inputs(results: ChunkedResults, source, tokenizer) -> Iterator[tuple[int, str, Tokens]]:
    """``(chunk id, input digest, tokens)`` for chunks not finished yet; finished ones are checked, not redone."""
    for i in range(results.n_chunks):
        chunk = source.chunk(*results.bounds(i))
        digest = chunk.digest() if results.store is not None else ""
        if results.is_done(i, digest):  # raises when the data under a finished chunk changed
            continue
        yield i, digest, tokenizer.tokenize(chunk)


def _run_here(results, inputs, encoder, precision, batch_size, max_tokens, options, bar) -> None:
    def encode(item) -> None:
        i, digest, tokens = item
        emb = encode_chunk(encoder, tokens, precision, batch_size, max_tokens, options, bar=bar)
        results.put(i, digest, embedding=emb, **tokens.per_cell)

    if encoder.device.type == "cpu":
        # Host work and the forward share the same cores (and the GIL): overlapping them is slower.
        for item in inputs:
            encode(item)
        return
    # On an accelerator, one thread reads and tokenizes the next chunk while this one runs on the device.
    with ThreadPoolExecutor(max_workers=1) as pool:
        ahead = pool.submit(next, inputs, None)
        while (item := ahead.result()) is not None:
            ahead = pool.submit(next, inputs, None)
            encode(item)


def _run_on_cluster(
    results, inputs, spec, device, precision, batch_size, max_tokens, options, scheduler, bar
):
    precisions: set[str] = set()
    with client_for(scheduler) as client:
        logger.info("Running chunks on %s (%d workers).", client.scheduler.address, len(client.nthreads()))
        remote = share(client, spec)
        side: dict[int, tuple[str, dict]] = {}

        def items():
            for i, digest, tokens in inputs:
                side[i] = (digest, tokens.per_cell)
                yield i, (remote, device, precision, tokens, batch_size, max_tokens, options)

        def on_result(i: int, out) -> None:
            emb, used = out
            digest, per_cell = side.pop(i)
            results.put(i, digest, embedding=emb, **per_cell)
            precisions.add(used)
            bar.update(len(emb))

        map_chunks(client, encode_on_worker, items(), on_result)
    return precisions


def encode_chunk(
    encoder, tokens: Tokens, precision: str, batch_size: int, max_tokens: int, options, bar=None
):
    """One chunk's forward passes (the device side); float32 rows in chunk order."""
    return encode_tokens(
        encoder,
        tokens,
        precision=precision,
        batch_size=batch_size,
        max_tokens=max_tokens,
        options=options,
        bar=bar,
    )


def encode_on_worker(spec, device, precision, tokens, batch_size, max_tokens, options):
    """A chunk's forward passes on a dask worker: load the encoder once per worker, resolve precision there."""
    encoder = load_encoder(spec, device)
    used = resolve_precision(precision, encoder.device)
    return encode_chunk(encoder, tokens, used, batch_size, max_tokens, options), used


def load_encoder(spec: Any, device: Any):
    """The encoder a spec names: ``(kind, name or path)`` through the per-process loader caches, or an object."""
    if not isinstance(spec, tuple):
        return spec
    kind, name = spec
    if kind == "text":
        from sc_llm.models._text import load_text_encoder

        return load_text_encoder(name, device)
    if kind == "scgpt":
        from sc_llm.models._scgpt import load_scgpt

        return load_scgpt(name, device)
    if kind == "geneformer":
        from sc_llm.models._geneformer import load_geneformer

        return load_geneformer(name, device)
    raise ValueError(f"Unknown encoder kind {kind!r}.")


def worker_spec(kind: str, model: Any, loaded: Any, scheduler: Scheduler) -> Any:
    """What a worker loads.

    On a cluster a model named by string or path is loaded there by name (once per worker, through
    the loader cache); otherwise the loaded object is used (sent once).
    """
    if scheduler is not None and (model is None or isinstance(model, str | PurePath)):
        return (kind, None if model is None else str(model))
    return loaded


def count_stats(n: np.ndarray) -> dict[str, float]:
    """Mean, min and max of a per-cell count (genes that fit, genes used), for ``uns``."""
    if n.size == 0:
        return {"mean": 0.0, "min": 0, "max": 0}
    return {"mean": float(n.mean()), "min": int(n.min()), "max": int(n.max())}


def write_embedding(
    adata: AnnData,
    key_added: str,
    embedding: np.ndarray,
    params: Mapping[str, Any],
    results: Mapping[str, Any],
    execution: Execution,
) -> None:
    """Put the embedding in ``obsm[key_added]`` and its record in ``uns[key_added]``.

    The record has scanpy's shape: the call's settings (model identity included) under ``"params"``,
    what the run found (dimension, genes per cell, coverage, ...) beside it.
    """
    warn_overwrite(adata.obsm, key_added, "adata.obsm")
    adata.obsm[key_added] = embedding
    run = {"chunk_size": execution.chunk_size, "store": None if execution.store is None else str(execution.store)}
    adata.uns[key_added] = {"params": {**params, **run}, **results}
