"""scGPT and Geneformer encoders at real size: fp32 vs bf16 throughput and agreement on pbmc68k cells.

Random weights in the released layouts (timing does not depend on the values): scGPT_human's shape
(512-d, 12 layers, 8 heads, d_hid 512, flash-attention key names) and Geneformer V1's
(256-d, 6 layers, 4 heads, 2048 positions). Prints cells/s for each precision, the bf16/fp32 ratio,
the cosine agreement to fp32, and the share of wall time spent outside the forward pass
(tokenization, binning, padding). bf16 falls back to fp32 on CPUs without AMX / AVX512-BF16.
``--quick`` uses 64 cells instead of 256.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import ForwardTimer, cosine

import sc_llm as scl
from sc_llm.models._runtime import cpu_has_bf16
from sc_llm.testing import ensembl_ids, write_geneformer, write_scgpt


def run(name, embed, encoder, adata, key, batch_size):
    embed(adata[:8].copy(), precision="fp32", batch_size=batch_size)  # warm-up and bf16 copy made once
    embed(adata[:8].copy(), precision="bf16", batch_size=batch_size)
    out, rates = {}, {}
    for precision in ("fp32", "bf16"):
        model = encoder.model_in(precision)
        with ForwardTimer(model) as timer:
            t0 = time.perf_counter()
            res = embed(adata, precision=precision, batch_size=batch_size, copy=True)
            wall = time.perf_counter() - t0
        out[precision], rates[precision] = res.obsm[key], adata.n_obs / wall
        used = res.uns[key]["params"]["precision"]
        print(
            f"{name} {precision:>4} (ran {used}): {rates[precision]:7.1f} cells/s, "
            f"outside forward {100 * (1 - timer.seconds / wall):4.1f}% of {wall:.1f}s"
        )
    cos = cosine(out["fp32"], out["bf16"])
    print(
        f"{name} bf16/fp32 speed-up: {rates['bf16'] / rates['fp32']:.2f}x; "
        f"cosine to fp32 min {cos.min():.5f} mean {cos.mean():.5f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    n = 64 if args.quick else 256
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    adata = scl.datasets.pbmc68k()[:n].copy()
    adata.var["ensembl_id"] = ensembl_ids(adata.n_vars)
    print(f"{n} pbmc68k cells, torch threads {torch.get_num_threads()}, native CPU bf16: {cpu_has_bf16()}")
    genes_per_cell = np.asarray((adata.X > 0).sum(1)).ravel()
    print(f"expressed genes per cell: mean {genes_per_cell.mean():.0f}, max {genes_per_cell.max()}")

    with tempfile.TemporaryDirectory() as tmp:
        scgpt_dir = write_scgpt(
            Path(tmp) / "scGPT_human_shape", list(adata.var_names), dim=512, n_heads=8, d_hid=512, n_layers=12
        )
        enc = scl.models.load_scgpt(scgpt_dir)

        def embed_scgpt(a, **kw):
            return scl.tl.embed_scgpt(a, enc, **kw)

        run("scGPT 512d x12", embed_scgpt, enc, adata, "X_scgpt", args.batch_size)

        model_dir, tok, med = write_geneformer(
            Path(tmp) / "gf", list(adata.var["ensembl_id"]), input_size=2048, dim=256, n_layers=6, n_heads=4
        )
        genc = scl.models.load_geneformer(model_dir)

        def embed_gf(a, **kw):
            return scl.tl.embed_geneformer(a, genc, token_dictionary=tok, gene_median_dictionary=med, **kw)

        run("Geneformer V1 256d x6", embed_gf, genc, adata, "X_geneformer", args.batch_size)


if __name__ == "__main__":
    main()
