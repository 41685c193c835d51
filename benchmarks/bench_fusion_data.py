"""Real labelled single-cell datasets for the fusion benchmarks, each with text, PCA and GenePT-w embeddings.

Every dataset comes from a package registry, never from a download at run time:

- ``pbmc68k``: scanpy's bundled ``pbmc68k_reduced`` (700 PBMCs, 10 bulk-sorted labels), through
  :func:`sc_llm.datasets.pbmc68k`.
- ``pbmc3k160``: the 160-cell subset of 10x's pbmc3k (20 cells of each of 8 types annotated in the
  Seurat tutorial) shipped as ``extdata/sc_data.rds`` in Bioconductor's decoupleR (Debian package
  ``r-bioc-decoupler``). Log-normalized values; counts are ``rint(expm1(x) * nCount_RNA / 1e4)``.
- ``hsmm``: 271 human skeletal muscle myoblasts (Trapnell et al. 2014, Smart-seq FPKM) at 0, 24, 48 and
  72 h of differentiation, from Bioconductor's HSMMSingleCell (Debian ``r-bioc-hsmmsinglecell``);
  the label is the time point.

The two Bioconductor packages are read from ``/usr/lib/R/site-library`` when installed; otherwise the
``.deb`` is fetched with ``apt-get download`` into the cache directory and unpacked there with
``dpkg-deb -x`` (no R needed: the R files are parsed with the pure-Python ``rdata`` reader). Each prepared
dataset is written once to ``<cache>/<name>.h5ad`` (``SC_LLM_BENCH_CACHE``, default
``~/.cache/sc_llm_bench``) with ``obs["label"]``, ``obs["split"]`` (80/20 stratified, seed 0),
``obsm["X_text"]`` (packaged MiniLM on the cell sentence), ``obsm["X_pca"]`` (scanpy defaults:
normalize_total, log1p, 2,000 highly variable genes when there are more, 50 components) and
``obsm["X_genept"]`` (:func:`sc_llm.tl.embed_text_genes`, expression-weighted gene-name embeddings).
"""

from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
from scipy import sparse

import sc_llm as scl

DATASETS = ("pbmc68k", "pbmc3k160", "hsmm")
R_LIB = Path("/usr/lib/R/site-library")
DEBS = {"decoupleR": "r-bioc-decoupler", "HSMMSingleCell": "r-bioc-hsmmsinglecell"}


