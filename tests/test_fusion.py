"""fuse_train / fuse_predict / FusionModel / mlp_annotate on real pbmc68k (text + PCA embeddings)."""

from __future__ import annotations

import json
import warnings
from dataclasses import FrozenInstanceError, fields, replace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import sc_llm as scl
from sc_llm.models._training import class_weights, stratified_split
from sc_llm.tl import FusionConfig
from sc_llm.tl._metrics import classification_metrics

REPS = ["X_text", "X_pca"]
# Small but real training: a few seconds per fit on two CPU cores.
FAST_SETTINGS = {"hidden": 64, "epochs": 15, "batch_size": 64}
FAST = FusionConfig(**FAST_SETTINGS)
PAPER = replace(FAST, architecture="paper")
FUSION_FIELDS = {f.name for f in fields(FusionConfig)}


@pytest.fixture
def adata(pbmc_embedded):
    return pbmc_embedded


def _held_out(adata):
    return (adata.obs["split"] != "train").to_numpy()


def test_fuse_train_outputs_and_metrics(adata):
    model = scl.tl.fuse_train(adata, REPS, "cell_type", config=PAPER)
    classes = sorted(adata.obs.loc[adata.obs["split"] == "train", "cell_type"].astype(str).unique())
    assert model.use_reps == REPS
    assert model.input_dims == [adata.obsm["X_text"].shape[1], adata.obsm["X_pca"].shape[1]]
    assert model.classes == classes
    proba = adata.obsm["fusion_proba"]
    assert proba.shape == (adata.n_obs, len(classes))
    np.testing.assert_allclose(proba.sum(1), 1, rtol=1e-5)
    pred = np.asarray(classes)[proba.argmax(1)]
    assert (adata.obs["fusion"].astype(str).to_numpy() == pred).all()
    assert (adata.obs["fusion_top1"].astype(str).to_numpy() == pred).all()
    np.testing.assert_allclose(adata.obs["fusion_top1_frac"], proba.max(1), rtol=1e-6)
    np.testing.assert_allclose(adata.obs["fusion_confidence"], proba.max(1), rtol=1e-6)
    assert (adata.obs["fusion_top1_frac"] >= adata.obs["fusion_top2_frac"]).all()
    # Metrics recomputed independently from the written predictions on the held-out cells.
    held = _held_out(adata)
    truth = adata.obs["cell_type"].astype(str).to_numpy()[held]
    uns = adata.uns["fusion"]
    expected = classification_metrics(truth, pred[held])
    for name in ("accuracy", "precision", "recall", "f1", "n_cells"):
        assert uns["metrics"][name] == pytest.approx(expected[name])
    assert uns["metrics"]["n_cells"] == held.sum()
    assert uns["metrics"]["accuracy"] > 0.6  # 10 PBMC types; chance is ~0.3
    assert uns["n_train"] + uns["n_validation"] == (~held).sum()
    assert uns["hyperparameters"]["lr"] == 1e-3 and uns["classes"] == classes
    hist = uns["history"]
    assert list(hist.columns) == ["epoch", "train_loss", "val_loss", "val_accuracy", "lr"]
    assert 1 <= len(hist) <= FAST.epochs
    np.testing.assert_allclose(hist["lr"], 1e-3 * 0.95 ** np.arange(len(hist)))
    assert model.hyperparameters["best_epoch"] == hist["epoch"][hist["val_loss"].idxmin()]


