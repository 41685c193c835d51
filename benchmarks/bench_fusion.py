"""Fusion on three real labelled datasets: each input alone, the default (stacked) fusion and the paper's network.

Datasets and their embeddings (text = packaged MiniLM on the cell sentence, PCA = scanpy defaults,
GenePT-w = expression-weighted gene-name embeddings) come from ``bench_fusion_data.py``: pbmc68k
(scanpy), a 160-cell pbmc3k subset (Bioconductor decoupleR, Debian) and HSMM myoblast time points
(Bioconductor HSMMSingleCell, Debian).

Table 1 (per dataset, ``--runs`` stratified 80/20 splits, run ``r`` = split seed ``r`` = training seed
``r``, mean (sd) of held-out accuracy and macro F1):

- ``text`` / ``PCA`` / ``GenePT-w``: one input, trained exactly as the stacked fusion trains it (the
  experts of the fused model, from ``uns["fusion"]["inputs"]``);
- ``fused (default)``: ``fuse_train`` defaults on text + PCA, then on text + PCA + GenePT-w, then on
  text + PCA + a pure-noise Gaussian input (50 dims);
- ``fused (paper)``: ``architecture="paper"`` (hidden 4096, raw inputs, early stopping on a 10 %
  validation split) on text + PCA, and each input alone through the same network;
- the paired difference of the default fusion (text + PCA) to the best single input over the runs.

Table 2 (the levers, same data, split 0, ``--runs`` seeds): the paper's network with one change
at a time (standardized inputs; hidden 256; no early stopping), and how much the paper's fused
network depends on each input (held-out accuracy when that input is replaced by its training mean).

``--quick``: 3 runs and 2 datasets. Torch runs single-threaded (``--threads``): on a shared 2-core
machine two threads were 2.8x slower for these small networks.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pandas as pd
import torch
from bench_fusion_data import DATASETS, describe, load

import sc_llm as scl
from sc_llm.tl._compare import paired_comparison

PAPER = scl.tl.FusionConfig(architecture="paper")

METRICS = ("accuracy", "f1")


def _split(adata, seed: int) -> None:
    scl.pp.train_test_split(adata, "label", test_size=0.2, random_state=seed)


def _rows(uns: dict, name_of: dict[str, str], run: int) -> list[dict]:
    out = []
    for _, r in uns["inputs"].iterrows():
        out.append({"model": name_of.get(r["model"], r["model"]), "seed": run, **{m: r[m] for m in METRICS}})
    return out


def main_table(adata, runs: int) -> pd.DataFrame:
    rows = []
    adata.obsm["X_noise"] = np.random.default_rng(0).normal(size=(adata.n_obs, 50)).astype(np.float32)
    names = {"X_text": "text", "X_pca": "PCA", "X_genept": "GenePT-w", "X_noise": "noise"}
    for r in range(runs):
        _split(adata, r)
        scl.tl.fuse_train(adata, ["X_text", "X_pca"], "label", random_state=r)
        rows += _rows(adata.uns["fusion"], {**names, "fused": "fused (default): text + PCA"}, r)
        scl.tl.fuse_train(adata, ["X_text", "X_pca", "X_genept"], "label", random_state=r)
        rows += [
            x
            for x in _rows(
                adata.uns["fusion"], {**names, "fused": "fused (default): text + PCA + GenePT-w"}, r
            )
            if x["model"] in ("GenePT-w", "fused (default): text + PCA + GenePT-w")
        ]
        scl.tl.fuse_train(adata, ["X_text", "X_pca", "X_noise"], "label", random_state=r)
        rows += [
            x
            for x in _rows(adata.uns["fusion"], {**names, "fused": "fused (default): text + PCA + noise"}, r)
            if x["model"] == "fused (default): text + PCA + noise"
        ]
        scl.tl.fuse_train(adata, ["X_text", "X_pca"], "label", config=PAPER, random_state=r)
        paper = {
            "X_text": "text (paper head)",
            "X_pca": "PCA (paper head)",
            "fused": "fused (paper): text + PCA",
        }
        rows += _rows(adata.uns["fusion"], paper, r)
    return pd.DataFrame(rows)


def levers(adata, runs: int) -> pd.DataFrame:
    _split(adata, 0)
    variants = {
        "paper (hidden 4096, raw inputs, val-loss early stopping)": {},
        "+ standardized inputs": {"standardize": True},
        "+ standardized, hidden 256": {"standardize": True, "hidden": 256},
        "+ standardized, hidden 256, no early stopping (50 epochs)": {
            "standardize": True,
            "hidden": 256,
            "validation_fraction": 0,
        },
    }
    rows = []
    train = (adata.obs["split"] == "train").to_numpy()
    for name, kwargs in variants.items():
        for seed in range(runs):
            model = scl.tl.fuse_train(
                adata,
                ["X_text", "X_pca"],
                "label",
                config=scl.tl.FusionConfig(architecture="paper", **kwargs),
                report_inputs=False,
                random_state=seed,
            )
            uns = adata.uns["fusion"]
            row = {"variant": name, "seed": seed, **{m: uns["metrics"][m] for m in METRICS}}
            row["best_epoch"] = model.hyperparameters.get("best_epoch", np.nan)
            if not kwargs:
                row.update(_dependence(adata, model, train))
            rows.append(row)
    for seed in range(runs):
        scl.tl.fuse_train(adata, ["X_text", "X_pca"], "label", random_state=seed, report_inputs=False)
        uns = adata.uns["fusion"]
        rows.append({"variant": "stacked (default)", "seed": seed, **{m: uns["metrics"][m] for m in METRICS}})
    return pd.DataFrame(rows)


def _dependence(adata, model, train) -> dict[str, float]:
    """Held-out accuracy of the fused network when one input is replaced by its training mean."""
    held = ~train
    truth = adata.obs["label"].astype(str).to_numpy()[held]
    out = {}
    for i, key in enumerate(("X_text", "X_pca")):
        reps = [adata.obsm[k].astype(np.float32) for k in ("X_text", "X_pca")]
        reps[i] = np.broadcast_to(reps[i][train].mean(0), reps[i].shape).copy()
        pred = np.asarray(model.classes)[model.predict_proba(reps).argmax(1)][held]
        out[f"acc_without_{key[2:]}"] = float((pred == truth).mean())
    return out


def fmt(table: pd.DataFrame, by: str) -> pd.DataFrame:
    g = table.groupby(by, sort=False)
    out = pd.DataFrame(index=g.size().index)
    out["runs"] = g.size()
    for m in METRICS + tuple(c for c in table.columns if c.startswith("acc_without") or c == "best_epoch"):
        if m in table:
            mean, sd = g[m].mean(), g[m].std(ddof=1)
            out[m] = [
                f"{a:.3f} ({s:.3f})" if m != "best_epoch" else f"{a:.1f}"
                for a, s in zip(mean, sd, strict=True)
            ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS))
    parser.add_argument("--no-levers", action="store_true", help="only the main table")
    parser.add_argument("--levers-only", action="store_true", help="only the levers table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    runs = 3 if args.quick else args.runs
    datasets = args.datasets[:2] if args.quick else args.datasets
    verdicts = []
    for name in datasets:
        adata = load(name)
        print(f"\n## {name}: {describe(adata)}\n")
        if args.levers_only:
            print(fmt(levers(adata, runs), "variant").to_markdown())
            continue
        t0 = time.perf_counter()
        table = main_table(adata, runs)
        print(fmt(table, "model").to_markdown())
        singles = [m for m in ("text", "PCA", "GenePT-w") if m in set(table["model"])]
        best = max(singles, key=lambda m: table.loc[table["model"] == m, "accuracy"].mean())
        paired = paired_comparison(
            table, reference="fused (default): text + PCA", metrics=METRICS, pair="seed"
        )
        cols = ["delta_accuracy", "delta_accuracy_sd", "wins", "ties", "losses", "p_accuracy"]
        print("\nfused (default, text + PCA) minus each row, paired over runs:\n")
        print(paired.dropna(subset=["delta_accuracy"])[cols].round(4).to_markdown())
        fused = table.loc[table["model"] == "fused (default): text + PCA", "accuracy"].mean()
        best_acc = table.loc[table["model"] == best, "accuracy"].mean()
        verdicts.append((name, fused, best, best_acc))
        print(f"\n(main table {time.perf_counter() - t0:.0f} s)")
        if args.no_levers:
            continue
        t0 = time.perf_counter()
        lev = levers(adata, runs)
        print(f"\nLevers on {name} (split 0, seeds 0..{runs - 1}):\n")
        print(fmt(lev, "variant").to_markdown())
        print(f"\n(levers {time.perf_counter() - t0:.0f} s)")
    print("\n## Target: fused (default) >= best single input - 0.01 (accuracy, mean over runs)\n")
    for name, fused, best, best_acc in verdicts:
        ok = "yes" if fused >= best_acc - 0.01 else "NO"
        print(
            f"{name}: fused {fused:.3f} vs best single ({best}) {best_acc:.3f}: diff {fused - best_acc:+.3f} -> {ok}"
        )


if __name__ == "__main__":
    main()
