"""scl.tl.attribute: which genes of a cell sentence drive a text encoder + MLP head (paper §3.4, §4.1, Table 1).

The explained model is the frozen sentence-transformers encoder (transformer → pooling →
its own normalization, then the L2 normalization :func:`sc_llm.tl.embed_text` applies) followed
by a trained head that maps the text embedding to class logits, e.g. a single-representation
:class:`sc_llm.models.FusionModel`. Only the genes the encoder reads (those that fit its token
limit, whole genes) are explained.
"""

from __future__ import annotations

import bisect
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from .._progress import progress
from .._utils import check_unique_obs_names, embedding_record, format_examples, warn_overwrite

METHODS = ("integrated_gradients", "lime")


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


def attribute(
    adata: AnnData,
    head: Any,
    *,
    groupby: str,
    method: str = "integrated_gradients",
    model: Any = None,
    sentence_key: str = "cell_sentence",
    split_key: str | None = "split",
    split_value: str = "test",
    groups: Sequence[str] | None = None,
    n_cells: int = 10,
    top_n: int = 10,
    target: str = "label",
    normalize: bool | None = None,
    exclude: Sequence[str] = (),
    n_steps: int = 50,
    internal_batch_size: int | None = None,
    num_samples: int = 1000,
    batch_size: int = 64,
    precision: str = "fp32",
    random_state: int = 0,
    device: Any = None,
    key_added: str | None = None,
) -> pd.DataFrame:
    """Gene attributions of a frozen text encoder + classification head, summed per cell type.

    For up to ``n_cells`` cells of each group, every in-context gene of the cell sentence gets an
    attribution toward the target class; attributions are summed over the cells of the group and
    the ``top_n`` genes with the highest positive sum are kept (the paper's Table 1 procedure).

    Parameters
    ----------
    adata
        Annotated data matrix with sentences in ``obs[sentence_key]``.
    head
        Trained classifier on the text embedding: a ``torch.nn.Module`` whose ``forward(x)`` maps a
        float tensor ``[n, dim]`` to logits ``[n, n_classes]`` and with a ``classes`` attribute
        (logit order), e.g. a :class:`sc_llm.models.FusionModel` with one representation.
    groupby
        ``obs`` column with the cell types (targets when ``target="label"``).
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
    split_key, split_value
        Explain cells with ``obs[split_key] == split_value`` (the paper: test cells). ``None``
        draws from all cells.
    groups
        Groups to explain (default: every group that is also a class of the head).
    n_cells
        Cells per group (all of them when fewer), drawn at random with ``random_state``.
    top_n
        Genes kept per group.
    target
        ``"label"``: explain the cell's own label from ``groupby``; ``"predicted"``: the head's
        prediction for the cell (then cells are still grouped by ``groupby``).
    normalize
        L2-normalize the text embedding before the head; ``None`` reads it from
        ``uns[head.use_reps[0]]["normalize"]`` when available, else ``True``
        (the :func:`sc_llm.tl.embed_text` default).
    exclude
        Regular expressions (case-insensitive, :func:`re.search`) of genes to leave out of the
        per-group top lists, e.g. ``("^RP[SL]", "^MT-")`` for ribosomal and mitochondrial genes,
        which otherwise dominate them. Excluded genes are still attributed (the per-cell sums and
        completeness check are unchanged); only the summary skips them.
    n_steps, internal_batch_size
        Integration steps and forward batch size of integrated gradients; ``None`` runs all steps
        of a cell in one batch (fastest on CPU and GPU alike when memory allows).
    precision
        ``"fp32"``, ``"bf16"``, ``"fp16"`` (CUDA) or ``"auto"`` (fp16 on CUDA, fp32 elsewhere): the
        precision of the encoder's forward and backward passes, through the same reduced-precision
        weight copy :func:`sc_llm.tl.embed_text` uses. ``"bf16"`` on a CPU without native bf16
        falls back to fp32. The head runs in fp32. See ``benchmarks/bench_attribute.py`` for the
        speed and the agreement with fp32.
    num_samples
        Perturbed sentences per cell for LIME (lime's own default is 5000; 1000 keeps a CPU run short).
    batch_size
        Sentences per forward pass for LIME.
    random_state
        Seed of the cell draw and of LIME's sampling.
    device
        Torch device of the encoder; ``None`` picks CUDA, then MPS, then CPU.
    key_added
        ``uns`` key; default ``f"attributions_{method}"``.

    Returns
    -------
    Tidy table with columns ``group``, ``rank``, ``gene``, ``attribution`` (sum over the
    explained cells), ``n_cells`` (explained cells of the group whose context held the gene) and
    ``method``. Stored in ``uns[key_added]["genes"]`` next to ``"cells"`` (one row per explained
    cell: group, target, predicted class, number of in-context genes, attribution sum, captum's
    convergence delta or LIME's fit R²) and ``"params"``.
    """
    check_unique_obs_names(adata, "attribute explains and reports cells by obs name")
    if method not in METHODS:
        raise ValueError(f"Unknown attribution method {method!r}; choose one of {list(METHODS)}.")
    excluded = _compile_exclude(exclude)
    if target not in ("label", "predicted"):
        raise ValueError(f"target must be 'label' or 'predicted', got {target!r}.")
    from ..models._runtime import resolve_precision
    from ..models._text import load_text_encoder

    classes = _head_classes(head)
    encoder = load_text_encoder(model, device)
    used_precision = resolve_precision(precision, encoder.device)
    normalize = _resolve_normalize(adata, head, normalize)
    cells = _pick_cells(
        adata, groupby, classes, split_key, split_value, groups, n_cells, random_state, target
    )
    sentences = adata.obs[sentence_key] if sentence_key in adata.obs else None
    if sentences is None:
        raise KeyError(
            f"Column {sentence_key!r} not found in adata.obs; create it with sc_llm.pp.cell_sentences."
        )
    explainer = _Explainer(encoder, head, normalize, used_precision)
    lime_rng = np.random.RandomState(random_state)
    rows, per_cell = [], []
    with progress(len(cells), f"attribute ({method})", unit="cell") as bar:
        for name, group in cells.items():
            words = _in_context_words(encoder, str(sentences[name]))
            predicted = int(np.argmax(explainer.logits([words])[0]))
            tgt = predicted if target == "predicted" else classes.index(group)
            if method == "integrated_gradients":
                res = explainer.integrated_gradients(
                    words, tgt, n_steps=n_steps, internal_batch_size=internal_batch_size
                )
            else:
                res = explainer.lime(words, tgt, num_samples=num_samples, batch_size=batch_size, rng=lime_rng)
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
    genes = _top_genes(rows, top_n, method, excluded)
    key_added = key_added or f"attributions_{method}"
    warn_overwrite(adata.uns, key_added, "adata.uns")
    adata.uns[key_added] = {
        "genes": genes,
        "cells": pd.DataFrame(per_cell).set_index("cell"),
        "params": {
            "method": method,
            "groupby": groupby,
            "sentence_key": sentence_key,
            "n_cells": n_cells,
            "top_n": top_n,
            "target": target,
            "normalize": normalize,
            "n_steps": n_steps,
            "num_samples": num_samples,
            "random_state": random_state,
            "model": encoder.identity(),
            "classes": classes,
            "target_score": "logit" if method == "integrated_gradients" else "probability",
            "exclude": [p.pattern for p in excluded],
            "precision": used_precision,
        },
    }
    return genes


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
    info = embedding_record(adata, use_reps[0]) if use_reps else {}
    return bool(info.get("normalize", True))