def test_stacked_fusion_reports_each_input(adata):
    model = scl.tl.fuse_train(adata, REPS, "cell_type", n_runs=2, config=FusionConfig(hidden=128, epochs=30))
    uns = adata.uns["fusion"]
    assert model.architecture == "stacked" and uns["params"]["architecture"] == "stacked"
    inputs = uns["inputs"]
    assert list(inputs["model"]) == ["fused", *REPS] * 2 and list(inputs["seed"]) == [0, 0, 0, 1, 1, 1]
    # Each single-input row is the fused model's own expert: recompute it from the weights.
    held = _held_out(adata)
    truth = adata.obs["cell_type"].astype(str).to_numpy()[held]
    xs = [torch.as_tensor(adata.obsm[k]) for k in REPS]
    with torch.no_grad():
        experts = model.expert_log_proba(*xs)
    for m, key in enumerate(REPS):
        pred = np.asarray(model.classes)[experts[m].argmax(1).numpy()][held]
        row = inputs[(inputs["model"] == key) & (inputs["seed"] == 0)].iloc[0]
        assert row["accuracy"] == pytest.approx((pred == truth).mean())
    # The fused logits are the mix-weighted sum of the experts' log-probabilities.
    with torch.no_grad():
        fused = model(*xs)
    np.testing.assert_allclose(
        fused, sum(w * e for w, e in zip(model.mix, experts, strict=True)), rtol=1e-5, atol=1e-5
    )
    mix = uns["mix"]
    assert list(mix["input"]) == REPS and (mix["weight"] >= 0).all()
    assert list(mix["epochs"]) == model.hyperparameters["expert_epochs"]
    assert set(uns["history"].columns) == {"epoch", "input", "oof_loss", "oof_accuracy"}
    for m, key in enumerate(REPS):
        hist = uns["history"][uns["history"]["input"] == key]
        assert hist.loc[hist["oof_loss"].idxmin(), "epoch"] == model.hyperparameters["expert_epochs"][m]
    # Paired comparison: fused minus each input over the two seeds.
    comp = uns["comparison"]
    fused_acc = inputs.loc[inputs["model"] == "fused", "accuracy"].to_numpy()
    for key in REPS:
        single = inputs.loc[inputs["model"] == key, "accuracy"].to_numpy()
        assert comp.loc[key, "delta_accuracy"] == pytest.approx((fused_acc - single).mean())
        assert comp.loc[key, ["wins", "ties", "losses"]].sum() == 2
    assert comp.loc["fused", "accuracy"] == pytest.approx(uns["metrics_mean"]["accuracy"])
    best_single = max(comp.loc[k, "accuracy"] for k in REPS)
    assert comp.loc["fused", "accuracy"] >= best_single - 0.02


def test_pure_noise_input_gets_no_weight(adata, rng):
    adata.obsm["X_noise"] = rng.normal(size=(adata.n_obs, 50)).astype(np.float32)
    scl.tl.fuse_train(adata, ["X_pca", "X_noise"], "cell_type", config=FusionConfig(hidden=128, epochs=30))
    uns = adata.uns["fusion"]
    comp = uns["comparison"]
    # The bar: the fused model stays within 0.02 of its informative input.
    assert comp.loc["fused", "accuracy"] >= comp.loc["X_pca", "accuracy"] - 0.02
    assert comp.loc["X_noise", "accuracy"] < 0.45  # the noise alone is near the majority-class rate
    weights = uns["mix"].set_index("input")["weight"]
    assert weights["X_noise"] < 0.1 * weights["X_pca"]


def test_paper_architecture_is_the_papers_network(adata):
    model = scl.tl.fuse_train(
        adata, REPS, "cell_type", config=FusionConfig(architecture="paper", epochs=1), report_inputs=False
    )
    n_classes = len(model.classes)
    assert model.architecture == "paper" and model.hidden == 4096 and not hasattr(model, "mix")
    for branch, dim in zip(model.branches, model.input_dims, strict=True):
        assert [type(m).__name__ for m in branch] == ["Linear", "ReLU"]
        assert (branch[0].in_features, branch[0].out_features) == (dim, 4096)
    assert (model.head.in_features, model.head.out_features) == (4096 * 2, n_classes)
    # The paper fed the raw embeddings: no standardization unless asked for.
    assert all(torch.equal(s.scale, torch.ones_like(s.scale)) and not s.shift.any() for s in model.inputs)
    params = adata.uns["fusion"]["params"]
    assert params["standardize"] is False and params["hidden"] == 4096 and "grid" in adata.uns["fusion"]


def test_best_weights_restored(adata):
    model = scl.tl.fuse_train(
        adata,
        REPS,
        "cell_type",
        config=FusionConfig(architecture="paper", hidden=64, epochs=40, lr=1e-2, patience=2),
    )
    hist = adata.uns["fusion"]["history"]
    assert len(hist) < 40  # stopped early
    assert hist["val_loss"].iloc[-1] > hist["val_loss"].min()
    # Recompute the validation loss of the returned model: it is the best epoch's.
    train = (adata.obs["split"] == "train").to_numpy()
    y = adata.obs["cell_type"].astype(str).to_numpy()[train]
    codes = np.searchsorted(model.classes, y)
    _, val = stratified_split(codes, 0.1, 0)
    reps = [adata.obsm[k][train][val] for k in REPS]
    logits = torch.from_numpy(model.predict_logits(reps))
    loss = torch.nn.functional.cross_entropy(logits, torch.as_tensor(codes[val]))
    assert float(loss) == pytest.approx(hist["val_loss"].min(), rel=1e-4)


