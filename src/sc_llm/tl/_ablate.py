"""scl.tl.ablate and scl.tl.ablation_study: the paper's gene-name and gene-order ablations (§3.4, §4.1, A.4)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from sc_llm._docs import doc_copy, doc_device_precision, doc_params, doc_random_state, doc_split
from sc_llm._utils import check_key, logger, maybe_copy, obs_sentences, warn_overwrite
from sc_llm.models._runtime import Precision

HASH_LENGTH = 10
KINDS = (
    "gene_hash",
    "per_instance_hash",
    "shuffle_all",
    "shuffle_in_context",
    "shuffle_top",
    "hash_shuffle_in_context",
    "truncate",
)
_FRACTION_KINDS = ("shuffle_top", "truncate")
_CONTEXT_KINDS = ("shuffle_in_context", "shuffle_top", "hash_shuffle_in_context", "truncate")
DEFAULT_FRACTION = 0.1
# Table 2's columns, in the paper's order.
STUDY_KINDS = (
    "gene_hash",
    "shuffle_all",
    "shuffle_in_context",
    "shuffle_top",
    "hash_shuffle_in_context",
    "per_instance_hash",
)
LABELS = {
    "baseline": "No ablation (baseline)",
    "gene_hash": "Gene name ablation",
    "shuffle_all": "Order ablation (all genes)",
    "shuffle_in_context": "Order ablation (in context)",
    "shuffle_top": "Order ablation (top {pct} in context)",
    "hash_shuffle_in_context": "Gene name + order ablation (in context)",
    "per_instance_hash": "Gene name per-instance ablation",
    "truncate": "Top {pct} of in-context genes",
}
METRIC_ROWS = ("accuracy", "precision", "recall", "f1", "kmeans_ari", "kmeans_ami")
ROUNDING = "n_top = max(1, floor(fraction * n_in_context + 0.5)) genes (round half up, at least one)"


def gene_hash(gene: str) -> str:
    """SHA-256 hex digest of the gene name (UTF-8), truncated to 10 characters (the paper's gene-name ablation)."""
    return hashlib.sha256(gene.encode("utf-8")).hexdigest()[:HASH_LENGTH]


@doc_params(rounding=ROUNDING)
def n_top(n_in_context: np.ndarray | int, fraction: float) -> np.ndarray:
    """Number of genes making up the top ``fraction`` of ``n_in_context`` genes ({rounding}).

    Parameters
    ----------
    n_in_context
        Genes that fit the encoder's token limit, per cell.
    fraction
        Share of them to keep, in (0, 1].

    Returns
    -------
    Integer array shaped like ``n_in_context``; 0 where no gene fits.
    """
    n = np.asarray(n_in_context, dtype=np.int64)
    # The epsilon keeps 0.1 * 150 = 15.000000000000002 at 15 and exact halves rounding up.
    k = np.floor(fraction * n + 0.5 + 1e-9).astype(np.int64)
    return np.where(n > 0, np.clip(k, 1, n), 0)


@doc_params(rounding=ROUNDING, doc_random_state=doc_random_state, doc_copy=doc_copy)
def ablate(
    adata: AnnData,
    kind: str,
    *,
    sentence_key: str = "cell_sentence",
    fraction: float | None = None,
    model: Any = None,
    random_state: int = 0,
    key_added: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Write an ablated copy of each cell sentence, exactly as the paper defines its ablations.

    Parameters
    ----------
    adata
        Annotated data matrix with sentences in ``obs[sentence_key]``.
    kind
        One of

        - ``"gene_hash"``: every gene name becomes the first 10 hex characters of its SHA-256
          digest (UTF-8); the same gene always gets the same hash.
        - ``"per_instance_hash"``: every occurrence of every gene becomes a fresh random
          10-character hex string (40 random bits, seeded), so no two cells share a word.
        - ``"shuffle_all"``: all genes of the sentence in random order.
        - ``"shuffle_in_context"``: only the genes that fit the encoder's token limit (counted
          with its tokenizer, whole genes) are permuted; the rest stay in place.
        - ``"shuffle_top"``: only the top ``fraction`` (default 0.1) of the in-context genes
          are permuted; all other genes stay in place.
        - ``"hash_shuffle_in_context"``: ``gene_hash``, then ``shuffle_in_context`` of the hashed
          sentence (the in-context genes are counted on the hashed sentence, which is what the
          encoder reads).
        - ``"truncate"``: keep only the top ``fraction`` (default 0.1) of the in-context genes
          (Figures 6–8).
    sentence_key
        ``obs`` column with the sentences (genes separated by single spaces, highest first).
    fraction
        Fraction of the in-context genes for ``"shuffle_top"`` and ``"truncate"``. Rounding:
        {rounding}. Other kinds do not take a fraction.
    model
        Text encoder whose tokenizer and token limit decide which genes are in context (same
        values as :func:`sc_llm.tl.embed_text`; ``None`` is the bundled all-MiniLM-L6-v2).
        Permuting in-context genes never changes which genes fit: each word is tokenized on
        its own, so the same words use the same number of tokens in any order.
    {doc_random_state}
        Here: the shuffles and per-instance hashes (bit-for-bit reproducible).
    key_added
        ``obs`` column for the ablated sentences; default ``f"{sentence_key}_{kind}"`` (with
        ``f"_{fraction:g}"`` appended for kinds that take a fraction). The record goes to
        ``uns[key_added]``.
    {doc_copy}

    Returns
    -------
    adata : anndata.AnnData or None
        ``None`` or a copy. Sets ``obs[key_added]`` and ``uns[key_added]``: ``"params"`` (kind,
        fraction and its rounding rule, seed, source column, and the encoder identity for context-based
        kinds) beside, for context-based kinds, ``"genes_in_context"`` (in-context genes of the source
        sentences: mean, min, max) and, for ``"truncate"``, ``"genes_kept"``.

    Examples
    --------
    >>> import sc_llm as scl
    >>> adata = scl.datasets.pbmc68k()[:40].copy()
    >>> scl.pp.cell_sentences(adata)
    >>> scl.tl.ablate(adata, "shuffle_all", random_state=0)
    >>> cell = adata.obs.iloc[0]
    >>> sorted(cell["cell_sentence_shuffle_all"].split()) == sorted(cell["cell_sentence"].split())
    True
    >>> scl.tl.ablate(adata, "truncate", fraction=0.1)  # of the genes in the encoder's context
    >>> adata.uns["cell_sentence_truncate_0.1"]["genes_kept"]
    {'mean': 7.675, 'min': 7, 'max': 8}
    """
    if kind not in KINDS:
        raise ValueError(f"Unknown ablation kind {kind!r}; choose one of {list(KINDS)}.")
    fraction = _check_fraction(kind, fraction)
    key_added = check_key(default_key(sentence_key, kind, fraction) if key_added is None else key_added)
    if key_added == sentence_key:
        raise ValueError(
            f"key_added must differ from sentence_key ({sentence_key!r}): the sentences would be replaced by "
            "their ablation."
        )
    sentences = obs_sentences(adata, sentence_key)
    adata = maybe_copy(adata, copy)
    ablated, info = ablate_sentences(
        sentences, kind, fraction=fraction, model=model, random_state=random_state
    )
    warn_overwrite(adata.obs, key_added, "adata.obs")
    adata.obs[key_added] = pd.Series(ablated, index=adata.obs_names, dtype=object)
    params = {"kind": kind, "fraction": fraction, "random_state": random_state, "sentence_key": sentence_key}
    if fraction is not None:
        params["rounding"] = ROUNDING
    if "model" in info:
        params["model"] = info.pop("model")
    adata.uns[key_added] = {"params": params, **info}
    return adata if copy else None


def default_key(sentence_key: str, kind: str, fraction: float | None) -> str:
    """The default name of an ablation: ``obs`` column of :func:`ablate`, column of :func:`ablation_study`."""
    return f"{sentence_key}_{kind}" + (f"_{fraction:g}" if fraction is not None else "")


def ablate_sentences(
    sentences: Sequence[str],
    kind: str,
    *,
    fraction: float | None = None,
    model: Any = None,
    random_state: int = 0,
) -> tuple[list[str], dict[str, Any]]:
    """Ablate a list of sentences without an AnnData (see :func:`ablate` for the kinds).

    Returns
    -------
    ``(ablated sentences, info)``; ``info`` holds, for context-based kinds, the encoder identity
    (``"model"``) and ``"genes_in_context"``, and ``"genes_kept"`` for ``"truncate"``.
    """
    if kind not in KINDS:
        raise ValueError(f"Unknown ablation kind {kind!r}; choose one of {list(KINDS)}.")
    fraction = _check_fraction(kind, fraction)
    rng = np.random.default_rng(random_state)
    words = [s.split() for s in sentences]
    info: dict[str, Any] = {}
    if kind in ("gene_hash", "hash_shuffle_in_context"):
        words = _hash_genes(words)
    if kind == "per_instance_hash":
        words = _per_instance_hash(words, rng)
    elif kind == "shuffle_all":
        words = [_permute_prefix(w, len(w), rng) for w in words]
    elif kind in _CONTEXT_KINDS:
        n_fit, info = _in_context(words, model)
        if kind == "truncate":
            kept = n_top(n_fit, fraction)
            words = [w[:k] for w, k in zip(words, kept, strict=True)]
            if kept.size:
                info["genes_kept"] = {
                    "mean": float(kept.mean()),
                    "min": int(kept.min()),
                    "max": int(kept.max()),
                }
        else:
            counts = n_top(n_fit, fraction) if kind == "shuffle_top" else n_fit
            words = [_permute_prefix(w, int(k), rng) for w, k in zip(words, counts, strict=True)]
    return [" ".join(w) for w in words], info


def _check_fraction(kind: str, fraction: float | None) -> float | None:
    if kind not in _FRACTION_KINDS:
        if fraction is not None:
            raise ValueError(f"Ablation {kind!r} takes no fraction (only {list(_FRACTION_KINDS)} do).")
        return None
    fraction = DEFAULT_FRACTION if fraction is None else float(fraction)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    return fraction


def _hash_genes(words: list[list[str]]) -> list[list[str]]:
    cache: dict[str, str] = {}
    out = []
    for row in words:
        out.append([cache[g] if g in cache else cache.setdefault(g, gene_hash(g)) for g in row])
    return out


def _per_instance_hash(words: list[list[str]], rng: np.random.Generator) -> list[list[str]]:
    # 40 random bits per occurrence = exactly 10 hex characters (collisions: ~n²/2⁴¹).
    values = rng.integers(0, 1 << (4 * HASH_LENGTH), size=sum(len(w) for w in words), dtype=np.int64)
    out, pos = [], 0
    for row in words:
        out.append([f"{v:0{HASH_LENGTH}x}" for v in values[pos : pos + len(row)].tolist()])
        pos += len(row)
    return out


def _permute_prefix(row: list[str], k: int, rng: np.random.Generator) -> list[str]:
    """``row`` with its first ``k`` words in random order and the rest in place."""
    k = min(k, len(row))
    return [row[i] for i in rng.permutation(k)] + row[k:]


def _in_context(words: list[list[str]], model: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """Whole genes that fit the encoder's token limit, counted with its tokenizer (:meth:`TextEncoder.fit`)."""
    from sc_llm.models._text import load_text_encoder

    encoder = load_text_encoder(model)
    _, n_fit = encoder.fit([" ".join(w) for w in words])
    stats = (
        {"mean": float(n_fit.mean()), "min": int(n_fit.min()), "max": int(n_fit.max())} if n_fit.size else {}
    )
    return n_fit, {"model": encoder.identity(), "genes_in_context": stats}


# -- the study (Table 2) ---------------------------------------------------------------------------------


@doc_params(doc_split=doc_split, doc_random_state=doc_random_state, doc_device_precision=doc_device_precision)
def ablation_study(
    adata: AnnData,
    labels_key: str,
    *,
    model: Any = None,
    kinds: Sequence[str | tuple[str, float]] = STUDY_KINDS,
    sentence_key: str = "cell_sentence",
    split_key: str = "split",
    train_value: str = "train",
    k: int = 10,
    random_state: int = 0,
    batch_size: int = 64,
    device: Any = None,
    precision: Precision = "auto",
    key_added: str = "ablation_study",
) -> pd.DataFrame:
    """Embed each ablated version of the sentences and score it (the paper's Table 2).

    For the baseline and for every ablation the sentences are embedded with
    :func:`sc_llm.tl.embed_text`, labelled by :func:`sc_llm.tl.knn_annotate` (10-NN, cosine,
    metrics on the held-out cells) and clustered by :func:`sc_llm.tl.cluster_metrics` (k-means
    ARI/AMI on all labelled cells). The work happens on a scratch AnnData: ``adata.obs`` and
    ``adata.obsm`` are left untouched.

    Parameters
    ----------
    adata
        Annotated data matrix with sentences, labels and a train/test split in ``obs``.
    labels_key
        ``obs`` column with cell types.
    model
        Text encoder (as in :func:`sc_llm.tl.embed_text`); it also decides which genes are in context.
    kinds
        Ablations to run, as kind names or ``(kind, fraction)`` pairs, e.g.
        ``[("truncate", 0.1), ("truncate", 0.2), ("truncate", 0.5)]`` for Figures 6–8.
        The baseline (unablated sentences) is always included.
    sentence_key
        ``obs`` column with the sentences.
    {doc_split}
        Here the training cells are the kNN reference.
    k
        Neighbours of the kNN classifier.
    {doc_random_state}
        Here: the ablations and k-means.
    batch_size
        Sentences per forward pass of :func:`sc_llm.tl.embed_text` (``device`` and ``precision`` are
        passed on to it too).
    {doc_device_precision}
    key_added
        ``uns`` key of the results.

    Returns
    -------
    table : pandas.DataFrame
        The table: metrics as rows (accuracy, macro precision/recall/F1, k-means ARI/AMI), one column
        per ablation (``"baseline"`` first; kinds with a fraction are named ``f"{kind}_{fraction:g}"``).
        Also stored in ``uns[key_added]``: ``"params"`` (the call's settings and the encoder identity)
        beside ``"table"``, ``"kinds"`` (column → kind, fraction and what :func:`ablate` records) and
        ``"genes_in_context"`` (column → mean in-context genes of the embedded sentences).
    """
    from ._embed_text import embed_text
    from ._knn import knn_annotate
    from ._metrics import cluster_metrics, get_labels

    check_key(key_added)
    get_labels(adata, labels_key)
    if split_key not in adata.obs:
        raise KeyError(
            f"Column {split_key!r} not found in adata.obs; create one with sc_llm.pp.train_test_split."
        )
    specs = _study_specs(kinds)
    sentences = obs_sentences(adata, sentence_key)
    base_obs = adata.obs[[labels_key, split_key]].copy()
    columns, in_context, kinds_info = {}, {}, {}
    for name, kind, fraction in specs:
        if kind is None:
            text, info = sentences, {}
        else:
            text, info = ablate_sentences(
                sentences, kind, fraction=fraction, model=model, random_state=random_state
            )
        logger.info("ablation_study: embedding %s", name)
        scratch = AnnData(obs=base_obs.assign(_sentence=text))
        embed_text(
            scratch,
            model,
            sentence_key="_sentence",
            key_added="_X",
            batch_size=batch_size,
            device=device,
            precision=precision,
        )
        knn_annotate(
            scratch, "_X", labels_key, split_key=split_key, train_value=train_value, k=k, key_added="_knn"
        )
        metrics = dict(scratch.uns["_knn"]["metrics"])
        clusters = cluster_metrics(
            scratch, "_X", labels_key, random_state=random_state, key_added="_clusters"
        )
        columns[name] = [metrics.get(m, np.nan) for m in METRIC_ROWS[:4]] + [clusters["ari"], clusters["ami"]]
        record = scratch.uns["_X"]
        in_context[name] = record["genes_in_context"]["mean"]
        kinds_info[name] = {"kind": kind or "baseline", "fraction": fraction, **info}
    table = pd.DataFrame(columns, index=list(METRIC_ROWS))
    table.index.name = "metric"
    params = {"labels_key": labels_key, "sentence_key": sentence_key, "split_key": split_key,
              "train_value": train_value, "k": k, "random_state": random_state, "model": record["params"]["model"],
              "precision": record["params"]["precision"]}  # fmt: skip
    adata.uns[key_added] = {
        "params": params,
        "table": table,
        "kinds": kinds_info,
        "genes_in_context": in_context,
    }
    return table


def _study_specs(kinds) -> list[tuple[str, str | None, float | None]]:
    specs: list[tuple[str, str | None, float | None]] = [("baseline", None, None)]
    for item in kinds:
        kind, fraction = (item, None) if isinstance(item, str) else (item[0], item[1])
        if kind not in KINDS:
            raise ValueError(f"Unknown ablation kind {kind!r}; choose one of {list(KINDS)}.")
        fraction = _check_fraction(kind, fraction)
        # Same naming as ablate's default obs column, minus the sentence key.
        name = default_key("", kind, fraction)[1:]
        if any(name == s[0] for s in specs):
            raise ValueError(f"Ablation {name!r} is listed twice.")
        specs.append((name, kind, fraction))
    return specs


def column_label(name: str, kinds_info: dict[str, Any] | None = None) -> str:
    """The paper's wording for a study column (e.g. ``"Order ablation (top 10% in context)"``)."""
    info = (kinds_info or {}).get(name, {})
    kind = info.get("kind", name.rsplit("_", 1)[0] if name.rsplit("_", 1)[0] in KINDS else name)
    fraction = info.get("fraction")
    if fraction is None and kind in _FRACTION_KINDS:
        tail = name.rsplit("_", 1)[-1]
        fraction = float(tail) if tail.replace(".", "", 1).isdigit() else DEFAULT_FRACTION
    label = LABELS.get(kind, name)
    return label.format(pct=f"{100 * fraction:g}%") if fraction is not None else label
