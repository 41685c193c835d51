"""scl.tl.embed_scgpt: scGPT cell embeddings from a released checkpoint folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from anndata import AnnData

from sc_llm._docs import doc_copy, doc_device_precision, doc_embedding_key, doc_execution, doc_params
from sc_llm._execution import Execution, resolve_execution
from sc_llm._sources import MatrixSource
from sc_llm._utils import check_key, gene_names, logger, maybe_copy
from sc_llm.models._runtime import Precision

from ._coverage import coverage_of_run, to_model_ids, warn_on_first_chunk
from ._embedding import count_stats, run_encoder, worker_spec, write_embedding

_CELL_CHUNK = 1024
PER_CELL = {"n_genes": np.int64, "counts_covered": np.float64, "counts_total": np.float64}


@doc_params(
    doc_device_precision=doc_device_precision, doc_execution=doc_execution, doc_embedding_key=doc_embedding_key, chunk=f"{_CELL_CHUNK:,}", doc_copy=doc_copy
)
def embed_scgpt(
    adata: AnnData,
    model: str | Path | Any,
    *,
    gene_symbols: str | None = None,
    species: str = "human",
    layer: str | None = None,
    max_length: int = 1200,
    batch_size: int | None = None,
    device: Any = None,
    precision: Precision = "auto",
    random_state: int = 0,
    min_gene_fraction: float = 0.1,
    key_added: str = "X_scgpt",
    execution: Execution | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Embed cells with a pretrained scGPT model (the ``<cls>`` output, L2-normalized).

    Reproduces upstream ``scgpt.tasks.embed_data``: genes are matched by exact symbol to the
    model vocabulary; per cell only expressed matched genes are used, in ``var`` order; their
    values are binned per cell into the checkpoint's ``n_bins`` by quantiles of that cell's
    non-zero values (bin 0 is reserved for zero, ties at a bin edge are broken at random);
    ``<cls>`` comes first with the pad value; when a cell has more than ``max_length - 1``
    expressed genes a random subset is kept.

    Unlike upstream, the matrix is read in row chunks (never densified), ``adata`` keeps all its
    genes and cells, and randomness is reproducible: each cell draws from its own generator
    seeded by ``(random_state, crc32(obs_name))``, first the bin tie-breaks, then the subset.
    A cell's embedding therefore does not depend on the other cells, their order or the batching.

    Parameters
    ----------
    adata
        Annotated data matrix with non-negative expression (counts or log-normalized; binning
        per cell is rank-based, so either works).
    model
        Folder with ``args.json``, ``vocab.json`` and ``best_model.pt`` as released
        (e.g. ``scGPT_human/``), or an encoder from :func:`sc_llm.models.load_scgpt`.
    gene_symbols
        ``var`` column with gene names; ``None`` uses ``var_names``. Symbols are matched to the
        vocabulary as they are; Ensembl IDs are first converted to symbols with the gene table shipped
        with sc_llm (see :func:`sc_llm.pp.map_gene_ids`; genes without a unique symbol are left out).
    species
        ``"human"`` or ``"mouse"``: the gene table used to convert Ensembl IDs.
    layer
        Layer with the expression values; ``None`` uses ``adata.X``.
    max_length
        Maximum tokens per cell including ``<cls>`` (upstream default 1200).
    batch_size
        Cells per forward pass at ``max_length`` tokens; batches group cells of similar length and are
        capped at ``batch_size × max_length`` tokens. ``None``: 512 on CUDA, 64 elsewhere.
    {doc_device_precision}
    random_state
        Seed for bin tie-breaking and gene subsampling.
    min_gene_fraction
        Error when fewer than this fraction of ``adata``'s genes are in the vocabulary
        (usually a sign of Ensembl IDs or another species in ``gene_symbols``).
    {doc_embedding_key}
    {doc_execution}
    {doc_copy}

    Returns
    -------
    adata : anndata.AnnData or None
        ``None`` or a copy. Sets ``adata.obsm[key_added]`` (float32, cells × embsize) and
        ``adata.uns[key_added]``: ``"params"`` (model identity, precision used, ``max_length``,
        ``random_state``, gene column, layer, execution settings) beside the matched genes (count,
        fraction), genes per cell (mean, min, max), the number of subsampled cells, ``coverage`` (genes
        matched, share of the expressed counts they hold overall and per cell; a warning naming
        :func:`sc_llm.pp.map_gene_ids` when it is under half, checked on the first chunk before any
        compute) and ``id_conversion`` (whether and how identifiers were converted).

    Examples
    --------
    A tiny random checkpoint in the released layout stands in for a real ``scGPT_human/`` folder:

    >>> import tempfile
    >>> from pathlib import Path
    >>> import sc_llm as scl
    >>> from sc_llm.testing import write_scgpt
    >>> adata = scl.datasets.pbmc68k()[:40].copy()
    >>> model_dir = write_scgpt(Path(tempfile.mkdtemp()) / "scGPT_tiny", list(adata.var_names))
    >>> scl.tl.embed_scgpt(adata, model_dir)
    >>> adata.obsm["X_scgpt"].shape
    (40, 32)
    >>> adata.uns["X_scgpt"]["fraction_genes_matched"]
    1.0
    """
    from sc_llm.models._scgpt import load_scgpt

    check_key(key_added)
    execution = resolve_execution(execution, _CELL_CHUNK)
    adata = maybe_copy(adata, copy)
    encoder = load_scgpt(model, device)
    source = MatrixSource(adata, layer=layer)
    where = f"var[{gene_symbols!r}]" if gene_symbols else "var_names"
    names = gene_names(source.var, gene_symbols)
    symbols, id_report = to_model_ids(names, "symbol", species)
    tokenizer = encoder.tokenizer_for(
        symbols, max_length=max_length, random_state=random_state, min_gene_fraction=min_gene_fraction,
        where=where, shown_names=names, where_values=f"adata.layers[{layer!r}]" if layer else "adata.X",
    )  # fmt: skip
    what = "embed_scgpt: the scGPT vocabulary"
    warned = warn_on_first_chunk(source, tokenizer.matched, execution.chunk_size, what, "symbol")
    run = run_encoder(
        adata, encoder, tokenizer, source, function="embed_scgpt",
        spec=worker_spec("scgpt", model, encoder, execution.scheduler), device=device, precision=precision,
        batch_size=batch_size, per_cell=PER_CELL, execution=execution,
    )  # fmt: skip
    coverage = coverage_of_run(run.per_cell, tokenizer.matched, warned, what, "symbol")
    n_genes = run.per_cell["n_genes"]
    n_empty = int((n_genes == 0).sum())
    if n_empty:
        logger.warning(
            "embed_scgpt: %d cells express no vocabulary gene; they get the <cls>-only embedding.", n_empty
        )
    params = {
        "model": encoder.identity(),
        "precision": run.precision,
        "max_length": max_length,
        "random_state": random_state,
        "gene_symbols": gene_symbols or "var_names",
        "species": species,
        "layer": layer,
    }
    results = {
        "n_genes_matched": len(tokenizer.cols),
        "fraction_genes_matched": len(tokenizer.cols) / max(len(source.var), 1),
        "genes_per_cell": count_stats(np.minimum(n_genes, max_length - 1)),
        "n_cells_subsampled": int((n_genes > max_length - 1).sum()),
        "n_cells_without_genes": n_empty,
        "coverage": coverage,
        "id_conversion": id_report,
    }
    write_embedding(adata, key_added, run.embedding, params, results, execution)
    return adata if copy else None