def test_deterministic_under_seed(adata):
    a, b = adata.copy(), adata.copy()
    m1 = scl.tl.fuse_train(a, REPS, "cell_type", random_state=3, config=FAST)
    m2 = scl.tl.fuse_train(b, REPS, "cell_type", random_state=3, config=FAST)
    for (k, v1), v2 in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(v1, v2), k
    assert np.array_equal(a.obsm["fusion_proba"], b.obsm["fusion_proba"])
    m3 = scl.tl.fuse_train(b, REPS, "cell_type", random_state=4, config=FAST)
    assert not torch.equal(m1.branches[0][0].weight, m3.branches[0][0].weight)


@pytest.mark.parametrize("architecture", ["stacked", "paper"])
def test_save_load_predict_identical(adata, tmp_path, architecture):
    model = scl.tl.fuse_train(
        adata, REPS, "cell_type", config=replace(FAST, architecture=architecture), report_inputs=False
    )
    path = model.save(tmp_path / "m")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((path / "config.json").read_text())
    assert config["use_reps"] == REPS and config["classes"] == model.classes and config["hidden"] == 64
    assert config["architecture"] == architecture
    assert config["hyperparameters"]["epochs"] == 15 and "sc_llm_version" in config
    loaded = scl.tl.FusionModel.load(path)
    assert loaded.classes == model.classes and loaded.input_dims == model.input_dims
    assert loaded.architecture == architecture
    for (k, v1), v2 in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(v1, v2), k  # includes the standardization buffers and the stacked mix weights
    # New AnnData holding only the representations, as a user's new data would.
    new = ad.AnnData(obs=pd.DataFrame(index=adata.obs_names), obsm={k: adata.obsm[k] for k in REPS})
    scl.tl.fuse_predict(new, path, key_added="pred")
    assert np.array_equal(new.obsm["pred_proba"], adata.obsm["fusion_proba"])
    assert (new.obs["pred"].astype(str) == adata.obs["fusion"].astype(str)).all()
    assert new.uns["pred"]["classes"] == model.classes and new.uns["pred"]["metrics"] == {}
    # With labels, fuse_predict reports the same held-out metrics as training did.
    scl.tl.fuse_predict(adata, loaded, labels_key="cell_type", split_key="split", key_added="again")
    assert adata.uns["again"]["metrics"] == adata.uns["fusion"]["metrics"]


def test_fuse_predict_renamed_keys_and_h5ad_roundtrip(adata, tmp_path):
    model = scl.tl.fuse_train(adata, REPS, "cell_type", config=FAST)
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    assert back.uns["fusion"]["hyperparameters"]["epochs"] == 15
    assert len(back.uns["fusion"]["history"]) == len(adata.uns["fusion"]["history"])
    back.obsm["emb"] = back.obsm.pop("X_text")
    scl.tl.fuse_predict(back, model, use_reps=["emb", "X_pca"], key_added="p")
    assert np.array_equal(back.obsm["p_proba"], adata.obsm["fusion_proba"])


@pytest.mark.parametrize("architecture", ["stacked", "paper"])
def test_n_runs_mean_and_sd(adata, architecture):
    scl.tl.fuse_train(
        adata, REPS, "cell_type", n_runs=3, random_state=5, config=replace(FAST, architecture=architecture)
    )
    uns = adata.uns["fusion"]
    runs = uns["runs"]
    assert list(runs["seed"]) == [5, 6, 7]
    assert uns["metrics_mean"]["accuracy"] == pytest.approx(runs["accuracy"].mean())
    assert uns["metrics_sd"]["f1"] == pytest.approx(np.std(runs["f1"], ddof=1))
    assert runs["accuracy"].iloc[0] == pytest.approx(uns["metrics"]["accuracy"])
    # Seeds change initialisation and shuffling (the validation split is shared by all runs).
    assert runs["f1"].nunique() > 1
    # Each input trained the same way with the same seeds, next to the fused model, in one table.
    inputs, comp = uns["inputs"], uns["comparison"]
    assert sorted(inputs["model"].unique()) == sorted(["fused", *REPS]) and len(inputs) == 9
    np.testing.assert_allclose(inputs.loc[inputs["model"] == "fused", "accuracy"], runs["accuracy"])
    for key in REPS:
        single = inputs[inputs["model"] == key]
        assert list(single["seed"]) == [5, 6, 7]
        assert comp.loc[key, "accuracy_sd"] == pytest.approx(np.std(single["accuracy"], ddof=1))


