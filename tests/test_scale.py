"""Out-of-core inputs (backed h5ad, dask X), resumable zarr stores, gene-level text mode, approximate kNN."""

import anndata as ad
import dask.array as da
import numpy as np
import pytest
from scipy import sparse

import sc_llm as scl
from sc_llm._store import ChunkStore
from sc_llm.tl import _embedding

N_CELLS, CHUNK = 40, 16  # three chunks, the last one short


class Interrupt(RuntimeError):
    pass


@pytest.fixture
def small(pbmc):
    return pbmc[:N_CELLS].copy()


@pytest.fixture
def backed(small, tmp_path):
    path = tmp_path / "small.h5ad"
    small.write_h5ad(path)
    return ad.read_h5ad(path, backed="r")


@pytest.fixture(scope="module")
def reference(text_encoder):
    """The first cells of pbmc68k embedded in memory, fp32 (computed once for the module)."""
    ref = scl.datasets.pbmc68k()[:N_CELLS].copy()
    scl.tl.embed_text(ref, text_encoder, precision="fp32", execution=scl.Execution(chunk_size=CHUNK))
    return ref


def counting(monkeypatch, obj, name, fail_after=None):
    """Replace ``obj.name`` by a wrapper that counts calls and raises once ``fail_after`` calls are done."""
    inner, calls = getattr(obj, name), []

    def wrapper(*args, **kwargs):
        if fail_after is not None and len(calls) >= fail_after:
            raise Interrupt("simulated kill")
        calls.append(1)
        return inner(*args, **kwargs)

    monkeypatch.setattr(obj, name, wrapper)
    return calls


def test_chunking_does_not_change_sentences_or_embeddings(small, reference, text_encoder):
    one = small.copy()
    scl.pp.cell_sentences(small, execution=scl.Execution(chunk_size=7))
    scl.pp.cell_sentences(one)
    assert list(small.obs["cell_sentence"]) == list(one.obs["cell_sentence"])
    scl.tl.embed_text(
        small,
        text_encoder,
        precision="fp32",
        execution=scl.Execution(chunk_size=N_CELLS),
        key_added="X_one_chunk",
    )
    np.testing.assert_allclose(small.obsm["X_one_chunk"], reference.obsm["X_text"], atol=1e-5)


def test_backed_h5ad_matches_in_memory(backed, small, reference, text_encoder):
    scl.pp.cell_sentences(backed, execution=scl.Execution(chunk_size=CHUNK))
    scl.pp.cell_sentences(small)
    assert list(backed.obs["cell_sentence"]) == list(small.obs["cell_sentence"])
    del backed.obs["cell_sentence"]
    scl.tl.embed_text(backed, text_encoder, precision="fp32", execution=scl.Execution(chunk_size=CHUNK))
    assert backed.isbacked and backed.obsm["X_text"].shape == (N_CELLS, 384)
    np.testing.assert_array_equal(backed.obsm["X_text"], reference.obsm["X_text"])
    assert backed.uns["X_text"]["genes_in_context"] == reference.uns["X_text"]["genes_in_context"]


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_dask_x_matches_in_memory(small, reference, text_encoder, kind):
    X = small.X.toarray()
    dask_x = da.from_array(X, chunks=(11, -1))
    if kind == "sparse":
        dask_x = dask_x.map_blocks(sparse.csr_matrix, dtype=X.dtype)
    lazy = ad.AnnData(dask_x, obs=small.obs.copy(), var=small.var.copy())
    scl.pp.cell_sentences(lazy, execution=scl.Execution(chunk_size=CHUNK))
    scl.pp.cell_sentences(small)
    assert list(lazy.obs["cell_sentence"]) == list(small.obs["cell_sentence"])
    del lazy.obs["cell_sentence"]
    scl.tl.embed_text(lazy, text_encoder, precision="fp32", execution=scl.Execution(chunk_size=CHUNK))
    np.testing.assert_array_equal(lazy.obsm["X_text"], reference.obsm["X_text"])


