"""Cell sentences: gene names in descending expression order (GenePT-s / Cell2Sentence style)."""

from __future__ import annotations

import re
import warnings

import numpy as np
from anndata import AnnData
from scipy import sparse

from sc_llm._docs import doc_copy, doc_execution, doc_params
from sc_llm._execution import Execution, resolve_execution
from sc_llm._sources import MatrixSource
from sc_llm._store import ChunkedResults, names_digest
from sc_llm._utils import check_values, format_examples, gene_names, get_matrix, maybe_copy, warn_overwrite

TIE_RULE = "equal values keep the order of the genes in var (lower var position first)"
_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}")
_CHUNK = 4096


@doc_params(doc_execution=doc_execution, chunk=f"{_CHUNK:,}", doc_copy=doc_copy, TIE_RULE=TIE_RULE)
def cell_sentences(
    adata: AnnData,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    gene_symbols: str | None = None,
    n_genes: int | None = None,
    key_added: str = "cell_sentence",
    execution: Execution | None = None,
    in_obs: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Write one cell sentence per cell: gene names by descending expression, zeros omitted.

    Rows are ranked chunk by chunk from their CSR form, so the whole matrix is never densified
    and backed (``backed="r"``) AnnData works as well.

    Parameters
    ----------
    adata
        Annotated data matrix. Values must be non-negative and finite (counts or normalized).
    layer
        Layer to rank instead of ``adata.X``.
    use_raw
        Rank ``adata.raw.X`` (with ``adata.raw.var_names``).
    gene_symbols
        Column of ``var`` holding the names to write, instead of ``var_names``.
    n_genes
        Keep at most this many top genes per cell. ``None`` keeps every expressed gene.
    key_added
        ``obs`` column for the sentences; parameters go to ``uns[key_added]``.
    {doc_execution}
        Here memory is proportional to the non-zeros of one chunk; a store holds the sentences
        (array ``"cell_sentence"``); ``scheduler`` is not used (ranking is cheap host work).
    in_obs
        Also put the sentences in ``obs[key_added]``. With a store, ``False`` keeps them on disk
        only (for atlases whose sentences do not fit in memory); read them back with
        ``sc_llm._store.ChunkStore.read`` or embed from the matrix with
        :func:`sc_llm.tl.embed_text`, which ranks each chunk on the fly.
    {doc_copy}

    Returns
    -------
    adata : anndata.AnnData or None
        ``None``, or a copy when ``copy=True``. Sets ``adata.obs[key_added]`` (str) and
        ``adata.uns[key_added]``: ``"params"`` (expression source, names, ``n_genes``, execution settings)
        beside ``"tie_rule"`` and ``"n_empty"`` (cells with no expressed gene).

    Notes
    -----
    Ties: {TIE_RULE}. This is deterministic, unlike Cell2Sentence's random tie shuffling.
    Cells with no expressed gene get an empty sentence and a warning with their count.

    Examples
    --------
    >>> import sc_llm as scl
    >>> adata = scl.datasets.pbmc68k()[:40].copy()
    >>> scl.pp.cell_sentences(adata)
    >>> adata.obs["cell_sentence"].iloc[0].split()[:5]
    ['FTL', 'CD74', 'AIF1', 'HLA-DPA1', 'JUNB']
    >>> adata.uns["cell_sentence"]["n_empty"]
    0
    """
    execution = resolve_execution(execution, _CHUNK)
    store = execution.store
    if not in_obs and store is None:
        raise ValueError("in_obs=False needs a store to keep the sentences in: execution=scl.Execution(store=...).")
    if execution.scheduler is not None:
        raise ValueError("cell_sentences runs in this process; leave Execution.scheduler unset.")
    adata = maybe_copy(adata, copy)
    names = checked_gene_names(adata, layer=layer, use_raw=use_raw, gene_symbols=gene_symbols)
    params = {"layer": layer, "use_raw": use_raw, "gene_symbols": gene_symbols, "n_genes": n_genes}
    fingerprint = {"function": "cell_sentences", **params, "genes": names_digest(names)}
    if store is not None:
        fingerprint["cells"] = names_digest(adata.obs_names)
    results = ChunkedResults(
        adata.n_obs, execution.chunk_size, {"cell_sentence": ((), str)}, store=store, fingerprint=fingerprint
    )
    source = MatrixSource(adata, layer=layer, use_raw=use_raw)
    for i in range(results.n_chunks):
        chunk = source.chunk(*results.bounds(i))
        digest = chunk.digest() if results.store is not None else ""
        if results.is_done(i, digest):  # refused when the data under a finished chunk changed
            continue
        check_values(chunk.rows, chunk.obs_names)
        cols, indptr = rank_csr_rows(chunk.rows, n_genes)
        results.put(i, digest, cell_sentence=join_ranked(names, cols, indptr))
    n_empty = _count_empty(results)
    if n_empty:
        warnings.warn(f"{n_empty} cells have no expressed gene; their sentence is empty.", UserWarning, stacklevel=2)
    if in_obs:
        warn_overwrite(adata.obs, key_added, "adata.obs")
        adata.obs[key_added] = results.array("cell_sentence")
    run = {"chunk_size": execution.chunk_size, "store": None if store is None else str(store)}
    adata.uns[key_added] = {"params": {**params, **run}, "tie_rule": TIE_RULE, "n_empty": n_empty}
    return adata if copy else None


def _count_empty(results: ChunkedResults) -> int:
    if results.store is None:
        return int(sum(1 for s in results.array("cell_sentence") if not s))
    # Chunk by chunk, so sentences kept only on disk are never all loaded.
    return sum(
        int((results.store.read("cell_sentence", *results.bounds(i)) == "").sum())
        for i in range(results.store.n_chunks)
    )



def checked_gene_names(
    adata: AnnData, *, layer: str | None = None, use_raw: bool = False, gene_symbols: str | None = None
) -> np.ndarray:
    """Gene names for sentences, validated: unique, no whitespace, warn on Ensembl-looking IDs."""
    _, var = get_matrix(adata, layer=layer, use_raw=use_raw)
    names = gene_names(var, gene_symbols)
    source = f"var[{gene_symbols!r}]" if gene_symbols else ("raw.var_names" if use_raw else "var_names")
    uniq, counts = np.unique(names, return_counts=True)
    if (counts > 1).any():
        raise ValueError(
            f"Gene names in {source} are not unique: {format_examples(uniq[counts > 1])}. "
            "Make them unique (e.g. adata.var_names_make_unique()) or pick another `gene_symbols` column."
        )
    spaced = [n for n in names if not n or any(c.isspace() for c in n)]
    if spaced:
        raise ValueError(f"Gene names in {source} must be non-empty without whitespace: {format_examples(spaced)}.")
    n_ens = sum(1 for n in names[:2000] if _ENSEMBL.match(n))
    if n_ens > 0.5 * min(len(names), 2000):
        warnings.warn(
            f"Most gene names in {source} look like Ensembl IDs (e.g. {names[0]!r}); text encoders know gene "
            "symbols. Pass `gene_symbols=` with a var column of symbols.",
            UserWarning,
            stacklevel=3,
        )
    return names




def rank_csr_rows(chunk: sparse.csr_matrix, n_genes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Column indices of each row's non-zeros by descending value (ties: lower column first).

    Returns ``(cols, indptr)`` in CSR layout, each row cut to ``n_genes`` entries if given.
    """
    if n_genes is not None and n_genes < 0:
        raise ValueError(f"n_genes must be non-negative, got {n_genes}.")
    if (chunk.data == 0).any():  # explicit zeros are not expressed genes; never mutate the caller's matrix
        chunk = chunk.copy()
        chunk.eliminate_zeros()
    counts = np.diff(chunk.indptr)
    rows = np.repeat(np.arange(chunk.shape[0], dtype=np.int64), counts)
    cols = _sort_within_rows(rows, chunk.data, chunk.indices.astype(np.int64), chunk.shape[1])
    if n_genes is None or cols.size == 0:
        return cols, chunk.indptr.astype(np.int64)
    rank_in_row = np.arange(cols.size) - np.repeat(chunk.indptr[:-1], counts)
    kept = np.minimum(counts, n_genes)
    indptr = np.zeros(chunk.shape[0] + 1, dtype=np.int64)
    np.cumsum(kept, out=indptr[1:])
    return cols[rank_in_row < n_genes], indptr


def _sort_within_rows(rows: np.ndarray, values: np.ndarray, cols: np.ndarray, n_cols: int) -> np.ndarray:
    """Columns ordered by (row, value descending, column) with one sort of a packed int64 key."""
    if values.size == 0:
        return cols
    descending, n_levels = _descending_value_codes(values)
    if (int(rows[-1]) + 1) * n_levels * n_cols >= 2**63:  # key would overflow: fall back to a 3-key lexsort
        return cols[np.lexsort((cols, -values, rows))]
    key = (rows * n_levels + descending) * n_cols + cols
    key.sort()
    return key % n_cols


def _descending_value_codes(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Integer codes that sort like the values in descending order, and how many codes exist."""
    exact_f32 = values.dtype in (np.float16, np.float32) or (
        np.issubdtype(values.dtype, np.integer) and values.max() < 2**24
    )
    if exact_f32:
        # For non-negative floats the IEEE-754 bit pattern increases with the value.
        bits = values.astype(np.float32).view(np.uint32).astype(np.int64)
        return (2**32 - 1) - bits, 2**32
    uniq, inverse = np.unique(values, return_inverse=True)
    return (len(uniq) - 1) - inverse.astype(np.int64), len(uniq)


def join_ranked(names: np.ndarray, cols: np.ndarray, indptr: np.ndarray, sep: str = " ") -> np.ndarray:
    """Join ranked gene names row by row with one string join for the whole chunk."""
    n_rows = len(indptr) - 1
    out = np.full(n_rows, "", dtype=object)
    counts = np.diff(indptr)
    filled = counts > 0
    if not filled.any():
        return out
    with_sep = np.array([n + sep for n in names], dtype=object)
    with_end = np.array([n + "\n" for n in names], dtype=object)
    tokens = with_sep[cols]
    last = indptr[1:][filled] - 1
    tokens[last] = with_end[cols[last]]
    out[filled] = "".join(tokens.tolist()).split("\n")[:-1]
    return out
