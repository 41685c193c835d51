"""scl.pp.spatial_sentences on a small spatial AnnData whose neighbours are known by construction."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import sc_llm as scl


@pytest.fixture
def tissue():
    """Eight cells on a line at x = 2**i - 1: all pairwise distances differ, so neighbours are unambiguous."""
    x = 2.0 ** np.arange(8) - 1
    labels = ["T cell", "B cell", "T cell", "NK cell", "T cell", "B cell", "Monocyte", "T cell"]
    genes = ["CD3D", "MS4A1", "NKG7", "LYZ", "GAPDH"]
    counts = np.zeros((8, 5), dtype=np.float32)
    marker = {"T cell": 0, "B cell": 1, "NK cell": 2, "Monocyte": 3}
    for i, lab in enumerate(labels):
        counts[i, marker[lab]] = 5 + i
        counts[i, 4] = 1
    adata = ad.AnnData(
        X=sparse.csr_matrix(counts),
        obs=pd.DataFrame({"cell_type": pd.Categorical(labels)}, index=[f"cell{i}" for i in range(8)]),
        var=pd.DataFrame(index=genes),
    )
    adata.obsm["spatial"] = np.c_[x, np.zeros(8)]
    scl.pp.cell_sentences(adata)
    return adata


def _nearest(x: np.ndarray, i: int, k: int) -> list[int]:
    """Independent reference: the k nearest other cells by distance, ties by index."""
    d = np.abs(x - x[i])
    order = sorted((d[j], j) for j in range(len(x)) if j != i)
    return [j for _, j in order[:k]]


def test_labels_context_lists_nearest_neighbours_first(tissue):
    scl.pp.spatial_sentences(tissue, labels_key="cell_type", neighbors=2)
    x = tissue.obsm["spatial"][:, 0]
    labels = tissue.obs["cell_type"].astype(str).to_numpy()
    for i in range(tissue.n_obs):
        context = "neighbours: " + ", ".join(labels[_nearest(x, i, 2)])
        expected = f"{context} | {tissue.obs['cell_sentence'].iloc[i]}"
        assert tissue.obs["cell_sentence_spatial"].iloc[i] == expected
    assert tissue.obs["cell_sentence_spatial"].iloc[0] == "neighbours: B cell, T cell | CD3D GAPDH"


def test_position_end_and_uns_and_inputs_untouched(tissue):
    before_obs = tissue.obs.copy()
    scl.pp.spatial_sentences(tissue, labels_key="cell_type", neighbors=1, position="end", sep=" ; ", key_added="ctx")
    assert tissue.obs["ctx"].iloc[3] == "NKG7 GAPDH ; neighbours: T cell"
    pd.testing.assert_frame_equal(tissue.obs[before_obs.columns], before_obs)
    assert len(tissue.obsp) == 0  # squidpy ran on a throw-away AnnData
    info = tissue.uns["ctx"]
    assert info["params"]["mode"] == "labels" and info["params"]["neighbors"] == 1 and info["params"]["position"] == "end"
    assert info["n_without_context"] == 0 and "squidpy" in info["neighbours"]


def test_missing_labels_are_skipped_and_isolated_cells_keep_their_sentence(tissue):
    tissue.obs["partial"] = tissue.obs["cell_type"].astype(object)
    tissue.obs.loc[["cell0", "cell1"], "partial"] = np.nan  # cell2's two nearest neighbours
    scl.pp.spatial_sentences(tissue, labels_key="partial", neighbors=2)
    out = tissue.obs["cell_sentence_spatial"]
    assert out["cell2"] == tissue.obs["cell_sentence"]["cell2"]
    assert out["cell0"] == "neighbours: T cell | CD3D GAPDH"  # cell1 skipped, cell2 kept
    assert out["cell3"] == "neighbours: T cell | NKG7 GAPDH"
    assert tissue.uns["cell_sentence_spatial"]["n_without_context"] == 1


@pytest.mark.parametrize("ranking", ["mean", "enrichment"])
def test_genes_context_is_top_genes_of_neighbour_mean(tissue, ranking):
    tissue.layers["log1p"] = tissue.X.copy()
    tissue.layers["log1p"].data = np.log1p(tissue.layers["log1p"].data)
    scl.pp.spatial_sentences(tissue, mode="genes", neighbors=3, n_top_genes=2, layer="log1p", gene_ranking=ranking)
    x = tissue.obsm["spatial"][:, 0]
    dense = tissue.layers["log1p"].toarray().astype(np.float64)
    genes = tissue.var_names.to_numpy()
    for i in range(tissue.n_obs):
        score = dense[_nearest(x, i, 3)].mean(axis=0)
        if ranking == "enrichment":
            score = score - dense.mean(axis=0)
        top = [g for g in sorted(range(len(genes)), key=lambda g: (-score[g], g)) if score[g] > 1e-9][:2]
        context = "neighbour genes: " + " ".join(genes[top])
        assert tissue.obs["cell_sentence_spatial"].iloc[i] == f"{context} | {tissue.obs['cell_sentence'].iloc[i]}"
    if ranking == "enrichment":  # GAPDH is the same everywhere, so never enriched
        assert not tissue.obs["cell_sentence_spatial"].str.split(" [|] ").str[0].str.contains("GAPDH").any()
    assert tissue.uns["cell_sentence_spatial"]["params"]["gene_ranking"] == ranking


def test_precomputed_graph_ordered_by_distances(tissue):
    conn = sparse.csr_matrix(([1.0, 1.0], ([0, 0], [6, 5])), shape=(8, 8))
    dist = sparse.csr_matrix(([21.0, 15.0], ([0, 0], [6, 5])), shape=(8, 8))
    tissue.obsp["my_connectivities"], tissue.obsp["my_distances"] = conn, dist
    stored = tissue.obsp["my_connectivities"].copy()
    scl.pp.spatial_sentences(tissue, labels_key="cell_type", neighbors="my_connectivities")
    assert tissue.obs["cell_sentence_spatial"].iloc[0] == "neighbours: B cell, Monocyte | CD3D GAPDH"
    assert tissue.obs["cell_sentence_spatial"].iloc[1] == tissue.obs["cell_sentence"].iloc[1]
    assert "my_distances" in tissue.uns["cell_sentence_spatial"]["neighbours"]
    assert (tissue.obsp["my_connectivities"] != stored).nnz == 0
    del tissue.obsp["my_distances"]  # without distances: by descending weight
    tissue.obsp["my_connectivities"] = sparse.csr_matrix(([0.2, 0.9], ([0, 0], [6, 5])), shape=(8, 8))
    scl.pp.spatial_sentences(tissue, labels_key="cell_type", neighbors="my_connectivities", key_added="w")
    assert tissue.obs["w"].iloc[0] == "neighbours: B cell, Monocyte | CD3D GAPDH"
    assert "by weight" in tissue.uns["w"]["neighbours"]


def test_library_key_keeps_neighbours_within_a_slide(tissue):
    tissue.obs["slide"] = ["a", "b"] * 4  # even cells on slide a, odd on slide b
    scl.pp.spatial_sentences(tissue, labels_key="cell_type", neighbors=1, library_key="slide")
    # cell0's nearest cell on slide a is cell2 (x=3), not cell1 (x=1, slide b).
    assert tissue.obs["cell_sentence_spatial"].iloc[0].startswith("neighbours: T cell |")
    assert tissue.obs["cell_sentence_spatial"].iloc[1].startswith("neighbours: NK cell |")


def test_copy_returns_new_object(tissue):
    out = scl.pp.spatial_sentences(tissue, labels_key="cell_type", copy=True)
    assert "cell_sentence_spatial" in out.obs and "cell_sentence_spatial" not in tissue.obs


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"labels_key": "cell_type", "spatial_key": "xy"}, KeyError, r"obsm\['xy'\] not found"),
        ({"labels_key": "celltype"}, KeyError, r"obs\['celltype'\] not found"),
        ({}, ValueError, "needs labels_key"),
        ({"labels_key": "cell_type", "sentence_key": "sent"}, KeyError, r"scl.pp.cell_sentences\(adata"),
        ({"labels_key": "cell_type", "neighbors": 8}, ValueError, "neighbors must be an obsp key or between 1 and"),
        ({"labels_key": "cell_type", "mode": "niche"}, ValueError, "mode must be"),
        ({"mode": "genes", "gene_ranking": "max"}, ValueError, "gene_ranking must be"),
        ({"labels_key": "cell_type", "key_added": "cell_sentence"}, ValueError, "must differ"),
        ({"labels_key": "cell_type", "neighbors": "g"}, KeyError, r"obsp\['g'\] not found"),
    ],
)
def test_errors_name_the_key(tissue, kwargs, error, match):
    with pytest.raises(error, match=match):
        scl.pp.spatial_sentences(tissue, **kwargs)


def test_nan_coordinates_name_the_cell(tissue):
    tissue.obsm["spatial"][5, 1] = np.nan
    with pytest.raises(ValueError, match="cell5"):
        scl.pp.spatial_sentences(tissue, labels_key="cell_type")


def test_embed_text_and_knn_work_on_spatial_sentences(tissue, text_encoder):
    scl.pp.spatial_sentences(tissue, labels_key="cell_type", neighbors=2)
    scl.tl.embed_text(tissue, text_encoder, sentence_key="cell_sentence_spatial", key_added="X_spatial")
    # Independent reference: sentence-transformers itself (the short sentences fit the token limit whole).
    direct = text_encoder.model.encode(list(tissue.obs["cell_sentence_spatial"]), normalize_embeddings=True)
    np.testing.assert_allclose(tissue.obsm["X_spatial"], direct, atol=1e-4)
    tissue.obs["split"] = ["train"] * 6 + ["test"] * 2
    scl.tl.knn_annotate(tissue, "X_spatial", "cell_type", k=2)
    assert tissue.obs["knn"].notna().all()