def test_grid_search_picks_lowest_validation_loss(adata):
    grid = {"lr": [1e-4, 1e-2], "batch_size": [32, 128]}
    model = scl.tl.fuse_train(
        adata,
        REPS,
        "cell_type",
        config=FusionConfig(architecture="paper", hidden=32, epochs=8, param_grid=grid),
        report_inputs=False,
    )
    table = adata.uns["fusion"]["grid"]
    assert len(table) == 4 and set(table["lr"]) == {1e-4, 1e-2}
    best = table.loc[table["val_loss"].idxmin()]
    chosen = adata.uns["fusion"]["hyperparameters"]
    assert chosen["lr"] == best["lr"] and chosen["batch_size"] == best["batch_size"]
    assert model.hyperparameters["lr"] == best["lr"]


def test_three_way_fusion(adata):
    model = scl.tl.fuse_train(adata, [*REPS, "X_umap"], "cell_type", config=FAST)
    assert len(model.branches) == 3 and model.input_dims[2] == 2
    assert adata.uns["fusion"]["metrics"]["accuracy"] > 0.6


def testclass_weights(adata):
    codes = np.array([0, 0, 0, 1])
    np.testing.assert_allclose(class_weights("balanced", np.array(["a", "b"]), codes), [4 / 6, 2.0])
    np.testing.assert_allclose(class_weights({"a": 1, "b": 3}, np.array(["a", "b"]), codes), [1, 3])
    for bad in (-1.0, 0.0, float("nan")):
        with pytest.raises(ValueError, match="positive and finite"):
            class_weights({"a": 1, "b": bad}, np.array(["a", "b"]), codes)
    scl.tl.fuse_train(adata, REPS, "cell_type", config=replace(FAST, class_weight="balanced"))
    assert adata.uns["fusion"]["params"]["class_weight"] == "balanced"
    with pytest.raises(ValueError, match="lacks training labels"):
        scl.tl.fuse_train(
            adata, REPS, "cell_type", config=replace(FAST, class_weight={"CD14+ Monocyte": 2.0})
        )
    with pytest.raises(ValueError, match="class_weight must be"):
        FusionConfig(class_weight="inverse")


def test_missing_and_unseen_labels(adata):
    labels = adata.obs["cell_type"].astype(object).to_numpy()
    train = (adata.obs["split"] == "train").to_numpy()
    labels[np.flatnonzero(train)[:50]] = np.nan
    test_idx = np.flatnonzero(~train)[:5]
    labels[test_idx] = "Novel type"
    adata.obs["label"] = pd.Categorical(labels)
    with pytest.warns(UserWarning, match="absent from training.*Novel type"):
        model = scl.tl.fuse_train(adata, REPS, "label", config=FAST)
    uns = adata.uns["fusion"]
    assert "Novel type" not in model.classes
    assert list(uns["unseen_labels"]) == ["Novel type"]
    assert uns["n_train"] + uns["n_validation"] == train.sum() - 50
    assert uns["metrics"]["n_cells"] == (~train).sum()
    assert (adata.obs["fusion"].iloc[test_idx] != "Novel type").all()


def test_mudata_matches_anndata(adata):
    md = pytest.importorskip("mudata")
    text = ad.AnnData(X=adata.obsm["X_text"].copy(), obs=pd.DataFrame(index=adata.obs_names))
    pca = ad.AnnData(X=np.zeros((adata.n_obs, 1), np.float32), obs=pd.DataFrame(index=adata.obs_names))
    pca.obsm["X_pca"] = adata.obsm["X_pca"].copy()
    # The pca modality lists its cells in another order: rows are aligned by name.
    pca = pca[::-1].copy()
    mdata = md.MuData({"text": text, "pca": pca})
    mdata.obs["cell_type"] = adata.obs["cell_type"].to_numpy()
    mdata.obs["split"] = adata.obs["split"].to_numpy()
    mdata = mdata[adata.obs_names].copy()
    scl.tl.fuse_train(mdata, ["text", "pca:X_pca"], "cell_type", config=FAST)
    scl.tl.fuse_train(adata, REPS, "cell_type", config=FAST)
    assert np.array_equal(mdata.obsm["fusion_proba"], adata.obsm["fusion_proba"])
    assert (mdata.obs["fusion"].astype(str).to_numpy() == adata.obs["fusion"].astype(str).to_numpy()).all()
    with pytest.raises(KeyError, match="neither a modality"):
        scl.tl.fuse_train(mdata, ["text", "rna"], "cell_type", config=FAST)
    with pytest.raises(KeyError, match="not found in mdata.mod\\['pca'\\].obsm"):
        scl.tl.fuse_train(mdata, ["text", "pca:X_nope"], "cell_type", config=FAST)
    partial = md.MuData({"text": text, "pca": pca[:10].copy()})
    partial.obs["cell_type"], partial.obs["split"] = "a", "train"
    with pytest.raises(ValueError, match="lacks cells"):
        scl.tl.fuse_train(partial, ["text", "pca"], "cell_type", config=FAST)


