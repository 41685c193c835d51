import numpy as np
import pandas as pd
import pytest
import scanpy as sc

import sc_llm as scl


def test_pbmc68k_counts_recover_raw():
    a = scl.datasets.pbmc68k()
    ref = sc.datasets.pbmc68k_reduced()
    assert a.shape == (700, 765) and list(a.var_names) == list(ref.raw.var_names)
    assert np.array_equal(a.X.data, np.rint(a.X.data))
    assert a.obs["cell_type"].nunique() == 10
    # Normalizing the recovered counts back gives the stored log values (up to count rounding).
    renorm = np.log1p(a.X.toarray() / a.obs["n_counts"].to_numpy()[:, None] * 1e4)
    np.testing.assert_allclose(renorm, ref.raw.X.toarray(), atol=0.05)
    np.testing.assert_allclose(a.layers["log1p"].toarray(), ref.raw.X.toarray())


def test_split_is_stratified_and_seeded(pbmc):
    scl.pp.train_test_split(pbmc, "cell_type", test_size=0.25, random_state=3)
    first = pbmc.obs["split"].copy()
    scl.pp.train_test_split(pbmc, "cell_type", test_size=0.25, random_state=3, key_added="again")
    assert (first == pbmc.obs["again"]).all()
    frac = pbmc.obs.groupby("cell_type", observed=True)["split"].apply(lambda s: (s == "test").mean())
    assert frac.between(0.1, 0.4).all()
    assert list(pbmc.obs["split"].cat.categories) == ["train", "test"]


def test_split_singletons_and_missing_labels(pbmc):
    labels = pbmc.obs["cell_type"].astype(object).copy()
    labels.iloc[0] = "lonely"
    labels.iloc[1] = np.nan
    pbmc.obs["y"] = labels
    with pytest.warns(UserWarning, match="Labels with one cell go to train: 'lonely'"):
        scl.pp.train_test_split(pbmc, "y")
    assert pbmc.obs["split"].iloc[0] == "train" and pbmc.obs["split"].iloc[1] == "test"


def test_split_errors(pbmc):
    with pytest.raises(KeyError, match="'nope' not found"):
        scl.pp.train_test_split(pbmc, "nope")
    with pytest.raises(ValueError, match="test_size must be in"):
        scl.pp.train_test_split(pbmc, "cell_type", test_size=1.5)
    assert isinstance(pbmc.obs, pd.DataFrame)
