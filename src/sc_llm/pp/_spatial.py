"""Spatial cell sentences: each cell's sentence plus a text description of its spatial neighbours."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from sc_llm._docs import doc_copy, doc_params
from sc_llm._utils import (
    as_csr,
    check_key,
    check_values,
    format_examples,
    get_matrix,
    import_optional,
    logger,
    maybe_copy,
    warn_overwrite,
)

from ._cell_sentences import checked_gene_names, join_ranked, rank_csr_rows

LABELS_PREFIX = "neighbours: "
GENES_PREFIX = "neighbour genes: "
_CHUNK = 4096


@doc_params(doc_copy=doc_copy)
def spatial_sentences(
    adata: AnnData,
    *,
    sentence_key: str = "cell_sentence",
    labels_key: str | None = None,
    mode: Literal["labels", "genes"] = "labels",
    neighbors: int | str = 6,
    n_top_genes: int = 10,
    gene_ranking: Literal["mean", "enrichment"] = "mean",
    layer: str | None = None,
    use_raw: bool = False,
    gene_symbols: str | None = None,
    position: Literal["start", "end"] = "start",
    sep: str = " | ",
    spatial_key: str = "spatial",
    library_key: str | None = None,
    key_added: str = "cell_sentence_spatial",
    copy: bool = False,
) -> AnnData | None:
    """Add each cell's spatial neighbourhood to its cell sentence, as text (CELLama style).

    Neighbours are the ``neighbors`` nearest cells in ``obsm[spatial_key]``, found with squidpy
    (:func:`squidpy.gr.spatial_neighbors_knn`, or ``spatial_neighbors`` on older squidpy) on a
    throw-away AnnData, so ``adata.obsp`` is never written. Pass an ``obsp`` key as ``neighbors`` to
    use a graph already there instead (e.g. a Visium grid or Delaunay graph built with squidpy).

    The new sentences are written as::

        position="start": "neighbours: T cell, T cell, B cell | CD3D LTB IL7R ..."
        position="end":   "CD3D LTB IL7R ... | neighbours: T cell, T cell, B cell"
        mode="genes":     "neighbour genes: LYZ S100A9 CD74 ... | CD3D LTB IL7R ..."

    With ``mode="labels"`` every neighbour's label is listed, nearest first, so repeated labels
    weigh a majority more in the pooled embedding; neighbours without a label (NaN) are skipped.
    With ``mode="genes"`` the context is the ``n_top_genes`` genes of the neighbours' mean
    expression, by descending value (ties as in :func:`~sc_llm.pp.cell_sentences`), or with
    ``gene_ranking="enrichment"`` by how much that mean exceeds the mean over all cells. A cell with no
    usable neighbour keeps its sentence unchanged. :func:`~sc_llm.tl.embed_text` and
    :func:`~sc_llm.tl.knn_annotate` work on the new key as on any sentence column.

    Parameters
    ----------
    adata
        Annotated data matrix with coordinates in ``obsm[spatial_key]`` (cells × 2 or 3).
    sentence_key
        ``obs`` column with the cells' own sentences (:func:`~sc_llm.pp.cell_sentences`).
    labels_key
        ``obs`` column with the labels written for neighbours (cell types, clusters, niches);
        required for ``mode="labels"``. Beware of leakage when it holds the labels you evaluate:
        prefer clusters or labels of training cells only (other cells NaN).
    mode
        ``"labels"``: neighbours' labels; ``"genes"``: top genes of the neighbourhood.
    neighbors
        Number of nearest spatial neighbours, or the ``obsp`` key of a precomputed spatial graph
        (e.g. ``"spatial_connectivities"``): neighbours are then ordered by the matching
        ``*_distances`` entry when present (squidpy's naming), else by descending connectivity weight.
    n_top_genes
        Genes written in ``mode="genes"``.
    gene_ranking
        ``"mean"``: the neighbourhood's most expressed genes (often the same abundant genes
        everywhere); ``"enrichment"``: neighbourhood mean minus the mean of all cells, so the context
        names what is specific to the neighbourhood (genes not above average are never written).
    layer, use_raw, gene_symbols
        Expression source and gene names for ``mode="genes"`` (e.g. ``layer="log1p"``, so that a
        few very high counts do not dominate).
    position
        Where the context goes. Text encoders read only the start of a sentence (all-MiniLM-L6-v2
        fits about 76 of pbmc68k's ~250 genes), so at the ``"end"`` the context is cut for almost
        every cell; ``"start"`` (default) guarantees it is read, at the cost of the cell's lowest
        ranked genes that still fitted. Use ``"end"`` only with sentences short enough to fit
        (e.g. ``cell_sentences(n_genes=...)``).
    sep
        Text between the sentence and the context.
    spatial_key
        ``obsm`` key of the coordinates.
    library_key
        ``obs`` column naming each cell's slide/library: neighbours are found within a library only.
    key_added
        ``obs`` column for the new sentences; parameters go to ``uns[key_added]``.
    {doc_copy}

    Returns
    -------
    adata : anndata.AnnData or None
        ``None``, or a copy when ``copy=True``. Sets ``adata.obs[key_added]`` (str) and
        ``adata.uns[key_added]``: ``"params"`` beside ``"neighbours"`` (where the graph came from) and
        ``"n_without_context"`` (cells left without context).
    """
    graph_key = neighbors if isinstance(neighbors, str) else None
    n_neighs = None if graph_key else neighbors
    _check_args(adata, sentence_key, labels_key, mode, position, n_neighs, n_top_genes, key_added)
    if gene_ranking not in ("mean", "enrichment"):
        raise ValueError(f"gene_ranking must be 'mean' or 'enrichment', got {gene_ranking!r}.")
    sentences = _sentences(adata, sentence_key)
    adata = maybe_copy(adata, copy)
    conn, order_values, source = _neighbour_graph(adata, n_neighs, spatial_key, library_key, graph_key)
    if mode == "labels":
        context = _label_context(conn, order_values, adata.obs[labels_key])
    else:
        context = _gene_context(adata, conn, n_top_genes, gene_ranking, layer, use_raw, gene_symbols)
    n_without = int(sum(1 for c in context if not c))
    if n_without:
        logger.info(
            "spatial_sentences: %d cells have no usable neighbour; their sentence is unchanged.", n_without
        )
    warn_overwrite(adata.obs, key_added, "adata.obs")
    adata.obs[key_added] = _compose(sentences, context, position, sep)
    params = {
        "sentence_key": sentence_key,
        "mode": mode,
        "labels_key": labels_key,
        "neighbors": neighbors,
        "spatial_key": None if graph_key else spatial_key,
        "library_key": library_key,
        "n_top_genes": n_top_genes if mode == "genes" else None,
        "gene_ranking": gene_ranking if mode == "genes" else None,
        "layer": layer,
        "use_raw": use_raw,
        "gene_symbols": gene_symbols,
        "position": position,
        "sep": sep,
    }
    adata.uns[key_added] = {"params": params, "neighbours": source, "n_without_context": n_without}
    return adata if copy else None


def _check_args(adata, sentence_key, labels_key, mode, position, n_neighs, n_top_genes, key_added) -> None:
    check_key(key_added)
    if mode not in ("labels", "genes"):
        raise ValueError(f"mode must be 'labels' or 'genes', got {mode!r}.")
    if position not in ("start", "end"):
        raise ValueError(f"position must be 'start' or 'end', got {position!r}.")
    if sentence_key not in adata.obs:
        raise KeyError(
            f"obs[{sentence_key!r}] not found. Build the cell sentences first, e.g. "
            f"scl.pp.cell_sentences(adata, key_added={sentence_key!r})."
        )
    if key_added == sentence_key:
        raise ValueError(
            f"key_added must differ from sentence_key ({sentence_key!r}): the input would be replaced."
        )
    if mode == "labels":
        if labels_key is None:
            raise ValueError("mode='labels' needs labels_key (an obs column); or use mode='genes'.")
        if labels_key not in adata.obs:
            raise KeyError(f"obs[{labels_key!r}] not found; available columns: {list(adata.obs.columns)}.")
    if mode == "genes" and n_top_genes < 1:
        raise ValueError(f"n_top_genes must be at least 1, got {n_top_genes}.")
    if n_neighs is not None and (isinstance(n_neighs, bool) or n_neighs < 1 or n_neighs >= adata.n_obs):
        raise ValueError(
            f"neighbors must be an obsp key or between 1 and n_obs - 1 = {adata.n_obs - 1}, got {n_neighs}."
        )


def _sentences(adata: AnnData, key: str) -> np.ndarray:
    """The cells' own sentences; a missing one (NaN) is refused rather than written as the word "nan"."""
    col = adata.obs[key]
    missing = col.isna().to_numpy()
    if missing.any():
        raise ValueError(
            f"obs[{key!r}] is missing for {int(missing.sum())} cells: {format_examples(adata.obs_names[missing])}. "
            "Rebuild the sentences with scl.pp.cell_sentences (a cell without genes gets an empty sentence)."
        )
    return col.astype(str).to_numpy()


def _neighbour_graph(adata, n_neighs, spatial_key, library_key, connectivity_key):
    """``(connectivities, order_values, source)``: lower order value = listed first."""
    if connectivity_key is not None:
        return _stored_graph(adata, connectivity_key)
    coords = _coordinates(adata, spatial_key)
    shell = AnnData(obs=pd.DataFrame(index=adata.obs_names.copy()), obsm={"spatial": coords})
    if library_key is not None:
        if library_key not in adata.obs:
            raise KeyError(f"obs[{library_key!r}] not found; available columns: {list(adata.obs.columns)}.")
        shell.obs[library_key] = pd.Categorical(adata.obs[library_key].astype(str))
    conn, dist = _squidpy_knn(shell, n_neighs, library_key)
    return as_csr(conn), as_csr(dist), f"squidpy kNN on obsm[{spatial_key!r}]"


def _squidpy_knn(shell: AnnData, n_neighs: int, library_key: str | None):
    sq = import_squidpy()
    if hasattr(sq.gr, "spatial_neighbors_knn"):  # squidpy >= 1.8 deprecates the all-in-one builder
        result = sq.gr.spatial_neighbors_knn(shell, library_key=library_key, n_neighs=n_neighs, copy=True)
    else:
        result = sq.gr.spatial_neighbors(
            shell, library_key=library_key, coord_type="generic", n_neighs=n_neighs, delaunay=False, copy=True
        )
    return result[0], result[1]


def import_squidpy():
    """Import squidpy; "not installed" and "installed but broken" (with the real error) are told apart."""
    return import_optional("squidpy", "spatial", "spatial_sentences")


def _coordinates(adata: AnnData, spatial_key: str) -> np.ndarray:
    if spatial_key not in adata.obsm:
        raise KeyError(
            f"obsm[{spatial_key!r}] not found; available: {list(adata.obsm)}. Spatial coordinates "
            "(cells × 2 or 3) are needed, or pass neighbors='<obsp key>' for a precomputed graph."
        )
    coords = np.asarray(adata.obsm[spatial_key], dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] < 1:
        raise ValueError(
            f"obsm[{spatial_key!r}] must be a cells × dimensions array, got shape {coords.shape}."
        )
    bad = ~np.isfinite(coords).all(axis=1)
    if bad.any():
        raise ValueError(
            f"obsm[{spatial_key!r}] has NaN/inf for cells {format_examples(adata.obs_names[bad])}."
        )
    return coords


def _stored_graph(adata: AnnData, connectivity_key: str):
    if connectivity_key not in adata.obsp:
        raise KeyError(f"obsp[{connectivity_key!r}] not found; available: {list(adata.obsp)}.")
    conn = as_csr(adata.obsp[connectivity_key]).copy()  # sorting below must not touch the user's obsp
    conn.sort_indices()
    dist_key = connectivity_key.removesuffix("_connectivities") + "_distances"
    if connectivity_key.endswith("_connectivities") and dist_key in adata.obsp:
        order = as_csr(adata.obsp[dist_key]).copy()
        order.sort_indices()
        # Only trust the distances when they describe the same edges.
        if (order.indptr == conn.indptr).all() and (order.indices == conn.indices).all():
            return conn, order, f"obsp[{connectivity_key!r}] ordered by obsp[{dist_key!r}]"
    order = conn.copy()
    order.data = -order.data
    return conn, order, f"obsp[{connectivity_key!r}] ordered by weight"


def _ordered_neighbours(conn: sparse.csr_matrix, order_values: sparse.csr_matrix):
    """CSR ``(cols, indptr)`` of each row's neighbours (self excluded) by order value, then index."""
    conn = conn.copy()
    conn.setdiag(0)
    conn.eliminate_zeros()
    conn.sort_indices()
    order_values = order_values.tocsr().copy()
    order_values.sort_indices()
    rows = np.repeat(np.arange(conn.shape[0]), np.diff(conn.indptr))
    values = np.asarray(order_values[rows, conn.indices]).ravel()
    perm = np.lexsort((conn.indices, values, rows))
    return conn.indices[perm], conn.indptr


def _label_context(conn, order_values, labels: pd.Series) -> list[str]:
    cols, indptr = _ordered_neighbours(conn, order_values)
    missing = labels.isna().to_numpy()
    names = labels.astype(str).to_numpy()
    context = []
    for i in range(len(indptr) - 1):
        nbrs = cols[indptr[i] : indptr[i + 1]]
        nbrs = nbrs[~missing[nbrs]]
        context.append(LABELS_PREFIX + ", ".join(names[nbrs]) if nbrs.size else "")
    return context


def _gene_context(adata, conn, n_top_genes, gene_ranking, layer, use_raw, gene_symbols) -> list[str]:
    names = checked_gene_names(adata, layer=layer, use_raw=use_raw, gene_symbols=gene_symbols)
    X, _ = get_matrix(adata, layer=layer, use_raw=use_raw)
    X = as_csr(X)
    source = f"adata.layers[{layer!r}]" if layer is not None else ("adata.raw.X" if use_raw else "adata.X")
    check_values(
        X,
        adata.obs_names,
        source,
        "mode='genes' averages expression, which needs non-negative, finite values",
    )
    adjacency = (conn != 0).astype(np.float64).tocsr()
    adjacency.setdiag(0)
    adjacency.eliminate_zeros()
    degree = np.asarray(adjacency.sum(axis=1)).ravel()
    mean_op = sparse.diags(np.divide(1.0, degree, out=np.zeros_like(degree), where=degree > 0)) @ adjacency
    enrichment = gene_ranking == "enrichment"
    overall = np.asarray(X.mean(axis=0)).ravel() if enrichment else None
    # Enrichment densifies a block (cells × genes): smaller blocks keep that bounded.
    chunk = _CHUNK // 8 if enrichment else _CHUNK
    context: list[str] = []
    for start in range(0, adata.n_obs, chunk):
        block = sparse.csr_matrix(mean_op[start : start + chunk] @ X)
        if enrichment:
            block = sparse.csr_matrix(np.maximum(block.toarray() - overall, 0))
        cols, indptr = rank_csr_rows(block, n_top_genes)
        context.extend(GENES_PREFIX + s if s else "" for s in join_ranked(names, cols, indptr))
    return context


def _compose(sentences: np.ndarray, context: list[str], position: str, sep: str) -> np.ndarray:
    out = np.empty(len(sentences), dtype=object)
    for i, (sentence, ctx) in enumerate(zip(sentences, context, strict=True)):
        if not ctx or not sentence:
            out[i] = ctx or sentence
        else:
            out[i] = f"{ctx}{sep}{sentence}" if position == "start" else f"{sentence}{sep}{ctx}"
    return out
