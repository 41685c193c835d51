"""scl.tl.llm_annotate and scl.tl.llm_marker_matching: generative LLMs over OpenAI-compatible APIs.

The paper (§3.3, §4.2, Appendix A.3) asks a generative LLM, given a cell sentence, for the most
likely cell type either among all training labels (zero-shot, Figure 4) or among the three labels
most voted by the cell's 10 nearest neighbours in scGPT space (re-ranking, Figure 5), with
structured output so that only a label comes back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from .._llm_client import DEFAULT_API_KEY_ENV, ChatClient, ChatRequest
from .._utils import format_examples, logger, maybe_copy, warn_overwrite
from ._candidates import N_CANDIDATES
from ._metrics import classification_metrics, train_mask

# The words are the paper's (Figures 4 and 5); the label list is rendered as Python's str(list),
# which is what the figures' "+ [list] +" concatenation produces. The line breaks are our choice.
ZERO_SHOT_TEMPLATE = (
    "Given the cell described. Output ONLY the most likely cell type from the following list: {labels}\n"
    '"""{sentence}"""'
)
RERANK_TEMPLATE = (
    "Given the cell described. Output ONLY the most likely cell type from the following list: {labels}\n"
    "If you are not certain about what cell type this is, conclude that it is the first option in the list\n"
    '"""{sentence}"""'
)
MARKER_TEMPLATE = (
    "Which of the following lists of marker genes belongs to the same cell type as the gene {gene}? "
    "Output ONLY the number of that list.\n{lists}"
)
ANSWER_FIELD = "cell_type"
REASONS = ("ok", "malformed", "out_of_list", "failed")
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_JSON_OBJECT = re.compile(r"\{.*?\}", re.DOTALL)
_FIELD = re.compile(r"\{(\w+)\}")


def llm_annotate(
    adata: AnnData,
    *,
    model: str | ChatClient,
    mode: Literal["rerank", "zero_shot"] = "rerank",
    candidates_key: str = "knn",
    labels: Sequence[str] | None = None,
    labels_key: str | None = None,
    sentence_key: str = "cell_sentence",
    n_genes: int | None = None,
    split_key: str | None = "split",
    train_value: str = "train",
    cells: Sequence[str] | np.ndarray | None = None,
    n_cells: int | None = None,
    random_state: int = 0,
    template: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    api_key_env: str = DEFAULT_API_KEY_ENV,
    temperature: float | None = None,
    params: Mapping[str, Any] | None = None,
    n_runs: int = 1,
    max_concurrency: int = 8,
    timeout: float = 120.0,
    max_retries: int = 6,
    cache_dir: str | bool | None = None,
    retry_flagged: bool = False,
    price_per_1m_tokens: tuple[float, float] | None = None,
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
    model
        Model name on the server (e.g. ``"o3-mini-2025-01-31"``), or a configured
        :class:`sc_llm.tl.ChatClient` (then ``base_url``, ``api_key``, ``api_key_env``,
        ``max_concurrency``, ``timeout``, ``max_retries`` and ``cache_dir`` are ignored).
    mode
        ``"rerank"`` (choose among kNN candidates) or ``"zero_shot"`` (choose among all labels).
    candidates_key
        ``key_added`` of :func:`sc_llm.tl.knn_annotate`: candidates are read from
        ``obs[f"{candidates_key}_top1"]`` … ``_top3`` (missing ones skipped). A cell with a single
        candidate gets it without a request.
    labels
        Zero-shot label list; ``None`` uses the labels of the training cells (sorted).
    labels_key
        ``obs`` column with true labels, for the zero-shot list and the accuracy. ``None`` takes
        the one recorded by ``knn_annotate`` in ``uns[candidates_key]``, if any.
    sentence_key
        ``obs`` column with the cell sentences (see :func:`sc_llm.pp.cell_sentences`).
    n_genes
        Keep only the first ``n_genes`` genes of each sentence (``None``: the whole sentence).
    split_key, train_value
        Default cells are those with ``obs[split_key] != train_value`` (held-out cells); with
        ``split_key=None`` all cells. Re-ranking needs no training cells: when ``obs`` has no
        ``split_key`` column or no cell in it equals ``train_value`` (an AnnData of query cells
        whose candidates are already in ``obs``), all cells are annotated; so are they in
        zero-shot mode when ``labels`` is given.
    cells
        Explicit cells instead (obs names or a boolean mask).
    n_cells
        Annotate a random subset of this many of those cells, drawn with ``random_state`` (the
        paper evaluates 100 random test cells, the same ones for every model).
    random_state
        Seed of the ``n_cells`` draw.
    template
        Prompt template with ``{labels}`` and ``{sentence}`` fields (both required); ``None`` uses
        the paper's (:data:`RERANK_TEMPLATE` or :data:`ZERO_SHOT_TEMPLATE`). Only these two
        fields are filled in; any other braces (a JSON example, say) stay as written.
    base_url
        API root, e.g. ``"http://localhost:8000/v1"`` for vLLM; ``None``: OpenAI.
    api_key, api_key_env
        Bearer token, by default read from the environment variable ``api_key_env``.
    temperature
        Sampling temperature (``None``: not sent, the server's default; the paper used 0 for
        DeepSeek-V3, 0.6 for DeepSeek-R1 and defaults for OpenAI models).
    params
        Extra request fields, e.g. ``{"reasoning_effort": "high", "seed": 0}``.
    n_runs
        Independent runs per cell (separate requests and cache entries); the paper reports mean
        (sample sd) accuracy over 3 runs.
    max_concurrency, timeout, max_retries, cache_dir
        Client settings (see :class:`sc_llm.tl.ChatClient`); ``timeout`` is a deadline for each
        attempt as a whole.
    retry_flagged
        Ask again for cells whose cached answer was flagged (``"malformed"`` or ``"out_of_list"``)
        and replace it. Cells whose request failed are always asked again on a rerun; valid
        answers never are.
    price_per_1m_tokens
        ``(input, output)`` price per million tokens, to add a ``"cost"`` to the usage summary.
    key_added
        Prefix of the outputs.
    copy
        Return a copy instead of writing into ``adata``.

    Returns
    -------
    ``None`` or a copy. Sets

    - ``obs[key_added]``: the label of run 1 for annotated cells (NaN elsewhere);
    - ``obs[f"{key_added}_fallback"]``: ``"ok"``, or why the first option was used instead
      (``"malformed"``: no JSON/label could be read; ``"out_of_list"``: a label not offered;
      ``"failed"``: no answer, the request failed for good);
    - ``obs[f"{key_added}_error"]``: for failed cells, the reason (HTTP status and the server's
      message, credentials redacted); NaN elsewhere;
    - with ``n_runs > 1`` also ``obs[f"{key_added}_run{r}"]``, ``…_run{r}_fallback`` and ``…_run{r}_error``;
    - ``uns[key_added]``: ``params`` (model, mode, template, base URL without credentials, …),
      ``labels`` (zero-shot list), ``metrics`` (per-run accuracy and macro P/R/F1,
      ``accuracy_mean``, ``accuracy_sd`` (ddof=1), the candidates' top-1 ``baseline_accuracy``
      on the same cells in re-rank mode; flagged cells count with their first option),
      ``outcomes`` (answers per reason over all runs), ``fallbacks`` (table of flagged answers
      with the error of failed ones), ``usage`` (requests, retries, rejected, failed, cache
      hits, tokens), ``response_format`` (the form the server accepted) and
      ``structured_output`` (whether the server constrained the answers).
    """
    if mode not in ("rerank", "zero_shot"):
        raise ValueError(f"mode must be 'rerank' or 'zero_shot', got {mode!r}.")
    if n_runs < 1:
        raise ValueError(f"n_runs must be at least 1, got {n_runs}.")
    adata = maybe_copy(adata, copy)
    labels_key = _labels_key(adata, labels_key, candidates_key)
    template = template or (RERANK_TEMPLATE if mode == "rerank" else ZERO_SHOT_TEMPLATE)
    _check_template(template, ("labels", "sentence"))
    if split_key is not None and not _has_training_cells(adata, split_key, train_value):
        if mode == "rerank" or labels is not None:
            # A query-only AnnData: nothing was held out, every cell is a query.
            logger.info(
                "llm_annotate: no cell has obs[%r] == %r; annotating all cells.", split_key, train_value
            )
            split_key = None
    idx = _select_cells(adata, cells, split_key, train_value, n_cells, random_state)
    sentences = _sentences(adata, sentence_key, idx, n_genes)
    options, zero_shot_labels = _options(
        adata, idx, mode, candidates_key, labels, labels_key, split_key, train_value
    )
    extra = {**({} if temperature is None else {"temperature": temperature}), **(params or {})}

    client_kwargs = dict(
        base_url=base_url, api_key=api_key, api_key_env=api_key_env, timeout=timeout,
        max_retries=max_retries, max_concurrency=max_concurrency, cache_dir=cache_dir,
    )  # fmt: skip
    with _client_for(model, client_kwargs) as client:
        before = dataclasses.replace(client.usage)
        answers, errors = _ask(
            client, adata.obs_names[idx], sentences, options, template, extra, n_runs, retry_flagged
        )

    preds, reasons, flagged = _decide(answers, errors, options, adata.obs_names[idx])
    _write_obs(adata, key_added, idx, preds, reasons, errors, options)
    adata.uns[key_added] = {
        "params": {
            "mode": mode, "model": client.model, "base_url": client.base_url, "template": template,
            "candidates_key": candidates_key if mode == "rerank" else None, "labels_key": labels_key,
            "sentence_key": sentence_key, "n_genes": n_genes, "n_runs": n_runs, "n_cells": len(idx),
            "random_state": random_state, "request_params": json.dumps(extra, sort_keys=True),
        },
        "labels": zero_shot_labels if zero_shot_labels is not None else [],
        "metrics": _metrics(adata, labels_key, idx, preds, options, mode),
        "outcomes": {r: int(sum(run.count(r) for run in reasons)) for r in REASONS},
        "fallbacks": flagged,
        "usage": client.usage.since(before).summary(price_per_1m_tokens),
        "response_format": client.response_format,
        "structured_output": client.response_format != "text",
    }  # fmt: skip
    n_failed = adata.uns[key_added]["outcomes"]["failed"]
    if n_failed:
        logger.warning(
            "llm_annotate: %d of %d answers failed (see obs[%r]); call again to ask for them again.",
            n_failed, len(idx) * n_runs, f"{key_added}_error",
        )  # fmt: skip
    n_flag = len(flagged)
    logger.info("llm_annotate: %d cells × %d runs, %d answers flagged.", len(idx), n_runs, n_flag)
    return adata if copy else None


