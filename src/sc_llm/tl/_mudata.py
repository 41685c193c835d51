"""MuData views of an AnnData: one modality per embedding, obs shared (and back)."""

from __future__ import annotations

import copy as _copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from sc_llm._utils import format_examples, import_optional

from ._heads import collect_reps, is_mudata
from ._metrics import get_rep


def to_mudata(
    adata: AnnData,
    use_reps: Sequence[str],
    *,
    mod_names: Mapping[str, str] | None = None,
    obs_keys: Sequence[str] | None = None,
    expression_mod: str | None = None,
    layer: str | None = None,
) -> Any:
    """Build a MuData with one modality per ``obsm`` representation and the cells' ``obs`` shared.

    Modality ``m`` holds representation ``r`` as its ``X`` (cells × dimensions, the same dtype and
    values), with variables named ``f"{m}_{i}"`` and an empty ``obs``: the annotations live once in
    ``mdata.obs``. ``adata.uns[r]`` (e.g. the encoder identity written by
    :func:`~sc_llm.tl.embed_text`) is copied to the modality's ``uns[r]``. Modalities are named after
    the representations by default, so :func:`~sc_llm.tl.fuse_train` takes the same ``use_reps`` on
    the AnnData and on the MuData. Write it with ``mdata.write_h5mu(path)``.

    Parameters
    ----------
    adata
        Annotated data matrix with the representations in ``obsm``.
    use_reps
        ``obsm`` keys to turn into modalities, e.g. ``["X_text", "X_pca"]``.
    mod_names
        Optional renaming, representation → modality name (e.g. ``{"X_text": "text"}``).
    obs_keys
        ``obs`` columns to share in ``mdata.obs`` (default: all).
    expression_mod
        Also add the expression matrix (``adata.X`` or ``layer``, with ``var``) as a modality of this
        name, e.g. ``"rna"``.
    layer
        Layer to use for ``expression_mod`` instead of ``adata.X``.

    Returns
    -------
    mdata : mudata.MuData
        A :class:`mudata.MuData` with the same ``obs_names`` as ``adata``.
    """
    md = import_optional("mudata", "mudata", "to_mudata")
    names = _modality_names(adata, use_reps, mod_names, expression_mod)
    mods = {names[rep]: _rep_modality(adata, rep, names[rep]) for rep in use_reps}
    if expression_mod is not None:
        mods[expression_mod] = _expression_modality(adata, layer)
    obs = _shared_obs(adata, obs_keys)
    with md.set_options(pull_on_update=False):  # modalities carry no obs columns; silences the 0.4 notice
        mdata = md.MuData(mods)
    mdata.obs = obs.loc[mdata.obs_names]
    return mdata


def from_mudata(mdata: Any, mods: Sequence[str] | None = None, *, x_mod: str | None = None) -> AnnData:
    """Gather a MuData's modalities back into one AnnData: each modality's ``X`` becomes ``obsm[name]``.

    The inverse of :func:`to_mudata`: ``from_mudata(to_mudata(adata, reps))`` has the same
    ``obs``, ``obsm[rep]`` values and ``uns[rep]`` entries.

    Parameters
    ----------
    mdata
        A :class:`mudata.MuData` (e.g. from :func:`mudata.read_h5mu`).
    mods
        Modalities to turn into ``obsm`` entries, or ``"modality:key"`` for a modality's own
        ``obsm[key]``. Default: every modality except ``x_mod``.
    x_mod
        Modality whose ``X`` and ``var`` become the AnnData's ``X`` and ``var`` (e.g. ``"rna"``).

    Returns
    -------
    adata : anndata.AnnData
        An AnnData with ``mdata.obs`` (rows in ``mdata.obs_names`` order), the requested ``obsm``
        entries (float32, dense), ``mdata.obsm`` entries (except the per-modality masks), and each modality's ``uns`` merged into ``uns``.
    """
    if not is_mudata(mdata):
        raise TypeError(f"from_mudata needs a MuData, got {type(mdata).__name__}.")
    if x_mod is not None and x_mod not in mdata.mod:
        raise KeyError(f"x_mod {x_mod!r} is not a modality; available: {list(mdata.mod)}.")
    mods = [m for m in mdata.mod if m != x_mod] if mods is None else list(mods)
    adata = _base_anndata(mdata, x_mod)
    for name, X in zip(mods, collect_reps(mdata, mods) if mods else [], strict=True):
        adata.obsm[name] = X
    for key in mdata.obsm:
        # MuData keeps one boolean column per modality in obsm (which cells it holds): not a representation.
        if key not in adata.obsm and key not in mdata.mod:
            adata.obsm[key] = np.asarray(get_rep(mdata, key))
    for name in mdata.mod:
        adata.uns.update(_copy.deepcopy(dict(mdata.mod[name].uns)))
    adata.uns.update(_copy.deepcopy(dict(mdata.uns)))
    return adata


