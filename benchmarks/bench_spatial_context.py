"""Does spatial context move the text embedding the expected way? pbmc68k with synthetic coordinates.

1. Random layout (coordinates independent of cell type, so neighbourhood composition is a clean
   experimental variable): for each coarse group g (T cell, B cell, monocyte...), the shift of every
   cell's embedding towards the centroid of group g (cosine to the centroid of the plain embeddings,
   with context minus without) is compared between cells with >= 3 of 6 neighbours in g and cells
   with none, plus the Spearman correlation between the number of g neighbours and the shift.
   Done for ``mode="labels"`` (coarse labels) and ``mode="genes"`` (top 10 genes of the neighbours).
2. Tissue-like layout (each cell type in its own patch, patches overlapping): kNN annotation
   accuracy of held-out cells from the plain text embedding, from the neighbours' majority
   training label alone, and from the embedding of sentences carrying the labels of training
   neighbours (held-out cells' labels are never written anywhere).

``--quick`` uses 300 cells instead of 700.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

import sc_llm as scl
from sc_llm.models import load_text_encoder

COARSE = {
    "CD14+ Monocyte": "monocyte",
    "CD19+ B": "B cell",
    "CD56+ NK": "NK cell",
    "CD34+": "progenitor cell",
    "Dendritic": "dendritic cell",
}


def coarse_label(cell_type: str) -> str:
    return COARSE.get(cell_type, "T cell")  # the remaining five pbmc68k types are T cell subsets


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def neighbour_counts(adata, labels: np.ndarray, n_neighs: int) -> pd.DataFrame:
    """Per cell, how many of its spatial neighbours carry each label (same squidpy kNN graph)."""
    import squidpy as sq

    conn = sq.gr.spatial_neighbors_knn(adata, n_neighs=n_neighs, copy=True)[0].tocsr()
    groups = np.unique(labels)
    onehot = (labels[:, None] == groups[None, :]).astype(float)
    return pd.DataFrame(conn @ onehot, columns=groups, index=adata.obs_names)


def shift_table(plain: np.ndarray, spatial: np.ndarray, labels: np.ndarray, counts: pd.DataFrame) -> pd.DataFrame:
    """Per group g: cosine shift towards g's centroid (of plain embeddings) vs number of g neighbours."""
    rows = []
    for g in counts.columns:
        centroid = unit(plain[labels == g].mean(0))
        shift = unit(spatial) @ centroid - unit(plain) @ centroid
        n_g = counts[g].to_numpy()
        many, none = n_g >= 3, n_g == 0
        rows.append(
            {
                "group": g,
                "cells >=3 nbrs": int(many.sum()),
                "shift >=3 minus 0 nbrs": shift[many].mean() - shift[none].mean() if many.any() else np.nan,
                "spearman(n nbrs, shift)": spearmanr(n_g, shift).statistic,
            }
        )
    return pd.DataFrame(rows).set_index("group")


def composition_r2(emb: np.ndarray, counts: pd.DataFrame, train: np.ndarray) -> float:
    """Held-out R^2 of a ridge regression from the embedding to the neighbourhood composition."""
    from sklearn.linear_model import Ridge

    y = counts.to_numpy() / counts.to_numpy().sum(1, keepdims=True)
    pred = Ridge(alpha=1.0).fit(emb[train], y[train]).predict(emb[~train])
    resid = ((y[~train] - pred) ** 2).sum()
    return float(1 - resid / ((y[~train] - y[train].mean(0)) ** 2).sum())


def tissue_layout(labels: np.ndarray, rng: np.random.Generator, spread: float) -> np.ndarray:
    """Each label's patch centred on a circle of radius 1; cells scattered with sd ``spread``."""
    groups = np.unique(labels)
    angle = 2 * np.pi * np.arange(len(groups)) / len(groups)
    centres = dict(zip(groups, np.c_[np.cos(angle), np.sin(angle)], strict=True))
    return np.array([centres[g] for g in labels]) + rng.normal(scale=spread, size=(len(labels), 2))


