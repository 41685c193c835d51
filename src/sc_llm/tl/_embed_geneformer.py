"""scl.tl.embed_geneformer: Geneformer cell embeddings (rank value encoding + BERT)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from anndata import AnnData
from scipy import sparse

from .._distributed import Scheduler, run_embedding, worker_model
from .._progress import progress
from .._store import ChunkedResults, names_digest
from .._utils import as_csr, format_examples, gene_names, get_matrix, maybe_copy, warn_overwrite
from ..models._runtime import Precision, resolve_precision

logger = logging.getLogger("sc_llm")

_CELL_CHUNK = 1024
TARGET_SUM = 10_000


def embed_geneformer(
    adata: AnnData,
    model_dir: str | Path | Any,
    *,
    token_dictionary: str | Path | Mapping[str, int],
    gene_median_dictionary: str | Path | Mapping[str, float],
    ensembl_col: str | None = "ensembl_id",
    counts_layer: str | None = None,
    emb_layer: int = -1,
    emb_mode: Literal["mean", "cls"] = "mean",
    special_tokens: bool | None = None,
    batch_size: int = 32,
    device: Any = None,
    precision: Precision = "auto",
    key_added: str = "X_geneformer",
    chunk_size: int = _CELL_CHUNK,
    store: str | Path | None = None,
    scheduler: Scheduler = None,
    copy: bool = False,
) -> AnnData | None:
    """Embed cells with a pretrained Geneformer model.

    Rank value encoding as Geneformer's tokenizer: a cell's counts of the genes in both
    dictionaries are divided by its total count (over all genes), scaled to 10,000 and divided
    by each gene's median; genes are sorted by that value, highest first (ties keep ``var``
    order), and cut to the model's input size. Duplicate Ensembl IDs are summed first. The
    embedding is the mean of one hidden layer over the cell's gene tokens.

    Parameters
    ----------
    adata
        Annotated data matrix with raw counts.
    model_dir
        Geneformer folder (transformers ``BertForMaskedLM`` checkpoint: ``config.json`` and
        ``model.safetensors`` or ``pytorch_model.bin``) or an encoder from
        :func:`sc_llm.models.load_geneformer`.
    token_dictionary
        Ensembl ID → token id, as a dict or the pickle shipped with Geneformer
        (``token_dictionary_gc104M.pkl`` for V2 models, ``gene_dictionaries_30m/token_dictionary_gc30M.pkl`` for V1).
    gene_median_dictionary
        Ensembl ID → non-zero median expression, as a dict or Geneformer's pickle (same model version).
    ensembl_col
        ``var`` column with Ensembl gene IDs (Geneformer's convention is ``"ensembl_id"``);
        ``None`` uses ``var_names``.
    counts_layer
        Layer with raw counts; ``None`` uses ``adata.X``.
    emb_layer
        Geneformer's layer convention: ``-1`` (its default) is the second-to-last layer, ``0``
        the last layer, ``-n_layers`` the input embeddings.
    emb_mode
        ``"mean"`` over gene tokens (Geneformer's cell embedding) or ``"cls"`` (V2 models only).
    special_tokens
        Add ``<cls>``/``<eos>`` around the genes (V2). ``None`` decides from the token dictionary
        (both tokens present → V2).
    batch_size
        Cells per forward pass (batches group cells of similar length).
    device
        Torch device; ``None`` picks CUDA, then MPS, then CPU.
    precision
        ``"auto"`` (fp16 on CUDA, fp32 on CPU), ``"fp32"``, ``"bf16"`` (used on CPUs with native
        bf16, else fp32) or ``"fp16"`` (CUDA).
    key_added
        ``obsm`` key for the embedding; details go to ``uns[key_added]``.
    chunk_size
        Cells read and tokenized at a time (the unit of resuming and of distributed work).
    store
        Path of a resumable zarr store for the embeddings (see :func:`sc_llm.tl.embed_text`).
    scheduler
        Run the forward passes on a dask.distributed cluster (``"local"``, an address or a
        ``Client``, see :func:`sc_llm.tl.embed_text`); this process reads and tokenizes the
        chunks. Workers load ``model_dir`` once each, so the folder must be readable there.
    copy
        Return a copy instead of writing into ``adata``.

    Returns
    -------
    ``None`` or a copy. Sets ``adata.obsm[key_added]`` (float32, cells × hidden size, in the
    caller's cell order) and ``adata.uns[key_added]`` with the model identity, layer, special
    tokens, matched genes and genes per cell.
    """
    from ..models._geneformer import load_geneformer, read_dictionary

    tokens_of = read_dictionary(token_dictionary, "token_dictionary")
    medians = read_dictionary(gene_median_dictionary, "gene_median_dictionary")
    if special_tokens is None:
        special_tokens = "<cls>" in tokens_of and "<eos>" in tokens_of
    _check_mode(emb_mode, special_tokens, tokens_of)
    adata = maybe_copy(adata, copy)
    encoder = load_geneformer(model_dir, device)
    used_precision = resolve_precision(precision, encoder.device)
    encoder.hidden_index(emb_layer)
    X, var = get_matrix(adata, layer=counts_layer)
    cols, collapse, token_ids, norm = _match_genes(
        gene_names(var, ensembl_col), tokens_of, medians, ensembl_col
    )
    _check_vocab(token_ids, wrap_ids(tokens_of, special_tokens), encoder.vocab_size)
    n_keep = encoder.input_size - (2 if special_tokens else 0)
    wrap = wrap_ids(tokens_of, special_tokens)

    fingerprint = {
        "function": "embed_geneformer", "model": encoder.identity(), "precision": used_precision,
        "emb_layer": emb_layer, "emb_mode": emb_mode, "special_tokens": bool(special_tokens),
        "counts_layer": counts_layer,
    }  # fmt: skip
    if store is not None:
        fingerprint |= {"cells": names_digest(adata.obs_names), "tokens": names_digest(token_ids)}
    results = ChunkedResults(
        adata.n_obs,
        chunk_size,
        {"embedding": ((encoder.dim,), np.float32), "n_genes": ((), np.int64)},
        store=store,
        fingerprint=fingerprint,
    )

    def tokenize(start: int, stop: int):
        seqs, n = rank_value_encode(as_csr(X[start:stop]), cols, collapse, token_ids, norm, n_keep, wrap)
        _check_nonempty(n, adata.obs_names[start:stop])
        return (seqs,), {"n_genes": n}

    with progress(adata.n_obs, "embed_geneformer", unit="cell") as bar:
        run_embedding(
            results,
            tokenize,
            encode_geneformer_chunk,
            shared=(
                worker_model(model_dir, encoder, scheduler), device, emb_layer, special_tokens, emb_mode,
                batch_size, precision,
            ),
            scheduler=scheduler,
            bar=bar,
        )  # fmt: skip
    emb, n_genes = results.array("embedding"), results.array("n_genes")
    warn_overwrite(adata.obsm, key_added, "adata.obsm")
    adata.obsm[key_added] = emb
    adata.uns[key_added] = {
        "model": encoder.identity(),
        "precision": used_precision,
        "emb_layer": emb_layer,
        "emb_mode": emb_mode,
        "special_tokens": bool(special_tokens),
        "ensembl_col": ensembl_col or "var_names",
        "n_genes_matched": int(len(token_ids)),
        "fraction_genes_matched": len(cols) / max(len(var), 1),
        "genes_per_cell": _stats(np.minimum(n_genes, n_keep)),
        "n_cells_truncated": int((n_genes > n_keep).sum()),
    }
    return adata if copy else None


def encode_geneformer_chunk(
    model_dir, device, emb_layer, special_tokens, emb_mode, batch_size, precision, seqs, bar=None
) -> np.ndarray:
    """One chunk's forward passes; runs here or on a dask worker (which loads the model once)."""
    from ..models._geneformer import load_geneformer

    encoder = load_geneformer(model_dir, device)
    used = resolve_precision(precision, encoder.device)  # on a worker: that worker's device
    return encoder.encode(
        seqs, emb_layer=emb_layer, special_tokens=special_tokens, emb_mode=emb_mode,
        batch_size=batch_size, precision=used, bar=bar,
    )  # fmt: skip


def _check_mode(emb_mode: str, special_tokens: bool, tokens_of: Mapping) -> None:
    if emb_mode not in ("mean", "cls"):
        raise ValueError(f"emb_mode must be 'mean' or 'cls', got {emb_mode!r}.")
    if emb_mode == "cls" and not special_tokens:
        raise ValueError("emb_mode='cls' needs a V2 model with <cls>/<eos> tokens (special_tokens=True).")
    if special_tokens:
        absent = [t for t in ("<cls>", "<eos>") if t not in tokens_of]
        if absent:
            raise KeyError(f"special_tokens=True but token_dictionary has no {absent} (a V1 dictionary?).")


def _match_genes(ids: np.ndarray, tokens_of: Mapping, medians: Mapping, ensembl_col):
    """Matched columns, a column → unique-gene map summing duplicates, token ids and 1/median."""
    ok = np.fromiter((g in tokens_of and g in medians for g in ids), dtype=bool, count=len(ids))
    cols = np.flatnonzero(ok)
    if len(cols) == 0:
        where = f"var[{ensembl_col!r}]" if ensembl_col else "var_names"
        raise ValueError(
            f"None of the {len(ids)} genes in {where} are in both Geneformer dictionaries; examples: "
            f"{format_examples(ids)}. Geneformer needs Ensembl gene IDs (e.g. 'ENSG00000167286'): pass "
            "ensembl_col= with the column that holds them."
        )
    unique, first, inverse = np.unique(ids[cols], return_index=True, return_inverse=True)
    # Keep genes in var order (first occurrence) so equal values rank by var position.
    in_var_order = np.argsort(first)
    rank = np.empty_like(in_var_order)
    rank[in_var_order] = np.arange(len(in_var_order))
    unique, inverse = unique[in_var_order], rank[inverse]
    if len(unique) < len(cols):
        logger.info("embed_geneformer: %d duplicate Ensembl IDs summed.", len(cols) - len(unique))
    collapse = sparse.csr_matrix(
        (np.ones(len(cols)), (np.arange(len(cols)), inverse)), shape=(len(cols), len(unique))
    )
    token_ids = np.array([tokens_of[g] for g in unique], dtype=np.int64)
    inv_median = np.array([1.0 / float(medians[g]) for g in unique])
    if len(unique) / len(ids) < 0.5:
        logger.warning(
            "embed_geneformer: only %d of %d genes are in the dictionaries.", len(unique), len(ids)
        )
    return cols, collapse, token_ids, inv_median


def rank_value_encode(chunk, cols, collapse, token_ids, inv_median, n_keep: int, wrap):
    """Token sequences of a CSR chunk of cells, and each cell's number of expressed matched genes.

    Totals are taken over all genes of the chunk, as Geneformer's ``n_counts``.
    """
    totals = np.asarray(chunk.sum(axis=1)).ravel().astype(np.float64)
    scale = np.divide(TARGET_SUM, totals, out=np.zeros_like(totals), where=totals > 0)
    norm = sparse.csr_matrix(sparse.diags(scale) @ (chunk[:, cols] @ collapse) @ sparse.diags(inv_median))
    norm.eliminate_zeros()
    norm.sort_indices()
    seqs = []
    for i in range(norm.shape[0]):
        lo, hi = norm.indptr[i], norm.indptr[i + 1]
        order = np.argsort(-norm.data[lo:hi], kind="stable")[:n_keep]
        tok = token_ids[norm.indices[lo:hi][order]]
        seqs.append(np.concatenate(([wrap[0]], tok, [wrap[1]])) if wrap else tok)
    return seqs, np.diff(norm.indptr)


def wrap_ids(tokens_of: Mapping, special_tokens: bool) -> tuple[int, int] | None:
    return (int(tokens_of["<cls>"]), int(tokens_of["<eos>"])) if special_tokens else None


def _check_vocab(token_ids: np.ndarray, wrap, vocab_size: int) -> None:
    used = np.concatenate((token_ids, wrap or ()))
    if used.size and (used.max() >= vocab_size or used.min() < 0):
        raise ValueError(
            f"token_dictionary has ids up to {int(used.max())} but the model embeds {vocab_size} tokens: "
            "the dictionary belongs to another Geneformer version (V1 30M vs V2 104M dictionaries)."
        )


def _check_nonempty(n_genes: np.ndarray, names) -> None:
    empty = n_genes == 0
    if empty.any():
        raise ValueError(
            f"{int(empty.sum())} cells express none of the matched genes, so they have no Geneformer "
            f"embedding: {format_examples(list(names[empty]))}. Filter them first (e.g. sc.pp.filter_cells)."
        )


def _stats(n: np.ndarray) -> dict[str, float]:
    if n.size == 0:
        return {"mean": 0.0, "min": 0, "max": 0}
    return {"mean": float(n.mean()), "min": int(n.min()), "max": int(n.max())}
