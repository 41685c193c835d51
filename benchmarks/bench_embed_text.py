"""embed_text vs a plain SentenceTransformer.encode loop, side by side in one run.

1. Host path: a 0-layer, 8-wide random BERT behind the bundled MiniLM tokenizer (embeddings and
   pooling only, so the model costs almost nothing and what is measured is everything around it),
   on pbmc68k repeated to ``--cells`` cells and padded to ~1,000 expressed genes per cell (see
   ``bench_word_tokens.padded_pbmc``). Plain ``encode`` tokenizes each cell's full sentence;
   ``embed_text`` ranks each chunk of rows and builds token ids gene by gene.
2. The bundled all-MiniLM-L6-v2 on pbmc68k: fp32 and bf16, share of wall time spent outside the
   model's forward, minimum cosine to fp32.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
from _common import ForwardTimer, cosine
from bench_word_tokens import padded_pbmc

import sc_llm as scl
from sc_llm.models import default_model_path, load_text_encoder
from sc_llm.models._runtime import cpu_has_bf16, resolve_precision


def tiny_bert(folder: Path):
    """A SentenceTransformer with 0 transformer layers and width 8, behind the bundled tokenizer."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=8, num_hidden_layers=0, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=512,
    )  # fmt: skip
    BertModel(config).save_pretrained(folder)
    for f in default_model_path().iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(f, folder / f.name)
    word = models.Transformer(str(folder), max_seq_length=256)
    return SentenceTransformer(modules=[word, models.Pooling(8, "mean")], device="cpu")


def host_path(n_cells: int, batch_size: int) -> None:
    X, names = padded_pbmc(n_cells)
    adata = ad.AnnData(X, var={"gene": names})
    adata.var_names = names
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_bert(Path(tmp))
        enc = load_text_encoder(model)
        scl.pp.cell_sentences(adata)
        sentences = list(adata.obs["cell_sentence"])
        model.encode(sentences[:64], batch_size=batch_size)  # warm-up for both paths
        t0 = time.perf_counter()
        model.encode(sentences, batch_size=batch_size)
        t_plain = time.perf_counter() - t0
        rows = {}
        for label, kwargs in (("from the matrix", {"sentence_key": "none"}), ("from obs sentences", {})):
            t0 = time.perf_counter()
            scl.tl.embed_text(adata, enc, precision="fp32", batch_size=batch_size, key_added="X", **kwargs)
            rows[label] = time.perf_counter() - t0
    genes = np.diff(X.indptr)
    import torch

    print(f"\n1. Host path ({torch.get_num_threads()} torch threads): {n_cells} cells, {genes.mean():.0f} expressed genes per cell (min {genes.min()}), "
          f"0-layer 8-wide BERT, MiniLM tokenizer (256 tokens), batch {batch_size}")  # fmt: skip
    print(f"{'path':42s} {'cells/s':>9s} {'vs plain':>9s}")
    print(f"{'SentenceTransformer.encode, full sentences':42s} {n_cells / t_plain:9.0f} {1:8.1f}×")
    for label, wall in rows.items():
        print(f"{'embed_text ' + label:42s} {n_cells / wall:9.0f} {t_plain / wall:8.1f}×")


def minilm(n_cells: int, batch_size: int) -> None:
    adata = scl.datasets.pbmc68k()
    adata = ad.concat([adata] * -(-n_cells // adata.n_obs), index_unique="-")[:n_cells].copy()
    scl.pp.cell_sentences(adata)
    enc = load_text_encoder()
    sentences = list(adata.obs["cell_sentence"])
    enc.model.encode(sentences[:8])  # warm-up for both paths
    t0 = time.perf_counter()
    enc.model.encode(sentences, batch_size=batch_size, normalize_embeddings=True)
    t_plain = time.perf_counter() - t0
    results = {}
    for precision in ("fp32", "bf16"):
        model = enc.model_in(resolve_precision(precision, enc.device))  # the weights embed_text will run
        scl.tl.embed_text(adata[:8].copy(), enc, precision=precision)  # warm-up
        with ForwardTimer(model) as timer:
            t0 = time.perf_counter()
            scl.tl.embed_text(adata, enc, precision=precision, batch_size=batch_size, key_added=precision)
            wall = time.perf_counter() - t0
        results[precision] = (wall, timer.seconds, adata.obsm[precision])
    print(f"\n2. {n_cells} pbmc68k cells, all-MiniLM-L6-v2 (256 tokens), batch {batch_size}, "
          f"CPU bf16 native: {cpu_has_bf16()}")  # fmt: skip
    print(f"{'method':34s} {'cells/s':>8s} {'vs plain':>9s} {'outside fwd':>12s} {'min cos':>9s}")
    print(f"{'SentenceTransformer.encode fp32':34s} {n_cells / t_plain:8.1f} {1.0:8.2f}× {'':>12s} {'':>9s}")
    ref = results["fp32"][2]
    for precision, (wall, fwd, emb) in results.items():
        cos = cosine(emb, ref).min()
        print(f"{'embed_text ' + precision:34s} {n_cells / wall:8.1f} {t_plain / wall:8.2f}× "
              f"{1 - fwd / wall:11.1%} {cos:9.5f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--cells", type=int, default=6300, help="cells for the host-path comparison")
    parser.add_argument("--minilm-cells", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both paths (default: torch's)")
    parser.add_argument("--parts", default="host,minilm", help="which comparisons to run")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if "host" in args.parts:
        host_path(700 if args.quick else args.cells, args.batch_size)
    if "minilm" in args.parts:
        minilm(64 if args.quick else args.minilm_cells, args.batch_size)


if __name__ == "__main__":
    main()