def test_mlp_annotate_matches_sklearn(adata):
    from sklearn.neural_network import MLPClassifier

    scl.tl.mlp_annotate(adata, "X_pca", "cell_type", random_state=1, max_iter=50)
    train = (adata.obs["split"] == "train").to_numpy()
    clf = MLPClassifier(random_state=1, max_iter=50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(adata.obsm["X_pca"][train], adata.obs["cell_type"].astype(str).to_numpy()[train])
    assert (adata.obs["mlp"].astype(str).to_numpy() == clf.predict(adata.obsm["X_pca"])).all()
    np.testing.assert_allclose(adata.obsm["mlp_proba"], clf.predict_proba(adata.obsm["X_pca"]), rtol=1e-5)
    uns = adata.uns["mlp"]
    assert uns["params"]["mlp_params"]["max_iter"] == 50 and uns["params"]["random_state"] == 1
    assert uns["converged"] is False and uns["n_iter"] == 50
    held = ~train
    expected = classification_metrics(
        adata.obs["cell_type"].astype(str)[held], clf.predict(adata.obsm["X_pca"][held])
    )
    assert uns["metrics"]["accuracy"] == pytest.approx(expected["accuracy"])
    out = scl.tl.mlp_annotate(adata, "X_pca", "cell_type", copy=True, max_iter=5)
    assert out is not None and "mlp" in out.uns


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"use_reps": ["X_nope"]}, KeyError, "'X_nope' not found in adata.obsm"),
        ({"use_reps": "X_text"}, TypeError, "list of keys"),
        ({"use_reps": []}, ValueError, "at least one"),
        ({"use_reps": ["X_text", "X_text"]}, ValueError, "duplicates"),
        ({"labels_key": "nope"}, KeyError, "'nope' not found in adata.obs"),
        ({"split_key": "nope"}, KeyError, "'nope' not found in adata.obs"),
        ({"train_value": "nope"}, ValueError, "No cell has obs\\['split'\\] == 'nope'"),
        ({"lr": 0}, ValueError, "Invalid lr"),
        ({"epochs": 0}, ValueError, "Invalid epochs"),
        ({"lr_decay": 1.5}, ValueError, "Invalid lr_decay"),
        ({"validation_fraction": 1.0}, ValueError, "Invalid validation_fraction"),
        ({"n_runs": 0}, ValueError, "Invalid n_runs"),
        (
            {"param_grid": {"momentum": [0.9]}, "architecture": "paper"},
            ValueError,
            "unknown settings \\['momentum'\\]",
        ),
        ({"param_grid": {"lr": []}, "architecture": "paper"}, ValueError, "no candidate values"),
        ({"param_grid": "paper", "architecture": "paper"}, ValueError, "param_grid must be"),
        (
            {"param_grid": {"lr": [1e-3]}, "validation_fraction": 0, "architecture": "paper"},
            ValueError,
            "needs a validation split",
        ),
        ({"param_grid": {"lr": [-1.0]}, "architecture": "paper"}, ValueError, "Invalid lr"),
        ({"param_grid": {"lr": [1e-3]}}, ValueError, "param_grid applies to architecture='paper'"),
        ({"architecture": "deep"}, ValueError, "architecture must be one of"),
        ({"n_folds": 1}, ValueError, "Invalid n_folds"),
        ({"min_confidence": 1.5}, ValueError, "min_confidence must be in"),
    ],
)
def test_fuse_train_errors(adata, kwargs, exc, match):
    settings = {k: kwargs.pop(k) for k in list(kwargs) if k in FUSION_FIELDS}
    args = {"use_reps": REPS, "labels_key": "cell_type", **kwargs}
    with pytest.raises(exc, match=match):
        # Training settings are refused when the config is built, the rest when fuse_train reads the data.
        scl.tl.fuse_train(adata, **args, config=replace(FAST, **settings))


