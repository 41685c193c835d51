"""compare_annotators (Table 3 rows) and pl.annotation_metrics on real pbmc68k."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest

import sc_llm as scl
from sc_llm.tl._compare import format_table

REPS = ["X_text", "X_pca"]
FUSION = scl.tl.FusionConfig(hidden=64, epochs=10)
MLP = {"max_iter": 30}


@pytest.fixture
def compared(pbmc_embedded):
    adata = pbmc_embedded
    before_obs, before_obsm = list(adata.obs.columns), list(adata.obsm)
    summary = scl.tl.compare_annotators(
        adata,
        REPS,
        "cell_type",
        methods=("knn", "mlp", "head", "fusion"),
        n_runs=2,
        mlp_kwargs=MLP,
        fusion_config=FUSION,
    )
    assert list(adata.obs.columns) == before_obs and list(adata.obsm) == before_obsm
    return adata, summary


def test_rows_and_columns(compared):
    adata, summary = compared
    assert list(summary.index) == [
        "X_text + kNN",
        "X_pca + kNN",
        "X_text + MLP",
        "X_pca + MLP",
        "X_text + fusion head",
        "X_pca + fusion head",
        "scMPT (X_text + X_pca)",
    ]
    assert list(summary["n_runs"]) == [1, 1, 2, 2, 2, 2, 2]
    assert summary.loc["X_text + kNN", "accuracy_sd"] != summary.loc["X_text + kNN", "accuracy_sd"]  # NaN
    runs = adata.uns["annotator_comparison"]["runs"]
    for model, group in runs.groupby("model"):
        assert summary.loc[model, "f1"] == pytest.approx(group["f1"].mean())
        if len(group) > 1:
            assert summary.loc[model, "f1_sd"] == pytest.approx(np.std(group["f1"], ddof=1))
    assert summary[["accuracy", "precision", "recall", "f1"]].stack().between(0, 1).all()
    assert summary.loc["scMPT (X_text + X_pca)", "accuracy"] > 0.6  # 10 PBMC types; chance is ~0.3
    params = adata.uns["annotator_comparison"]["params"]
    assert params["methods"] == ["knn", "mlp", "head", "fusion"] and params["train_value"] == "train"
    assert (params["random_state"], params["k"], params["n_runs"]) == (0, 10, 2)


def test_rows_agree_with_the_annotators_run_directly(compared):
    adata, summary = compared
    scl.tl.knn_annotate(adata, "X_pca", "cell_type")
    assert summary.loc["X_pca + kNN", "accuracy"] == pytest.approx(adata.uns["knn"]["metrics"]["accuracy"])
    accs = []
    for seed in (0, 1):
        scl.tl.mlp_annotate(adata, "X_text", "cell_type", random_state=seed, key_added=f"m{seed}", **MLP)
        accs.append(adata.uns[f"m{seed}"]["metrics"]["accuracy"])
    assert summary.loc["X_text + MLP", "accuracy"] == pytest.approx(np.mean(accs))
    scl.tl.fuse_train(adata, REPS, "cell_type", n_runs=2, config=FUSION)
    fused = summary.loc["scMPT (X_text + X_pca)"]
    assert fused["accuracy"] == pytest.approx(adata.uns["fusion"]["metrics_mean"]["accuracy"])
    assert fused["recall_sd"] == pytest.approx(adata.uns["fusion"]["metrics_sd"]["recall"])


def test_format_table(compared):
    _, summary = compared
    table = format_table(summary)
    knn, fused = table.loc["X_text + kNN", "accuracy"], table.loc["scMPT (X_text + X_pca)", "f1"]
    assert knn == f"{summary.loc['X_text + kNN', 'accuracy']:.3f}"
    s = summary.loc["scMPT (X_text + X_pca)"]
    assert fused == f"{s['f1']:.3f} ({s['f1_sd']:.4f})"


def test_annotation_metrics_plot(compared, tmp_path):
    adata, summary = compared
    ax = scl.pl.annotation_metrics(adata, save=tmp_path / "m.png")
    assert (tmp_path / "m.png").stat().st_size > 0
    heights = [p.get_height() for p in ax.patches]
    assert len(heights) == 4 * len(summary)
    # Bars are drawn model by model: the first four are the first model's metrics.
    np.testing.assert_allclose(
        heights[:4], summary.iloc[0][["accuracy", "precision", "recall", "f1"]].astype(float)
    )
    ax2 = scl.pl.annotation_metrics(summary, metrics=["f1"], show=False)
    assert len(ax2.patches) == len(summary)
    with pytest.raises(KeyError, match="not in the comparison"):
        scl.pl.annotation_metrics(summary, metrics=["auroc"], show=False)
    with pytest.raises(KeyError, match="run sc_llm.tl.compare_annotators first"):
        scl.pl.annotation_metrics(adata, key="nope", show=False)


def test_errors(pbmc_embedded):
    adata = pbmc_embedded
    with pytest.raises(ValueError, match="unknown: \\['svm'\\]"):
        scl.tl.compare_annotators(adata, REPS, "cell_type", methods=("knn", "svm"))
    with pytest.raises(ValueError, match="at least two representations"):
        scl.tl.compare_annotators(adata, ["X_text"], "cell_type", methods=("fusion",), n_runs=1)
    with pytest.raises(ValueError, match="n_runs must be positive"):
        scl.tl.compare_annotators(adata, REPS, "cell_type", n_runs=0)
    with pytest.raises(ValueError, match="must not set 'n_runs'"):
        scl.tl.compare_annotators(adata, REPS, "cell_type", methods=("fusion",), fusion_kwargs={"n_runs": 3})
    with pytest.raises(KeyError, match="'X_nope' not found"):
        scl.tl.compare_annotators(adata, ["X_nope"], "cell_type", methods=("knn",))
    with pytest.raises(KeyError, match="'nope' not found in adata.obs"):
        scl.tl.compare_annotators(adata, REPS, "cell_type", split_key="nope", methods=("knn",))


def test_unseen_labels_warn_once(pbmc_embedded):
    adata = pbmc_embedded
    labels = adata.obs["cell_type"].astype(str).to_numpy().copy()
    labels[np.flatnonzero(adata.obs["split"] != "train")[:3]] = "Novel"
    adata.obs["label"] = labels
    with pytest.warns(UserWarning, match="absent from training count as errors.*Novel") as record:
        scl.tl.compare_annotators(adata, REPS, "label", methods=("knn",), n_runs=1)
    assert sum("absent from training" in str(w.message) for w in record) == 1


def test_paired_comparison_of_the_fused_row(compared):
    adata, summary = compared
    paired = adata.uns["annotator_comparison"]["paired"].set_index("model")
    runs = adata.uns["annotator_comparison"]["runs"]
    fused = runs[runs["model"] == "scMPT (X_text + X_pca)"].set_index("seed")
    assert np.isnan(paired.loc["scMPT (X_text + X_pca)", "delta_accuracy"])
    for model in ("X_text + MLP", "X_pca + fusion head"):
        other = runs[runs["model"] == model].set_index("seed")
        diff = fused["accuracy"] - other.loc[fused.index, "accuracy"]
        assert paired.loc[model, "delta_accuracy"] == pytest.approx(diff.mean())
        assert paired.loc[model, "delta_accuracy_sd"] == pytest.approx(np.std(diff, ddof=1))
        assert paired.loc[model, ["wins", "ties", "losses"]].tolist() == [
            (diff > 0).sum(),
            (diff == 0).sum(),
            (diff < 0).sum(),
        ]
    # kNN rows are deterministic (no seed): no paired difference.
    assert np.isnan(paired.loc["X_text + kNN", "delta_accuracy"])


def test_fusion_config_passes_once(pbmc_embedded):
    adata = pbmc_embedded
    args = (adata, REPS, "cell_type")
    kwargs = {"methods": ("fusion",), "n_runs": 1}
    new = scl.tl.compare_annotators(*args, **kwargs, fusion_config=scl.tl.FusionConfig(hidden=16, epochs=3))
    with pytest.raises(TypeError, match="unexpected keyword argument 'hidden'"):
        scl.tl.compare_annotators(*args, **kwargs, fusion_kwargs={"hidden": 16, "epochs": 3})
    # The config also passes inside fusion_kwargs, but only once.
    inside = scl.tl.compare_annotators(
        *args, **kwargs, fusion_kwargs={"config": scl.tl.FusionConfig(hidden=16, epochs=3)}
    )
    pd.testing.assert_frame_equal(new, inside)
    with pytest.raises(ValueError, match="Pass the fusion config once"):
        scl.tl.compare_annotators(
            *args,
            **kwargs,
            fusion_config=scl.tl.FusionConfig(),
            fusion_kwargs={"config": scl.tl.FusionConfig()},
        )
