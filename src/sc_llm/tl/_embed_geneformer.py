"""scl.tl.embed_geneformer: Geneformer cell embeddings (rank value encoding + BERT)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from anndata import AnnData

from sc_llm._docs import doc_copy, doc_device_precision, doc_embedding_key, doc_execution, doc_params
from sc_llm._execution import Execution, resolve_execution
from sc_llm._sources import MatrixSource
from sc_llm._utils import check_key, format_examples, gene_names, logger, maybe_copy
from sc_llm.models._runtime import Precision

from ._coverage import coverage_of_run, to_model_ids, warn_on_first_chunk
from ._embed_scgpt import PER_CELL
from ._embedding import count_stats, run_encoder, worker_spec, write_embedding

_CELL_CHUNK = 1024


@doc_params(
    doc_device_precision=doc_device_precision, doc_execution=doc_execution, doc_embedding_key=doc_embedding_key, chunk=f"{_CELL_CHUNK:,}", doc_copy=doc_copy
)
def embed_geneformer(
    adata: AnnData,
    model: str | Path | Any,
    *,
    token_dictionary: str | Path | Mapping[str, int],
    gene_median_dictionary: str | Path | Mapping[str, float],
    gene_ids: str | None = "ensembl_id",
    species: str = "human",
    layer: str | None = None,
    emb_layer: int = -1,
    emb_mode: Literal["mean", "cls"] = "mean",
    special_tokens: bool | None = None,
    batch_size: int | None = None,
    device: Any = None,
    precision: Precision = "auto",
    key_added: str = "X_geneformer",
    execution: Execution | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Embed cells with a pretrained Geneformer model.

    Rank value encoding as Geneformer's tokenizer: a cell's counts of the genes in both
    dictionaries are divided by its total count (over all genes), scaled to 10,000 and divided
    by each gene's median; genes are sorted by that value, highest first (ties keep ``var``
    order, where upstream's order is arbitrary), and cut to the model's input size. IDs are
    matched without version suffix and case (upstream upper-cases them); duplicate IDs are summed
    first; genes in the token dictionary but not the median dictionary are left out with a warning.
    The embedding is the mean of one hidden layer over the cell's gene tokens. A cell expressing
    no matched gene gets a NaN row and a warning instead of stopping the whole call.

    Parameters
    ----------
    adata
        Annotated data matrix with raw counts.
    model
        Geneformer folder (transformers ``BertForMaskedLM`` checkpoint: ``config.json`` and
        ``model.safetensors`` or ``pytorch_model.bin``) or an encoder from
        :func:`sc_llm.models.load_geneformer`.
    token_dictionary
        Ensembl ID → token id, as a dict or the pickle shipped with Geneformer
        (``token_dictionary_gc104M.pkl`` for V2 models, ``gene_dictionaries_30m/token_dictionary_gc30M.pkl`` for V1).
    gene_median_dictionary
        Ensembl ID → non-zero median expression, as a dict or Geneformer's pickle (same model version).
    gene_ids
        ``var`` column with gene IDs (Geneformer's convention is ``"ensembl_id"``; :func:`scanpy.read_10x_h5`
        writes ``"gene_ids"``); ``None`` uses ``var_names``, and so does the default when ``var`` has no
        ``"ensembl_id"`` column. Ensembl IDs
        are matched as they are; symbols are first converted to Ensembl IDs with the gene table shipped
        with sc_llm (see :func:`sc_llm.pp.map_gene_ids`; genes without a unique ID are left out).
    species
        ``"human"`` or ``"mouse"``: the gene table used to convert symbols.
    layer
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
        Cells per forward pass at the model's input size; batches group cells of similar length and
        are capped at ``batch_size × input size`` tokens. ``None``: 512 on CUDA, 64 elsewhere.
    {doc_device_precision}
    {doc_embedding_key}
    {doc_execution}
    {doc_copy}

    Returns
    -------
    adata : anndata.AnnData or None
        ``None`` or a copy. Sets ``adata.obsm[key_added]`` (float32, cells × hidden size, in the
        caller's cell order) and ``adata.uns[key_added]``: ``"params"`` (model identity, precision used,
        ``emb_layer``, ``emb_mode``, special tokens, gene column, layer, execution settings) beside the matched genes, genes per cell, ``coverage`` (genes matched, share of the counts they hold
        overall and per cell, warned about when under half, first on the first chunk before any compute)
        and ``id_conversion`` (whether and how identifiers were converted).

    Examples
    --------
    A tiny random model in Geneformer's layout stands in for a real one; Geneformer reads Ensembl IDs,
    to which the gene symbols are converted offline:

    >>> import tempfile
    >>> from pathlib import Path
    >>> import sc_llm as scl
    >>> from sc_llm.testing import write_geneformer
    >>> adata = scl.datasets.pbmc68k()[:40].copy()
    >>> ids, report = scl.tl.to_model_ids(adata.var_names, "ensembl")
    >>> report["n_converted"], report["n_genes"]
    (751, 765)
    >>> folder = Path(tempfile.mkdtemp()) / "gf_tiny"
    >>> model_dir, tokens, medians = write_geneformer(folder, [i for i in ids if i is not None])
    >>> scl.tl.embed_geneformer(adata, model_dir, token_dictionary=tokens, gene_median_dictionary=medians)
    >>> adata.obsm["X_geneformer"].shape
    (40, 32)
    >>> adata.uns["X_geneformer"]["coverage"]["n_genes_matched"]
    751
    """
    from sc_llm.models._geneformer import load_geneformer, read_dictionary

    tokens_of = read_dictionary(token_dictionary, "token_dictionary")
    medians = read_dictionary(gene_median_dictionary, "gene_median_dictionary")
    if special_tokens is None:
        special_tokens = "<cls>" in tokens_of and "<eos>" in tokens_of
    _check_mode(emb_mode, special_tokens, tokens_of)
    check_key(key_added)
    execution = resolve_execution(execution, _CELL_CHUNK)
    adata = maybe_copy(adata, copy)
    encoder = load_geneformer(model, device)
    encoder.hidden_index(emb_layer)
    source = MatrixSource(adata, layer=layer)
    if gene_ids == "ensembl_id" and gene_ids not in source.var.columns:
        gene_ids = None  # the default column is absent: read var_names, converting symbols if needed
    where = f"var[{gene_ids!r}]" if gene_ids else "var_names"
    ids, id_report = to_model_ids(gene_names(source.var, gene_ids), "ensembl", species)
    where_counts = f"adata.layers[{layer!r}]" if layer else "adata.X"
    tokenizer = encoder.tokenizer_for(
        ids, tokens_of, medians, special_tokens=special_tokens, where=where, where_counts=where_counts
    )
    what = "embed_geneformer: the Geneformer dictionaries"
    warned = warn_on_first_chunk(source, tokenizer.matched, execution.chunk_size, what, "ensembl")
    options = {"emb_layer": emb_layer, "special_tokens": bool(special_tokens), "emb_mode": emb_mode}
    run = run_encoder(
        adata, encoder, tokenizer, source, function="embed_geneformer",
        spec=worker_spec("geneformer", model, encoder, execution.scheduler), device=device, precision=precision,
        batch_size=batch_size, options=options, per_cell=PER_CELL, execution=execution,
    )  # fmt: skip
    coverage = coverage_of_run(run.per_cell, tokenizer.matched, warned, what, "ensembl")
    n_genes = run.per_cell["n_genes"]
    n_empty = int((n_genes == 0).sum())
    if n_empty:
        logger.warning(
            "embed_geneformer: %d cells express none of the matched genes (e.g. %s); their embedding is NaN. "
            "Filter them first (e.g. sc.pp.filter_cells).", n_empty, format_examples(adata.obs_names[n_genes == 0]),
        )  # fmt: skip
    params = {
        "model": encoder.identity(),
        "precision": run.precision,
        **options,
        "gene_ids": gene_ids or "var_names",
        "species": species,
        "layer": layer,
    }
    results = {
        "n_genes_matched": int(len(tokenizer.token_ids)),
        "fraction_genes_matched": len(tokenizer.cols) / max(len(source.var), 1),
        "genes_per_cell": count_stats(np.minimum(n_genes, tokenizer.n_keep)),
        "n_cells_truncated": int((n_genes > tokenizer.n_keep).sum()),
        "n_cells_without_genes": n_empty,
        "coverage": coverage,
        "id_conversion": id_report,
    }
    write_embedding(adata, key_added, run.embedding, params, results, execution)
    return adata if copy else None


def _check_mode(emb_mode: str, special_tokens: bool, tokens_of: Mapping) -> None:
    if emb_mode not in ("mean", "cls"):
        raise ValueError(f"emb_mode must be 'mean' or 'cls', got {emb_mode!r}.")
    if emb_mode == "cls" and not special_tokens:
        raise ValueError("emb_mode='cls' needs a V2 model with <cls>/<eos> tokens (special_tokens=True).")
    if special_tokens:
        absent = [t for t in ("<cls>", "<eos>") if t not in tokens_of]
        if absent:
            raise KeyError(f"special_tokens=True but token_dictionary has no {absent} (a V1 dictionary?).")