def test_embed_text_resumes_after_kill_without_recomputing(
    backed, reference, text_encoder, monkeypatch, tmp_path
):
    store = tmp_path / "emb.zarr"
    first = counting(monkeypatch, _embedding, "encode_chunk", fail_after=2)
    with pytest.raises(Interrupt):
        scl.tl.embed_text(
            backed, text_encoder, precision="fp32", execution=scl.Execution(chunk_size=CHUNK, store=store)
        )
    assert len(first) == 2 and "X_text" not in backed.obsm
    monkeypatch.undo()

    again = counting(monkeypatch, _embedding, "encode_chunk")
    scl.tl.embed_text(
        backed, text_encoder, precision="fp32", execution=scl.Execution(chunk_size=CHUNK, store=store)
    )
    assert len(again) == 1  # only the third chunk was left
    np.testing.assert_array_equal(backed.obsm["X_text"], reference.obsm["X_text"])
    assert backed.uns["X_text"]["params"]["store"] == str(store)
    with pytest.raises(ValueError, match="another computation"):
        ChunkStore(store, n_obs=N_CELLS, chunk_size=CHUNK, fingerprint={}, arrays={})

    third = counting(monkeypatch, _embedding, "encode_chunk")
    scl.tl.embed_text(
        backed,
        text_encoder,
        precision="fp32",
        execution=scl.Execution(chunk_size=CHUNK, store=store),
        key_added="X_again",
    )
    assert len(third) == 0  # a finished store is read back, nothing recomputed
    np.testing.assert_array_equal(backed.obsm["X_again"], reference.obsm["X_text"])


def test_store_refuses_another_computation(small, text_encoder, tmp_path):
    store = tmp_path / "emb.zarr"
    scl.tl.embed_text(
        small[:8].copy(), text_encoder, precision="fp32", execution=scl.Execution(chunk_size=4, store=store)
    )
    with pytest.raises(ValueError, match=r"another computation \(differs in \['prefix'\]"):
        scl.tl.embed_text(
            small[:8].copy(),
            text_encoder,
            precision="fp32",
            execution=scl.Execution(chunk_size=4, store=store),
            prefix="Cell: ",
        )
    with pytest.raises(ValueError, match=r"differs in \['cells', 'n_obs'\]"):
        scl.tl.embed_text(
            small[:9].copy(),
            text_encoder,
            precision="fp32",
            execution=scl.Execution(chunk_size=4, store=store),
        )
    with pytest.raises(ValueError, match="chunk_size"):
        scl.tl.embed_text(
            small[:8].copy(), text_encoder, precision="fp32", execution=scl.Execution(chunk_size=0)
        )


def test_cell_sentences_store_resumes_and_can_stay_on_disk(backed, small, monkeypatch, tmp_path):
    from sc_llm.pp import _cell_sentences as cs

    scl.pp.cell_sentences(small)
    expected = np.asarray(small.obs["cell_sentence"], dtype=object)
    store = tmp_path / "sentences.zarr"
    calls = counting(monkeypatch, cs, "join_ranked", fail_after=1)
    with pytest.raises(Interrupt):
        scl.pp.cell_sentences(backed, execution=scl.Execution(chunk_size=CHUNK, store=store), in_obs=False)
    monkeypatch.undo()
    calls = counting(monkeypatch, cs, "join_ranked")
    scl.pp.cell_sentences(backed, execution=scl.Execution(chunk_size=CHUNK, store=store), in_obs=False)
    assert len(calls) == 2 and "cell_sentence" not in backed.obs
    assert backed.uns["cell_sentence"]["params"]["store"] == str(store)
    import zarr

    on_disk = zarr.open_group(str(store), mode="r")
    assert list(on_disk["cell_sentence"][:]) == list(expected)
    assert on_disk["done"][:].all()
    scl.pp.cell_sentences(
        backed, execution=scl.Execution(chunk_size=CHUNK, store=store)
    )  # finished: read back into obs
    assert list(backed.obs["cell_sentence"]) == list(expected)
    with pytest.raises(ValueError, match="needs a store"):
        scl.pp.cell_sentences(small, in_obs=False)


# -- gene-level text mode ---------------------------------------------------------------------------


def _rank_reference(dense: np.ndarray, n_genes: int | None) -> np.ndarray:
    """Weights 1/(r+1) by descending value, ties by gene position, computed row by row."""
    w = np.zeros_like(dense, dtype=np.float64)
    for i, row in enumerate(dense):
        expressed = np.flatnonzero(row > 0)
        order = expressed[np.lexsort((expressed, -row[expressed]))][:n_genes]
        w[i, order] = 1.0 / (np.arange(order.size) + 1)
    return w