def _labels_key(adata: AnnData, labels_key: str | None, candidates_key: str) -> str | None:
    if labels_key is not None:
        if labels_key not in adata.obs:
            raise KeyError(f"Column {labels_key!r} not found in adata.obs.")
        return labels_key
    recorded = adata.uns.get(candidates_key, {})
    recorded = recorded.get("params", {}).get("labels_key") if isinstance(recorded, Mapping) else None
    return recorded if recorded in adata.obs else None


def _has_training_cells(adata: AnnData, split_key: str, train_value: str) -> bool:
    return split_key in adata.obs and bool((adata.obs[split_key].astype(str) == str(train_value)).any())


def _check_template(template: str, required: Sequence[str]) -> None:
    if not isinstance(template, str):
        raise TypeError(f"template must be a string, got {type(template).__name__}.")
    missing = ["{" + f + "}" for f in required if "{" + f + "}" not in template]
    if missing:
        need = " and ".join("{" + f + "}" for f in required)
        raise ValueError(
            f"The template lacks {', '.join(missing)}: it must contain {need}, got {template!r}."
        )


def _render(template: str, **fields: str) -> str:
    """Fill ``{name}`` fields in one pass; other braces (JSON examples) and braces inside the
    values are left alone, unlike ``str.format``."""
    return _FIELD.sub(lambda m: fields[m.group(1)] if m.group(1) in fields else m.group(0), template)


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
                raise ValueError(f"`cells` names some cells more than once: {format_examples(uniq[counts > 1].tolist())}.")
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
    if sentence_key not in adata.obs:
        raise KeyError(
            f"Column {sentence_key!r} not found in adata.obs; create it with sc_llm.pp.cell_sentences."
        )
    col = adata.obs[sentence_key].iloc[idx]
    missing = col.isna().to_numpy()
    if missing.any():
        raise ValueError(f"obs[{sentence_key!r}] is missing for cells {format_examples(col.index[missing])}.")
    sentences = col.astype(str).tolist()
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
                "Zero-shot mode needs `labels`, or `labels_key` and `split_key` to read training labels."
            )
        train = train_mask(adata, split_key, train_value)
        labels = sorted(adata.obs[labels_key][train].dropna().astype(str).unique())
    labels = list(dict.fromkeys(str(label) for label in labels))
    if len(labels) < 2:
        raise ValueError(f"Zero-shot mode needs at least two labels, got {labels}.")
    return [labels] * len(idx), labels


