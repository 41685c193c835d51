"""Snapshot of every embed_* output and annotation metric on pbmc68k (fp32), to check a refactor changes no result.

    python scripts/results_snapshot.py OUT.npz            # write a snapshot
    python scripts/results_snapshot.py OUT.npz --compare BEFORE.npz   # write, then compare (exact)

Embeddings come from the bundled MiniLM and from tiny random scGPT / Geneformer checkpoints written
by sc_llm.testing; metrics from kNN, the MLP baseline, fusion (default and paper heads), map_labels.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np

import sc_llm as scl
from sc_llm.testing import ensembl_ids, write_geneformer, write_scgpt


def flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}/{k}", v, out)
    elif isinstance(value, int | float | np.integer | np.floating):
        out[prefix] = np.asarray(float(value))


def snapshot() -> dict[str, np.ndarray]:
    warnings.simplefilter("ignore")
    out: dict[str, np.ndarray] = {}
    adata = scl.datasets.pbmc68k()
    scl.pp.cell_sentences(adata)
    scl.pp.train_test_split(adata, "cell_type", test_size=0.2, random_state=0)
    out["sentences"] = np.asarray(adata.obs["cell_sentence"].astype(str))
    scl.tl.embed_text(adata, precision="fp32")
    scl.tl.embed_text_genes(adata, precision="fp32")
    genes = list(adata.var_names)
    with tempfile.TemporaryDirectory() as tmp:
        write_scgpt(Path(tmp) / "scgpt", genes)
        scl.tl.embed_scgpt(adata, Path(tmp) / "scgpt", precision="fp32", min_gene_fraction=0.0)
        adata.var["ensembl_id"] = ensembl_ids(len(genes))
        model, tokens, medians = write_geneformer(Path(tmp) / "gf", list(adata.var["ensembl_id"]))
        scl.tl.embed_geneformer(
            adata, model, token_dictionary=tokens, gene_median_dictionary=medians, precision="fp32"
        )
    for key in ("X_text", "X_text_genes", "X_scgpt", "X_geneformer"):
        out[key] = np.asarray(adata.obsm[key])
    sc_pca = __import__("scanpy").pp.pca
    sc_pca(adata, n_comps=30)
    for rep in ("X_text", "X_pca"):
        scl.tl.knn_annotate(adata, rep, "cell_type", key_added=f"knn_{rep}")
        flatten(f"knn_{rep}", adata.uns[f"knn_{rep}"].get("metrics", {}), out)
        scl.tl.mlp_annotate(adata, rep, "cell_type", key_added=f"mlp_{rep}")
        flatten(f"mlp_{rep}", adata.uns[f"mlp_{rep}"].get("metrics", {}), out)
    scl.tl.fuse_train(adata, ["X_text", "X_pca"], "cell_type", key_added="fusion")
    flatten("fusion", adata.uns["fusion"].get("metrics", {}), out)
    out["fusion_proba"] = np.asarray(adata.obs["fusion_confidence"]) if "fusion_confidence" in adata.obs else np.zeros(1)
    scl.tl.fuse_train(
        adata, ["X_text", "X_pca"], "cell_type", config=scl.tl.FusionConfig(architecture="paper"), key_added="paper"
    )
    flatten("paper", adata.uns["paper"].get("metrics", {}), out)
    query = adata[adata.obs["split"] != "train"].copy()
    ref = adata[adata.obs["split"] == "train"].copy()
    scl.tl.map_labels(query, ref, "X_text", "cell_type")
    flatten("mapped", query.uns["mapped"].get("metrics", {}), out)
    out["mapped_labels"] = np.asarray(query.obs["mapped"].astype(str))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--compare")
    args = parser.parse_args()
    snap = snapshot()
    np.savez(args.out, **snap)
    print(f"{len(snap)} entries written to {args.out}")
    if args.compare:
        before = dict(np.load(args.compare, allow_pickle=True))
        diffs = {}
        for key in sorted(set(before) | set(snap)):
            if key not in before or key not in snap:
                diffs[key] = "missing on one side"
            elif before[key].dtype.kind in "fc":
                d = float(np.nanmax(np.abs(before[key] - snap[key]))) if before[key].shape == snap[key].shape else "shape"
                if d != 0:
                    diffs[key] = d
            elif not np.array_equal(before[key], snap[key]):
                diffs[key] = "differs"
        print(json.dumps(diffs, indent=1) if diffs else "identical: every entry equal")


if __name__ == "__main__":
    main()
