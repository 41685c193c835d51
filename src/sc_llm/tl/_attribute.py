"""scl.tl.attribute: which genes of a cell sentence drive a text encoder + MLP head (paper §3.4, §4.1, Table 1).

The explained model is the frozen sentence-transformers encoder (transformer → pooling →
its own normalization, then the L2 normalization :func:`sc_llm.tl.embed_text` applies) followed
by a trained head that maps the text embedding to class logits, e.g. a single-representation
:class:`sc_llm.models.FusionModel`. Only the genes the encoder reads (those that fit its token
limit, whole genes) are explained. The encoder's own pieces do the work: its tokenizer and
whole-gene fitting (:meth:`TextEncoder.fit`), its forward pass and reduced-precision weight copy
(:meth:`TextEncoder.forward`, :meth:`TextEncoder.model_in`) and, for plain logits, its batched
:meth:`TextEncoder.encode_ids`; only the token → gene bookkeeping of integrated gradients is here.
"""

from __future__ import annotations

import bisect
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from sc_llm._docs import doc_device_precision, doc_params, doc_random_state
from sc_llm._progress import progress
from sc_llm._utils import (
    check_unique_obs_names,
    format_examples,
    import_optional,
    obs_sentences,
    uns_params,
    warn_overwrite,
)
from sc_llm.models._runtime import Precision

from ._metrics import get_labels, train_mask

METHODS = ("integrated_gradients", "lime")
TARGETS = ("label", "predicted")


@dataclass
class GeneAttribution:
    """Attributions of one cell: ``genes[i]`` (sentence position ``i``) received ``scores[i]``.

    ``delta`` is captum's convergence delta (integrated gradients only): sum of the
    attributions minus ``F(input) - F(baseline)`` for the target logit.
    """

    genes: list[str]
    scores: np.ndarray
    delta: float = np.nan
    fit_score: float = np.nan


