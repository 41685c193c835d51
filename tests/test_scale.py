"""Out-of-core inputs (backed h5ad, dask X), resumable zarr stores, gene-level text mode, approximate kNN."""

import anndata as ad
import dask.array as da
import numpy as np
import pytest
from scipy import sparse

import sc_llm as scl
from sc_llm._store import ChunkStore

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
    scl.tl.embed_text(ref, text_encoder, precision="fp32", chunk_size=CHUNK)
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
    scl.pp.cell_sentences(small, chunk_size=7)
    scl.pp.cell_sentences(one)
    assert list(small.obs["cell_sentence"]) == list(one.obs["cell_sentence"])
    scl.tl.embed_text(small, text_encoder, precision="fp32", chunk_size=N_CELLS, key_added="X_one_chunk")
    np.testing.assert_allclose(small.obsm["X_one_chunk"], reference.obsm["X_text"], atol=1e-5)


def test_backed_h5ad_matches_in_memory(backed, small, reference, text_encoder):
    scl.pp.cell_sentences(backed, chunk_size=CHUNK)
    scl.pp.cell_sentences(small)
    assert list(backed.obs["cell_sentence"]) == list(small.obs["cell_sentence"])
    del backed.obs["cell_sentence"]
    scl.tl.embed_text(backed, text_encoder, precision="fp32", chunk_size=CHUNK)
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
    scl.pp.cell_sentences(lazy, chunk_size=CHUNK)
    scl.pp.cell_sentences(small)
    assert list(lazy.obs["cell_sentence"]) == list(small.obs["cell_sentence"])
    del lazy.obs["cell_sentence"]
    scl.tl.embed_text(lazy, text_encoder, precision="fp32", chunk_size=CHUNK)
    np.testing.assert_array_equal(lazy.obsm["X_text"], reference.obsm["X_text"])


def test_embed_text_resumes_after_kill_without_recomputing(backed, reference, text_encoder, monkeypatch, tmp_path):
    store = tmp_path / "emb.zarr"
    first = counting(monkeypatch, text_encoder, "encode_ids", fail_after=2)
    with pytest.raises(Interrupt):
        scl.tl.embed_text(backed, text_encoder, precision="fp32", chunk_size=CHUNK, store=store)
    assert len(first) == 2 and "X_text" not in backed.obsm
    monkeypatch.undo()

    again = counting(monkeypatch, text_encoder, "encode_ids")
    scl.tl.embed_text(backed, text_encoder, precision="fp32", chunk_size=CHUNK, store=store)
    assert len(again) == 1  # only the third chunk was left
    np.testing.assert_array_equal(backed.obsm["X_text"], reference.obsm["X_text"])
    assert backed.uns["X_text"]["store"] == str(store)
    with pytest.raises(ValueError, match="another computation"):
        ChunkStore(store, n_obs=N_CELLS, chunk_size=CHUNK, fingerprint={}, arrays={})

    third = counting(monkeypatch, text_encoder, "encode_ids")
    scl.tl.embed_text(backed, text_encoder, precision="fp32", chunk_size=CHUNK, store=store, key_added="X_again")
    assert len(third) == 0  # a finished store is read back, nothing recomputed
    np.testing.assert_array_equal(backed.obsm["X_again"], reference.obsm["X_text"])


def test_store_refuses_another_computation(small, text_encoder, tmp_path):
    store = tmp_path / "emb.zarr"
    scl.tl.embed_text(small[:8].copy(), text_encoder, precision="fp32", chunk_size=4, store=store)
    with pytest.raises(ValueError, match=r"another computation \(differs in \['prefix'\]"):
        scl.tl.embed_text(small[:8].copy(), text_encoder, precision="fp32", chunk_size=4, store=store, prefix="Cell: ")
    with pytest.raises(ValueError, match=r"differs in \['cells', 'n_obs'\]"):
        scl.tl.embed_text(small[:9].copy(), text_encoder, precision="fp32", chunk_size=4, store=store)
    with pytest.raises(ValueError, match="chunk_size"):
        scl.tl.embed_text(small[:8].copy(), text_encoder, precision="fp32", chunk_size=0)


def test_cell_sentences_store_resumes_and_can_stay_on_disk(backed, small, monkeypatch, tmp_path):
    from sc_llm.pp import _cell_sentences as cs

    scl.pp.cell_sentences(small)
    expected = np.asarray(small.obs["cell_sentence"], dtype=object)
    store = tmp_path / "sentences.zarr"
    calls = counting(monkeypatch, cs, "join_ranked", fail_after=1)
    with pytest.raises(Interrupt):
        scl.pp.cell_sentences(backed, chunk_size=CHUNK, store=store, in_obs=False)
    monkeypatch.undo()
    calls = counting(monkeypatch, cs, "join_ranked")
    scl.pp.cell_sentences(backed, chunk_size=CHUNK, store=store, in_obs=False)
    assert len(calls) == 2 and "cell_sentence" not in backed.obs
    assert backed.uns["cell_sentence"]["store"] == str(store)
    import zarr

    on_disk = zarr.open_group(str(store), mode="r")
    assert list(on_disk["cell_sentence"][:]) == list(expected)
    assert on_disk["done"][:].all()
    scl.pp.cell_sentences(backed, chunk_size=CHUNK, store=store)  # finished: read back into obs
    assert list(backed.obs["cell_sentence"]) == list(expected)
    with pytest.raises(ValueError, match="needs a `store=`"):
        scl.pp.cell_sentences(small, in_obs=False)
