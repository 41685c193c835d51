"""Small real data reachable offline."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse


def pbmc68k() -> AnnData:
    """700 PBMCs (scanpy's bundled ``pbmc68k_reduced``) with counts recovered and labels in ``obs``.

    ``pbmc68k_reduced`` keeps log-normalized values of 765 genes in ``.raw``. Counts are recovered
    as ``rint(expm1(raw.X) * n_counts / 1e4)``.

    Returns
    -------
    adata : anndata.AnnData
        AnnData with

        - ``X``: recovered counts (CSR, float32), 700 cells × 765 genes (gene symbols as ``var_names``);
        - ``layers["log1p"]``: the original log-normalized values;
        - ``obs["cell_type"]``: the 10 bulk labels (categorical), plus scanpy's original ``obs`` columns;
        - ``obsm["X_pca"]``, ``obsm["X_umap"]``: the embeddings shipped with the dataset.
    """
    import scanpy as sc

    ref = sc.datasets.pbmc68k_reduced()
    log = sparse.csr_matrix(ref.raw.X, dtype=np.float32)
    counts = _recover_counts(log, ref.obs["n_counts"].to_numpy(dtype=np.float64))
    obs = ref.obs.copy()
    obs.insert(0, "cell_type", pd.Categorical(obs["bulk_labels"].astype(str)))
    adata = AnnData(X=counts, obs=obs, var=pd.DataFrame(index=ref.raw.var_names.copy()))
    adata.layers["log1p"] = log
    adata.obsm["X_pca"] = np.asarray(ref.obsm["X_pca"], dtype=np.float32)
    adata.obsm["X_umap"] = np.asarray(ref.obsm["X_umap"], dtype=np.float32)
    adata.uns["dataset"] = {"name": "pbmc68k_reduced", "source": "scanpy.datasets.pbmc68k_reduced", "counts": "recovered"}
    return adata


def _recover_counts(log: sparse.csr_matrix, n_counts: np.ndarray) -> sparse.csr_matrix:
    """Row-wise ``rint(expm1(x) * n_counts / 1e4)`` on the stored entries only."""
    rows = np.repeat(np.arange(log.shape[0]), np.diff(log.indptr))
    data = np.rint(np.expm1(log.data.astype(np.float64)) * n_counts[rows] / 1e4).astype(np.float32)
    counts = sparse.csr_matrix((data, log.indices.copy(), log.indptr.copy()), shape=log.shape)
    counts.eliminate_zeros()
    return counts
