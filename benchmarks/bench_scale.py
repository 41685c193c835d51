"""Atlas scale: bounded memory on a backed h5ad, dask.distributed vs one process, gene mode, approximate kNN.

Prints, side by side in one run:

1. Peak memory of ``cell_sentences`` (sentences to a zarr store, not to ``obs``) and ``embed_text``
   (sentences ranked on the fly, embeddings to a zarr store) on a generated sparse CSR h5ad
   (default 200,000 cells × 20,000 genes) opened with ``backed="r"``, each in a fresh subprocess.
   Reported as peak RSS growth during the call over the size of X (data + indices + indptr).
   Embedding 200,000 cells with MiniLM takes ~1.5 hours on 2 cores, so this part uses a tiny
   random BERT sentence-transformer built here (MiniLM's tokenizer, 1 layer, 32 dimensions,
   64 tokens): memory is dominated by the data path, which is the same for every encoder.
2. Throughput of ``embed_text`` (MiniLM, fp32) on pbmc68k cells: one process vs ``scheduler=``
   a LocalCluster of single-threaded worker processes (one per core), and the largest difference.
3. Gene-level text mode (GenePT-w) vs sentence embedding on pbmc68k: cells/s and kNN accuracy.
4. Approximate (pynndescent) vs exact kNN on synthetic clusters: recall@10, label agreement, time.

``--quick``: 20,000 cells for 1, 64 cells for 2, 10,000 cells for 4.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# -- 1. memory on a backed h5ad ------------------------------------------------------------------


def make_h5ad(path: Path, n_cells: int, n_genes: int, genes_per_cell: int, seed: int = 0) -> int:
    """Write a random count matrix (CSR, float32) to ``path``; returns the bytes of X."""
    import anndata as ad
    import pandas as pd
    from scipy import sparse

    rng = np.random.default_rng(seed)
    # Skewed gene popularity, as in real data: a few genes are expressed in most cells.
    popularity = 1.0 / np.arange(1, n_genes + 1) ** 0.6
    popularity /= popularity.sum()
    blocks = []
    for start in range(0, n_cells, 10_000):
        n = min(10_000, n_cells - start)
        counts = rng.poisson(genes_per_cell, size=n)
        cols = rng.choice(n_genes, size=int(counts.sum()), p=popularity)
        rows = np.repeat(np.arange(n), counts)
        data = rng.geometric(0.4, size=cols.size).astype(np.float32)
        block = sparse.csr_matrix((data, (rows, cols)), shape=(n, n_genes))
        block.sum_duplicates()
        blocks.append(block)
    X = sparse.vstack(blocks, format="csr")
    X.indices = X.indices.astype(np.int32)
    X.indptr = X.indptr.astype(np.int64)
    var = pd.DataFrame(index=[f"GENE{i}" for i in range(n_genes)])
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)])
    ad.AnnData(X, obs=obs, var=var).write_h5ad(path)
    return int(X.data.nbytes + X.indices.nbytes + X.indptr.nbytes)


def tiny_encoder_dir(path: Path) -> Path:
    """A random 1-layer BERT sentence-transformer with MiniLM's tokenizer (no download)."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    from sc_llm.models import default_model_path

    tok = AutoTokenizer.from_pretrained(str(default_model_path()))
    config = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    import torch

    torch.manual_seed(0)
    bert_dir = path / "bert"
    BertModel(config).save_pretrained(bert_dir)
    tok.save_pretrained(bert_dir)
    word = models.Transformer(str(bert_dir), max_seq_length=64)
    st = SentenceTransformer(modules=[word, models.Pooling(32, "mean")], device="cpu")
    st.save(str(path / "st"))
    return path / "st"


def _rss_peak_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def child_memory(h5ad: str, step: str, model_dir: str, workdir: str) -> None:
    """Run one step on the backed file and print its peak RSS growth as JSON (runs in a subprocess)."""
    import anndata as ad
    import scanpy as sc

    import sc_llm as scl
    from sc_llm.models import load_text_encoder

    sc.settings.verbosity = 0
    adata = ad.read_h5ad(h5ad, backed="r")
    encoder = load_text_encoder(model_dir)
    encoder.encode(["GENE1 GENE2"])  # warm-up: allocator pools and lazy imports belong to the baseline
    if not _rss_peak_reset():
        raise SystemExit("this benchmark needs Linux /proc/self/clear_refs")
    base = _status("VmRSS")
    t0 = time.perf_counter()
    if step == "cell_sentences":
        scl.pp.cell_sentences(
            adata,
            execution=scl.Execution(store=Path(workdir) / "sentences.zarr", chunk_size=4096),
            in_obs=False,
        )
    else:
        scl.tl.embed_text(
            adata,
            encoder,
            execution=scl.Execution(store=Path(workdir) / "emb.zarr", chunk_size=4096),
            batch_size=256,
        )
    wall = time.perf_counter() - t0
    print(json.dumps({"base": base, "peak": _status("VmHWM"), "wall": wall, "n_obs": adata.n_obs}))