def test_fuse_train_label_errors(adata):
    adata.obs["one"] = "T cell"
    with pytest.raises(ValueError, match="single label"):
        scl.tl.fuse_train(adata, REPS, "one", config=FAST)
    adata.obs["none"] = np.nan
    with pytest.raises(ValueError, match="No training cell has a label"):
        scl.tl.fuse_train(adata, REPS, "none", config=FAST)
    adata.obsm["X_bad"] = adata.obsm["X_pca"].copy()
    adata.obsm["X_bad"][3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN/inf for cells"):
        scl.tl.fuse_train(adata, ["X_bad"], "cell_type", config=FAST)


def test_no_validation_trains_all_epochs(adata):
    scl.tl.fuse_train(
        adata,
        REPS,
        "cell_type",
        config=FusionConfig(architecture="paper", validation_fraction=0, hidden=32, epochs=4),
    )
    hist = adata.uns["fusion"]["history"]
    assert len(hist) == 4 and hist["val_loss"].isna().all()
    assert adata.uns["fusion"]["n_validation"] == 0


def test_fuse_predict_errors(adata, tmp_path):
    model = scl.tl.fuse_train(adata, REPS, "cell_type", config=FusionConfig(hidden=16, epochs=2))
    wrong = adata.copy()
    wrong.obsm["X_pca"] = wrong.obsm["X_pca"][:, :10]
    with pytest.raises(ValueError, match="'X_pca' has 10 dimensions.*expects 50"):
        scl.tl.fuse_predict(wrong, model)
    del wrong.obsm["X_text"]
    with pytest.raises(KeyError, match="'X_text' not found in adata.obsm"):
        scl.tl.fuse_predict(wrong, model)
    with pytest.raises(ValueError, match="fuses 2 representations"):
        scl.tl.fuse_predict(adata, model, use_reps=["X_text"])
    with pytest.raises(TypeError, match="must be a FusionModel"):
        scl.tl.fuse_predict(adata, {"weights": 1})
    with pytest.raises(FileNotFoundError, match="FusionModel.save"):
        scl.tl.FusionModel.load(tmp_path)
    path = model.save(tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "format": "pickle"}))
    with pytest.raises(ValueError, match="format 'pickle'"):
        scl.tl.FusionModel.load(path)
    (path / "config.json").write_text(json.dumps({**config, "hidden": 8}))
    with pytest.raises(RuntimeError, match="size mismatch"):
        scl.tl.FusionModel.load(path)


def test_fusion_model_contract():
    torch.manual_seed(0)
    model = scl.models.FusionModel(["a", "b"], [3, 2], ["x", "y", "z"], hidden=8)
    logits = model(torch.randn(4, 3), torch.randn(4, 2))
    assert logits.shape == (4, 3)
    # Logits, not probabilities: rows need not sum to one; predict_proba applies the softmax.
    proba = model.predict_proba([np.ones((4, 3)), np.ones((4, 2))])
    np.testing.assert_allclose(proba.sum(1), 1, rtol=1e-6)
    with pytest.raises(ValueError, match="Expected 2 tensors"):
        model(torch.randn(4, 3))
    with pytest.raises(ValueError, match="'b' has shape \\(4, 5\\)"):
        model.predict_proba([np.ones((4, 3)), np.ones((4, 5))])
    with pytest.raises(ValueError, match="different numbers of cells"):
        model.predict_proba([np.ones((4, 3)), np.ones((5, 2))])
    for args, match in [
        (([], [], ["x", "y"]), "at least one"),
        ((["a"], [3], ["x"]), "at least two classes"),
        ((["a"], [3, 4], ["x", "y"]), "input dims"),
        ((["a"], [0], ["x", "y"]), "positive"),
        ((["a"], [3], ["x", "x"]), "duplicates"),
    ]:
        with pytest.raises(ValueError, match=match):
            scl.models.FusionModel(*args)


