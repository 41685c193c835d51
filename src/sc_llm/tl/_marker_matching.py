"""scl.tl.llm_marker_matching: a generative LLM's marker-gene knowledge (the paper's Appendix A.3.3).

Next to the other marker analyses (:mod:`sc_llm.tl._markers`), whose :func:`read_markers` reads the
marker sets; the client, prompt and answer parsing live in :mod:`sc_llm.llm`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from sc_llm._docs import doc_llm_client_kwargs, doc_llm_model, doc_params
from sc_llm._utils import format_examples
from sc_llm.llm._answers import answer_schema, parse_answer
from sc_llm.llm._client import ChatClient, ChatRequest
from sc_llm.llm._open import open_client
from sc_llm.llm._prompts import MARKER_TEMPLATE, check_template, render

from ._markers import read_markers

#: Temperature of the paper's marker-matching experiment, used unless the call or the client sets one.
DEFAULT_TEMPERATURE = 0.0


@dataclasses.dataclass
class MarkerMatching:
    """Result of :func:`~sc_llm.tl.llm_marker_matching`: ``n_correct`` of ``n_total`` held-out markers matched.

    Parameters
    ----------
    n_correct
        Held-out markers whose list the model named.
    n_total
        Cell types asked about (one held-out marker each).
    table
        One row per cell type: held-out gene, true and answered list number, answered type, correct,
        reason (``"ok"``, ``"malformed"``, ``"out_of_list"`` or ``"failed"``) and the error of a failed
        request.
    usage
        Requests, cache hits and tokens of the call.
    params
        The call's settings: model, base URL (without credentials), ``n_markers``, template and
        request fields.
    """

    n_correct: int
    n_total: int
    table: pd.DataFrame
    usage: dict[str, Any]
    params: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.n_correct}/{self.n_total}"


@doc_params(doc_llm_model=doc_llm_model, doc_llm_client_kwargs=doc_llm_client_kwargs)
def llm_marker_matching(
    markers: Mapping[str, Sequence[str]] | pd.DataFrame | str | Path,
    model: str | ChatClient,
    *,
    n_markers: int = 5,
    template: str | None = None,
    client_kwargs: Mapping[str, Any] | None = None,
) -> MarkerMatching:
    """Test an LLM's marker-gene knowledge (the paper's Appendix A.3.3, Tables 25–26).

    Each cell type's top ``n_markers`` markers are split into the first (held out) and the rest.
    For every held-out gene the model sees the lists of remaining markers of all types, numbered
    in the given type order and without type names, and must answer the number of the list of the
    same cell type (structured output: ``{"list": "<number>"}``). Answers are cached and a failed
    request counts as not matched, as in :func:`~sc_llm.tl.llm_annotate`.

    Parameters
    ----------
    markers
        Ranked markers per cell type: a mapping ``{type: [gene, …]}``, a GMT file (see
        :func:`read_markers`), or a DataFrame with one column per type (as
        ``pd.DataFrame(adata.uns["rank_genes_groups"]["names"])``). Genes are de-duplicated,
        first occurrence kept.
    {doc_llm_model}
    n_markers
        Markers used per type (the paper: top 5 from PanglaoDB).
    template
        Prompt with ``{gene}`` and ``{lists}`` fields, both required (``None``:
        :data:`sc_llm.llm.MARKER_TEMPLATE`); other braces stay as written.
    {doc_llm_client_kwargs}
        The temperature is 0 (the paper's) unless ``client_kwargs`` or the client sets one.

    Returns
    -------
    result : sc_llm.tl.MarkerMatching
        A :class:`MarkerMatching` with ``n_correct``, ``n_total`` (``str()`` gives ``"7/10"``), the
        per-type ``table``, the token ``usage`` and the call's ``params``.
    """
    lists = _marker_lists(markers, n_markers)
    template = template or MARKER_TEMPLATE
    check_template(template, ("gene", "lists"))
    types = list(lists)
    numbers = [str(i + 1) for i in range(len(types))]
    rendered = "\n".join(f"{n}. {', '.join(lists[t][1:])}" for n, t in zip(numbers, types, strict=True))
    schema = answer_schema(numbers, field="list")
    with open_client(model, client_kwargs) as call:
        client = call.client
        extra = dict(call.params)
        if not _sets_temperature(client_kwargs) and "temperature" not in client.params:
            extra["temperature"] = DEFAULT_TEMPERATURE
        requests = [
            ChatRequest(
                messages=[{"role": "user", "content": render(template, gene=lists[t][0], lists=rendered)}],
                schema=schema,
                name=f"marker {lists[t][0]} ({t})",
                params=extra or None,
            )
            for t in types
        ]
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
    params = {
        "model": client.model, "base_url": client.base_url, "n_markers": n_markers, "template": template,
        "request_params": json.dumps({**client.params, **extra}, sort_keys=True),
    }  # fmt: skip
    usage = client.usage.since(before).summary(call.price_per_1m_tokens)
    return MarkerMatching(int(table["correct"].sum()), len(types), table, usage, params)


def _sets_temperature(client_kwargs: Mapping[str, Any] | None) -> bool:
    """Whether the call chose a temperature (``None`` included: then none is sent)."""
    kwargs = client_kwargs or {}
    return "temperature" in kwargs or "temperature" in (kwargs.get("params") or {})


def _marker_lists(markers, n_markers: int) -> dict[str, list[str]]:
    if n_markers < 2:
        raise ValueError(f"n_markers must be at least 2 (one held out, one to match), got {n_markers}.")
    if isinstance(markers, pd.DataFrame):
        # One column per type, ranked (rank_genes_groups' names), unlike read_markers' long tables.
        markers = {str(c): markers[c].dropna().tolist() for c in markers.columns}
    lists = {t: genes[:n_markers] for t, genes in read_markers(markers).items()}
    short = [t for t, genes in lists.items() if len(genes) < 2]
    if short:
        raise ValueError(f"Cell types with fewer than 2 markers: {format_examples(short)}.")
    if len(lists) < 2:
        raise ValueError("Marker matching needs at least two cell types.")
    return lists
