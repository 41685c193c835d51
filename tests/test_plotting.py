"""scl.pl: every plot draws into the caller's Axes or a new figure, saves and shows the same way (pl/_utils)."""

from __future__ import annotations

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

import sc_llm as scl
from sc_llm.tl._ablate import METRIC_ROWS

COLUMNS = ["baseline", "gene_hash", "truncate_0.2", "truncate_0.5"]


@pytest.fixture
def study():
    values = np.linspace(0.1, 0.9, len(METRIC_ROWS) * len(COLUMNS)).reshape(len(METRIC_ROWS), len(COLUMNS))
    return pd.DataFrame(values, index=list(METRIC_ROWS), columns=COLUMNS)


@pytest.fixture
def attribution_table():
    rows = [("B", 1, "MS4A1", 0.9), ("B", 2, "FTL", 0.4), ("NK", 1, "NKG7", 0.7), ("T", 1, "CD3D", 0.5)]
    table = pd.DataFrame(rows, columns=["group", "rank", "gene", "attribution"])
    return table.assign(n_cells=1, method="lime")


@pytest.fixture
def shown(monkeypatch):
    calls = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: calls.append(1))
    yield calls
    plt.close("all")


def test_plots_draw_into_given_axes_and_leave_showing_to_the_caller(study, attribution_table, shown):
    fig, (a1, a2) = plt.subplots(1, 2)
    n_figures = len(plt.get_fignums())
    assert scl.pl.ablation(study, ax=a1, metrics=["accuracy"]) is a1
    heights = [p.get_height() for p in a1.patches]
    np.testing.assert_allclose(heights, study.loc["accuracy"].to_numpy())
    assert scl.pl.sentence_length(study, metrics=["f1"], axes=[a2]) == [a2] and len(a2.lines) == 1
    assert len(plt.get_fignums()) == n_figures and shown == []

    fig3, axes3 = plt.subplots(1, 3)
    assert scl.pl.attributions(attribution_table, axes=list(axes3)) is fig3
    assert [ax.get_title() for ax in axes3] == ["B", "NK", "T"]
    assert fig3.get_suptitle() == ""  # the caller's figure keeps its own title
    assert shown == []


def test_new_figures_are_shown_unless_saved(study, attribution_table, shown, tmp_path):
    ax = scl.pl.ablation(study)
    assert len(ax.patches) == len(METRIC_ROWS) * len(COLUMNS) and shown == [1]
    fig = scl.pl.attributions(attribution_table, ncols=2, save=tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 0 and shown == [1]
    assert sum(a.get_visible() for a in fig.axes) == 3  # 2 × 2 grid, the fourth cell hidden
    scl.pl.sentence_length(study, save=tmp_path / "s.png", show=True)
    assert shown == [1, 1]


def test_wrong_axes_and_missing_results_are_refused(study, attribution_table, shown):
    _, axes = plt.subplots(1, 2)
    with pytest.raises(ValueError, match="draws 3 panel\\(s\\): pass 3 matplotlib Axes"):
        scl.pl.attributions(attribution_table, axes=list(axes))
    with pytest.raises(ValueError, match="draws 2 panel\\(s\\)"):
        scl.pl.sentence_length(study, axes=axes[0])
    adata = ad.AnnData(obs=pd.DataFrame(index=["a", "b"]))
    with pytest.raises(
        KeyError, match="uns\\['ablation_study'\\]\\['table'\\] not found; run sc_llm.tl.ablation_study"
    ):
        scl.pl.ablation(adata)
    with pytest.raises(KeyError, match="run sc_llm.tl.attribute first"):
        scl.pl.attributions(adata)
    with pytest.raises(KeyError, match="lacks columns \\['gene'\\]"):
        scl.pl.attributions(attribution_table.drop(columns="gene"))
    with pytest.raises(ValueError, match="table is empty"):
        scl.pl.attributions(attribution_table.iloc[:0])
    with pytest.raises(KeyError, match="Metrics \\['auroc'\\] not in the ablation table"):
        scl.pl.sentence_length(study, metrics=["auroc"])


def test_annotation_embedding_into_given_axes(shown):
    rng = np.random.default_rng(0)
    obs = pd.DataFrame(
        {"cell_type": ["B", "T"] * 10, "knn": ["B", "T"] * 9 + ["T", "B"], "split": ["train", "test"] * 10},
        index=[f"c{i}" for i in range(20)],
    )
    adata = ad.AnnData(obs=obs, obsm={"X_umap": rng.normal(size=(20, 2))})
    _, axes = plt.subplots(1, 2)
    out = scl.pl.annotation_embedding(adata, "cell_type", axes=list(axes))
    assert out == list(axes) and shown == []
    assert axes[1].get_title() == "knn on held-out cells"
