"""scl.tl.embed_text: embed cell sentences with a frozen sentence-transformers encoder."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
from anndata import AnnData

from .._distributed import Scheduler, run_chunks, worker_model
from .._progress import progress
from .._store import ChunkedResults, names_digest
from .._utils import as_csr, format_examples, get_matrix, maybe_copy, warn_overwrite
from ..models._runtime import Precision, resolve_precision
from ..models._text import load_text_encoder
from ..pp._cell_sentences import cell_sentences, check_values, checked_gene_names, join_ranked, rank_csr_rows

_CELL_CHUNK = 2048


def embed_text(
    adata: AnnData,
    model: Any = None,
    *,
    sentence_key: str = "cell_sentence",
    key_added: str = "X_text",
    batch_size: int = 64,
    device: Any = None,
    precision: Precision = "auto",
    normalize: bool = True,
    prefix: str | None = None,
    layer: str | None = None,
    use_raw: bool = False,
    gene_symbols: str | None = None,
    store_sentences: bool = False,
    chunk_size: int = _CELL_CHUNK,
    store: str | Path | None = None,
    scheduler: Scheduler = None,
    copy: bool = False,
) -> AnnData | None:
    """Embed each cell's sentence with a text encoder (GenePT-s / CELLama style).

    Only the start of each sentence that fits the encoder's token limit is built and read:
    tokens are counted with the encoder's own tokenizer and a gene cut by the limit is dropped
    whole, never split into word pieces.

    Parameters
    ----------
    adata
        Annotated data matrix.
    model
        ``None`` for the bundled all-MiniLM-L6-v2 (offline), a sentence-transformers name or
        local path (the paper's encoder is ``"llmrails/ember-v1"``), a ``SentenceTransformer``
        or a :class:`sc_llm.models.TextEncoder`.
    sentence_key
        ``obs`` column with sentences (e.g. from :func:`sc_llm.pp.cell_sentences` or an ablation).
        If it does not exist, sentences are ranked on the fly from the matrix given by
        ``layer`` / ``use_raw`` / ``gene_symbols`` and not stored unless ``store_sentences``.
    key_added
        ``obsm`` key for the embedding; details go to ``uns[key_added]``.
    batch_size
        Sentences per forward pass.
    device
        Torch device; ``None`` picks CUDA, then MPS, then CPU.
    precision
        ``"auto"`` (fp16 on CUDA, fp32 on CPU), ``"fp32"``, ``"bf16"`` (a bf16 copy of the weights,
        made once; on CPUs with AMX/AVX512-BF16 about 3× faster, cosine to fp32 ≥ 0.9999 on
        pbmc68k; elsewhere fp32 is used) or ``"fp16"`` (CUDA).
    normalize
        L2-normalize the embeddings.
    prefix
        Text put before every sentence, e.g. ``"A cell with genes ranked by expression: "``;
        its tokens count against the limit.
    layer, use_raw, gene_symbols
        Expression source and names for on-the-fly sentences (see :func:`sc_llm.pp.cell_sentences`).
    store_sentences
        When sentences are built on the fly, also store the full sentences in ``obs[sentence_key]``.
    chunk_size
        Cells read, ranked and embedded at a time (the unit of resuming and of distributed work).
        Memory besides the result is proportional to one chunk.
    store
        Path of a zarr store (``"X_text.zarr"``): each finished chunk's embeddings are written there
        with a done flag, and a rerun with the same store, model, cells, sentences and parameters
        computes only the chunks left (a killed run resumes). A store holding another computation
        is refused. Needs ``sc-llm[scale]``.
    scheduler
        Run the chunks on a dask.distributed cluster: ``"local"`` (a ``LocalCluster`` started and
        closed here), a scheduler address (``"tcp://host:8786"``) or a ``distributed.Client``. This
        process reads the data and sends each worker a chunk of sentences; a model given by name is
        loaded once per worker, a model object is sent once to each worker. Results equal a
        single-process run. ``None`` (default) runs here.
    copy
        Return a copy instead of writing into ``adata``.

    Returns
    -------
    ``None`` or a copy. Sets ``adata.obsm[key_added]`` (float32, cells × dim) and
    ``adata.uns[key_added]`` with the model identity, dimension, token limit, precision used
    and how many genes fit (mean, min, max).

    Notes
    -----
    Out of core: with a backed AnnData (``read_h5ad(..., backed="r")``) or a dask-array ``X``, rows
    are read one chunk at a time. Kept in memory: the result (cells × dim float32, e.g. 300 MB for
    200,000 cells at 384 dimensions), ``obs``, and one chunk of rows, sentences and token ids.
    """
    adata = maybe_copy(adata, copy)
    encoder = load_text_encoder(model, device)
    used_precision = resolve_precision(precision, encoder.device)
    if sentence_key not in adata.obs and store_sentences:
        cell_sentences(adata, layer=layer, use_raw=use_raw, gene_symbols=gene_symbols, key_added=sentence_key)
    from_obs = sentence_key in adata.obs
    source = (
        ObsSentences(adata, sentence_key)
        if from_obs
        else MatrixSentences(adata, encoder.max_tokens, layer=layer, use_raw=use_raw, gene_symbols=gene_symbols)
    )
    params = {"precision": used_precision, "normalize": normalize, "prefix": prefix or ""}
    results = ChunkedResults(
        adata.n_obs,
        chunk_size,
        {"embedding": ((encoder.dim,), np.float32), "n_fit": ((), np.int64)},
        store=store,
        fingerprint=None if store is None else _fingerprint(adata, encoder, source, params),
    )
    with progress(adata.n_obs, "embed_text", unit="cell") as bar:
        bar.update(results.n_done_cells)

        def on_result(i, out):
            results.put(i, embedding=out[0], n_fit=out[1])
            if scheduler is not None:
                bar.update(len(out[1]))

        run_chunks(
            results.todo(),
            lambda i: (source.chunk(*results.bounds(i)),),
            embed_sentence_chunk,
            on_result,
            shared=(worker_model(model, encoder, scheduler), device, prefix, batch_size, precision, normalize),
            scheduler=scheduler,
            local_kwargs={"bar": bar},
        )
    emb, n_fit = results.array("embedding"), results.array("n_fit")
    warn_overwrite(adata.obsm, key_added, "adata.obsm")
    adata.obsm[key_added] = emb
    adata.uns[key_added] = {
        "model": encoder.identity(),
        "dim": encoder.dim,
        "max_tokens": encoder.max_tokens,
        **params,
        "sentences": f"obs[{sentence_key!r}]" if from_obs else "built from the matrix (not stored)",
        "genes_in_context": _stats(n_fit),
    }
    if store is not None:
        adata.uns[key_added]["store"] = str(store)
    return adata if copy else None


def embed_sentence_chunk(model, device, prefix, batch_size, precision, normalize, sentences, bar=None):
    """Embed one chunk of sentences: ``(embeddings, genes that fit)``; runs here or on a dask worker.

    On a worker, ``model`` is a name (loaded once per worker process by the cached loader) or the
    encoder object scattered to it once.
    """
    encoder = load_text_encoder(model, device)
    ids, n_fit = encoder.fit(sentences, prefix)
    emb = encoder.encode_ids(ids, batch_size=batch_size, precision=precision, normalize=normalize, bar=bar)
    return emb, n_fit


def _fingerprint(adata, encoder, source, params) -> dict[str, Any]:
    return {
        "function": "embed_text",
        "model": encoder.identity(),
        **params,
        "sentences": source.describe(),
        "cells": names_digest(adata.obs_names),
    }


def _stats(n_fit: np.ndarray) -> dict[str, float]:
    if n_fit.size == 0:
        return {"mean": 0.0, "min": 0, "max": 0}
    return {"mean": float(n_fit.mean()), "min": int(n_fit.min()), "max": int(n_fit.max())}


class ObsSentences:
    """Sentences read from an ``obs`` column, validated once."""

    def __init__(self, adata: AnnData, key: str):
        col = adata.obs[key]
        missing = col.isna().to_numpy()
        if missing.any():
            raise ValueError(
                f"obs[{key!r}] is missing for {int(missing.sum())} cells: {format_examples(adata.obs_names[missing])}."
            )
        self.key, self.values = key, col.astype(str).to_numpy()

    def chunk(self, start: int, stop: int) -> list[str]:
        return list(self.values[start:stop])

    def describe(self) -> dict[str, Any]:
        h = hashlib.sha256()
        for start in range(0, len(self.values), 10_000):
            h.update("\n".join(self.values[start : start + 10_000]).encode())
        return {"obs": self.key, "sha256": h.hexdigest()[:16]}


class MatrixSentences:
    """Sentences ranked from the matrix one chunk of rows at a time (only rows asked for are read).

    Every gene costs at least one token, so no more than ``max_tokens`` genes per cell are ranked.
    """

    def __init__(self, adata: AnnData, max_tokens: int, *, layer, use_raw, gene_symbols):
        self.names = checked_gene_names(adata, layer=layer, use_raw=use_raw, gene_symbols=gene_symbols)
        self.X, _ = get_matrix(adata, layer=layer, use_raw=use_raw)
        self.obs_names, self.max_tokens = adata.obs_names, max_tokens
        self.params = {"layer": layer, "use_raw": use_raw, "gene_symbols": gene_symbols}

    def chunk(self, start: int, stop: int) -> list[str]:
        block = as_csr(self.X[start:stop])
        check_values(block, self.obs_names[start:stop])
        cols, indptr = rank_csr_rows(block, self.max_tokens)
        return list(join_ranked(self.names, cols, indptr))

    def describe(self) -> dict[str, Any]:
        return {"matrix": self.params, "n_vars": len(self.names)}
