"""Accelerator throughput: cells/s per encoder, precision and batch size, side by side in one run.

Encoders: the bundled all-MiniLM-L6-v2 (``embed_text``), a BERT-large-shaped sentence encoder with
random weights in Ember-V1's shape (1024-d, 24 layers, 16 heads, 512 tokens; timing does not depend
on the values) and scGPT_human's shape (512-d, 12 layers) through ``embed_scgpt``. Each runs in fp32
and in the reduced precision of the device (fp16 and bf16 on CUDA, bf16 on CPU), at each batch size;
the table gives cells/s, the speed-up over fp32 at the same batch size and the minimum cosine
agreement with fp32. On CUDA the input tensors are pinned and copied without blocking.

Run it on the machine whose numbers you want (``python benchmarks/bench_gpu.py``);
``--quick`` (CPU smoke run) uses 32 cells, batch size 16 only and a 4-layer BERT-large-width encoder.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _common import cosine

import sc_llm as scl
from sc_llm.models import default_model_path, resolve_device
from sc_llm.testing import write_scgpt


def bert_large_sentence_encoder(path: Path, n_layers: int):
    """A random-weight BERT of Ember-V1's width with mean pooling, as a TextEncoder."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=1024, num_hidden_layers=n_layers,
        num_attention_heads=16, intermediate_size=4096, max_position_embeddings=512,
    )  # fmt: skip
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    word = models.Transformer(str(path), max_seq_length=512)
    # Wrapped once so its reduced-precision weight copy is made once, as for a model given by name.
    return scl.models.TextEncoder(SentenceTransformer(modules=[word, models.Pooling(1024, "mean")]))


def time_embedding(embed, adata, key, precision, batch_size) -> tuple[float, np.ndarray]:
    embed(adata[: min(8, adata.n_obs)].copy(), precision=precision, batch_size=batch_size)  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = embed(adata, precision=precision, batch_size=batch_size, copy=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return adata.n_obs / (time.perf_counter() - t0), res.obsm[key]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cells", type=int, default=None, help="default: 16,384 on CUDA, 700 elsewhere")
    args = parser.parse_args()
    device = resolve_device(None)
    n_cells = 32 if args.quick else args.cells or (16384 if device.type == "cuda" else 700)
    batch_sizes = [16] if args.quick else ([64, 256, 512, 1024] if device.type == "cuda" else [32])
    reduced = ["fp16", "bf16"] if device.type == "cuda" else ["bf16"]
    adata = scl.datasets.pbmc68k()
    adata = adata[np.resize(np.arange(adata.n_obs), n_cells)].copy()
    adata.obs_names_make_unique()
    scl.pp.cell_sentences(adata)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{n_cells} pbmc68k cells on {name}")

    rows = []
    minilm = scl.models.load_text_encoder()
    sentences = list(adata.obs["cell_sentence"])
    for batch_size in batch_sizes:  # the plain loop embed_text replaces, same model
        minilm.model.encode(sentences[:8], batch_size=batch_size)
        for label, model in (("fp32", minilm.model), ("fp16" if device.type == "cuda" else "bf16", None)):
            model = model or minilm.model_in(label)
            t0 = time.perf_counter()
            model.encode(sentences, batch_size=batch_size)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            rows.append(("plain ST.encode MiniLM", batch_size, label, n_cells / (time.perf_counter() - t0), np.nan, np.nan))
    with tempfile.TemporaryDirectory() as tmp:
        large = bert_large_sentence_encoder(Path(tmp) / "ember_shape", 4 if args.quick else 24)
        scgpt = scl.models.load_scgpt(
            write_scgpt(Path(tmp) / "scgpt", list(adata.var_names), dim=512, n_heads=8, d_hid=512, n_layers=12)
        )
        encoders = {
            "MiniLM-L6 (256 tok)": (lambda a, **kw: scl.tl.embed_text(a, **kw), "X_text"),
            "BERT-large shape (512 tok)": (lambda a, **kw: scl.tl.embed_text(a, large, **kw), "X_text"),
            "scGPT 512d x12": (lambda a, **kw: scl.tl.embed_scgpt(a, scgpt, **kw), "X_scgpt"),
        }
        for label, (embed, key) in encoders.items():
            for batch_size in batch_sizes:
                # batch_size is cells at full length: batches hold batch_size × max_tokens tokens
                base_rate, base = time_embedding(embed, adata, key, "fp32", batch_size)
                rows.append((label, batch_size, "fp32", base_rate, 1.0, 1.0))
                for precision in reduced:
                    rate, emb = time_embedding(embed, adata, key, precision, batch_size)
                    rows.append((label, batch_size, precision, rate, rate / base_rate, cosine(base, emb).min()))
                print(pd.DataFrame(rows[-1 - len(reduced) :]).to_string(header=False, index=False), flush=True)
    table = pd.DataFrame(rows, columns=["encoder", "batch", "precision", "cells/s", "x fp32", "min cos"])
    print(table.round({"cells/s": 1, "x fp32": 2, "min cos": 5}).to_string(index=False))


if __name__ == "__main__":
    main()
