"""The paper's Table 3 on pbmc68k: kNN, MLP per representation and the scMPT fused head, mean (sd) over seeds.

Representations: the packaged MiniLM text embedding of the cell sentences (``X_text``) and the PCA
of the expression matrix (``X_pca``, standing in for scGPT, whose weights are not reachable here).
Rows come from one :func:`sc_llm.tl.compare_annotators` call on the 80/20 split; the fused head is the
paper's network (``architecture="paper"``, width 4096, raw inputs). Also prints fused / best-single
ratios and the effect of the in-model input standardization (not in the paper), trained side by side
on the same split. ``benchmarks/bench_fusion.py`` compares it with the stacked default on three datasets.
``--quick``: hidden 512 and 3 seeds instead of 4096 and 5. Set ``SC_LLM_TEST_CACHE`` to reuse the
test suite's cached text embedding.
"""

from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import replace

import pandas as pd

import sc_llm as scl
from sc_llm.testing import pbmc68k_embedded
from sc_llm.tl._compare import format_table

REPS = ["X_text", "X_pca"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    hidden, n_runs = (512, 3) if args.quick else (4096, 5)
    warnings.filterwarnings("ignore", category=UserWarning)
    adata = pbmc68k_embedded()
    print(
        f"pbmc68k: {adata.n_obs} cells, {adata.obs['cell_type'].nunique()} labels, split {adata.obs['split'].value_counts().to_dict()}"
    )
    fusion = scl.tl.FusionConfig(architecture="paper", hidden=hidden, epochs=50)

    t0 = time.perf_counter()
    summary = scl.tl.compare_annotators(
        adata,
        REPS,
        "cell_type",
        methods=("knn", "mlp", "head", "fusion"),
        n_runs=n_runs,
        fusion_config=fusion,
    )
    t_compare = time.perf_counter() - t0

    t0 = time.perf_counter()
    scl.tl.fuse_train(
        adata, REPS, "cell_type", config=replace(fusion, standardize=True), n_runs=n_runs, key_added="raw"
    )
    t_raw = time.perf_counter() - t0
    raw = adata.uns["raw"]
    row = {"method": "fusion", "use_reps": " + ".join(REPS), "n_runs": n_runs}
    for m in ("accuracy", "precision", "recall", "f1"):
        row[m], row[f"{m}_sd"] = raw["metrics_mean"][m], raw["metrics_sd"][m]
    summary.loc["scMPT, standardized inputs"] = pd.Series(row)

    print(
        f"\nHeld-out cells: {adata.uns['raw']['metrics']['n_cells']}; hidden={hidden}; mean (sd) over {n_runs} seeds\n"
    )
    table = format_table(summary)
    table.insert(0, "runs", summary["n_runs"].astype(int))
    print(table.to_markdown() if _has_tabulate() else table.to_string())

    fused = summary.loc[f"scMPT ({' + '.join(REPS)})"]
    for metric in ("accuracy", "f1"):
        for kind in ("MLP", "fusion head", "kNN"):
            best = max(summary.loc[f"{r} + {kind}", metric] for r in REPS)
            print(f"fused / best single {kind:<11} {metric:<8}: {fused[metric] / best:.3f}")
    std_vs_raw = summary.loc["scMPT, standardized inputs", "accuracy"] / fused["accuracy"]
    print(f"fused accuracy, standardized / raw inputs: {std_vs_raw:.3f}")
    print(
        f"\nwall time: compare_annotators {t_compare:.1f} s, standardized fusion ({n_runs} runs) {t_raw:.1f} s"
    )


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
