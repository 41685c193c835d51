"""scl.tl.embed_text: embed cell sentences with a frozen sentence-transformers encoder."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from anndata import AnnData

from .._progress import progress
from .._utils import format_examples, maybe_copy, warn_overwrite
from ..models._runtime import Precision, resolve_precision
from ..models._text import load_text_encoder
from ..pp._cell_sentences import cell_sentences, checked_gene_names, iter_ranked_genes, join_ranked

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
    copy
        Return a copy instead of writing into ``adata``.

    Returns
    -------
    ``None`` or a copy. Sets ``adata.obsm[key_added]`` (float32, cells × dim) and
    ``adata.uns[key_added]`` with the model identity, dimension, token limit, precision used
    and how many genes fit (mean, min, max).
    """
    adata = maybe_copy(adata, copy)
    encoder = load_text_encoder(model, device)
    used_precision = resolve_precision(precision, encoder.device)
    if sentence_key not in adata.obs and store_sentences:
        cell_sentences(adata, layer=layer, use_raw=use_raw, gene_symbols=gene_symbols, key_added=sentence_key)
    from_obs = sentence_key in adata.obs
    chunks = (
        _obs_sentence_chunks(adata, sentence_key)
        if from_obs
        else _matrix_sentence_chunks(adata, encoder.max_tokens, layer, use_raw, gene_symbols)
    )
    emb = np.empty((adata.n_obs, encoder.dim), dtype=np.float32)
    n_fit = np.empty(adata.n_obs, dtype=np.int64)
    with progress(adata.n_obs, "embed_text", unit="cell") as bar:
        for start, stop, sentences in chunks:
            ids, n_fit[start:stop] = encoder.fit(sentences, prefix)
            emb[start:stop] = encoder.encode_ids(
                ids, batch_size=batch_size, precision=used_precision, normalize=normalize, bar=bar
            )
    warn_overwrite(adata.obsm, key_added, "adata.obsm")
    adata.obsm[key_added] = emb
    adata.uns[key_added] = {
        "model": encoder.identity(),
        "dim": encoder.dim,
        "max_tokens": encoder.max_tokens,
        "precision": used_precision,
        "normalize": normalize,
        "prefix": prefix or "",
        "sentences": f"obs[{sentence_key!r}]" if from_obs else "built from the matrix (not stored)",
        "genes_in_context": _stats(n_fit),
    }
    return adata if copy else None


def _stats(n_fit: np.ndarray) -> dict[str, float]:
    if n_fit.size == 0:
        return {"mean": 0.0, "min": 0, "max": 0}
    return {"mean": float(n_fit.mean()), "min": int(n_fit.min()), "max": int(n_fit.max())}


def _obs_sentence_chunks(adata: AnnData, key: str) -> Iterator[tuple[int, int, list[str]]]:
    col = adata.obs[key]
    missing = col.isna().to_numpy()
    if missing.any():
        raise ValueError(
            f"obs[{key!r}] is missing for {int(missing.sum())} cells: {format_examples(adata.obs_names[missing])}."
        )
    values = col.astype(str).to_numpy()
    for start in range(0, adata.n_obs, _CELL_CHUNK):
        stop = min(start + _CELL_CHUNK, adata.n_obs)
        yield start, stop, list(values[start:stop])


def _matrix_sentence_chunks(adata, max_tokens, layer, use_raw, gene_symbols):
    names = checked_gene_names(adata, layer=layer, use_raw=use_raw, gene_symbols=gene_symbols)
    # Every gene costs at least one token, so no more than `max_tokens` genes can ever be read.
    for start, stop, cols, indptr in iter_ranked_genes(
        adata, layer=layer, use_raw=use_raw, n_genes=max_tokens, chunk_size=_CELL_CHUNK
    ):
        yield start, stop, list(join_ranked(names, cols, indptr))