def cache_dir() -> Path:
    path = Path(os.environ.get("SC_LLM_BENCH_CACHE", Path.home() / ".cache" / "sc_llm_bench"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def load(name: str) -> ad.AnnData:
    """The prepared dataset ``name`` (built and cached on first use)."""
    path = cache_dir() / f"{name}.h5ad"
    if path.exists():
        return ad.read_h5ad(path)
    adata = {"pbmc68k": _pbmc68k, "pbmc3k160": _pbmc3k160, "hsmm": _hsmm}[name]()
    _embed(adata)
    adata.write_h5ad(path)
    return adata


def _r_package(pkg: str) -> Path:
    """Folder of an installed (or unpacked) Bioconductor package."""
    if (R_LIB / pkg).is_dir():
        return R_LIB / pkg
    root = cache_dir() / "deb"
    unpacked = root / "x" / R_LIB.relative_to("/") / pkg
    if not unpacked.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", DEBS[pkg]], cwd=root, check=True, capture_output=True)
        deb = next(root.glob(f"{DEBS[pkg]}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root / "x")], check=True)
    return unpacked


def _read_r(path: Path):
    """An .rds/.rda file as Python objects; S4 slots become SimpleNamespace attributes."""
    import rdata
    from rdata.parser import RObjectType

    class Converter(rdata.conversion.SimpleConverter):
        # Seurat objects keep closures and environments in their command log: not needed here.
        def _convert_next(self, obj):
            skip = (RObjectType.CLO, RObjectType.LANG, RObjectType.BCODE, RObjectType.EXTPTR, RObjectType.ENV)
            if getattr(obj, "info", None) is not None and obj.info.type in skip:
                return None
            return super()._convert_next(obj)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parsed = rdata.parser.parse_file(path)
        return Converter(constructor_dict=rdata.conversion.DEFAULT_CLASS_MAP).convert(parsed)


def _pbmc68k() -> ad.AnnData:
    adata = scl.datasets.pbmc68k()
    adata.obs["label"] = adata.obs["cell_type"].astype(str)
    return ad.AnnData(
        X=sparse.csr_matrix(adata.X), obs=adata.obs[["label"]].copy(), var=pd.DataFrame(index=adata.var_names)
    )


def _pbmc3k160() -> ad.AnnData:
    seurat = _read_r(_r_package("decoupleR") / "extdata" / "sc_data.rds")
    seurat = vars(seurat)
    data = vars(vars(seurat["assays"]["RNA"])["data"])
    n_genes, n_cells = (int(v) for v in data["Dim"])
    genes, cells = (np.asarray(v, dtype=str) for v in data["Dimnames"])
    logn = sparse.csc_matrix((data["x"], data["i"], data["p"]), shape=(n_genes, n_cells)).T.tocsr()
    meta = seurat["meta.data"]
    counts = logn.copy()
    counts.data = np.expm1(counts.data)
    counts = sparse.diags(meta["nCount_RNA"].to_numpy() / 1e4) @ counts
    counts.data = np.rint(counts.data)
    obs = pd.DataFrame({"label": np.asarray(seurat["active.ident"]).astype(str)}, index=cells)
    return ad.AnnData(X=sparse.csr_matrix(counts, dtype=np.float32), obs=obs, var=pd.DataFrame(index=genes))


def _hsmm() -> ad.AnnData:
    folder = _r_package("HSMMSingleCell") / "data"
    sheet = next(iter(_read_r(folder / "HSMM_sample_sheet.rda").values()))
    genes = next(iter(_read_r(folder / "HSMM_gene_annotation.rda").values()))
    expr = next(iter(_read_r(folder / "HSMM_expr_matrix.rda").values()))
    X = np.asarray(expr.values, dtype=np.float32).T  # FPKM, cells x genes
    symbols = genes.loc[np.asarray(expr.coords[expr.dims[0]].values, dtype=str), "gene_short_name"].astype(
        str
    )
    # Genes detected in at least 10 cells, one column per symbol (the most expressed copy).
    keep = (X > 0).sum(0) >= 10
    X, symbols = X[:, keep], symbols.to_numpy()[keep]
    order = np.argsort(-X.sum(0), kind="stable")
    first = pd.Index(symbols[order]).duplicated()
    cols = np.sort(order[~first])
    obs = pd.DataFrame(
        {"label": sheet["Hours"].astype(str).radd("h").to_numpy()}, index=sheet.index.astype(str)
    )
    return ad.AnnData(X=sparse.csr_matrix(X[:, cols]), obs=obs, var=pd.DataFrame(index=symbols[cols]))


def _embed(adata: ad.AnnData) -> None:
    adata.obs["label"] = pd.Categorical(adata.obs["label"])
    scl.pp.train_test_split(adata, "label", test_size=0.2, random_state=0)
    scl.pp.cell_sentences(adata)
    scl.tl.embed_text(adata, precision="bf16")
    scl.tl.embed_text_genes(adata, precision="bf16", key_added="X_genept")
    norm = adata.copy()
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    if norm.n_vars > 2000:
        sc.pp.highly_variable_genes(norm, n_top_genes=2000)
    sc.pp.pca(norm, n_comps=min(50, norm.n_obs - 1, norm.n_vars - 1), random_state=0)
    adata.obsm["X_pca"] = norm.obsm["X_pca"].astype(np.float32)
    for key in ("X_text", "X_genept"):
        adata.uns.pop(key, None)  # provenance dicts hold types h5ad cannot always write


def describe(adata: ad.AnnData) -> str:
    counts = adata.obs["split"].value_counts().to_dict()
    return f"{adata.n_obs} cells, {adata.obs['label'].nunique()} labels, split {counts}"


__all__ = ["DATASETS", "describe", "load"]
