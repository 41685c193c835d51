"""scl.tl.attribute: integrated gradients and LIME through the packaged encoder + a trained head (pbmc68k)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import sc_llm as scl
from sc_llm.models import FusionModel
from sc_llm.tl import AttributionConfig

GROUPS = ["CD14+ Monocyte", "CD19+ B", "CD56+ NK"]


class LinearHead(torch.nn.Module):
    """The minimal head contract: forward(x) -> logits, plus `classes`."""

    def __init__(self, dim: int, classes: list[str]):
        super().__init__()
        self.lin = torch.nn.Linear(dim, len(classes))
        self.classes = classes

    def forward(self, x):
        return self.lin(x)


@pytest.fixture(scope="module")
def trained(_pbmc_embedded_session):
    adata = _pbmc_embedded_session
    classes = sorted(adata.obs["cell_type"].astype(str).unique())
    torch.manual_seed(0)
    head = LinearHead(adata.obsm["X_text"].shape[1], classes)
    train = (adata.obs["split"] == "train").to_numpy()
    X = torch.as_tensor(adata.obsm["X_text"][train])
    y = torch.as_tensor([classes.index(c) for c in adata.obs["cell_type"].astype(str)[train]])
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(X), y).backward()
        opt.step()
    return head.eval()


def test_integrated_gradients_table_and_completeness(pbmc_embedded, trained, text_encoder):
    genes = scl.tl.attribute(
        pbmc_embedded,
        trained,
        labels_key="cell_type",
        groups=GROUPS,
        n_cells=2,
        top_n=5,
        config=AttributionConfig(n_steps=16),
        model=text_encoder,
    )
    res = pbmc_embedded.uns["attributions_integrated_gradients"]
    assert res["genes"] is genes
    assert list(genes.columns) == ["group", "rank", "gene", "attribution", "n_cells", "method"]
    cells = res["cells"]
    assert list(cells["group"].value_counts().sort_index()) == [2, 2, 2]
    assert (pbmc_embedded.obs.loc[cells.index, "split"] == "test").all()
    assert (cells["target"] == cells["group"]).all()
    for group, rows in genes.groupby("group"):
        assert list(rows["rank"]) == list(range(1, len(rows) + 1)) and len(rows) <= 5
        assert (rows["attribution"] > 0).all() and rows["attribution"].is_monotonic_decreasing
        assert (rows["n_cells"] <= 2).all()
        in_context = set()
        for name in cells.index[cells["group"] == group]:
            words = pbmc_embedded.obs.loc[name, "cell_sentence"].split()
            in_context |= set(words[: cells.loc[name, "n_genes_in_context"]])
        assert set(rows["gene"]) <= in_context

    # Completeness: attributions sum to F(x) - F(baseline) up to captum's reported delta, with F
    # recomputed here through the encoder's own embedding path.
    tok = text_encoder.tokenizer
    for name, row in cells.iterrows():
        words = pbmc_embedded.obs.loc[name, "cell_sentence"].split()[: row["n_genes_in_context"]]
        ids = tok(" ".join(words))["input_ids"]
        special = set(tok.all_special_ids)
        baseline = [i if i in special else tok.pad_token_id for i in ids]
        emb = text_encoder.encode_ids([ids, baseline], precision="fp32", batch_size=1)
        logits = trained(torch.as_tensor(emb)).detach().numpy()
        t = trained.classes.index(row["target"])
        diff = logits[0, t] - logits[1, t]
        assert row["attribution_sum"] - diff == pytest.approx(row["delta"], abs=1e-3)
        assert abs(row["delta"]) < 0.2 * abs(diff) + 0.05

    overlap = scl.tl.marker_overlap(
        pbmc_embedded,
        {
            "CD56+ NK": ["NKG7", "GNLY", "GZMA", "GZMB"],
            "CD19+ B": ["MS4A1", "CD79A", "CD79B", "CD74"],
            "CD14+ Monocyte": ["CD14", "LYZ", "FCN1", "S100A9"],
        },
        keys=["attributions_integrated_gradients"],
    )
    # Known markers show up among the top attributions (the paper's Table 1 finding).
    assert overlap["n_integrated_gradients"].sum() >= 2


def test_lime_fusion_model_is_seeded(pbmc_embedded, text_encoder):
    config = scl.tl.FusionConfig(hidden=32, epochs=5)
    model = scl.tl.fuse_train(pbmc_embedded, ["X_text"], "cell_type", config=config, random_state=0)
    assert isinstance(model, FusionModel)
    kwargs = {
        "labels_key": "cell_type",
        "groups": ["CD56+ NK", "CD19+ B"],
        "method": "lime",
        "n_cells": 1,
        "top_n": 4,
        "config": AttributionConfig(num_samples=40),
        "model": text_encoder,
    }
    first = scl.tl.attribute(pbmc_embedded, model, **kwargs).copy()
    with pytest.warns(UserWarning, match="already exists"):
        second = scl.tl.attribute(pbmc_embedded, model, **kwargs)
    assert first.equals(second)
    assert set(first["method"]) == {"lime"} and (first["attribution"] > 0).all()
    cells = pbmc_embedded.uns["attributions_lime"]["cells"]
    assert cells["fit_score"].notna().all() and cells["delta"].isna().all()
    other = scl.tl.attribute(pbmc_embedded, model, **{**kwargs, "random_state": 1}, key_added="lime2")
    assert not other.equals(first)


def test_predicted_target_and_errors(pbmc_embedded, trained, text_encoder):
    scl.tl.attribute(
        pbmc_embedded,
        trained,
        labels_key="cell_type",
        groups=["CD56+ NK"],
        n_cells=1,
        config=AttributionConfig(n_steps=4, target="predicted"),
        model=text_encoder,
        split_key=None,
    )
    cells = pbmc_embedded.uns["attributions_integrated_gradients"]["cells"]
    assert (cells["target"] == cells["predicted"]).all()
    with pytest.raises(ValueError, match="Unknown attribution method"):
        scl.tl.attribute(pbmc_embedded, trained, labels_key="cell_type", method="shap")
    with pytest.raises(AttributeError, match="classes"):
        scl.tl.attribute(pbmc_embedded, torch.nn.Linear(384, 3), labels_key="cell_type")
    fused = FusionModel(["X_text", "X_pca"], [384, 50], ["a", "b"], hidden=4)
    with pytest.raises(ValueError, match="this head fuses"):
        scl.tl.attribute(pbmc_embedded, fused, labels_key="cell_type")
    with pytest.raises(ValueError, match="'Martian'"):
        scl.tl.attribute(pbmc_embedded, trained, labels_key="cell_type", groups=["Martian"])
    with pytest.raises(KeyError, match="'celltype' not found"):
        scl.tl.attribute(pbmc_embedded, trained, labels_key="celltype")


def test_exclude_drops_genes_from_the_summary_only(pbmc_embedded, trained, text_encoder):
    kwargs = {
        "labels_key": "cell_type",
        "groups": ["CD14+ Monocyte"],
        "n_cells": 1,
        "top_n": 1000,
        "model": text_encoder,
        "config": AttributionConfig(n_steps=4),
    }
    full = scl.tl.attribute(pbmc_embedded, trained, key_added="all", **kwargs)
    patterns = ("^RP[SL]", "^MT-", "^hla-")  # case-insensitive: the last one matches HLA-DRA etc.
    kept = scl.tl.attribute(pbmc_embedded, trained, exclude=patterns, key_added="kept", **kwargs)
    dropped = full["gene"].str.contains("|".join(patterns), case=False, regex=True)
    assert dropped.any()  # the cell's context holds ribosomal / HLA genes
    assert not kept["gene"].str.contains("|".join(patterns), case=False, regex=True).any()
    expected = full[~dropped.to_numpy()].reset_index(drop=True)
    assert list(kept["gene"]) == list(expected["gene"])
    assert list(kept["rank"]) == list(range(1, len(kept) + 1))
    assert kept["attribution"].to_numpy() == pytest.approx(expected["attribution"].to_numpy())
    # Per-cell attributions (and their completeness) are untouched.
    cells_all, cells_kept = pbmc_embedded.uns["all"]["cells"], pbmc_embedded.uns["kept"]["cells"]
    assert cells_kept["attribution_sum"].to_numpy() == pytest.approx(cells_all["attribution_sum"].to_numpy())
    assert pbmc_embedded.uns["kept"]["params"]["exclude"] == list(patterns)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        scl.tl.attribute(pbmc_embedded, trained, exclude=("RP[",), **kwargs)
    with pytest.raises(TypeError, match="sequence of patterns"):
        scl.tl.attribute(pbmc_embedded, trained, exclude="^MT-", **kwargs)


def test_bf16_attributions_agree_with_fp32(pbmc_embedded, trained, text_encoder):
    from scipy.stats import spearmanr

    from sc_llm.models import resolve_precision

    kwargs = {"labels_key": "cell_type", "groups": ["CD56+ NK"], "n_cells": 1, "top_n": 1000, "model": text_encoder}
    fp32 = scl.tl.attribute(
        pbmc_embedded, trained, key_added="fp32", config=AttributionConfig(n_steps=8), **kwargs
    )
    bf16_config = AttributionConfig(n_steps=8, precision="bf16")
    bf16 = scl.tl.attribute(pbmc_embedded, trained, config=bf16_config, key_added="bf16", **kwargs)
    used = pbmc_embedded.uns["bf16"]["params"]["precision"]
    assert used == resolve_precision("bf16", text_encoder.device)
    # Same genes explained; the positive-attribution genes rank nearly alike.
    merged = fp32.merge(bf16, on="gene", suffixes=("_32", "_16"))
    assert len(merged) >= 0.8 * len(fp32)
    assert spearmanr(merged["attribution_32"], merged["attribution_16"]).statistic > 0.9
    s32 = pbmc_embedded.uns["fp32"]["cells"]["attribution_sum"].iloc[0]
    s16 = pbmc_embedded.uns["bf16"]["cells"]["attribution_sum"].iloc[0]
    # Completeness holds in both: the sums are F(x) - F(baseline) of the target logit, to bf16 accuracy.
    assert s16 == pytest.approx(s32, abs=0.1)
    with pytest.raises(ValueError, match="precision must be one of"):
        scl.tl.attribute(pbmc_embedded, trained, config=AttributionConfig(precision="int8"), **kwargs)


def test_duplicated_obs_names_are_refused(pbmc_embedded):
    sub = pbmc_embedded[:6].copy()
    sub.obs_names = ["a", "b", "a", "c", "d", "e"]
    with pytest.raises(ValueError, match="obs_names are not unique \\('a' repeat\\)"):
        scl.tl.attribute(sub, object(), labels_key="cell_type")


def test_explains_every_labelled_cell_outside_training(pbmc_embedded, trained, text_encoder):
    # A three-way split: the validation and test cells are both held out, so both are explained.
    adata = pbmc_embedded
    split = adata.obs["split"].astype(str).to_numpy().copy()
    nk = (adata.obs["cell_type"] == "CD56+ NK").to_numpy()
    split[np.flatnonzero(nk & (split == "train"))[:5]] = "val"
    adata.obs["split"] = split
    common = {"labels_key": "cell_type", "groups": ["CD56+ NK"], "n_cells": 1000, "model": text_encoder}
    config = AttributionConfig(n_steps=2)
    scl.tl.attribute(adata, trained, config=config, key_added="held_out", **common)
    explained = adata.obs.loc[adata.uns["held_out"]["cells"].index, "split"]
    assert set(explained) == {"val", "test"} and len(explained) == (nk & (split != "train")).sum()
    assert adata.uns["held_out"]["params"]["train_value"] == "train"
    assert adata.uns["held_out"]["params"]["labels_key"] == "cell_type"
    with pytest.raises(ValueError, match="No cell has obs\\['split'\\] == 'Train'"):
        scl.tl.attribute(adata, trained, config=config, train_value="Train", **common)


def test_config_is_checked(pbmc_embedded, trained):
    with pytest.raises(ValueError, match="n_steps must be a positive integer, got 0"):
        AttributionConfig(n_steps=0)
    with pytest.raises(ValueError, match="target must be one of"):
        AttributionConfig(target="prediction")
    with pytest.raises(TypeError, match="config must be an AttributionConfig, got dict"):
        scl.tl.attribute(pbmc_embedded, trained, labels_key="cell_type", config={"n_steps": 4})
    with pytest.raises(dataclasses.FrozenInstanceError):
        AttributionConfig().n_steps = 3


def test_normalize_is_read_from_the_embedding_record(pbmc_embedded, text_encoder):
    classes = sorted(pbmc_embedded.obs["cell_type"].astype(str).unique())
    head = FusionModel(["X_text"], [384], classes, hidden=4)
    kwargs = {"labels_key": "cell_type", "groups": ["CD19+ B"], "n_cells": 1, "model": text_encoder}
    pbmc_embedded.uns["X_text"] = {"params": {"normalize": False}, "dim": 384}
    scl.tl.attribute(pbmc_embedded, head, config=AttributionConfig(n_steps=2), key_added="recorded", **kwargs)
    assert pbmc_embedded.uns["recorded"]["params"]["normalize"] is False
    config = AttributionConfig(n_steps=2, normalize=True)
    scl.tl.attribute(pbmc_embedded, head, config=config, key_added="given", **kwargs)
    assert pbmc_embedded.uns["given"]["params"]["normalize"] is True