@pytest.mark.parametrize(("weighting", "n_genes"), [("expression", None), ("expression", 30), ("rank", 50)])
def test_gene_mode_equals_weighted_average_of_gene_embeddings(small, text_encoder, weighting, n_genes):
    small.X.data[small.X.indptr[3] : small.X.indptr[4]] = 0  # one cell without expression (explicit zeros)
    scl.tl.embed_text_genes(
        small,
        text_encoder,
        precision="fp32",
        weighting=weighting,
        n_genes=n_genes,
        execution=scl.Execution(chunk_size=CHUNK),
    )
    genes = text_encoder.model.encode(list(small.var_names), normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(small.varm["X_text_genes"], genes, atol=1e-5)
    dense = small.X.toarray().astype(np.float64)
    if weighting == "rank":
        w = _rank_reference(dense, n_genes)
    else:
        w = np.where(_rank_reference(dense, n_genes) > 0, dense, 0)
    expected = w @ genes.astype(np.float64)
    norms = np.linalg.norm(expected, axis=1, keepdims=True)
    expected = np.divide(expected, norms, out=np.zeros_like(expected), where=norms > 0)
    np.testing.assert_allclose(small.obsm["X_text_genes"], expected, atol=1e-5)
    assert not small.obsm["X_text_genes"][3].any()
    info = small.uns["X_text_genes"]
    assert info["params"]["weighting"] == weighting and info["n_empty_cells"] == 1 and info["params"]["mode"] == "gene"


def test_gene_mode_descriptions_unnormalized_backed_and_raw(backed, small, text_encoder):
    desc = {
        "CD3E": "T cell receptor CD3 epsilon subunit",
        "LYZ": "lysozyme, an antimicrobial enzyme of monocytes",
    }
    scl.tl.embed_text_genes(small, text_encoder, descriptions=desc, precision="fp32", normalize=False)
    assert small.uns["X_text_genes"]["n_genes_described"] == 2
    pos = list(small.var_names).index("LYZ")
    ref = text_encoder.model.encode([desc["LYZ"]], normalize_embeddings=True, convert_to_numpy=True)[0]
    np.testing.assert_allclose(small.varm["X_text_genes"][pos], ref, atol=1e-5)
    # Without normalizing, a cell is the weighted mean of unit vectors: norm at most 1.
    assert np.linalg.norm(small.obsm["X_text_genes"], axis=1).max() <= 1 + 1e-6
    scl.tl.embed_text_genes(backed, text_encoder, descriptions=desc, precision="fp32", normalize=False)
    np.testing.assert_allclose(backed.obsm["X_text_genes"], small.obsm["X_text_genes"], atol=1e-6)


def test_gene_mode_errors(small, text_encoder):
    with pytest.raises(ValueError, match="weighting must be one of"):
        scl.tl.embed_text_genes(small, text_encoder, weighting="tfidf")
    with pytest.raises(ValueError, match="No gene name matches"):
        scl.tl.embed_text_genes(small, text_encoder, descriptions={"ENSG0001": "x"})
    with pytest.raises(ValueError, match="n_genes must be positive"):
        scl.tl.embed_text_genes(small, text_encoder, n_genes=0)


def test_gene_mode_knn_accuracy_on_pbmc68k(pbmc_embedded, text_encoder):
    """GenePT-w on log-normalized pbmc68k annotates at least as well as the sentence embedding."""
    scl.tl.embed_text_genes(pbmc_embedded, text_encoder, layer="log1p", precision="fp32")
    scl.tl.knn_annotate(pbmc_embedded, "X_text_genes", "cell_type", key_added="knn_genes")
    scl.tl.knn_annotate(pbmc_embedded, "X_text", "cell_type", key_added="knn_sentences")
    genes, sentences = (pbmc_embedded.uns[k]["metrics"]["accuracy"] for k in ("knn_genes", "knn_sentences"))
    assert genes > 0.75
    assert genes >= sentences - 0.02


# -- approximate kNN ------------------------------------------------------------------------------


@pytest.fixture
def clusters(rng):
    """1,500 cells in 6 noisy Gaussian clusters (32 dimensions), 80 % training cells."""
    centers = rng.normal(size=(6, 32)) * 3
    labels = rng.integers(0, 6, size=1500)
    emb = (centers[labels] + rng.normal(size=(1500, 32)) * 2.5).astype(np.float32)
    adata = ad.AnnData(np.zeros((1500, 1), dtype=np.float32))
    adata.obsm["X_emb"] = emb
    adata.obs["label"] = [f"type{i}" for i in labels]
    adata.obs["split"] = np.where(rng.random(1500) < 0.8, "train", "test")
    return adata


def test_approximate_knn_agrees_with_exact_and_threshold_picks_it(clusters):
    from sklearn.neighbors import NearestNeighbors

    from sc_llm.tl._knn import _neighbours

    scl.tl.knn_annotate(clusters, "X_emb", "label", key_added="exact")
    assert clusters.uns["exact"]["index"] == "exact"
    scl.tl.knn_annotate(clusters, "X_emb", "label", approx=True, key_added="approx")
    assert clusters.uns["approx"]["index"].startswith("pynndescent")
    agree = (clusters.obs["exact"] == clusters.obs["approx"]).mean()
    assert agree > 0.97
    acc = (clusters.uns["exact"]["metrics"]["accuracy"], clusters.uns["approx"]["metrics"]["accuracy"])
    assert abs(acc[0] - acc[1]) < 0.03

    # Recall of the approximate neighbour lists against an exact search computed here.
    train = np.flatnonzero(clusters.obs["split"] == "train")
    X = clusters.obsm["X_emb"]
    approx = _neighbours(X, train, 10, "cosine", approx=True, random_state=0)
    test = np.flatnonzero(clusters.obs["split"] != "train")
    exact = NearestNeighbors(n_neighbors=10, metric="cosine").fit(X[train]).kneighbors(X[test])[1]
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx[test], exact, strict=True)])
    assert recall > 0.9
    np.testing.assert_array_equal(approx, _neighbours(X, train, 10, "cosine", approx=True, random_state=0))

    scl.tl.knn_annotate(clusters, "X_emb", "label", approx=None, approx_threshold=1000, key_added="auto")
    assert clusters.uns["auto"]["index"].startswith("pynndescent")
    scl.tl.knn_annotate(clusters, "X_emb", "label", approx_threshold=10_000, key_added="auto_exact")
    assert clusters.uns["auto_exact"]["index"] == "exact"
    assert list(clusters.obs["auto_exact"]) == list(clusters.obs["exact"])


