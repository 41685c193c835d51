import anndata as ad
import numpy as np
import pandas as pd
import pytest

import sc_llm as scl

# Measured on pbmc68k with the bundled MiniLM (seeded split): accuracy 0.686, macro F1 0.517.
ACCURACY_FLOOR = 0.62
F1_FLOOR = 0.45


def reference_knn(X, labels, train, k):
    """Straightforward per-cell loop: cosine distances, k nearest training cells (self excluded), vote."""
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    preds = []
    for i in range(X.shape[0]):
        cand = np.flatnonzero(train & (np.arange(X.shape[0]) != i))
        d = 1 - Xn[cand] @ Xn[i]
        nearest = cand[np.argsort(d, kind="stable")[:k]]
        votes = {}
        for rank, j in enumerate(nearest):
            n, first = votes.get(labels[j], (0, rank))
            votes[labels[j]] = (n + 1, first)
        preds.append(max(votes, key=lambda lab: (votes[lab][0], -votes[lab][1])))
    return np.array(preds)


def test_pbmc_metrics_above_floor_and_outputs(pbmc_embedded):
    a = pbmc_embedded
    scl.tl.knn_annotate(a, "X_text", "cell_type")
    m = a.uns["knn"]["metrics"]
    assert m["accuracy"] >= ACCURACY_FLOOR and m["f1"] >= F1_FLOOR
    assert m["n_cells"] == (a.obs["split"] == "test").sum()
    assert m["top3_accuracy"] >= m["accuracy"]
    assert (a.obs["knn"].astype(str) == a.obs["knn_top1"].astype(str)).all()
    fr = a.obs[["knn_top1_frac", "knn_top2_frac", "knn_top3_frac"]].to_numpy()
    assert (np.diff(fr, axis=1) <= 0).all() and (fr.sum(1) <= 1 + 1e-6).all()
    test = (a.obs["split"] == "test").to_numpy()
    y, p = a.obs["cell_type"].astype(str)[test], a.obs["knn"].astype(str)[test]
    assert m["accuracy"] == pytest.approx((y == p).mean())


def test_matches_independent_reference(pbmc_embedded):
    a = pbmc_embedded
    scl.tl.knn_annotate(a, "X_text", "cell_type", k=10)
    train = (a.obs["split"] == "train").to_numpy()
    ref = reference_knn(
        a.obsm["X_text"].astype(np.float64), a.obs["cell_type"].astype(str).to_numpy(), train, 10
    )
    agree = (ref == a.obs["knn"].astype(str).to_numpy()).mean()
    assert agree > 0.995  # float32 vs float64 distances may reorder exact near-ties


def test_tie_rule_nearest_neighbour_wins():
    # Query at 0; train cells: two "b" farther away, two "a" nearer → 2-2 tie, "a" has the nearest member.
    X = np.array([[1, 0.0], [1, 0.05], [1, 0.1], [1, 0.3], [1, 0.4], [1, 0.9]], dtype=np.float32)
    obs = pd.DataFrame(
        {"y": ["a", "a", "a", "b", "b", "b"], "split": ["test", "train", "train", "train", "train", "train"]},
        index=[f"c{i}" for i in range(6)],
    )
    a = ad.AnnData(obs=obs, obsm={"X": X})
    scl.tl.knn_annotate(a, "X", "y", k=4)
    assert a.obs["knn"].iloc[0] == "a"
    assert a.obs["knn_top1_frac"].iloc[0] == pytest.approx(0.5)
    assert a.obs["knn_top2"].iloc[0] == "b"
    assert pd.isna(a.obs["knn_top3"].iloc[0]) and a.obs["knn_top3_frac"].iloc[0] == 0


def test_training_cells_do_not_vote_for_themselves():
    X = np.array([[1, 0], [1, 0.01], [0, 1], [0.01, 1]], dtype=np.float32)
    obs = pd.DataFrame({"y": ["a", "b", "b", "b"], "split": ["train"] * 4}, index=list("wxyz"))
    a = ad.AnnData(obs=obs, obsm={"X": X})
    scl.tl.knn_annotate(a, "X", "y", k=1)
    assert list(a.obs["knn"]) == ["b", "a", "b", "b"]
    with pytest.warns(UserWarning, match="Only 4 training cells for k=4; using k=3"):
        scl.tl.knn_annotate(a, "X", "y", k=4)
    assert a.uns["knn"]["metrics"] == {}