def _schema(options: Sequence[str], field: str = ANSWER_FIELD) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {field: {"type": "string", "enum": list(options)}},
        "required": [field],
        "additionalProperties": False,
    }


def _ask(client, names, sentences, options, template, extra, n_runs, retry_flagged=False):
    """Answers and errors as ``answers[run][cell]``, ``errors[run][cell]`` (answers are ``None``
    where a single option needs no request or the request failed; errors are ``None`` unless it failed)."""
    requests, where = [], []
    for r in range(n_runs):
        for i, (name, sentence, opts) in enumerate(zip(names, sentences, options, strict=True)):
            if len(opts) < 2:
                continue
            prompt = _render(template, labels=str(list(opts)), sentence=sentence)
            requests.append(
                ChatRequest(
                    messages=[{"role": "user", "content": prompt}],
                    schema=_schema(opts),
                    tag={"run": r},
                    name=str(name) if n_runs == 1 else f"{name} (run {r + 1})",
                    params=extra or None,
                )
            )
            where.append((r, i))
    results = client.complete_many(requests, desc="LLM annotation", errors="return")
    if retry_flagged:
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


def parse_answer(content: str, allowed: Sequence[str], field: str = ANSWER_FIELD) -> tuple[str | None, str]:
    """Read one allowed value from a model's answer: ``(value, "ok")`` or ``(None, reason)``.

    Accepts a JSON object ``{field: value}`` (also inside a code fence or after a reasoning model's
    ``<think>`` block), a JSON string, or the bare value. Values match exactly, else ignoring case
    and surrounding whitespace/quotes/full stops when that identifies one allowed value.
    """
    text = _THINK.sub("", content or "").strip()
    value, parsed = _json_value(text, field)
    if not parsed:
        value = text
    if not isinstance(value, str | int) or isinstance(value, bool):
        return None, "malformed"
    match = _match(str(value), allowed)
    if match is not None:
        return match, "ok"
    return None, "out_of_list" if parsed else "malformed"


