"""Embedding plots of annotation results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from sc_llm._docs import doc_axes_show_save, doc_params, doc_split

from ._utils import finish, panels


@doc_params(doc_split=doc_split, doc_axes_show_save=doc_axes_show_save)
def annotation_embedding(
    adata: AnnData,
    labels_key: str,
    *,
    pred_key: str = "knn",
    basis: str = "umap",
    split_key: str | None = "split",
    train_value: str = "train",
    axes=None,
    save: str | Path | None = None,
    show: bool | None = None,
):
    """Two panels on an embedding: cells coloured by true label, and by whether the prediction is right.

    Parameters
    ----------
    adata
        Annotated data matrix with ``obsm[f"X_{basis}"]``.
    labels_key
        ``obs`` column with the true labels.
    pred_key
        ``obs`` column with the predictions (e.g. written by :func:`sc_llm.tl.knn_annotate`).
    basis
        Embedding to draw (``"umap"`` reads ``obsm["X_umap"]``).
    {doc_split}
        Here the training cells are drawn in grey as ``"train"`` in the correctness panel;
        ``split_key=None`` treats all cells alike.
    {doc_axes_show_save}

    Returns
    -------
    axes : list of matplotlib.axes.Axes
        The two panels: true labels, then right/wrong predictions.
    """
    import scanpy as sc

    for key in (labels_key, pred_key):
        if key not in adata.obs:
            raise KeyError(f"Column {key!r} not found in adata.obs.")
    if f"X_{basis}" not in adata.obsm:
        raise KeyError(f"obsm['X_{basis}'] not found; compute it first (e.g. sc.tl.{basis}).")
    view = AnnData(obs=pd.DataFrame({labels_key: adata.obs[labels_key].to_numpy()}, index=adata.obs_names))
    view.obs[labels_key] = view.obs[labels_key].astype("category")
    view.obsm[f"X_{basis}"] = np.asarray(adata.obsm[f"X_{basis}"])
    view.obs["prediction"] = _correctness(adata, labels_key, pred_key, split_key, train_value)
    # Draw training cells first so the held-out cells (the point of the panel) stay on top.
    view = view[np.argsort(view.obs["prediction"].to_numpy() != "train", kind="stable")].copy()
    fig, axes, own = panels(axes, 2, figsize=(13, 5), ncols=2)
    sc.pl.embedding(view, basis=basis, color=labels_key, ax=axes[0], show=False, title=f"true {labels_key}")
    sc.pl.embedding(
        view,
        basis=basis,
        color="prediction",
        ax=axes[1],
        show=False,
        palette={"correct": "#2a9d8f", "wrong": "#e63946", "train": "#d9d9d9"},
        title=f"{pred_key} on held-out cells",
    )
    finish(fig, save, show, own)
    return axes


def _correctness(adata, labels_key, pred_key, split_key, train_value) -> pd.Categorical:
    truth = adata.obs[labels_key].astype(str).to_numpy()
    pred = adata.obs[pred_key].astype(str).to_numpy()
    status = np.where(truth == pred, "correct", "wrong").astype(object)
    if split_key is not None and split_key in adata.obs:
        status[adata.obs[split_key].astype(str).to_numpy() == str(train_value)] = "train"
    return pd.Categorical(status, categories=["correct", "wrong", "train"])