def _pick_cells(adata, groupby, classes, split_key, split_value, groups, n_cells, random_state, target):
    """``{obs_name: group}`` with up to ``n_cells`` random cells per group, in obs order within a group."""
    if groupby not in adata.obs:
        raise KeyError(f"Column {groupby!r} not found in adata.obs.")
    if n_cells < 1:
        raise ValueError(f"n_cells must be positive, got {n_cells}.")
    labels = adata.obs[groupby]
    keep = labels.notna().to_numpy()
    if split_key is not None:
        if split_key not in adata.obs:
            raise KeyError(
                f"Column {split_key!r} not found in adata.obs; pass split_key=None to use all cells."
            )
        keep &= (adata.obs[split_key].astype(str) == str(split_value)).to_numpy()
    labels = labels[keep].astype(str)
    present = list(dict.fromkeys(sorted(labels.unique())))
    if groups is None:
        chosen = [g for g in present if g in classes or target == "predicted"]
    else:
        chosen = [str(g) for g in groups]
        absent = [g for g in chosen if g not in present]
        if absent:
            raise ValueError(
                f"Groups without cells to explain in obs[{groupby!r}]: {format_examples(absent)}."
            )
    unknown = [g for g in chosen if g not in classes]
    if unknown and target == "label":
        warnings.warn(
            f"Skipping groups the head cannot predict: {format_examples(unknown)}.", UserWarning, stacklevel=3
        )
        chosen = [g for g in chosen if g in classes]
    if not chosen:
        raise ValueError(
            f"No group of obs[{groupby!r}] left to explain (head classes: {format_examples(classes)})."
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

    def __init__(self, encoder, head, normalize: bool, precision: str = "fp32"):
        self.encoder, self.head, self.normalize = encoder, head, normalize
        # The encoder's own reduced-precision weight copy (made once per precision and kept).
        self.model = encoder.model_in(precision)
        self.tokenizer = encoder.tokenizer
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        head.eval()
        self.head_device = next(iter(head.parameters()), None)
        self.head_device = self.head_device.device if self.head_device is not None else encoder.device

    # -- the model as a function of token ids ------------------------------------------------
    def forward(self, input_ids, attention_mask):
        emb = self.encoder.forward(self.model, input_ids, attention_mask, normalize=self.normalize).float()
        return self.head(emb.to(self.head_device))

    def logits(self, sentences: Sequence[Sequence[str]], batch_size: int = 64) -> np.ndarray:
        """Logits for whole-gene word lists (already cut to the context)."""
        import torch

        from ..models._runtime import pad_batch

        ids = self.tokenizer(
            [" ".join(w) for w in sentences], truncation=True, max_length=self.encoder.max_tokens
        )["input_ids"]
        out = []
        with torch.inference_mode():
            for start in range(0, len(ids), batch_size):
                x, mask = pad_batch(ids[start : start + batch_size], self.pad_id, self.encoder.device)
                out.append(self.forward(x, mask).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.head.classes)), dtype=np.float32)

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
        baseline[0, torch.as_tensor(gene_of >= 0, device=ids.device)] = self.pad_id
        return ids, baseline, gene_of

    def integrated_gradients(
        self, words, target: int, *, n_steps: int, internal_batch_size: int | None
    ) -> GeneAttribution:
        try:
            from captum.attr import LayerIntegratedGradients
        except ImportError as err:  # pragma: no cover - captum ships with the interpret extra
            raise ImportError("Integrated gradients need captum: pip install 'sc-llm[interpret]'.") from err
        import torch

        ids, baseline, gene_of = self.token_inputs(words)
        mask = torch.ones_like(ids)
        layer = _input_embeddings(self.model)
        lig = LayerIntegratedGradients(self.forward, layer)
        attr, delta = lig.attribute(
            ids,
            baselines=baseline,
            target=target,
            additional_forward_args=(mask,),
            n_steps=n_steps,
            internal_batch_size=internal_batch_size,
            return_convergence_delta=True,
        )
        per_token = attr.float().sum(dim=-1)[0].detach().double().cpu().numpy()
        scores = np.zeros(len(words))
        np.add.at(scores, gene_of[gene_of >= 0], per_token[gene_of >= 0])
        return GeneAttribution(list(words), scores, delta=float(delta.item()))

    def output_difference(self, words, target: int) -> float:
        """``F(input) - F(baseline)`` of the target logit (what IG attributions sum to)."""
        import torch

        ids, baseline, _ = self.token_inputs(words)
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            return float(self.forward(ids, mask)[0, target] - self.forward(baseline, mask)[0, target])

    # -- LIME --------------------------------------------------------------------------------
    def lime(self, words, target: int, *, num_samples: int, batch_size: int, rng) -> GeneAttribution:
        try:
            from lime.lime_text import LimeTextExplainer
        except ImportError as err:
            raise ImportError(
                "LIME attributions need the lime package: pip install 'sc-llm[interpret]'."
            ) from err
        import torch

        explainer = LimeTextExplainer(
            class_names=list(self.head.classes),
            split_expression=r"\s+",
            bow=False,
            mask_string=self.tokenizer.pad_token or "[PAD]",
            random_state=rng,
        )

        def predict_proba(texts):
            logits = self.logits([t.split() for t in texts], batch_size=batch_size)
            return torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()

        exp = explainer.explain_instance(
            " ".join(words), predict_proba, labels=(target,), num_features=len(words), num_samples=num_samples
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
