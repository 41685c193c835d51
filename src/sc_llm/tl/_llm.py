"""scl.tl.llm_annotate: a generative LLM picks each cell's type, zero-shot or among kNN candidates.

The paper (§3.3, §4.2, Appendix A.3) asks a generative LLM, given a cell sentence, for the most
likely cell type either among all training labels (zero-shot, Figure 4) or among the three labels
most voted by the cell's 10 nearest neighbours in scGPT space (re-ranking, Figure 5), with
structured output so that only a label comes back. The client, prompts and answer parsing live in
:mod:`sc_llm.llm`; this module selects the cells, asks, and writes the results.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from sc_llm._docs import doc_copy, doc_llm_client_kwargs, doc_llm_model, doc_params, doc_random_state
from sc_llm._utils import (
    check_key,
    format_examples,
    logger,
    maybe_copy,
    obs_sentences,
    uns_params,
    warn_overwrite,
)
from sc_llm.llm._answers import REASONS, answer_schema, parse_answer
from sc_llm.llm._client import ChatClient, ChatRequest
from sc_llm.llm._open import open_client
from sc_llm.llm._prompts import RERANK_TEMPLATE, ZERO_SHOT_TEMPLATE, check_template, render

from ._candidates import N_CANDIDATES
from ._metrics import classification_metrics, mean_sd, train_mask


@dataclasses.dataclass(frozen=True)
class LLMAnnotateConfig:
    """What :func:`~sc_llm.tl.llm_annotate` asks about each cell, and how often.

    Parameters
    ----------
    labels
        Zero-shot label list; ``None`` uses the labels of the training cells (sorted). Ignored when
        re-ranking.
    template
        Prompt template with ``{labels}`` and ``{sentence}`` fields (both required); ``None`` uses
        the paper's (:data:`sc_llm.llm.RERANK_TEMPLATE` or :data:`sc_llm.llm.ZERO_SHOT_TEMPLATE`).
        Only these two fields are filled in; any other braces (a JSON example, say) stay as written.
    n_genes
        Keep only the first ``n_genes`` genes of each sentence (``None``: the whole sentence).
    n_runs
        Independent runs per cell (separate requests and cache entries); the paper reports mean
        (sample sd) accuracy over 3 runs.
    retry_flagged
        Ask again for cells whose cached answer was flagged (``"malformed"`` or ``"out_of_list"``)
        and replace it. Cells whose request failed are always asked again on a rerun; valid
        answers never are.
    """

    labels: Sequence[str] | None = None
    template: str | None = None
    n_genes: int | None = None
    n_runs: int = 1
    retry_flagged: bool = False

    def __post_init__(self) -> None:
        if self.labels is not None:
            if isinstance(self.labels, str):
                raise TypeError(f"labels must be a list of labels, got the string {self.labels!r}.")
            object.__setattr__(self, "labels", tuple(str(label) for label in self.labels))
        if self.template is not None:
            check_template(self.template, ("labels", "sentence"))
        if self.n_genes is not None and self.n_genes < 1:
            raise ValueError(f"n_genes must be positive or None, got {self.n_genes}.")
        if self.n_runs < 1:
            raise ValueError(f"n_runs must be at least 1, got {self.n_runs}.")


@doc_params(
    doc_llm_model=doc_llm_model,
    doc_llm_client_kwargs=doc_llm_client_kwargs,
    doc_random_state=doc_random_state,
    doc_copy=doc_copy,
)
def llm_annotate(
    adata: AnnData,
    model: str | ChatClient,
    *,
    mode: Literal["rerank", "zero_shot"] = "rerank",
    candidates_key: str = "knn",
    labels_key: str | None = None,
    sentence_key: str = "cell_sentence",
    split_key: str | None = "split",
    train_value: str = "train",
    cells: Sequence[str] | np.ndarray | None = None,
    n_cells: int | None = None,
    random_state: int = 0,
    config: LLMAnnotateConfig | None = None,
    client_kwargs: Mapping[str, Any] | None = None,
    key_added: str = "llm",
    copy: bool = False,
) -> AnnData | None:
    """Annotate cells with a generative LLM, zero-shot or by re-ranking kNN candidates.

    For each selected cell the model reads the cell sentence and must answer with one label from
    a list: the three most voted labels of its nearest neighbours (``mode="rerank"``, the paper's
    Figure 5, written by :func:`sc_llm.tl.knn_annotate`; "if uncertain, pick the first"), or all
    training labels (``mode="zero_shot"``, Figure 4). The answer is requested as a JSON object
    ``{"cell_type": …}`` constrained by a JSON schema enum of the allowed labels; the client
    negotiates the form once (``json_schema``, else ``json_object`` with the schema, else the
    schema in the prompt) and every answer is validated. An answer that is not JSON or not an
    allowed label is never written, and neither is a request that failed for good: the cell gets
    the first option of its list and is flagged in ``obs[f"{key_added}_fallback"]`` (with the
    error in ``obs[f"{key_added}_error"]``). One failing cell never stops the others.

    Every answer is cached on disk as it arrives, so an interrupted or failed run resumes where it
    stopped when called again: failed cells are asked again, answered ones are never paid twice.

    Parameters
    ----------
    adata
        Annotated data matrix with cell sentences in ``obs[sentence_key]``.
    {doc_llm_model}
    mode
        ``"rerank"`` (choose among kNN candidates) or ``"zero_shot"`` (choose among all labels).
    candidates_key
        ``key_added`` of :func:`sc_llm.tl.knn_annotate` (or :func:`sc_llm.tl.map_labels`):
        candidates are read from ``obs[f"{candidates_key}_top1"]`` … ``_top3`` (missing ones
        skipped). A cell with a single candidate gets it without a request.
    labels_key
        ``obs`` column with true labels, for the zero-shot list and the accuracy. ``None`` takes
        the one recorded by ``knn_annotate`` in ``uns[candidates_key]``, if any.
    sentence_key
        ``obs`` column with the cell sentences (see :func:`sc_llm.pp.cell_sentences`).
    split_key, train_value
        Default cells are those with ``obs[split_key] != train_value`` (held-out cells); with
        ``split_key=None`` all cells. Re-ranking needs no training cells: when ``obs`` has no
        ``split_key`` column or no cell in it equals ``train_value`` (an AnnData of query cells
        whose candidates are already in ``obs``), all cells are annotated; so are they in
        zero-shot mode when ``config.labels`` is given.
    cells
        Explicit cells instead (obs names or a boolean mask).
    n_cells
        Annotate a random subset of this many of those cells, drawn with ``random_state`` (the
        paper evaluates 100 random test cells, the same ones for every model).
    {doc_random_state}
    config
        Prompt and runs: zero-shot ``labels``, ``template``, ``n_genes``, ``n_runs``,
        ``retry_flagged`` (see :class:`LLMAnnotateConfig`; ``None``: the defaults).
    {doc_llm_client_kwargs}
    key_added
        Prefix of the ``obs`` columns and key of the ``uns`` record.
    {doc_copy}

    Returns
    -------
    adata : anndata.AnnData or None
        ``None``, or the annotated copy when ``copy=True``. Sets

        - ``obs[key_added]``: the label of run 1 for annotated cells (NaN elsewhere);
        - ``obs[f"{key_added}_fallback"]``: ``"ok"``, or why the first option was used instead
          (``"malformed"``: no JSON/label could be read; ``"out_of_list"``: a label not offered;
          ``"failed"``: no answer, the request failed for good);
        - ``obs[f"{key_added}_error"]``: for failed cells, the reason (HTTP status and the server's
          message, credentials redacted); NaN elsewhere;
        - with ``n_runs > 1`` also ``obs[f"{key_added}_run{r}"]``, ``…_run{r}_fallback`` and ``…_run{r}_error``;
        - ``uns[key_added]``: ``params`` (the call's settings: model, base URL without credentials,
          mode, template, request fields, …), ``labels`` (zero-shot list), ``metrics`` (per-run
          accuracy and macro P/R/F1, ``accuracy_mean``, ``accuracy_sd`` (ddof=1), the candidates'
          top-1 ``baseline_accuracy`` on the same cells in re-rank mode; flagged cells count with
          their first option), ``outcomes`` (answers per reason over all runs), ``fallbacks`` (table
          of flagged answers with the error of failed ones), ``usage`` (requests, retries, rejected,
          failed, cache hits, tokens, and ``cost`` with ``price_per_1m_tokens``), ``response_format``
          (the form the server accepted) and ``structured_output`` (whether the server constrained
          the answers).

    Examples
    --------
    Re-rank the kNN candidates of 20 held-out cells. The model here is :class:`sc_llm.testing.ChatServer`
    on 127.0.0.1 answering the first (most voted) option; point ``base_url`` at vLLM, llama.cpp, Ollama
    or leave it out for OpenAI:

    >>> import json
    >>> import sc_llm as scl
    >>> from sc_llm.testing import ChatServer
    >>> adata = scl.datasets.pbmc68k()
    >>> scl.pp.cell_sentences(adata)
    >>> scl.pp.train_test_split(adata, "cell_type", random_state=0)
    >>> scl.tl.knn_annotate(adata, "X_pca", "cell_type")
    >>> test = adata[adata.obs["split"] == "test"][:20].copy()
    >>> def first_option(prompt, body):
    ...     schema = body["response_format"]["json_schema"]["schema"]
    ...     return json.dumps({"cell_type": schema["properties"]["cell_type"]["enum"][0]})
    >>> with ChatServer(first_option) as server:
    ...     scl.tl.llm_annotate(test, "local-model", labels_key="cell_type",
    ...                         client_kwargs={"base_url": server.base_url, "cache_dir": False})
    >>> bool((test.obs["llm"].astype(str) == test.obs["knn"].astype(str)).all())
    True
    >>> test.uns["llm"]["usage"]["requests"]  # cells with a single candidate need no request
    13
    """
    if mode not in ("rerank", "zero_shot"):
        raise ValueError(f"mode must be 'rerank' or 'zero_shot', got {mode!r}.")
    config = LLMAnnotateConfig() if config is None else config
    if not isinstance(config, LLMAnnotateConfig):
        raise TypeError(f"config must be an LLMAnnotateConfig, got {type(config).__name__}.")
    check_key(key_added)
    adata = maybe_copy(adata, copy)
    labels_key = _labels_key(adata, labels_key, candidates_key)
    template = config.template or (RERANK_TEMPLATE if mode == "rerank" else ZERO_SHOT_TEMPLATE)
    selection_split = split_key
    if split_key is not None and not _has_training_cells(adata, split_key, train_value):
        if mode == "rerank" or config.labels is not None:
            # A query-only AnnData: nothing was held out, every cell is a query.
            logger.info(
                "llm_annotate: no cell has obs[%r] == %r; annotating all cells.", split_key, train_value
            )
            selection_split = None
    idx = _select_cells(adata, cells, selection_split, train_value, n_cells, random_state)
    sentences = _sentences(adata, sentence_key, idx, config.n_genes)
    options, zero_shot_labels = _options(
        adata, idx, mode, candidates_key, config.labels, labels_key, selection_split, train_value
    )

    with open_client(model, client_kwargs) as call:
        client = call.client
        before = dataclasses.replace(client.usage)
        answers, errors = _ask(
            client, adata.obs_names[idx], sentences, options, template, call.params, config
        )
    request_params = {**client.params, **call.params}

    preds, reasons, flagged = _decide(answers, errors, options, adata.obs_names[idx])
    _write_obs(adata, key_added, idx, preds, reasons, errors, options)
    adata.uns[key_added] = {
        "params": {
            "mode": mode, "model": client.model, "base_url": client.base_url, "template": template,
            "candidates_key": candidates_key if mode == "rerank" else None, "labels_key": labels_key,
            "sentence_key": sentence_key, "split_key": split_key, "train_value": train_value,
            "n_genes": config.n_genes, "n_runs": config.n_runs, "n_cells": len(idx),
            "random_state": random_state, "retry_flagged": config.retry_flagged,
            "request_params": json.dumps(request_params, sort_keys=True),
        },
        "labels": zero_shot_labels if zero_shot_labels is not None else [],
        "metrics": _metrics(adata, labels_key, idx, preds, options, mode),
        "outcomes": {r: int(sum(run.count(r) for run in reasons)) for r in REASONS},
        "fallbacks": flagged,
        "usage": client.usage.since(before).summary(call.price_per_1m_tokens),
        "response_format": client.response_format,
        "structured_output": client.response_format != "text",
    }  # fmt: skip
    n_failed = adata.uns[key_added]["outcomes"]["failed"]
    if n_failed:
        logger.warning(
            "llm_annotate: %d of %d answers failed (see obs[%r]); call again to ask for them again.",
            n_failed, len(idx) * config.n_runs, f"{key_added}_error",
        )  # fmt: skip
    logger.info(
        "llm_annotate: %d cells × %d runs, %d answers flagged.", len(idx), config.n_runs, len(flagged)
    )
    return adata if copy else None


def _labels_key(adata: AnnData, labels_key: str | None, candidates_key: str) -> str | None:
    if labels_key is not None:
        if labels_key not in adata.obs:
            raise KeyError(f"Column {labels_key!r} not found in adata.obs.")
        return labels_key
    recorded = uns_params(adata, candidates_key).get("labels_key")
    return recorded if isinstance(recorded, str) and recorded in adata.obs else None


def _has_training_cells(adata: AnnData, split_key: str, train_value: str) -> bool:
    return split_key in adata.obs and bool((adata.obs[split_key].astype(str) == str(train_value)).any())


def _select_cells(adata, cells, split_key, train_value, n_cells, random_state) -> np.ndarray:
    """Positions of the cells to annotate, in obs order."""
    if cells is not None:
        cells = np.asarray(cells)
        if cells.dtype == bool:
            if cells.shape != (adata.n_obs,):
                raise ValueError(f"Boolean `cells` must have length n_obs={adata.n_obs}, got {cells.shape}.")
            idx = np.flatnonzero(cells)
        else:
            pos = adata.obs_names.get_indexer(cells.astype(str))
            if (pos < 0).any():
                raise KeyError(f"Cells not in adata.obs_names: {format_examples(cells[pos < 0])}.")
            uniq, counts = np.unique(cells.astype(str), return_counts=True)
            if (counts > 1).any():
                raise ValueError(
                    f"`cells` names some cells more than once: {format_examples(uniq[counts > 1].tolist())}."
                )
            idx = np.sort(pos)
    elif split_key is None:
        idx = np.arange(adata.n_obs)
    else:
        idx = np.flatnonzero(~train_mask(adata, split_key, train_value))
    if idx.size == 0:
        raise ValueError("No cell selected for annotation.")
    if n_cells is not None and n_cells < idx.size:
        if n_cells < 1:
            raise ValueError(f"n_cells must be positive, got {n_cells}.")
        idx = np.sort(np.random.default_rng(random_state).choice(idx, size=n_cells, replace=False))
    return idx


def _sentences(adata, sentence_key, idx, n_genes) -> list[str]:
    sentences = obs_sentences(adata, sentence_key, idx)
    if n_genes is not None:
        sentences = [" ".join(s.split()[:n_genes]) for s in sentences]
    return sentences


def _options(adata, idx, mode, candidates_key, labels, labels_key, split_key, train_value):
    """The allowed labels of each selected cell, first option first; and the zero-shot list."""
    if mode == "rerank":
        cols = [f"{candidates_key}_top{i}" for i in range(1, N_CANDIDATES + 1)]
        absent = [c for c in cols if c not in adata.obs]
        if absent:
            raise KeyError(
                f"Candidate columns {absent} not found in adata.obs; run "
                f"sc_llm.tl.knn_annotate(..., key_added={candidates_key!r}) first."
            )
        table = adata.obs[cols].iloc[idx]
        options = [[str(v) for v in row if not pd.isna(v)] for row in table.itertuples(index=False)]
        empty = [name for name, opts in zip(table.index, options, strict=True) if not opts]
        if empty:
            raise ValueError(f"No kNN candidate in obs[{cols[0]!r}] for cells {format_examples(empty)}.")
        return options, None
    if labels is None:
        if labels_key is None or split_key is None:
            raise ValueError(
                "Zero-shot mode needs `config=LLMAnnotateConfig(labels=[...])`, or `labels_key` and "
                "`split_key` to read the training cells' labels."
            )
        train = train_mask(adata, split_key, train_value)
        labels = sorted(adata.obs[labels_key][train].dropna().astype(str).unique())
    labels = list(dict.fromkeys(str(label) for label in labels))
    if len(labels) < 2:
        raise ValueError(f"Zero-shot mode needs at least two labels, got {labels}.")
    return [labels] * len(idx), labels


def _ask(client, names, sentences, options, template, extra, config: LLMAnnotateConfig):
    """Ask every (run, cell) with two options or more: answers and errors as ``answers[run][cell]``.

    Answers are ``None`` where a single option needs no request or the request failed; errors are
    ``None`` unless it failed.
    """
    n_runs = config.n_runs
    requests, where = [], []
    for r in range(n_runs):
        for i, (name, sentence, opts) in enumerate(zip(names, sentences, options, strict=True)):
            if len(opts) < 2:
                continue
            prompt = render(template, labels=str(list(opts)), sentence=sentence)
            requests.append(
                ChatRequest(
                    messages=[{"role": "user", "content": prompt}],
                    schema=answer_schema(opts),
                    tag={"run": r},
                    name=str(name) if n_runs == 1 else f"{name} (run {r + 1})",
                    params=extra or None,
                )
            )
            where.append((r, i))
    results = client.complete_many(requests, desc="LLM annotation", errors="return")
    if config.retry_flagged:
        again = [
            k for k, (res, (_, i)) in enumerate(zip(results, where, strict=True))
            if res.ok and res.cached and parse_answer(res.content, options[i])[0] is None
        ]  # fmt: skip
        if again:
            logger.info("llm_annotate: asking again for %d flagged cached answers.", len(again))
            retried = [dataclasses.replace(requests[k], refresh=True) for k in again]
            for k, res in zip(
                again, client.complete_many(retried, desc="LLM annotation", errors="return"), strict=True
            ):
                results[k] = res
    answers: list[list[str | None]] = [[None] * len(names) for _ in range(n_runs)]
    errors: list[list[str | None]] = [[None] * len(names) for _ in range(n_runs)]
    for (r, i), res in zip(where, results, strict=True):
        if res.ok:
            answers[r][i] = res.content
        else:
            errors[r][i] = res.error
    return answers, errors


def _decide(answers, errors, options, names):
    """Per-run predictions and reasons; a bad answer or a failed request becomes the cell's first option, flagged."""
    preds, reasons, rows = [], [], []
    for r, (run, run_errors) in enumerate(zip(answers, errors, strict=True)):
        p, why = [], []
        for name, content, error, opts in zip(names, run, run_errors, options, strict=True):
            if error is not None:
                label, reason = None, "failed"
            elif content is None:
                label, reason = opts[0], "ok"
            else:
                label, reason = parse_answer(content, opts)
            if label is None:
                label = opts[0]
                rows.append({
                    "cell": str(name), "run": r + 1, "reason": reason,
                    "answer": (content or "")[:500], "error": error or "",
                })  # fmt: skip
            p.append(label)
            why.append(reason)
        preds.append(p)
        reasons.append(why)
    flagged = pd.DataFrame(rows, columns=["cell", "run", "reason", "answer", "error"])
    return preds, reasons, flagged