def _json_value(text: str, field: str) -> tuple[Any, bool]:
    candidates = [text, *_JSON_OBJECT.findall(text)]
    for chunk in candidates:
        try:
            obj = json.loads(chunk)
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj.get(field), True
        if isinstance(obj, str | int) and not isinstance(obj, bool):
            return obj, True
    return None, False


def _match(value: str, allowed: Sequence[str]) -> str | None:
    if value in allowed:
        return value

    def norm(s: str) -> str:
        return " ".join(s.strip().strip("\"'`.").split()).casefold()

    hits = [a for a in allowed if norm(a) == norm(value)]
    return hits[0] if len(hits) == 1 else None


def _decide(answers, errors, options, names):
    """Per-run predictions and reasons; a bad answer or a failed request becomes the cell's first
    option, flagged."""
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
    out: dict[str, Any] = {
        "runs": {str(r + 1): m for r, m in enumerate(runs)},
        "accuracy": acc,
        "accuracy_mean": float(acc.mean()),
        "accuracy_sd": float(acc.std(ddof=1)) if acc.size > 1 else float("nan"),
        "n_cells": int(have.sum()),
    }
    if mode == "rerank":
        first = np.array([o[0] for o in options], dtype=object)[have]
        out["baseline_accuracy"] = float((first == y).mean())
    return out


@dataclasses.dataclass
class MarkerMatching:
    """Result of :func:`llm_marker_matching`: ``n_correct`` of ``n_total`` held-out markers matched."""

    n_correct: int
    n_total: int
    table: pd.DataFrame
    usage: dict[str, Any]

    def __str__(self) -> str:
        return f"{self.n_correct}/{self.n_total}"


