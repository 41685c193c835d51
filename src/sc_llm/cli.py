"""Command line: ``sc-llm demo`` and ``sc-llm embed IN.h5ad OUT.h5ad``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

DEMO_LABELS = "cell_type"


def main(argv: list[str] | None = None) -> int:
    """Run the ``sc-llm`` command line (``demo`` or ``embed``); returns the exit status."""
    parser = argparse.ArgumentParser(prog="sc-llm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="sentences → text embedding → split → kNN → metrics on bundled pbmc68k")
    demo.add_argument("--out", default="results/demo", help="folder for the figure, metrics and h5ad")
    demo.add_argument("--model", default=None, help="sentence-transformers name or path (default: bundled MiniLM)")
    demo.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    demo.add_argument("--n-cells", type=int, default=None, help="use a seeded subsample of this many cells")
    demo.add_argument("--seed", type=int, default=0)
    embed = sub.add_parser("embed", help="add a text embedding to an h5ad file")
    embed.add_argument("input")
    embed.add_argument("output")
    embed.add_argument("--model", default=None)
    embed.add_argument("--layer", default=None)
    embed.add_argument("--use-raw", action="store_true")
    embed.add_argument("--gene-symbols", default=None, help="var column with gene symbols")
    embed.add_argument("--key-added", default="X_text")
    embed.add_argument("--batch-size", type=int, default=64)
    embed.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    embed.add_argument("--prefix", default=None)
    embed.add_argument("--store-sentences", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    try:
        _check_embed_args(args)
    except (OSError, ValueError) as e:
        parser.error(str(e))  # a usage problem: one line and exit status 2, before any work
    return _embed(args)


def _demo(args) -> int:
    import numpy as np
    import pandas as pd
    import scanpy as sc

    import sc_llm as scl

    sc.settings.verbosity = 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    adata = scl.datasets.pbmc68k()
    if args.n_cells is not None and args.n_cells < adata.n_obs:
        keep = np.random.default_rng(args.seed).choice(adata.n_obs, args.n_cells, replace=False)
        adata = adata[np.sort(keep)].copy()
    _step("cell sentences")
    scl.pp.cell_sentences(adata)
    scl.pp.train_test_split(adata, DEMO_LABELS, random_state=args.seed)
    _step(f"text embedding of {adata.n_obs} cells")
    scl.tl.embed_text(adata, args.model, precision=args.precision)
    rows = {}
    for rep in ("X_text", "X_pca"):
        key = f"knn_{rep}"
        scl.tl.knn_annotate(adata, rep, DEMO_LABELS, key_added=key)
        clusters = scl.tl.cluster_metrics(adata, rep, DEMO_LABELS, random_state=args.seed)
        rows[rep] = {**adata.uns[key]["metrics"], "kmeans_ari": clusters["ari"], "kmeans_ami": clusters["ami"]}
    table = pd.DataFrame(rows).T[["accuracy", "precision", "recall", "f1", "top3_accuracy", "kmeans_ari", "kmeans_ami"]]
    info = adata.uns["X_text"]
    params = info["params"]
    print(f"\nEncoder: {params['model']['name']} ({info['dim']}-d, {info['max_tokens']} tokens, {params['precision']});")
    print(f"genes in context per cell: mean {info['genes_in_context']['mean']:.1f}, min {info['genes_in_context']['min']}")
    print(f"10-NN annotation on {rows['X_text']['n_cells']} held-out cells (X_pca shown for reference):\n")
    print(table.round(3).to_string())
    _step("UMAP of the text embedding")
    sc.pp.neighbors(adata, use_rep="X_text", random_state=args.seed)
    sc.tl.umap(adata, random_state=args.seed)
    figure = out / "demo_umap.png"
    scl.pl.annotation_embedding(adata, DEMO_LABELS, pred_key="knn_X_text", save=figure, show=False)
    table.to_csv(out / "demo_metrics.csv")
    (out / "demo_metrics.json").write_text(json.dumps(rows, indent=2))
    adata.write_h5ad(out / "demo.h5ad")
    print(f"\nfigure: {figure.resolve()}\nmetrics: {(out / 'demo_metrics.csv').resolve()}")
    return 0


def _embed(args) -> int:
    import anndata as ad
    import scanpy as sc

    import sc_llm as scl

    sc.settings.verbosity = 2
    adata = ad.read_h5ad(args.input)
    scl.tl.embed_text(
        adata,
        args.model,
        key_added=args.key_added,
        batch_size=args.batch_size,
        precision=args.precision,
        prefix=args.prefix,
        layer=args.layer,
        use_raw=args.use_raw,
        gene_symbols=args.gene_symbols,
        store_sentences=args.store_sentences,
    )
    adata.write_h5ad(args.output)
    info = adata.uns[args.key_added]
    print(
        f"wrote obsm[{args.key_added!r}] ({adata.n_obs} × {info['dim']}; {info['genes_in_context']['mean']:.1f} "
        f"genes in context on average) to {args.output}"
    )
    return 0


def _check_embed_args(args) -> None:
    """Everything that can be known before reading the input and embedding it."""
    from sc_llm._utils import check_key

    check_key(args.key_added, "--key-added")
    check_writable(Path(args.output))
    if not Path(args.input).is_file():
        raise FileNotFoundError(f"input file {args.input} does not exist.")


def check_writable(path: Path) -> None:
    """Raise now if ``path`` cannot be written, instead of after the work that produces it.

    Probes by creating (and removing) a file next to it: unlike ``os.access`` this also catches
    read-only file systems and works the same for root.
    """
    if path.is_dir():
        raise IsADirectoryError(f"output {path} is a folder; give a file name such as {path / 'out.h5ad'}.")
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"output folder {folder} does not exist; create it first.")
    try:
        if path.exists():
            with open(path, "ab"):
                pass
        else:
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".sc-llm-probe-")
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise PermissionError(f"output {path} is not writable ({e.strerror}); choose another path.") from e


def _step(msg: str) -> None:
    print(f"[sc-llm] {msg} …", file=sys.stderr, flush=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