def _write_obs(adata, key, idx, preds, reasons, errors, options) -> None:
    cats = list(dict.fromkeys(o for opts in options for o in opts))
    cols = [(key, 0)]
    if len(preds) > 1:
        cols += [(f"{key}_run{r + 1}", r) for r in range(len(preds))]
    for col, r in cols:
        for name, values, categories in (
            (col, preds[r], cats),
            (f"{col}_fallback", reasons[r], list(REASONS)),
        ):
            warn_overwrite(adata.obs, name, "adata.obs")
            full = np.full(adata.n_obs, None, dtype=object)
            full[idx] = values
            adata.obs[name] = pd.Categorical(full, categories=categories)
        warn_overwrite(adata.obs, f"{col}_error", "adata.obs")
        full = np.full(adata.n_obs, None, dtype=object)
        full[idx] = errors[r]
        # Categorical keeps NaN for the cells without an error (also through write_h5ad).
        adata.obs[f"{col}_error"] = pd.Categorical(full)


def _metrics(adata, labels_key, idx, preds, options, mode) -> dict[str, Any]:
    if labels_key is None:
        return {}
    truth = adata.obs[labels_key].iloc[idx]
    have = truth.notna().to_numpy()
    if not have.any():
        return {}
    y = truth[have].astype(str).to_numpy()
    runs = [classification_metrics(y, np.asarray(p, dtype=object)[have]) for p in preds]
    acc = np.array([m["accuracy"] for m in runs])
    acc_mean, acc_sd = mean_sd(acc)
    out: dict[str, Any] = {
        "runs": {str(r + 1): m for r, m in enumerate(runs)},
        "accuracy": acc,
        "accuracy_mean": acc_mean,
        "accuracy_sd": acc_sd,
        "n_cells": int(have.sum()),
    }
    if mode == "rerank":
        first = np.array([o[0] for o in options], dtype=object)[have]
        out["baseline_accuracy"] = float((first == y).mean())
    return out
