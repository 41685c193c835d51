"""embed_text on a dask.distributed LocalCluster (2 worker processes on loopback) equals a single-process run."""

import numpy as np
import pytest

import sc_llm as scl

distributed = pytest.importorskip("distributed")

N_CELLS, CHUNK = 24, 8


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def client(cluster):
    with distributed.Client(cluster) as client:
        yield client


@pytest.fixture(scope="module")
def single(text_encoder):
    adata = scl.datasets.pbmc68k()[:N_CELLS].copy()
    scl.tl.embed_text(adata, text_encoder, precision="fp32", execution=scl.Execution(chunk_size=CHUNK))
    return adata


@pytest.fixture
def cells(single):
    return scl.datasets.pbmc68k()[:N_CELLS].copy()


def _loads_per_worker(client) -> list[int]:
    def misses():
        from sc_llm.models._text import _cached_encoder

        return _cached_encoder.cache_info().misses

    return sorted(client.run(misses).values())


def test_cluster_equals_single_process_and_loads_model_once_per_worker(client, cells, single):
    scl.tl.embed_text(cells, precision="fp32", execution=scl.Execution(chunk_size=CHUNK, scheduler=client))
    np.testing.assert_allclose(cells.obsm["X_text"], single.obsm["X_text"], atol=1e-5)
    assert cells.uns["X_text"]["genes_in_context"] == single.uns["X_text"]["genes_in_context"]
    scl.tl.embed_text(
        cells,
        precision="fp32",
        execution=scl.Execution(chunk_size=CHUNK // 2, scheduler=client),
        key_added="X_again",
    )
    np.testing.assert_allclose(cells.obsm["X_again"], single.obsm["X_text"], atol=1e-5)
    # 2 calls, 9 chunks spread over both workers: each worker loaded the model at most once.
    assert max(_loads_per_worker(client)) == 1


def test_scheduler_by_address_with_stored_sentences(cluster, cells, single):
    scl.pp.cell_sentences(cells)
    scl.tl.embed_text(
        cells,
        precision="fp32",
        execution=scl.Execution(chunk_size=CHUNK, scheduler=cluster.scheduler_address),
    )
    np.testing.assert_allclose(cells.obsm["X_text"], single.obsm["X_text"], atol=1e-5)
    assert cells.uns["X_text"]["params"]["sentences"] == "obs['cell_sentence']"


def test_model_object_is_sent_to_workers(client, cells, single, text_encoder):
    scl.tl.embed_text(
        cells, text_encoder, precision="fp32", execution=scl.Execution(chunk_size=CHUNK, scheduler=client)
    )
    np.testing.assert_allclose(cells.obsm["X_text"], single.obsm["X_text"], atol=1e-5)


def test_cluster_resumes_a_store_started_in_one_process(
    client, cells, single, text_encoder, monkeypatch, tmp_path
):
    store = tmp_path / "emb.zarr"
    from sc_llm.tl import _embedding

    inner, calls = _embedding.encode_chunk, []

    def fail_second(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return inner(*args, **kwargs)

    monkeypatch.setattr(_embedding, "encode_chunk", fail_second)
    with pytest.raises(KeyboardInterrupt):
        scl.tl.embed_text(
            cells, text_encoder, precision="fp32", execution=scl.Execution(chunk_size=CHUNK, store=store)
        )
    monkeypatch.undo()
    import zarr

    assert list(zarr.open_group(str(store), mode="r")["done"][:]) == [True, False, False]
    scl.tl.embed_text(
        cells, precision="fp32", execution=scl.Execution(chunk_size=CHUNK, store=store, scheduler=client)
    )
    np.testing.assert_allclose(cells.obsm["X_text"], single.obsm["X_text"], atol=1e-5)


def test_bad_scheduler(cells):
    with pytest.raises(TypeError, match="scheduler must be"):
        scl.tl.embed_text(cells, execution=scl.Execution(scheduler=3))


def test_foundation_models_on_cluster_equal_single_process(client, cells, tmp_path):
    from sc_llm.testing import ensembl_ids, write_geneformer, write_scgpt

    scgpt_dir = write_scgpt(tmp_path / "scgpt", list(cells.var_names[:600]))
    cells.var["ensembl_id"] = ensembl_ids(cells.n_vars)
    gf_dir, tok, med = write_geneformer(tmp_path / "gf", list(cells.var["ensembl_id"][:700]))
    gf = {"token_dictionary": tok, "gene_median_dictionary": med, "precision": "fp32"}
    scl.tl.embed_scgpt(
        cells, scgpt_dir, precision="fp32", execution=scl.Execution(chunk_size=CHUNK), key_added="one_scgpt"
    )
    scl.tl.embed_scgpt(
        cells,
        scgpt_dir,
        precision="fp32",
        execution=scl.Execution(chunk_size=CHUNK, scheduler=client),
        key_added="dask_scgpt",
    )
    np.testing.assert_allclose(cells.obsm["dask_scgpt"], cells.obsm["one_scgpt"], atol=1e-5)
    scl.tl.embed_geneformer(cells, gf_dir, **gf, execution=scl.Execution(chunk_size=CHUNK), key_added="one_gf")
    scl.tl.embed_geneformer(
        cells, gf_dir, **gf, execution=scl.Execution(chunk_size=CHUNK, scheduler=client), key_added="dask_gf"
    )
    np.testing.assert_allclose(cells.obsm["dask_gf"], cells.obsm["one_gf"], atol=1e-5)
    assert cells.uns["dask_gf"]["genes_per_cell"] == cells.uns["one_gf"]["genes_per_cell"]


def test_gene_mode_on_cluster_equals_single_process(client, cells, text_encoder):
    scl.tl.embed_text_genes(
        cells, text_encoder, precision="fp32", execution=scl.Execution(chunk_size=CHUNK), key_added="one"
    )
    scl.tl.embed_text_genes(
        cells, precision="fp32", execution=scl.Execution(chunk_size=CHUNK, scheduler=client), key_added="dask"
    )
    np.testing.assert_allclose(cells.obsm["dask"], cells.obsm["one"], atol=1e-6)


def test_gpu_cluster_pins_one_gpu_per_worker():
    """Without GPUs here, the pinning itself is checked: two workers, each seeing only its own index."""
    import os

    from sc_llm._distributed import gpu_cluster

    with gpu_cluster(n_gpus=2) as cluster, distributed.Client(cluster) as c:
        c.wait_for_workers(2)
        seen = sorted(c.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES")).values())
    assert seen == ["0", "1"]


def test_cuda_scheduler_without_gpus_says_so(cells, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="needs at least one CUDA GPU"):
        scl.tl.embed_text(cells, execution=scl.Execution(scheduler="cuda"))