# -- scGPT / Geneformer: backed input, resumable store ---------------------------------------------


@pytest.fixture
def foundation_models(tmp_path, pbmc):
    from sc_llm.testing import ensembl_ids, write_geneformer, write_scgpt

    genes = list(pbmc.var_names)
    ids = ensembl_ids(pbmc.n_vars)
    return write_scgpt(tmp_path / "scgpt", genes[:600]), write_geneformer(tmp_path / "gf", ids[:700]), ids


@pytest.mark.parametrize("which", ["scgpt", "geneformer"])
def test_foundation_models_backed_and_resumed(which, small, foundation_models, monkeypatch, tmp_path):
    scgpt_dir, (gf_dir, tok, med), ids = foundation_models
    small.var["ensembl_id"] = ids
    path = tmp_path / "small_ids.h5ad"
    small.write_h5ad(path)
    on_disk = ad.read_h5ad(path, backed="r")
    if which == "scgpt":
        module, name = _embedding, "encode_chunk"

        def run(adata, **kw):
            scl.tl.embed_scgpt(adata, scgpt_dir, precision="fp32", **kw)
    else:
        module, name = _embedding, "encode_chunk"

        def run(adata, **kw):
            scl.tl.embed_geneformer(
                adata, gf_dir, token_dictionary=tok, gene_median_dictionary=med, precision="fp32", **kw
            )

    run(small)
    key = f"X_{which}"
    store = tmp_path / "fm.zarr"
    counting(monkeypatch, module, name, fail_after=1)
    with pytest.raises(Interrupt):
        run(on_disk, execution=scl.Execution(chunk_size=CHUNK, store=store))
    monkeypatch.undo()
    calls = counting(monkeypatch, module, name)
    run(on_disk, execution=scl.Execution(chunk_size=CHUNK, store=store))
    assert len(calls) == 2
    np.testing.assert_allclose(on_disk.obsm[key], small.obsm[key], atol=1e-5)
    counts = "genes_per_cell"
    assert on_disk.uns[key][counts] == small.uns[key][counts]


# -- a store is never resumed over other data, other weights or damaged chunks ---------------------
def test_cell_sentences_store_refuses_changed_values(small, tmp_path):
    store = tmp_path / "cs.zarr"
    scl.pp.cell_sentences(small.copy(), execution=scl.Execution(store=store, chunk_size=CHUNK))
    changed = small.copy()
    changed.X = changed.layers["log1p"].copy()
    changed.X.data = changed.X.data[::-1].copy()
    with pytest.raises(ValueError, match=r"computed from other input data: cells 0–15 \(chunk 0\)"):
        scl.pp.cell_sentences(changed, execution=scl.Execution(store=store, chunk_size=CHUNK))


def test_embed_text_store_refuses_data_changed_after_a_kill(small, text_encoder, monkeypatch, tmp_path):
    store = tmp_path / "emb.zarr"
    counting(monkeypatch, _embedding, "encode_chunk", fail_after=1)
    with pytest.raises(Interrupt):
        scl.tl.embed_text(
            small.copy(),
            text_encoder,
            precision="fp32",
            execution=scl.Execution(chunk_size=CHUNK, store=store),
        )
    monkeypatch.undo()
    changed = small.copy()
    changed.X = changed.X.copy()
    changed.X[0, 0] += 5  # a cell of the finished first chunk
    with pytest.raises(ValueError, match="other input data"):
        scl.tl.embed_text(
            changed, text_encoder, precision="fp32", execution=scl.Execution(chunk_size=CHUNK, store=store)
        )
    scl.tl.embed_text(
        small, text_encoder, precision="fp32", execution=scl.Execution(chunk_size=CHUNK, store=store)
    )  # same data resumes