def tissue_run(adata, enc, rng, spread: float, train: np.ndarray) -> dict[str, float]:
    fine = adata.obs["cell_type"].astype(str).to_numpy()
    adata.obsm["spatial"] = tissue_layout(fine, rng, spread)
    key = f"tissue_{spread}"
    scl.pp.spatial_sentences(adata, labels_key="train_label", neighbors=6, key_added=f"sent_{key}")
    scl.tl.embed_text(adata, enc, sentence_key=f"sent_{key}", key_added=f"X_{key}", precision="bf16")
    scl.tl.knn_annotate(adata, f"X_{key}", "cell_type", k=10, key_added=f"knn_{key}")
    same = neighbour_counts(adata, fine, 6).to_numpy()[np.arange(adata.n_obs), np.searchsorted(np.unique(fine), fine)]
    vote = neighbour_counts(adata, adata.obs["train_label"].fillna("").astype(str).to_numpy(), 6)
    vote = vote.drop(columns="", errors="ignore")
    vote_acc = (vote.to_numpy().argmax(1)[~train] == np.searchsorted(vote.columns, fine[~train])).mean()
    return {"same": same.mean() / 6, "vote": vote_acc, "knn": adata.uns[f"knn_{key}"]["metrics"]["accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    logging.getLogger("squidpy").setLevel(logging.WARNING)
    logging.getLogger("spatialdata").setLevel(logging.WARNING)
    t_start = time.perf_counter()
    adata = scl.datasets.pbmc68k()
    if args.quick:
        adata = adata[np.random.default_rng(0).permutation(adata.n_obs)[:300]].copy()
    enc = load_text_encoder()
    scl.pp.cell_sentences(adata)
    scl.pp.train_test_split(adata, "cell_type", random_state=0)
    scl.tl.embed_text(adata, enc, precision="bf16")
    adata.obs["coarse"] = [coarse_label(c) for c in adata.obs["cell_type"].astype(str)]
    coarse = adata.obs["coarse"].to_numpy()

    rng = np.random.default_rng(0)
    adata.obsm["spatial"] = rng.random((adata.n_obs, 2))
    counts = neighbour_counts(adata, coarse, 6)
    train = (adata.obs["split"] == "train").to_numpy()
    pd.set_option("display.width", 140)
    print("== random layout: R^2 of the neighbourhood composition predicted from the embedding (held-out cells)")
    print(f"plain text embedding: {composition_r2(adata.obsm['X_text'], counts, train):.3f}")
    genes = {"mode": "genes", "layer": "log1p", "n_top_genes": 10}
    variants = {
        "labels": {"mode": "labels", "labels_key": "coarse"},
        "genes, mean": {**genes, "gene_ranking": "mean"},
        "genes, enrichment": {**genes, "gene_ranking": "enrichment"},
    }
    tables = {}
    for name, kwargs in variants.items():
        key = "sent_" + name.replace(", ", "_")
        scl.pp.spatial_sentences(adata, neighbors=6, key_added=key, **kwargs)
        scl.tl.embed_text(adata, enc, sentence_key=key, key_added=f"X_{key}", precision="bf16")
        emb = adata.obsm[f"X_{key}"]
        print(f"spatial sentences, {name:18s}: {composition_r2(emb, counts, train):.3f}   e.g. {adata.obs[key].iloc[0][:90]}...")
        tables[name] = shift_table(adata.obsm["X_text"], emb, coarse, counts)
    for name, table in tables.items():
        print(f"\n== random layout, {name}: cosine shift towards each group's centroid (plain embeddings)")
        print(table.to_string(float_format=lambda v: f"{v:+.3f}"))

    print("\n== tissue-like layout (cell types in overlapping patches); context = training neighbours' labels")
    adata.obs["train_label"] = adata.obs["cell_type"].astype(object).where(train)
    scl.tl.knn_annotate(adata, "X_text", "cell_type", k=10, key_added="knn_plain")
    plain_acc = adata.uns["knn_plain"]["metrics"]["accuracy"]
    print("spread  same-type nbrs  kNN plain  nbr vote  kNN spatial  ratio spatial/plain")
    for spread in (0.2, 0.35):
        acc = tissue_run(adata, enc, rng, spread, train)
        print(f"{spread:6.2f}  {acc['same']:14.2f}  {plain_acc:9.3f}  {acc['vote']:8.3f}  {acc['knn']:11.3f}  "
              f"{acc['knn'] / plain_acc:19.2f}")
    print(f"\n({adata.n_obs} cells, {time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
