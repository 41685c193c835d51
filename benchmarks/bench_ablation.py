"""Table 2 and Figure 6 on pbmc68k: every ablation embedded with the packaged encoder, scored by 10-NN and k-means.

Prints the ablation table (metrics as rows, ablations as columns), the truncation curve, and the
cost of building the ablated sentences relative to embedding them (measured side by side).

    python benchmarks/bench_ablation.py [--quick]
"""

from __future__ import annotations

import argparse
import time

import pandas as pd

import sc_llm as scl
from sc_llm.models import load_text_encoder
from sc_llm.tl._ablate import KINDS, STUDY_KINDS, ablate_sentences


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="200 cells, three ablations")
    parser.add_argument("--precision", default="bf16")
    args = parser.parse_args()

    adata = scl.datasets.pbmc68k()
    if args.quick:
        adata = adata[:200].copy()
    scl.pp.cell_sentences(adata)
    scl.pp.train_test_split(adata, "cell_type", test_size=0.2, random_state=0)
    encoder = load_text_encoder()
    kinds = ["gene_hash", "shuffle_all", "shuffle_top"] if args.quick else list(STUDY_KINDS)
    kinds += [("truncate", f) for f in ((0.1,) if args.quick else (0.1, 0.2, 0.5))]

    t0 = time.perf_counter()
    table = scl.tl.ablation_study(adata, "cell_type", model=encoder, kinds=kinds, precision=args.precision)
    study_s = time.perf_counter() - t0
    pd.set_option("display.width", 200)
    print(f"pbmc68k ({adata.n_obs} cells, {adata.obs['cell_type'].nunique()} types), encoder "
          f"{encoder.name}, {encoder.max_tokens} tokens, precision {args.precision}")
    print("mean genes in context:", {k: round(v, 1) for k, v in adata.uns["ablation_study"]["genes_in_context"].items()})
    print(table.round(3).to_string())

    sentences = list(adata.obs["cell_sentence"])
    t0 = time.perf_counter()
    for kind in KINDS:
        ablate_sentences(sentences, kind, model=encoder)
    ablate_s = (time.perf_counter() - t0) / len(KINDS)
    per_column = study_s / table.shape[1]
    print(f"building one ablated sentence set: {ablate_s:.2f} s; embedding+scoring one column: {per_column:.1f} s; "
          f"ratio ablate/embed = {ablate_s / per_column:.3f}")


if __name__ == "__main__":
    main()