def test_errors(pbmc_embedded):
    a = pbmc_embedded
    with pytest.raises(KeyError, match="'X_nope' not found in adata.obsm"):
        scl.tl.knn_annotate(a, "X_nope", "cell_type")
    with pytest.raises(KeyError, match="Column 'nope' not found in adata.obs"):
        scl.tl.knn_annotate(a, "X_text", "nope")
    with pytest.raises(KeyError, match="Column 'fold' not found"):
        scl.tl.knn_annotate(a, "X_text", "cell_type", split_key="fold")
    with pytest.raises(ValueError, match="No cell has obs\\['split'\\] == 'training'"):
        scl.tl.knn_annotate(a, "X_text", "cell_type", train_value="training")
    a.obsm["X_bad"] = a.obsm["X_text"].copy()
    a.obsm["X_bad"][3, 0] = np.nan
    with pytest.raises(ValueError, match=f"NaN/inf for cells '{a.obs_names[3]}'"):
        scl.tl.knn_annotate(a, "X_bad", "cell_type")
    with pytest.raises(ValueError, match="k must be positive"):
        scl.tl.knn_annotate(a, "X_text", "cell_type", k=0)


def test_cluster_metrics(pbmc_embedded):
    a = pbmc_embedded
    r1 = scl.tl.cluster_metrics(a, "X_text", "cell_type", random_state=0)
    r2 = scl.tl.cluster_metrics(a, "X_text", "cell_type", random_state=0, key_added="again")
    assert r1 == r2 and r1["n_clusters"] == 10 and r1["n_cells"] == a.n_obs
    assert 0.05 < r1["ari"] < 1 and 0.1 < r1["ami"] < 1
    params = {"use_rep": "X_text", "labels_key": "cell_type", "random_state": 0, "n_init": 10}
    assert a.uns["cluster_metrics_X_text"] == {"params": params, **r1}
    # Each representation keeps its own record (scanpy's uns[key]["params"] shape).
    pca = scl.tl.cluster_metrics(a, "X_pca", "cell_type")
    assert a.uns["cluster_metrics_X_text"] == {"params": params, **r1}
    assert a.uns["cluster_metrics_X_pca"] == {"params": {**params, "use_rep": "X_pca"}, **pca}
    shuffled = a.copy()
    shuffled.obs["cell_type"] = np.random.default_rng(0).permutation(a.obs["cell_type"].to_numpy())
    assert abs(scl.tl.cluster_metrics(shuffled, "X_text", "cell_type")["ari"]) < 0.05


def test_classification_metrics_by_hand():
    m = scl.tl.classification_metrics(["a", "a", "b", "c"], ["a", "b", "b", "b"])
    assert m["accuracy"] == 0.5
    # precision: a 1/1, b 1/3, c 0 → 4/9; recall: a 1/2, b 1, c 0 → 1/2
    assert m["precision"] == pytest.approx(4 / 9) and m["recall"] == pytest.approx(0.5)


def test_one_training_cell_raises_clearly_and_two_work():
    X = np.array([[1, 0], [1, 0.01], [0, 1]], dtype=np.float32)
    obs = pd.DataFrame({"y": ["a", "b", "a"], "split": ["train", "test", "test"]}, index=list("xyz"))
    a = ad.AnnData(obs=obs, obsm={"X": X})
    with pytest.raises(ValueError, match="at least 2 labelled training cells, found 1 \\('x'\\)"):
        scl.tl.knn_annotate(a, "X", "y")
    assert "knn" not in a.obs
    a.obs["split"] = ["train", "train", "test"]
    with pytest.warns(UserWarning, match="Only 2 training cells for k=10; using k=1"):
        scl.tl.knn_annotate(a, "X", "y")
    assert list(a.obs["knn"]) == ["b", "a", "b"]  # training cells get the other one's vote; z is nearer y


def test_unseen_test_labels_warn_like_the_trained_heads():
    X = np.array([[1, 0], [1, 0.1], [0, 1], [0.1, 1], [1, 0.05]], dtype=np.float32)
    obs = pd.DataFrame(
        {"y": ["a", "a", "b", "b", "c"], "split": ["train", "train", "train", "test", "test"]},
        index=list("vwxyz"),
    )
    a = ad.AnnData(obs=obs, obsm={"X": X})
    with pytest.warns(UserWarning, match="1 held-out cells carry labels absent from training \\('c'\\)"):
        scl.tl.knn_annotate(a, "X", "y", k=1)
    assert a.uns["knn"]["unseen_labels"] == ["c"]
    assert a.uns["knn"]["metrics"]["accuracy"] == 0.5
