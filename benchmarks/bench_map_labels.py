"""map_labels with one cell type held out of the reference (pbmc68k): is the novel type called "unknown"?

For each seed, pbmc68k is split in two random halves (reference, query); for each cell type, that
type is removed from the reference and the query is mapped twice: with ``min_confidence="auto"``
and without rejection. Printed per held-out type, mean (sd) over seeds:

- ``novel→unknown``: share of the held-out type's query cells called "unknown" (target ≥ 0.50);
- ``known drop``: accuracy of known-type query cells without rejection minus with it, in points
  ("unknown" counts as wrong; target ≤ 3);
- ``known rejected``: share of known-type query cells called "unknown";
- ``LOO est.``: what ``min_confidence="auto"`` expected the known drop to be, in points: the share of
  the reference's own cells that leave-one-out classifies correctly yet rejects
  (``uns["auto"]["reference_loo"]["correct_rejected"]``; the threshold keeps it at most 2.5).

Embeddings: ``X_pca`` shipped with pbmc68k_reduced, and ``X_text`` (bundled MiniLM on cell
sentences; computed once, cached under ``--cache``).

Usage: ``python benchmarks/bench_map_labels.py [--seeds 5] [--reps X_pca X_text]``
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np

import sc_llm as scl


def load(cache: Path, reps: list[str]):
    import anndata as ad

    path = cache / "pbmc68k_text.h5ad"
    if "X_text" in reps and path.exists():
        return ad.read_h5ad(path)
    adata = scl.datasets.pbmc68k()
    if "X_text" in reps:
        scl.pp.cell_sentences(adata)
        scl.tl.embed_text(adata, precision="bf16")
        cache.mkdir(parents=True, exist_ok=True)
        adata.write_h5ad(path)
    return adata


def run(adata, rep: str, seeds: int) -> dict[str, list[tuple[float, float, float, float]]]:
    y = adata.obs["cell_type"].astype(str).to_numpy()
    out: dict[str, list[tuple[float, float, float, float]]] = {}
    for seed in range(seeds):
        perm = np.random.default_rng(seed).permutation(adata.n_obs)
        ref_all, query = (
            adata[np.sort(perm[: adata.n_obs // 2])],
            adata[np.sort(perm[adata.n_obs // 2 :])].copy(),
        )
        for held in sorted(set(y)):
            ref = ref_all[ref_all.obs["cell_type"].astype(str) != held].copy()
            if (query.obs["cell_type"] == held).sum() == 0:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scl.tl.map_labels(query, ref, rep, "cell_type", key_added="auto")
                scl.tl.map_labels(query, ref, rep, "cell_type", min_confidence=None, key_added="plain")
            m, m0 = query.uns["auto"]["metrics"], query.uns["plain"]["metrics"]
            drop = 100 * (m0["known"]["accuracy"] - m["known"]["accuracy"])
            est = 100 * query.uns["auto"]["reference_loo"]["correct_rejected"]
            out.setdefault(held, []).append((m["novel"]["rejected"], drop, m["known"]["rejected"], est))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--reps", nargs="+", default=["X_pca", "X_text"])
    parser.add_argument("--cache", type=Path, default=Path("bench_results"))
    args = parser.parse_args()
    adata = load(args.cache, args.reps)
    for rep in args.reps:
        res = run(adata, rep, args.seeds)
        print(f"\n== {rep}: {args.seeds} seeds, mean (sd)")
        print(
            f"{'held-out type':32s} {'n query':>7s} {'novel→unknown':>15s} {'known drop (pts)':>17s} "
            f"{'known rejected':>15s} {'LOO est.':>9s}"
        )
        n_q = adata.obs["cell_type"].value_counts() / 2
        for held, rows in res.items():
            v = np.asarray(rows)
            sd = v.std(axis=0, ddof=1) if len(v) > 1 else np.zeros(4)
            print(
                f"{held:32s} {n_q[held]:7.0f} {v[:, 0].mean():8.2f} ({sd[0]:.2f}) "
                f"{v[:, 1].mean():10.1f} ({sd[1]:.1f}) {v[:, 2].mean():8.2f} ({sd[2]:.2f}) {v[:, 3].mean():9.1f}"
            )
        allv = np.asarray([r for rows in res.values() for r in rows])
        per_type = np.asarray([np.mean(r, axis=0) for r in res.values()])
        print(
            f"{'mean over types':32s} {'':7s} {per_type[:, 0].mean():8.2f} ({per_type[:, 0].std(ddof=1):.2f}) "
            f"{per_type[:, 1].mean():10.1f} ({per_type[:, 1].std(ddof=1):.1f}) {per_type[:, 2].mean():8.2f} "
            f"{'':6s} {per_type[:, 3].mean():9.1f}"
        )
        print(
            f"types with novel→unknown ≥ 0.5: {(per_type[:, 0] >= 0.5).sum()}/{len(per_type)}; "
            f"runs with known drop ≤ 3 pts: {(allv[:, 1] <= 3).sum()}/{len(allv)}"
        )


if __name__ == "__main__":
    main()