def test_standardization_is_part_of_the_model(adata):
    # The stacked default standardizes on all training cells (its folds all use the same scaling).
    model = scl.tl.fuse_train(adata, REPS, "cell_type", report_inputs=False, config=FAST)
    train = (adata.obs["split"] == "train").to_numpy()
    for std, key in zip(model.inputs, REPS, strict=True):
        X = adata.obsm[key][train].astype(np.float64)
        np.testing.assert_allclose(std.shift.numpy(), X.mean(0), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(std.scale.numpy(), np.sqrt(X.var(0).mean()), rtol=1e-5)
    # The paper's recipe standardizes only when asked, on the cells left after the validation split.
    model = scl.tl.fuse_train(
        adata, REPS, "cell_type", config=replace(PAPER, standardize=True), report_inputs=False
    )
    codes = np.searchsorted(model.classes, adata.obs["cell_type"].astype(str).to_numpy()[train])
    fit, _ = stratified_split(codes, 0.1, 0)
    for std, key in zip(model.inputs, REPS, strict=True):
        X = adata.obsm[key][train][fit].astype(np.float64)
        np.testing.assert_allclose(std.shift.numpy(), X.mean(0), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(std.scale.numpy(), np.sqrt(X.var(0).mean()), rtol=1e-5)
    raw = scl.tl.fuse_train(
        adata, REPS, "cell_type", config=replace(FAST, standardize=False), key_added="raw"
    )
    assert all(torch.equal(s.scale, torch.ones_like(s.scale)) for s in raw.inputs)
    assert adata.uns["raw"]["params"]["standardize"] is False


def test_min_confidence_labels_unknown(adata, tmp_path):
    model = scl.tl.fuse_train(adata, REPS, "cell_type", report_inputs=False, config=FAST)
    proba = adata.obsm["fusion_proba"]
    threshold = float(np.quantile(proba.max(1), 0.3))  # about 30 % of the cells fall below it
    scl.tl.fuse_predict(
        adata, model, labels_key="cell_type", split_key="split", min_confidence=threshold, key_added="p"
    )
    conf = adata.obs["p_confidence"].to_numpy()
    np.testing.assert_allclose(conf, proba.max(1), rtol=1e-6)
    pred = adata.obs["p"].astype(str).to_numpy()
    low = conf < threshold
    assert low.any() and (pred[low] == "unknown").all()
    assert (pred[~low] == adata.obs["fusion"].astype(str).to_numpy()[~low]).all()
    # The top-3 candidates keep the model's ranking for re-ranking.
    assert (adata.obs["p_top1"].astype(str) == adata.obs["fusion"].astype(str)).all()
    held = _held_out(adata)
    truth = adata.obs["cell_type"].astype(str).to_numpy()[held]
    metrics = adata.uns["p"]["metrics"]
    assert metrics["rejection_rate"] == pytest.approx(low[held].mean())
    assert metrics["accuracy"] == pytest.approx((pred[held] == truth).mean())
    assert adata.uns["p"]["params"]["min_confidence"] == pytest.approx(threshold)
    # None never rejects; the saved model applies the same threshold.
    scl.tl.fuse_predict(adata, model, key_added="q")
    assert "unknown" not in set(adata.obs["q"].astype(str))
    scl.tl.fuse_predict(adata, model.save(tmp_path / "m"), min_confidence=threshold, key_added="r")
    assert (adata.obs["r"].astype(str).to_numpy() == pred).all()
    with pytest.raises(ValueError, match="min_confidence must be in"):
        scl.tl.fuse_predict(adata, model, min_confidence=-0.1)


def test_mlp_annotate_n_runs_and_min_confidence(adata):
    scl.tl.mlp_annotate(adata, "X_pca", "cell_type", n_runs=3, random_state=2, max_iter=30)
    uns = adata.uns["mlp"]
    runs = uns["runs"]
    assert list(runs["seed"]) == [2, 3, 4] and uns["params"]["n_runs"] == 3
    assert runs["accuracy"].iloc[0] == pytest.approx(uns["metrics"]["accuracy"])
    assert uns["metrics_mean"]["f1"] == pytest.approx(runs["f1"].mean())
    assert uns["metrics_sd"]["accuracy"] == pytest.approx(np.std(runs["accuracy"], ddof=1))
    # Run 2 is the sklearn fit with seed 3.
    scl.tl.mlp_annotate(adata, "X_pca", "cell_type", random_state=3, max_iter=30, key_added="single")
    assert runs["accuracy"].iloc[1] == pytest.approx(adata.uns["single"]["metrics"]["accuracy"])
    scl.tl.mlp_annotate(adata, "X_pca", "cell_type", max_iter=30, min_confidence=0.9, key_added="strict")
    conf = adata.obs["strict_confidence"].to_numpy()
    pred = adata.obs["strict"].astype(str).to_numpy()
    assert ((pred == "unknown") == (conf < 0.9)).all()
    assert adata.uns["strict"]["metrics"]["rejection_rate"] == pytest.approx(
        (conf < 0.9)[_held_out(adata)].mean()
    )
    with pytest.raises(ValueError, match="Invalid n_runs"):
        scl.tl.mlp_annotate(adata, "X_pca", "cell_type", n_runs=0)


def test_stacked_model_contract():
    torch.manual_seed(0)
    model = scl.models.FusionModel(["a", "b"], [3, 2], ["x", "y", "z"], hidden=8, architecture="stacked")
    assert model.head is None and torch.equal(model.mix, torch.ones(2))
    xa, xb = torch.randn(4, 3), torch.randn(4, 2)
    model.mix.copy_(torch.tensor([0.0, 2.0]))
    with torch.no_grad():
        # With input a weighted out, the fused logits are twice b's log-probabilities.
        expected = 2 * torch.log_softmax(model.branches[1](xb), dim=1)
        torch.testing.assert_close(model(xa, xb), expected)
    with pytest.raises(ValueError, match="architecture must be one of"):
        scl.models.FusionModel(["a"], [3], ["x", "y"], architecture="deep")


def test_fusion_config_is_frozen_validated_and_resolved():
    config = FusionConfig()
    with pytest.raises(FrozenInstanceError):
        config.epochs = 3
    assert (config.resolved().hidden, config.resolved().standardize) == (256, True)
    paper = FusionConfig(architecture="paper").resolved()
    assert (paper.hidden, paper.standardize) == (4096, False)
    assert FusionConfig(hidden=8, standardize=False).resolved() == FusionConfig(hidden=8, standardize=False)
    assert scl.models.FusionConfig is FusionConfig
    grid = FusionConfig(
        architecture="paper", lr=0.5, param_grid={"epochs": [1, 2], "batch_size": [8, 16, 32]}
    ).grid()
    assert (
        len(grid) == 6 and {g["lr"] for g in grid} == {0.5} and {g["batch_size"] for g in grid} == {8, 16, 32}
    )
    assert len(FusionConfig(architecture="paper", param_grid="default").grid()) == 16
    assert FusionConfig().grid() == [
        {"lr": 1e-3, "epochs": 50, "batch_size": 64, "lr_decay": 0.95, "weight_decay": 0.01}
    ]
    for bad, match in [
        ({"batch_size": 0}, "Invalid batch_size"),
        ({"weight_decay": -1}, "Invalid weight_decay"),
        ({"patience": 0}, "Invalid patience"),
        ({"hidden": 2.5}, "Invalid hidden"),
        ({"n_folds": 1}, "needs at least 2 folds"),
        ({"class_weight": "inverse"}, "class_weight must be"),
    ]:
        with pytest.raises(ValueError, match=match):
            FusionConfig(**bad)
    # n_folds is the stacked architecture's: the paper's recipe does not check it.
    assert FusionConfig(architecture="paper", n_folds=1).n_folds == 1


def test_training_settings_go_through_the_config_only(adata):
    with pytest.raises(TypeError, match="unexpected keyword argument 'epochs'"):
        scl.tl.fuse_train(adata.copy(), REPS, "cell_type", epochs=15)


def test_params_hold_the_call_settings_and_write_to_h5ad(adata, tmp_path):
    config = FusionConfig(
        architecture="paper", hidden=16, epochs=3, param_grid={"lr": [1e-3, 1e-2]}, patience=None
    )
    model = scl.tl.fuse_train(
        adata, REPS, "cell_type", config=config, report_inputs=False, min_confidence=0.2
    )
    params = adata.uns["fusion"]["params"]
    assert params["architecture"] == "paper" and params["hidden"] == 16 and params["epochs"] == 3
    assert params["param_grid"] == "lr=[0.001, 0.01]" and params["patience"] == -1
    assert params["n_folds"] == 0 and params["class_weight"] == "None" and params["min_confidence"] == 0.2
    assert params["train_value"] == "train" and params["report_inputs"] is False
    assert "hyperparameters" not in params and "metrics" not in params
    scl.tl.fuse_predict(adata, model, labels_key="cell_type", split_key="split", key_added="p")
    pred = adata.uns["p"]
    assert pred["params"] == {
        "use_reps": REPS,
        "labels_key": "cell_type",
        "split_key": "split",
        "train_value": "train",
        "batch_size": 1024,
        "min_confidence": -1.0,
    }
    assert pred["architecture"] == "paper" and pred["model_use_reps"] == REPS
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    assert back.uns["fusion"]["params"]["param_grid"] == "lr=[0.001, 0.01]"
    assert len(back.uns["fusion"]["grid"]) == 2