@doc_params(doc_device_precision=doc_device_precision)
@dataclass(frozen=True)
class AttributionConfig:
    """How :func:`sc_llm.tl.attribute` explains each cell: the target, the methods' own settings, the device.

    The defaults reproduce the paper's procedure; change them with e.g.
    ``AttributionConfig(n_steps=20, precision="bf16")`` (about 7× faster on a CPU with native bf16,
    same gene ranking; see the interpretability how-to).

    Parameters
    ----------
    target
        ``"label"``: explain the logit (or probability) of the cell's own label from ``labels_key``;
        ``"predicted"``: of the head's prediction for the cell (cells are still grouped by
        ``labels_key``).
    normalize
        L2-normalize the text embedding before the head; ``None`` reads it from the record of the
        embedding the head was trained on (``uns[head.use_reps[0]]``) when there is one, else
        ``True`` (the :func:`sc_llm.tl.embed_text` default).
    n_steps
        Integration steps of integrated gradients.
    internal_batch_size
        Forward batch size of integrated gradients; ``None`` runs all steps of a cell in one batch
        (fastest on CPU and GPU alike when memory allows).
    num_samples
        Perturbed sentences per cell for LIME (lime's own default is 5000; 1000 keeps a CPU run short).
    batch_size
        Sentences per forward pass for LIME and for the predictions.
    {doc_device_precision}
        Here the default is ``"fp32"``: the precision of the encoder's forward and backward passes
        (the head runs in fp32). See ``benchmarks/bench_attribute.py`` for the speed and the
        agreement with fp32.
    """

    target: Literal["label", "predicted"] = "label"
    normalize: bool | None = None
    n_steps: int = 50
    internal_batch_size: int | None = None
    num_samples: int = 1000
    batch_size: int = 64
    device: Any = None
    precision: Precision = "fp32"

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {list(TARGETS)}, got {self.target!r}.")
        for name in ("n_steps", "num_samples", "batch_size", "internal_batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int | np.integer) or value < 1):
                raise ValueError(f"AttributionConfig.{name} must be a positive integer, got {value!r}.")


@doc_params(doc_random_state=doc_random_state)
def attribute(
    adata: AnnData,
    head: Any,
    *,
    labels_key: str,
    method: Literal["integrated_gradients", "lime"] = "integrated_gradients",
    model: Any = None,
    sentence_key: str = "cell_sentence",
    split_key: str | None = "split",
    train_value: str = "train",
    groups: Sequence[str] | None = None,
    n_cells: int = 10,
    top_n: int = 10,
    exclude: Sequence[str] = (),
    config: AttributionConfig | None = None,
    random_state: int = 0,
    key_added: str | None = None,
) -> pd.DataFrame:
    """Gene attributions of a frozen text encoder + classification head, summed per cell type.

    For up to ``n_cells`` held-out cells of each group, every in-context gene of the cell sentence
    gets an attribution toward the target class; attributions are summed over the cells of the
    group and the ``top_n`` genes with the highest positive sum are kept (the paper's Table 1
    procedure).

    Parameters
    ----------
    adata
        Annotated data matrix with sentences in ``obs[sentence_key]``.
    head
        Trained classifier on the text embedding: a ``torch.nn.Module`` whose ``forward(x)`` maps a
        float tensor ``[n, dim]`` to logits ``[n, n_classes]`` and with a ``classes`` attribute
        (logit order), e.g. a :class:`sc_llm.models.FusionModel` with one representation.
    labels_key
        ``obs`` column with the cell types: the groups, and the targets unless
        ``config.target="predicted"``.
    method
        ``"integrated_gradients"``: captum ``LayerIntegratedGradients`` on the encoder's input word
        embeddings, baseline = the same sequence with every gene token replaced by the pad token
        ([CLS]/[SEP] kept), attributions of word pieces summed to whole genes; the target is the
        logit. ``"lime"``: ``lime``'s ``LimeTextExplainer`` with genes as features (split on
        whitespace, ``bow=False`` so a gene's position matters, removed genes replaced by the
        pad token); the target is the class probability.
    model
        The text encoder that made the embedding the head was trained on (as in
        :func:`sc_llm.tl.embed_text`; ``None`` is the bundled all-MiniLM-L6-v2).
    sentence_key
        ``obs`` column with the (unablated) sentences.
    split_key, train_value
        Cells with ``obs[split_key] == train_value`` trained the head; the other labelled cells are
        explained (the paper: the test cells). ``split_key=None`` draws from all labelled cells.
    groups
        Groups to explain (default: every group that is also a class of the head).
    n_cells
        Cells per group (all of them when fewer), drawn at random with ``random_state``.
    top_n
        Genes kept per group.
    exclude
        Regular expressions (case-insensitive, :func:`re.search`) of genes to leave out of the
        per-group top lists, e.g. ``("^RP[SL]", "^MT-")`` for ribosomal and mitochondrial genes,
        which otherwise dominate them. Excluded genes are still attributed (the per-cell sums and
        completeness check are unchanged); only the summary skips them.
    config
        Target, the methods' settings (integration steps, LIME samples, batch sizes), device and
        precision: an :class:`AttributionConfig` (``None``: its defaults).
    {doc_random_state}
        Here: the cell draw and LIME's sampling.
    key_added
        ``uns`` key; default ``f"attributions_{method}"``.

    Returns
    -------
    genes : pandas.DataFrame
        Tidy table with columns ``group``, ``rank``, ``gene``, ``attribution`` (sum over the
        explained cells), ``n_cells`` (explained cells of the group whose context held the gene) and
        ``method``. Stored in ``uns[key_added]``: ``"params"`` (the call's settings, the encoder's
        identity, the head's classes, the precision used) beside ``"genes"`` (this table) and
        ``"cells"`` (one row per explained cell, indexed by obs name: group, target, predicted class,
        number of in-context genes, attribution sum, captum's convergence delta or LIME's fit R²).

    Examples
    --------
    Explain an "encoder + MLP" head (a one-input fusion model) for two monocytes of a 60-cell sample:

    >>> import sc_llm as scl
    >>> adata = scl.datasets.pbmc68k()[:60].copy()
    >>> scl.pp.cell_sentences(adata)
    >>> scl.pp.train_test_split(adata, "cell_type", random_state=0)
    >>> scl.tl.embed_text(adata)
    >>> config = scl.tl.FusionConfig(hidden=32, epochs=10)
    >>> head = scl.tl.fuse_train(adata, ["X_text"], "cell_type", config=config, random_state=0)
    >>> genes = scl.tl.attribute(adata, head, labels_key="cell_type", groups=["CD14+ Monocyte"], n_cells=2,
    ...                          top_n=5, config=scl.tl.AttributionConfig(n_steps=8))
    >>> genes.columns.tolist()
    ['group', 'rank', 'gene', 'attribution', 'n_cells', 'method']
    >>> len(genes), bool((genes["attribution"] > 0).all())
    (5, True)
    """
    check_unique_obs_names(adata, "attribute explains and reports cells by obs name")
    if method not in METHODS:
        raise ValueError(f"Unknown attribution method {method!r}; choose one of {list(METHODS)}.")
    config = AttributionConfig() if config is None else config
    if not isinstance(config, AttributionConfig):
        raise TypeError(f"config must be an AttributionConfig, got {type(config).__name__}.")
    excluded = _compile_exclude(exclude)
    classes = _head_classes(head)
    cells = _pick_cells(
        _explainable(adata, labels_key, split_key, train_value),
        classes,
        groups,
        n_cells,
        random_state,
        config.target,
    )
    sentences = dict(zip(cells, obs_sentences(adata, sentence_key, list(cells)), strict=True))
    from sc_llm.models._runtime import resolve_precision
    from sc_llm.models._text import load_text_encoder

    encoder = load_text_encoder(model, config.device)
    used_precision = resolve_precision(config.precision, encoder.device)
    normalize = _resolve_normalize(adata, head, config.normalize)
    explainer = _Explainer(encoder, head, normalize, used_precision, config)
    per_cell, rows = _explain_cells(explainer, cells, sentences, method, classes, config, random_state)
    genes = _top_genes(rows, top_n, method, excluded)
    key_added = key_added or f"attributions_{method}"
    warn_overwrite(adata.uns, key_added, "adata.uns")
    adata.uns[key_added] = {
        "params": {
            "method": method,
            "labels_key": labels_key,
            "sentence_key": sentence_key,
            "split_key": split_key,
            "train_value": str(train_value),
            "n_cells": n_cells,
            "top_n": top_n,
            "exclude": [p.pattern for p in excluded],
            "random_state": random_state,
            "target": config.target,
            "normalize": normalize,
            "n_steps": config.n_steps,
            "num_samples": config.num_samples,
            "precision": used_precision,
            "model": encoder.identity(),
            "classes": classes,
            "target_score": "logit" if method == "integrated_gradients" else "probability",
        },
        "genes": genes,
        "cells": pd.DataFrame(per_cell).set_index("cell"),
    }
    return genes


def _explain_cells(explainer, cells: dict[str, str], sentences, method, classes, config, random_state):
    """Attribute every picked cell; ``(one record per cell, one gene table per cell)``."""
    lime_rng = np.random.RandomState(random_state)
    rows, per_cell = [], []
    with progress(len(cells), f"attribute ({method})", unit="cell") as bar:
        for name, group in cells.items():
            words = _in_context_words(explainer.encoder, sentences[name])
            predicted = int(np.argmax(explainer.logits([words])[0]))
            tgt = predicted if config.target == "predicted" else classes.index(group)
            if method == "integrated_gradients":
                res = explainer.integrated_gradients(words, tgt)
            else:
                res = explainer.lime(words, tgt, rng=lime_rng)
            rows.append(pd.DataFrame({"group": group, "gene": res.genes, "attribution": res.scores}))
            per_cell.append(
                {
                    "cell": name,
                    "group": group,
                    "target": classes[tgt],
                    "predicted": classes[predicted],
                    "n_genes_in_context": len(words),
                    "attribution_sum": float(np.sum(res.scores)),
                    "delta": res.delta,
                    "fit_score": res.fit_score,
                }
            )
            bar.update(1)
    return per_cell, rows


def _head_classes(head) -> list[str]:
    import torch

    if not isinstance(head, torch.nn.Module):
        raise TypeError(f"head must be a torch.nn.Module (e.g. a FusionModel), got {type(head).__name__}.")
    classes = getattr(head, "classes", None)
    if classes is None:
        raise AttributeError("head needs a `classes` attribute listing the labels in logit order.")
    use_reps = getattr(head, "use_reps", None)
    if use_reps is not None and len(use_reps) != 1:
        raise ValueError(
            f"attribute explains a text encoder + head on one representation; this head fuses {list(use_reps)}."
        )
    return [str(c) for c in classes]


def _resolve_normalize(adata: AnnData, head, normalize: bool | None) -> bool:
    if normalize is not None:
        return bool(normalize)
    use_reps = getattr(head, "use_reps", None) or []
    return bool(uns_params(adata, use_reps[0]).get("normalize", True)) if use_reps else True


def _explainable(adata: AnnData, labels_key: str, split_key: str | None, train_value: str) -> pd.Series:
    """Labels (as ``str``) of the cells that may be explained: labelled and not used for training."""
    labels = get_labels(adata, labels_key)
    keep = labels.notna().to_numpy()
    if split_key is not None:
        keep &= ~train_mask(adata, split_key, train_value)
    labels = labels[keep].astype(str)
    if labels.empty:
        where = f" outside obs[{split_key!r}] == {str(train_value)!r}" if split_key is not None else ""
        raise ValueError(f"No labelled cell{where} to explain in obs[{labels_key!r}].")
    return labels


def _pick_cells(labels: pd.Series, classes, groups, n_cells, random_state, target) -> dict[str, str]:
    """``{obs_name: group}`` with up to ``n_cells`` random cells per group, in obs order within a group."""
    if n_cells < 1:
        raise ValueError(f"n_cells must be positive, got {n_cells}.")
    present = sorted(labels.unique())
    if groups is None:
        chosen = [g for g in present if g in classes or target == "predicted"]
    else:
        chosen = [str(g) for g in groups]
        absent = [g for g in chosen if g not in present]
        if absent:
            raise ValueError(
                f"Groups without cells to explain in obs[{labels.name!r}]: {format_examples(absent)}."
            )
    unknown = [g for g in chosen if g not in classes]
    if unknown and target == "label":
        warnings.warn(
            f"Skipping groups the head cannot predict: {format_examples(unknown)}.", UserWarning, stacklevel=4
        )
        chosen = [g for g in chosen if g in classes]
    if not chosen:
        raise ValueError(
            f"No group of obs[{labels.name!r}] left to explain (head classes: {format_examples(classes)})."
        )
    rng = np.random.default_rng(random_state)
    cells: dict[str, str] = {}
    for g in chosen:
        names = labels.index[labels.to_numpy() == g]
        pick = np.sort(rng.choice(len(names), size=min(n_cells, len(names)), replace=False))
        cells.update({str(names[i]): g for i in pick})
    return cells


def _in_context_words(encoder, sentence: str) -> list[str]:
    words = sentence.split()
    _, n_fit = encoder.fit([" ".join(words)])
    return words[: int(n_fit[0])]


def _compile_exclude(exclude: Sequence[str]) -> list[re.Pattern]:
    if isinstance(exclude, str):
        raise TypeError(f"exclude must be a sequence of patterns, e.g. ({exclude!r},), not a string.")
    compiled = []
    for pattern in exclude:
        try:
            compiled.append(re.compile(pattern, re.IGNORECASE))
        except re.error as err:
            raise ValueError(
                f"exclude pattern {pattern!r} is not a valid regular expression: {err}."
            ) from err
    return compiled


def _top_genes(
    rows: list[pd.DataFrame], top_n: int, method: str, excluded: Sequence[re.Pattern] = ()
) -> pd.DataFrame:
    cols = ["group", "rank", "gene", "attribution", "n_cells", "method"]
    if not rows:
        return pd.DataFrame(columns=cols)
    long = pd.concat(rows, ignore_index=True)
    if excluded:
        drop = long["gene"].map(lambda g: any(p.search(g) for p in excluded)).to_numpy(bool)
        long = long[~drop]
    summed = (
        long.groupby(["group", "gene"], sort=False)
        .agg(attribution=("attribution", "sum"), n_cells=("attribution", "size"))
        .reset_index()
    )
    summed = summed[summed["attribution"] > 0]
    # Sort by group order of first appearance, then attribution (ties: gene name) for a stable table.
    order = {g: i for i, g in enumerate(dict.fromkeys(long["group"]))}
    summed = summed.assign(_g=summed["group"].map(order)).sort_values(
        ["_g", "attribution", "gene"], ascending=[True, False, True], kind="stable"
    )
    top = summed.groupby("group", sort=False).head(top_n).drop(columns="_g")
    top.insert(1, "rank", top.groupby("group", sort=False).cumcount() + 1)
    top["method"] = method
    return top.reset_index(drop=True)[cols]


class _Explainer:
    """The explained function: gene sentence → frozen encoder → (normalize) → head → logits."""

    def __init__(self, encoder, head, normalize: bool, precision: str, config: AttributionConfig):
        self.encoder, self.head, self.normalize, self.precision = encoder, head, normalize, precision
        self.config = config
        # The encoder's own reduced-precision weight copy (made once per precision and kept).
        self.model = encoder.model_in(precision)
        self.tokenizer = encoder.tokenizer
        head.eval()
        first = next(iter(head.parameters()), None)
        self.head_device = first.device if first is not None else encoder.device

    # -- the model as a function of token ids ------------------------------------------------
    def forward(self, input_ids, attention_mask):
        emb = self.encoder.forward(self.model, input_ids, attention_mask, normalize=self.normalize).float()
        return self.head(emb.to(self.head_device))

    def logits(self, sentences: Sequence[Sequence[str]]) -> np.ndarray:
        """Logits for whole-gene word lists (already cut to the context), through the encoder's batched path."""
        import torch

        emb = self.encoder.encode(
            [" ".join(w) for w in sentences],
            batch_size=self.config.batch_size,
            precision=self.precision,
            normalize=self.normalize,
        )
        with torch.inference_mode():
            return self.head(torch.from_numpy(emb).to(self.head_device)).float().cpu().numpy()

    # -- integrated gradients ----------------------------------------------------------------
    def token_inputs(self, words: Sequence[str]):
        """``(ids, baseline_ids, gene index per token or -1 for special tokens)`` for one cell."""
        import torch

        text = " ".join(words)
        enc = self.tokenizer(
            text,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
            truncation=True,
            max_length=self.encoder.max_tokens,
        )
        starts = np.cumsum([0] + [len(w) + 1 for w in words[:-1]]).tolist()
        gene_of = np.array(
            [
                -1 if special else bisect.bisect_right(starts, begin) - 1
                for (begin, _), special in zip(enc["offset_mapping"], enc["special_tokens_mask"], strict=True)
            ]
        )
        ids = torch.tensor([enc["input_ids"]], device=self.encoder.device)
        baseline = ids.clone()
        baseline[0, torch.as_tensor(gene_of >= 0, device=ids.device)] = self.encoder.pad_id
        return ids, baseline, gene_of

    def integrated_gradients(self, words, target: int) -> GeneAttribution:
        import torch

        captum = import_optional("captum.attr", "interpret", "Integrated gradients")

        ids, baseline, gene_of = self.token_inputs(words)
        mask = torch.ones_like(ids)
        layer = _input_embeddings(self.model)
        lig = captum.LayerIntegratedGradients(self.forward, layer)
        attr, delta = lig.attribute(
            ids,
            baselines=baseline,
            target=target,
            additional_forward_args=(mask,),
            n_steps=self.config.n_steps,
            internal_batch_size=self.config.internal_batch_size,
            return_convergence_delta=True,
        )
        per_token = attr.float().sum(dim=-1)[0].detach().double().cpu().numpy()
        scores = np.zeros(len(words))
        np.add.at(scores, gene_of[gene_of >= 0], per_token[gene_of >= 0])
        return GeneAttribution(list(words), scores, delta=float(delta.item()))

    # -- LIME --------------------------------------------------------------------------------
    def lime(self, words, target: int, *, rng) -> GeneAttribution:
        import torch

        lime_text = import_optional("lime.lime_text", "interpret", "LIME attributions")
        explainer = lime_text.LimeTextExplainer(
            class_names=list(self.head.classes),
            split_expression=r"\s+",
            bow=False,
            mask_string=self.tokenizer.pad_token or "[PAD]",
            random_state=rng,
        )

        def predict_proba(texts):
            logits = self.logits([t.split() for t in texts])
            return torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()

        exp = explainer.explain_instance(
            " ".join(words),
            predict_proba,
            labels=(target,),
            num_features=len(words),
            num_samples=self.config.num_samples,
        )
        indexed = exp.domain_mapper.indexed_string
        # bow=False gives one feature per word position; lime's token list interleaves words and
        # separators, so map its token positions to gene positions.
        gene_at = np.cumsum([bool(tok.strip()) for tok in indexed.as_list]) - 1
        scores = np.zeros(len(words))
        for feature, weight in exp.as_map()[target]:
            scores[gene_at[indexed.positions[feature]]] = weight
        return GeneAttribution(list(words), scores, fit_score=float(exp.score))


def _input_embeddings(st_model):
    """The word-embedding layer of a sentence-transformers model's transformer module."""
    for module in st_model.modules():
        auto = getattr(module, "auto_model", None)
        if auto is not None and hasattr(auto, "get_input_embeddings"):
            return auto.get_input_embeddings()
    raise TypeError(f"Cannot find the input word embeddings of {type(st_model).__name__}.")
