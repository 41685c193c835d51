"""Stratified train/test split stored as an obs column."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from anndata import AnnData
from sklearn.model_selection import train_test_split as _sk_split

from sc_llm._docs import doc_copy, doc_params, doc_random_state
from sc_llm._utils import check_key, format_examples, maybe_copy, warn_overwrite


@doc_params(doc_random_state=doc_random_state, doc_copy=doc_copy)
def train_test_split(
    adata: AnnData,
    labels_key: str,
    *,
    test_size: float = 0.2,
    random_state: int = 0,
    key_added: str = "split",
    copy: bool = False,
) -> AnnData | None:
    """Stratified split of the cells into ``"train"`` and ``"test"``.

    Parameters
    ----------
    adata
        Annotated data matrix.
    labels_key
        ``obs`` column to stratify on.
    test_size
        Fraction of the labelled cells that go to the test split.
    {doc_random_state}
    key_added
        ``obs`` column written (categorical with ``"train"`` and ``"test"``); the parameters and the
        number of cells per side go to ``uns[key_added]``.
    {doc_copy}

    Returns
    -------
    adata : anndata.AnnData or None
        ``None``, or a copy when ``copy=True``. Sets ``adata.obs[key_added]`` and ``adata.uns[key_added]``
        (``"params"`` beside ``"n_train"`` and ``"n_test"``).

    Notes
    -----
    Labels with a single cell cannot be stratified; those cells go to ``"train"`` (with a
    warning). Cells with a missing label go to ``"test"``: they cannot train a classifier and
    are left out of every metric.
    """
    if labels_key not in adata.obs:
        raise KeyError(f"Column {labels_key!r} not found in adata.obs.")
    if not 0 < test_size < 1:
        raise ValueError(f"test_size must be in (0, 1), got {test_size}.")
    check_key(key_added)
    adata = maybe_copy(adata, copy)
    labels = adata.obs[labels_key]
    labelled = np.flatnonzero(labels.notna().to_numpy())
    counts = labels.iloc[labelled].value_counts()
    singletons = set(counts.index[counts < 2])
    if singletons:
        warnings.warn(
            f"Labels with one cell go to train: {format_examples(sorted(map(str, singletons)))}.",
            UserWarning,
            stacklevel=2,
        )
    strat = labelled[~labels.iloc[labelled].isin(singletons).to_numpy()]
    _check_splittable(labels_key, len(labels), labelled.size, strat, labels.iloc[strat], test_size)
    _, test_idx = _sk_split(
        strat, test_size=test_size, random_state=random_state, stratify=labels.iloc[strat].astype(str).to_numpy()
    )
    split = np.full(adata.n_obs, "train", dtype=object)
    split[test_idx] = "test"
    split[labels.isna().to_numpy()] = "test"
    warn_overwrite(adata.obs, key_added, "adata.obs")
    adata.obs[key_added] = pd.Categorical(split, categories=["train", "test"])
    adata.uns[key_added] = {
        "params": {"labels_key": labels_key, "test_size": test_size, "random_state": random_state},
        "n_train": int((split == "train").sum()),
        "n_test": int((split == "test").sum()),
    }
    return adata if copy else None


def _check_splittable(labels_key: str, n_obs: int, n_labelled: int, strat, strat_labels, test_size: float) -> None:
    """Say in the user's terms why no stratified split exists, instead of sklearn's message about n_samples."""
    if n_labelled == 0:
        raise ValueError(f"obs[{labels_key!r}] is missing for all {n_obs} cells: there is nothing to split.")
    if strat.size == 0:
        raise ValueError(
            f"Every label in obs[{labels_key!r}] has a single cell ({n_labelled} labelled cells), so no label "
            "can be stratified into train and test. Use a coarser label column."
        )
    n_classes = strat_labels.nunique()
    n_test = int(np.ceil(test_size * strat.size))
    n_train = strat.size - n_test
    if n_test < n_classes or n_train < n_classes:
        raise ValueError(
            f"test_size={test_size} of {strat.size} cells gives {n_test} test and {n_train} train cells, fewer than "
            f"the {n_classes} labels in obs[{labels_key!r}] with two or more cells; a stratified split needs at "
            "least one cell per label on each side. Choose a test_size closer to 0.5 or use more cells."
        )