def llm_marker_matching(
    markers: Mapping[str, Sequence[str]] | pd.DataFrame,
    *,
    model: str | ChatClient,
    n_markers: int = 5,
    template: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    api_key_env: str = DEFAULT_API_KEY_ENV,
    temperature: float | None = 0.0,
    params: Mapping[str, Any] | None = None,
    max_concurrency: int = 8,
    timeout: float = 120.0,
    max_retries: int = 6,
    cache_dir: str | bool | None = None,
) -> MarkerMatching:
    """Test an LLM's marker-gene knowledge (the paper's Appendix A.3.3, Tables 25–26).

    Each cell type's top ``n_markers`` markers are split into the first (held out) and the rest.
    For every held-out gene the model sees the lists of remaining markers of all types, numbered
    in the given type order and without type names, and must answer the number of the list of the
    same cell type (structured output: ``{"list": "<number>"}``).

    Parameters
    ----------
    markers
        Ranked markers per cell type: a mapping ``{type: [gene, …]}`` or a DataFrame with one
        column per type (as ``pd.DataFrame(adata.uns["rank_genes_groups"]["names"])``).
    model
        Model name or a :class:`sc_llm.tl.ChatClient`.
    n_markers
        Markers used per type (the paper: top 5 from PanglaoDB).
    template
        Prompt with ``{gene}`` and ``{lists}`` fields, both required (``None``: :data:`MARKER_TEMPLATE`);
        other braces stay as written.
    base_url, api_key, api_key_env, params, max_concurrency, timeout, max_retries, cache_dir
        As in :func:`llm_annotate`.
    temperature
        The paper used 0 for this experiment.

    Returns
    -------
    A :class:`MarkerMatching` with ``n_correct``, ``n_total`` (``str()`` gives ``"7/10"``), the
    per-type ``table`` (held-out gene, true and answered list number, answered type, correct,
    reason: ``"ok"``, ``"malformed"``, ``"out_of_list"`` or ``"failed"``, and the error of a
    failed request) and the token ``usage``. A failed request counts as not matched.
    """
    lists = _marker_lists(markers, n_markers)
    types = list(lists)
    numbers = [str(i + 1) for i in range(len(types))]
    rendered = "\n".join(f"{n}. {', '.join(lists[t][1:])}" for n, t in zip(numbers, types, strict=True))
    template = template or MARKER_TEMPLATE
    _check_template(template, ("gene", "lists"))
    extra = {**({} if temperature is None else {"temperature": temperature}), **(params or {})}
    schema = _schema(numbers, field="list")
    requests = [
        ChatRequest(
            messages=[{"role": "user", "content": _render(template, gene=lists[t][0], lists=rendered)}],
            schema=schema,
            name=f"marker {lists[t][0]} ({t})",
            params=extra or None,
        )
        for t in types
    ]
    client_kwargs = dict(
        base_url=base_url, api_key=api_key, api_key_env=api_key_env, timeout=timeout,
        max_retries=max_retries, max_concurrency=max_concurrency, cache_dir=cache_dir,
    )  # fmt: skip
    with _client_for(model, client_kwargs) as client:
        before = dataclasses.replace(client.usage)
        results = client.complete_many(requests, desc="Marker matching", errors="return")
    rows = []
    for n, t, res in zip(numbers, types, results, strict=True):
        answer, reason = parse_answer(res.content, numbers, field="list") if res.ok else (None, "failed")
        rows.append({
            "cell_type": t, "held_out": lists[t][0], "true_list": int(n),
            "answer": int(answer) if answer else pd.NA, "answered_type": types[int(answer) - 1] if answer else None,
            "correct": answer == n, "reason": reason, "error": res.error or "",
        })  # fmt: skip
    table = pd.DataFrame(rows).set_index("cell_type")
    table["answer"] = table["answer"].astype("Int64")
    return MarkerMatching(
        int(table["correct"].sum()), len(types), table, client.usage.since(before).summary()
    )


def _marker_lists(markers, n_markers: int) -> dict[str, list[str]]:
    if n_markers < 2:
        raise ValueError(f"n_markers must be at least 2 (one held out, one to match), got {n_markers}.")
    if isinstance(markers, pd.DataFrame):
        markers = {str(c): markers[c].dropna().tolist() for c in markers.columns}
    lists = {str(t): [str(g) for g in genes][:n_markers] for t, genes in markers.items()}
    short = [t for t, genes in lists.items() if len(genes) < 2]
    if short:
        raise ValueError(f"Cell types with fewer than 2 markers: {format_examples(short)}.")
    if len(lists) < 2:
        raise ValueError("Marker matching needs at least two cell types.")
    return lists


@contextlib.contextmanager
def _client_for(model: str | ChatClient, client_kwargs: Mapping[str, Any]):
    """Use the caller's :class:`ChatClient` as is, or build one for a model name and close it after."""
    if isinstance(model, ChatClient):
        yield model
        return
    client = ChatClient(model, **client_kwargs)
    try:
        yield client
    finally:
        client.close()
