"""scl.tl.embed_text vs plain SentenceTransformer.encode on full-length sentences, same model and cells.

Prints throughput (cells/s) for: plain ``encode`` of full sentences (fp32), ``embed_text`` in fp32 and
in bf16 (weights cast once; native on CPUs with AMX / AVX512-BF16), the ratios, the cosine agreement to the
fp32 references, and the share of ``embed_text`` wall time spent outside the encoder's forward pass.
``--quick`` uses 64 cells instead of 256.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import ForwardTimer, cosine

import sc_llm as scl
from sc_llm.models import load_text_encoder
from sc_llm.models._runtime import cpu_has_bf16, resolve_precision


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    n = 64 if args.quick else 256
    adata = scl.datasets.pbmc68k()[:n].copy()
    scl.pp.cell_sentences(adata)
    enc = load_text_encoder()
    sentences = list(adata.obs["cell_sentence"])
    enc.model.encode(sentences[:8])  # warm-up for both paths

    t0 = time.perf_counter()
    plain = enc.model.encode(sentences, batch_size=args.batch_size, normalize_embeddings=True)
    t_plain = time.perf_counter() - t0

    results = {}
    for precision in ("fp32", "bf16"):
        model = enc._model_in(resolve_precision(precision, enc.device))  # the weights embed_text will run
        with ForwardTimer(model) as timer:
            t0 = time.perf_counter()
            scl.tl.embed_text(adata, enc, precision=precision, batch_size=args.batch_size, key_added=precision)
            wall = time.perf_counter() - t0
        results[precision] = (wall, timer.seconds, adata.obsm[precision])

    print(f"{n} pbmc68k cells, all-MiniLM-L6-v2 (256 tokens), batch {args.batch_size}, CPU bf16 native: {cpu_has_bf16()}")
    print(f"mean words per full sentence: {np.mean([len(s.split()) for s in sentences]):.0f}; "
          f"genes in context: {adata.uns['fp32']['genes_in_context']['mean']:.1f}")
    print(f"{'method':34s} {'cells/s':>8s} {'vs plain':>9s} {'outside fwd':>12s} {'min cos':>9s}")
    print(f"{'SentenceTransformer.encode fp32':34s} {n / t_plain:8.1f} {1.0:8.2f}× {'':>12s} {'':>9s}")
    ref = results["fp32"][2]
    for precision, (wall, fwd, emb) in results.items():
        cos = cosine(emb, ref).min()
        print(f"{'embed_text ' + precision:34s} {n / wall:8.1f} {t_plain / wall:8.2f}× {1 - fwd / wall:11.1%} {cos:9.5f}")
    print(f"cosine embed_text fp32 vs plain encode (plain cuts the last gene mid-word): {cosine(ref, plain).min():.5f}")


if __name__ == "__main__":
    main()
