"""to_mudata / from_mudata: one modality per representation, shared obs, .h5mu round trip, fusion on it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import sc_llm as scl

md = pytest.importorskip("mudata")

REPS = ["X_text", "X_pca"]
FAST = scl.tl.FusionConfig(hidden=64, epochs=15, batch_size=64)


@pytest.fixture
def adata(pbmc_embedded):
    return pbmc_embedded


# mudata 0.3 announces a default change of .update() (run by write/read) with a FutureWarning.
def _write(mdata, path):
    with md.set_options(pull_on_update=False):
        mdata.write_h5mu(path)


def _read(path):
    with md.set_options(pull_on_update=False):
        return md.read_h5mu(path)


def _assert_same_obs(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    """Same cells, columns and values (.h5 files store strings as categoricals, so compare as text)."""
    assert list(got.index) == list(expected.index)
    assert list(got.columns) == list(expected.columns)
    for col in expected.columns:
        if pd.api.types.is_numeric_dtype(expected[col]):
            np.testing.assert_array_equal(got[col].to_numpy(), expected[col].to_numpy(), err_msg=col)
        else:
            assert (got[col].astype(str).to_numpy() == expected[col].astype(str).to_numpy()).all(), col


def test_one_modality_per_representation(adata):
    mdata = scl.tl.to_mudata(adata, REPS)
    assert list(mdata.mod) == REPS
    assert list(mdata.obs_names) == list(adata.obs_names)
    for rep in REPS:
        mod = mdata.mod[rep]
        assert mod.X.dtype == adata.obsm[rep].dtype
        np.testing.assert_array_equal(mod.X, adata.obsm[rep])
        assert list(mod.var_names) == [f"{rep}_{i}" for i in range(adata.obsm[rep].shape[1])]
        assert mod.obs.shape[1] == 0  # annotations live once, in mdata.obs
    _assert_same_obs(mdata.obs, adata.obs)
    assert mdata.mod["X_text"].uns["X_text"]["params"]["model"] == adata.uns["X_text"]["params"]["model"]
    mdata.mod["X_text"].X[0, 0] += 1  # a copy: the AnnData is untouched
    assert mdata.mod["X_text"].X[0, 0] != adata.obsm["X_text"][0, 0]


def test_renaming_obs_subset_and_expression(adata):
    mdata = scl.tl.to_mudata(
        adata, REPS, mod_names={"X_text": "text"}, obs_keys=["cell_type"], expression_mod="rna", layer="log1p"
    )
    assert list(mdata.mod) == ["text", "X_pca", "rna"]
    assert list(mdata.obs.columns) == ["cell_type"]
    rna = mdata.mod["rna"]
    assert list(rna.var_names) == list(adata.var_names)
    assert abs(rna.X - adata.layers["log1p"]).max() == 0


def test_h5mu_round_trip_preserves_obs_modalities_and_uns(adata, tmp_path):
    path = tmp_path / "pbmc.h5mu"
    _write(scl.tl.to_mudata(adata, REPS, expression_mod="rna"), path)
    back = _read(path)
    assert list(back.mod) == [*REPS, "rna"]
    _assert_same_obs(back.obs, adata.obs)
    for rep in REPS:
        np.testing.assert_array_equal(back.mod[rep].X, adata.obsm[rep])
    assert abs(back.mod["rna"].X - adata.X).max() == 0
    assert back.mod["X_text"].uns["X_text"]["genes_in_context"] == adata.uns["X_text"]["genes_in_context"]

    restored = scl.tl.from_mudata(back, REPS, x_mod="rna")
    _assert_same_obs(restored.obs, adata.obs)
    for rep in REPS:
        np.testing.assert_array_equal(restored.obsm[rep], adata.obsm[rep])
    assert list(restored.var_names) == list(adata.var_names)
    assert abs(restored.X - adata.X).max() == 0
    assert restored.uns["X_text"]["dim"] == 384
    assert "rna" not in restored.obsm  # the per-modality masks of mdata.obsm are not representations


def test_fuse_train_on_h5mu_matches_anndata(adata, tmp_path):
    path = tmp_path / "reps.h5mu"
    _write(scl.tl.to_mudata(adata, REPS, obs_keys=["cell_type", "split"]), path)
    mdata = _read(path)
    scl.tl.fuse_train(mdata, REPS, "cell_type", config=FAST)
    scl.tl.fuse_train(adata, REPS, "cell_type", config=FAST)
    np.testing.assert_array_equal(mdata.obsm["fusion_proba"], adata.obsm["fusion_proba"])
    assert (mdata.obs["fusion"].astype(str).to_numpy() == adata.obs["fusion"].astype(str).to_numpy()).all()
    assert mdata.uns["fusion"]["metrics"]["accuracy"] == adata.uns["fusion"]["metrics"]["accuracy"]
    # Results written to the MuData come back with from_mudata.
    restored = scl.tl.from_mudata(mdata)
    np.testing.assert_array_equal(restored.obsm["fusion_proba"], adata.obsm["fusion_proba"])
    assert (restored.obs["fusion"].astype(str) == adata.obs["fusion"].astype(str)).all()


def test_from_mudata_aligns_cells_by_name(adata):
    mdata = scl.tl.to_mudata(adata[:20].copy(), ["X_pca"])
    mdata.mod["X_pca"] = mdata.mod["X_pca"][::-1].copy()
    restored = scl.tl.from_mudata(mdata)
    np.testing.assert_array_equal(restored.obsm["X_pca"], adata.obsm["X_pca"][:20])


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (["X_nope"], {}, KeyError, "obsm keys not found: 'X_nope'"),
        ("X_text", {}, TypeError, "not a string"),
        ([], {}, ValueError, "at least one"),
        (REPS, {"mod_names": {"X_text": "X_pca"}}, ValueError, "repeated: 'X_pca'"),
        (REPS, {"mod_names": {"X_umap": "umap"}}, KeyError, "not in use_reps: 'X_umap'"),
        (REPS, {"mod_names": {"X_text": "text:a"}}, ValueError, "cannot be empty or contain"),
        (REPS, {"obs_keys": ["celltype"]}, KeyError, "obs columns not found: 'celltype'"),
        (REPS, {"expression_mod": "rna", "layer": "counts"}, KeyError, "Layer 'counts' not found"),
    ],
)
def test_to_mudata_errors(adata, args, kwargs, error, match):
    with pytest.raises(error, match=match):
        scl.tl.to_mudata(adata, args, **kwargs)


def test_from_mudata_errors(adata):
    with pytest.raises(TypeError, match="needs a MuData"):
        scl.tl.from_mudata(adata)
    mdata = scl.tl.to_mudata(adata, REPS)
    with pytest.raises(KeyError, match="x_mod 'rna' is not a modality"):
        scl.tl.from_mudata(mdata, x_mod="rna")
    with pytest.raises(KeyError, match="neither a modality"):
        scl.tl.from_mudata(mdata, ["X_umap"])