def bench_memory(n_cells: int, n_genes: int, genes_per_cell: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        x_bytes = make_h5ad(tmp / "atlas.h5ad", n_cells, n_genes, genes_per_cell)
        t_make = time.perf_counter() - t0
        model_dir = tiny_encoder_dir(tmp / "tiny")
        print(
            f"\n1. Backed h5ad: {n_cells:,} cells × {n_genes:,} genes, ~{genes_per_cell} genes/cell; "
            f"X = {x_bytes / 2**20:,.0f} MiB (generated in {t_make:.0f} s)"
        )
        print(
            f"{'step (backed, zarr store)':34s} {'cells/s':>9s} {'base RSS':>9s} {'peak growth':>12s} {'growth/X':>9s}"
        )
        for step in ("cell_sentences", "embed_text"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    str(tmp / "atlas.h5ad"),
                    step,
                    str(model_dir),
                    str(tmp),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if out.returncode:
                raise RuntimeError(out.stderr[-3000:])
            r = json.loads(out.stdout.strip().splitlines()[-1])
            growth = r["peak"] - r["base"]
            label = step + (" (tiny BERT)" if step == "embed_text" else "")
            print(
                f"{label:34s} {r['n_obs'] / r['wall']:9,.0f} {r['base'] / 2**20:8,.0f}M "
                f"{growth / 2**20:11,.0f}M {growth / x_bytes:8.2f}×"
            )


# -- 2. distributed vs one process ---------------------------------------------------------------


def _load_default_encoder() -> bool:
    from sc_llm.models import load_text_encoder

    return load_text_encoder() is not None  # cached in the worker process for the chunks to come


def bench_distributed(n_cells: int) -> None:
    import distributed

    import sc_llm as scl

    adata = scl.datasets.pbmc68k()[:n_cells].copy()
    scl.pp.cell_sentences(adata)
    chunk = max(n_cells // 8, 8)
    scl.tl.embed_text(adata[:8].copy(), precision="fp32")  # load the model here once
    t0 = time.perf_counter()
    scl.tl.embed_text(adata, precision="fp32", execution=scl.Execution(chunk_size=chunk), key_added="one")
    t_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    with (
        distributed.LocalCluster(processes=True, threads_per_worker=1, dashboard_address=None) as cluster,
        distributed.Client(cluster) as client,
    ):
        t_start = time.perf_counter() - t0
        n_workers = len(client.nthreads())
        client.run(_load_default_encoder)  # every worker loads the model once, before timing
        t_load = time.perf_counter() - t0 - t_start
        t1 = time.perf_counter()
        scl.tl.embed_text(
            adata,
            precision="fp32",
            execution=scl.Execution(chunk_size=chunk, scheduler=client),
            key_added="dask",
        )
        t_dask = time.perf_counter() - t1
    diff = np.abs(adata.obsm["one"] - adata.obsm["dask"]).max()
    print(f"\n2. embed_text, {n_cells} pbmc68k cells, MiniLM fp32, {os.cpu_count()} cores, chunks of {chunk}")
    print(f"{'run':46s} {'cells/s':>8s} {'vs one':>7s}")
    print(f"{'one process (torch on all cores)':46s} {n_cells / t_one:8.1f} {1.0:6.2f}×")
    print(
        f"{f'LocalCluster, {n_workers} workers × 1 thread':46s} {n_cells / t_dask:8.1f} {t_one / t_dask:6.2f}×"
    )
    print(
        f"cluster start {t_start:.1f} s, first model load on workers {t_load:.1f} s (once per worker); "
        f"max |difference| {diff:.1e}"
    )


# -- 3. gene mode vs sentences -------------------------------------------------------------------


def bench_gene_mode() -> None:
    import sc_llm as scl

    adata = scl.datasets.pbmc68k()
    scl.pp.train_test_split(adata, "cell_type", test_size=0.2, random_state=0)
    scl.pp.cell_sentences(adata)
    runs = {
        "sentences (embed_text)": lambda: scl.tl.embed_text(adata, precision="fp32", key_added="rep"),
        "genes, expression weights (log1p)": lambda: scl.tl.embed_text_genes(
            adata, layer="log1p", precision="fp32", key_added="rep"
        ),
        "genes, rank weights": lambda: scl.tl.embed_text_genes(
            adata, weighting="rank", precision="fp32", key_added="rep"
        ),
    }
    scl.tl.embed_text_genes(adata[:8].copy(), precision="fp32")  # load the model once
    print(
        f"\n3. Gene-level text mode vs sentences, pbmc68k ({adata.n_obs} cells, {adata.n_vars} genes), MiniLM fp32"
    )
    print(f"{'representation':36s} {'cells/s':>9s} {'kNN acc':>8s} {'macro F1':>9s}")
    for i, (name, run) in enumerate(runs.items()):
        adata.obsm.pop("rep", None)
        t0 = time.perf_counter()
        run()
        wall = time.perf_counter() - t0
        scl.tl.knn_annotate(adata, "rep", "cell_type", key_added=f"knn{i}")
        m = adata.uns[f"knn{i}"]["metrics"]
        print(f"{name:36s} {adata.n_obs / wall:9.0f} {m['accuracy']:8.3f} {m['f1']:9.3f}")


# -- 4. approximate kNN --------------------------------------------------------------------------


def bench_knn(n_cells: int) -> None:
    import anndata as ad
    from sklearn.neighbors import NearestNeighbors

    import sc_llm as scl
    from sc_llm.tl._knn import _neighbours

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(30, 32)) * 2
    labels = rng.integers(0, 30, size=n_cells)
    X = (centers[labels] + rng.normal(size=(n_cells, 32)) * 2).astype(np.float32)
    adata = ad.AnnData(np.zeros((n_cells, 1), dtype=np.float32))
    adata.obsm["X"] = X
    adata.obs["label"] = labels.astype(str)
    adata.obs["split"] = np.where(rng.random(n_cells) < 0.8, "train", "test")
    train = np.flatnonzero(adata.obs["split"] == "train")
    test = np.flatnonzero(adata.obs["split"] == "test")
    _neighbours(X[:500], np.arange(400), 10, "cosine", approx=True)  # numba compiles once (cached on disk)
    t0 = time.perf_counter()
    scl.tl.knn_annotate(adata, "X", "label", approx=False, key_added="exact")
    t_exact = time.perf_counter() - t0
    t0 = time.perf_counter()
    scl.tl.knn_annotate(adata, "X", "label", approx=True, key_added="approx")
    t_approx = time.perf_counter() - t0
    approx = _neighbours(X, train, 10, "cosine", approx=True)[test]
    exact = (
        NearestNeighbors(n_neighbors=10, metric="cosine", algorithm="brute")
        .fit(X[train])
        .kneighbors(X[test])[1]
    )
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact, strict=True)])
    agree = (adata.obs["exact"] == adata.obs["approx"]).mean()
    acc = adata.uns["exact"]["metrics"]["accuracy"], adata.uns["approx"]["metrics"]["accuracy"]
    print(
        f"\n4. knn_annotate on {n_cells:,} synthetic cells (32 dims, 30 clusters, {train.size:,} training), k=10 cosine"
    )
    print(f"{'index':14s} {'seconds':>8s} {'vs exact':>9s} {'accuracy':>9s}")
    print(f"{'exact':14s} {t_exact:8.1f} {1.0:8.2f}× {acc[0]:9.3f}")
    print(f"{'pynndescent':14s} {t_approx:8.1f} {t_exact / t_approx:8.2f}× {acc[1]:9.3f}")
    print(f"recall@10 of approximate vs exact neighbours: {recall:.3f}; same predicted label: {agree:.3f}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_memory(*sys.argv[2:6])
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n-cells", type=int, default=None, help="cells of the generated h5ad (part 1)")
    parser.add_argument("--n-genes", type=int, default=20_000)
    parser.add_argument("--genes-per-cell", type=int, default=300)
    parser.add_argument("--parts", default="1234", help="which parts to run, e.g. 13")
    args = parser.parse_args()
    import scanpy as sc

    sc.settings.verbosity = 0
    if "1" in args.parts:
        bench_memory(args.n_cells or (20_000 if args.quick else 200_000), args.n_genes, args.genes_per_cell)
    if "2" in args.parts:
        bench_distributed(64 if args.quick else 192)
    if "3" in args.parts:
        bench_gene_mode()
    if "4" in args.parts:
        bench_knn(10_000 if args.quick else 100_000)


if __name__ == "__main__":
    main()