def test_deleted_chunk_file_is_recomputed_not_read_as_zeros(small, reference, text_encoder, tmp_path, caplog):
    store = tmp_path / "emb.zarr"
    scl.tl.embed_text(
        small.copy(), text_encoder, precision="fp32", execution=scl.Execution(chunk_size=CHUNK, store=store)
    )
    (store / "embedding" / "c" / "1" / "0").unlink()
    calls = []
    with caplog.at_level("WARNING", logger="sc_llm"):
        inner = _embedding.encode_chunk
        _embedding.encode_chunk = lambda *a, **k: calls.append(1) or inner(*a, **k)
        try:
            scl.tl.embed_text(
                small, text_encoder, precision="fp32", execution=scl.Execution(chunk_size=CHUNK, store=store)
            )
        finally:
            _embedding.encode_chunk = inner
    assert "missing or damaged" in caplog.text and len(calls) == 1
    np.testing.assert_array_equal(small.obsm["X_text"], reference.obsm["X_text"])


def test_store_refuses_another_model_object(small, text_encoder, tmp_path):
    import copy

    import torch

    store = tmp_path / "emb.zarr"
    scl.tl.embed_text(
        small[:8].copy(),
        text_encoder.model,
        precision="fp32",
        execution=scl.Execution(chunk_size=4, store=store),
    )
    other = copy.deepcopy(text_encoder.model)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    with pytest.raises(ValueError, match=r"differs in \['model'\]"):
        scl.tl.embed_text(
            small[:8].copy(), other, precision="fp32", execution=scl.Execution(chunk_size=4, store=store)
        )


def test_store_of_another_layout_is_refused(small, text_encoder, tmp_path):
    import zarr

    store = tmp_path / "old.zarr"
    group = zarr.open_group(str(store), mode="w")
    group.attrs["sc_llm"] = {
        "function": "embed_text",
        "n_obs": 8,
        "chunk_size": 4,
        "arrays": ["embedding", "n_fit"],
    }
    group.create_array("done", shape=(2,), dtype=bool, fill_value=False)
    with pytest.raises(ValueError, match=r"holds another computation \(differs in \[.*'store_format'"):
        scl.tl.embed_text(
            small[:8].copy(),
            text_encoder,
            precision="fp32",
            execution=scl.Execution(chunk_size=4, store=store),
        )


def test_gene_mode_store_resumes_and_equals_in_memory(small, text_encoder, monkeypatch, tmp_path):
    scl.tl.embed_text_genes(small, text_encoder, precision="fp32", key_added="mem")
    store = tmp_path / "genes.zarr"
    counting(monkeypatch, _embedding, "encode_chunk", fail_after=1)
    with pytest.raises(Interrupt):
        scl.tl.embed_text_genes(
            small, text_encoder, precision="fp32", execution=scl.Execution(chunk_size=CHUNK, store=store)
        )
    monkeypatch.undo()
    calls = counting(monkeypatch, _embedding, "encode_chunk")
    scl.tl.embed_text_genes(
        small, text_encoder, precision="fp32", execution=scl.Execution(chunk_size=CHUNK, store=store)
    )
    assert len(calls) == 2
    np.testing.assert_allclose(small.obsm["X_text_genes"], small.obsm["mem"], atol=1e-6)
    assert small.uns["X_text_genes"]["params"]["store"] == str(store)


def test_damaged_chunk_file_is_recomputed_with_a_warning(small, reference, text_encoder, tmp_path, caplog):
    store = tmp_path / "emb.zarr"
    scl.tl.embed_text(
        small.copy(), text_encoder, precision="fp32", execution=scl.Execution(chunk_size=CHUNK, store=store)
    )
    (store / "embedding" / "c" / "2" / "0").write_bytes(b"not a zarr chunk")
    with caplog.at_level("WARNING", logger="sc_llm"):
        scl.tl.embed_text(
            small, text_encoder, precision="fp32", execution=scl.Execution(chunk_size=CHUNK, store=store)
        )
    assert f"The store {store}" in caplog.text and "chunks [2]" in caplog.text
    np.testing.assert_array_equal(small.obsm["X_text"], reference.obsm["X_text"])