def _modality_names(adata, use_reps, mod_names, expression_mod) -> dict[str, str]:
    if isinstance(use_reps, str):
        raise TypeError(f"use_reps must be a list of obsm keys, e.g. [{use_reps!r}], not a string.")
    use_reps = list(use_reps)
    if not use_reps:
        raise ValueError("use_reps must name at least one obsm key.")
    missing = [r for r in use_reps if r not in adata.obsm]
    if missing:
        raise KeyError(f"obsm keys not found: {format_examples(missing)}; available: {list(adata.obsm)}.")
    mod_names = dict(mod_names or {})
    unknown = [k for k in mod_names if k not in use_reps]
    if unknown:
        raise KeyError(f"mod_names renames representations not in use_reps: {format_examples(unknown)}.")
    names = {rep: mod_names.get(rep, rep) for rep in use_reps}
    taken = list(names.values()) + ([expression_mod] if expression_mod is not None else [])
    dupes = sorted({n for n in taken if taken.count(n) > 1})
    if dupes:
        raise ValueError(f"Modality names must be unique; repeated: {format_examples(dupes)}.")
    bad = [n for n in taken if not n or "/" in n or ":" in n]
    if bad:
        raise ValueError(
            f"Modality names cannot be empty or contain '/' or ':' (h5mu paths): {format_examples(bad)}."
        )
    return names


def _rep_modality(adata: AnnData, rep: str, name: str) -> AnnData:
    X = adata.obsm[rep]
    X = X.to_numpy() if isinstance(X, pd.DataFrame) else X
    X = X.copy() if hasattr(X, "copy") else np.array(X)
    if X.ndim != 2:
        raise ValueError(f"obsm[{rep!r}] must be 2-dimensional, got shape {X.shape}.")
    var = pd.DataFrame(index=[f"{name}_{i}" for i in range(X.shape[1])])
    mod = AnnData(X=X, obs=pd.DataFrame(index=adata.obs_names.copy()), var=var)
    if rep in adata.uns:
        mod.uns[rep] = _copy.deepcopy(adata.uns[rep])
    return mod


def _expression_modality(adata: AnnData, layer: str | None) -> AnnData:
    if layer is not None and layer not in adata.layers:
        raise KeyError(f"Layer {layer!r} not found in adata.layers; available: {sorted(adata.layers)}.")
    X = adata.layers[layer] if layer is not None else adata.X
    if X is None:
        raise ValueError("adata.X is None; pass layer= for expression_mod.")
    return AnnData(X=X.copy(), obs=pd.DataFrame(index=adata.obs_names.copy()), var=adata.var.copy())


def _shared_obs(adata: AnnData, obs_keys: Sequence[str] | None) -> pd.DataFrame:
    if obs_keys is None:
        return adata.obs.copy()
    missing = [k for k in obs_keys if k not in adata.obs]
    if missing:
        raise KeyError(
            f"obs columns not found: {format_examples(missing)}; available: {list(adata.obs.columns)}."
        )
    return adata.obs[list(obs_keys)].copy()


def _base_anndata(mdata, x_mod: str | None) -> AnnData:
    obs = mdata.obs.copy()
    if x_mod is None:
        return AnnData(obs=obs)
    mod = mdata.mod[x_mod]
    pos = mod.obs_names.get_indexer(mdata.obs_names)
    if (pos < 0).any():
        raise ValueError(f"mdata.mod[{x_mod!r}] lacks cells {format_examples(mdata.obs_names[pos < 0])}.")
    return AnnData(X=mod.X[pos], obs=obs, var=mod.var.copy())
