"""scl.tl.embed_text: embed cell sentences with a frozen sentence-transformers encoder."""

from __future__ import annotations

from typing import Any

import numpy as np
from anndata import AnnData

from sc_llm._docs import doc_copy, doc_device_precision, doc_embedding_key, doc_execution, doc_params
from sc_llm._execution import Execution, resolve_execution
from sc_llm._sources import MatrixSource, SentenceSource
from sc_llm._utils import check_key, maybe_copy
from sc_llm.models._runtime import Precision
from sc_llm.models._text import load_text_encoder
from sc_llm.pp._cell_sentences import cell_sentences, checked_gene_names

from ._embedding import count_stats, run_encoder, worker_spec, write_embedding

_CELL_CHUNK = 2048


@doc_params(
    doc_device_precision=doc_device_precision, doc_execution=doc_execution, doc_embedding_key=doc_embedding_key, chunk=f"{_CELL_CHUNK:,}", doc_copy=doc_copy
)
def embed_text(
    adata: AnnData,
    model: Any = None,
    *,
    sentence_key: str = "cell_sentence",
    key_added: str = "X_text",
    batch_size: int | None = None,
    device: Any = None,
    precision: Precision = "auto",
    normalize: bool = True,
    prefix: str | None = None,
    layer: str | None = None,
    use_raw: bool = False,
    gene_symbols: str | None = None,
    store_sentences: bool = False,
    execution: Execution | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Embed each cell's sentence with a text encoder (GenePT-s / CELLama style).

    Only the start of each sentence that fits the encoder's token limit is read: tokens are
    counted with the encoder's own tokenizer and a gene cut by the limit is dropped whole, never
    split into word pieces. Each gene is tokenized once (as it appears inside a sentence) and a
    cell's token ids are built by lookup, identical to tokenizing its fitted sentence; tokenizers
    for which that does not hold are detected on the genes in use and read whole sentences.

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
    {doc_embedding_key}
    batch_size
        Cells per forward pass at the encoder's full token length; batches are capped at
        ``batch_size × max_tokens`` tokens, so batches of shorter cells hold more of them.
        ``None``: 512 on CUDA, 64 elsewhere.
    {doc_device_precision}
    normalize
        L2-normalize the embeddings.
    prefix
        Text put before every sentence, e.g. ``"A cell with genes ranked by expression: "``;
        its tokens count against the limit.
    layer, use_raw, gene_symbols
        Expression source and names for on-the-fly sentences (see :func:`sc_llm.pp.cell_sentences`).
    store_sentences
        When sentences are built on the fly, also store the full sentences in ``obs[sentence_key]``.
    {doc_execution}
    {doc_copy}

    Returns
    -------
    adata : anndata.AnnData or None
        ``None`` or a copy. Sets ``adata.obsm[key_added]`` (float32, cells × dim) and
        ``adata.uns[key_added]``: ``"params"`` (model identity, precision used, ``normalize``, ``prefix``,
        where the sentences came from, execution settings) beside ``"dim"``, ``"max_tokens"`` and
        ``"genes_in_context"`` (genes that fit per cell: mean, min, max).

    Notes
    -----
    Out of core: with a backed AnnData (``read_h5ad(..., backed="r")``) or a dask-array ``X``, rows
    are read one chunk at a time. Kept in memory: the result (cells × dim float32, e.g. 300 MB for
    200,000 cells at 384 dimensions), ``obs``, and up to two chunks of rows and token ids (on an accelerator the next chunk
    is read and tokenized while the current one runs on the device).

    Examples
    --------
    >>> import sc_llm as scl
    >>> adata = scl.datasets.pbmc68k()[:40].copy()
    >>> scl.pp.cell_sentences(adata)
    >>> scl.tl.embed_text(adata)  # the packaged all-MiniLM-L6-v2; a name or path selects another encoder
    >>> adata.obsm["X_text"].shape
    (40, 384)
    >>> adata.uns["X_text"]["genes_in_context"]  # of each 256-token sentence
    {'mean': 76.2, 'min': 70, 'max': 83}
    """
    check_key(key_added)
    execution = resolve_execution(execution, _CELL_CHUNK)
    adata = maybe_copy(adata, copy)
    encoder = load_text_encoder(model, device)
    if sentence_key not in adata.obs and store_sentences:
        cell_sentences(adata, layer=layer, use_raw=use_raw, gene_symbols=gene_symbols, key_added=sentence_key)
    from_obs = sentence_key in adata.obs
    if from_obs:
        source, genes = SentenceSource(adata, sentence_key), None
    else:
        genes = checked_gene_names(adata, layer=layer, use_raw=use_raw, gene_symbols=gene_symbols)
        source = MatrixSource(adata, layer=layer, use_raw=use_raw)
    run = run_encoder(
        adata,
        encoder,
        encoder.tokenizer_for(prefix, genes),
        source,
        function="embed_text",
        spec=worker_spec("text", model, encoder, execution.scheduler),
        device=device,
        precision=precision,
        batch_size=batch_size,
        options={"normalize": normalize},
        per_cell={"n_fit": np.int64},
        execution=execution,
        params={"gene_symbols": gene_symbols},
    )
    params = {
        "model": encoder.identity(),
        "precision": run.precision,
        "normalize": normalize,
        "prefix": prefix or "",
        "sentences": f"obs[{sentence_key!r}]" if from_obs else "built from the matrix (not stored)",
        "layer": layer,
        "use_raw": use_raw,
        "gene_symbols": gene_symbols,
    }
    results = {
        "dim": encoder.dim,
        "max_tokens": encoder.max_tokens,
        "genes_in_context": count_stats(run.per_cell["n_fit"]),
    }
    write_embedding(adata, key_added, run.embedding, params, results, execution)
    return adata if copy else None
