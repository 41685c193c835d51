"""Reading a model's answer: one value out of an allowed list, or the reason there is none.

Answers are requested as a JSON object ``{field: value}`` whose value a JSON schema constrains to the
allowed list (:func:`answer_schema`), but every answer is validated whatever the server enforced:
:func:`parse_answer` accepts the object (also in a code fence or after a reasoning model's
``<think>`` block), a JSON string or the bare value, and says why when none of them is allowed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

#: The JSON field holding the answer of :func:`sc_llm.tl.llm_annotate`.
ANSWER_FIELD = "cell_type"
#: Outcomes of one question: an allowed value (``"ok"``), no value that could be read
#: (``"malformed"``), a value not offered (``"out_of_list"``), or no answer at all (``"failed"``).
REASONS = ("ok", "malformed", "out_of_list", "failed")
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_JSON_OBJECT = re.compile(r"\{.*?\}", re.DOTALL)


def answer_schema(allowed: Sequence[str], field: str = ANSWER_FIELD) -> dict[str, Any]:
    """JSON schema of an object with the one required string ``field`` whose value is one of ``allowed``.

    Parameters
    ----------
    allowed
        The values the answer may take (an ``enum``), in the order offered.
    field
        Name of the answer's field.

    Returns
    -------
    schema : dict
        A JSON schema (dict) for :class:`~sc_llm.llm.ChatRequest`'s ``schema``.
    """
    return {
        "type": "object",
        "properties": {field: {"type": "string", "enum": list(allowed)}},
        "required": [field],
        "additionalProperties": False,
    }


def parse_answer(content: str, allowed: Sequence[str], field: str = ANSWER_FIELD) -> tuple[str | None, str]:
    """Read one allowed value from a model's answer.

    Accepts a JSON object ``{field: value}`` (also inside a code fence or after a reasoning model's
    ``<think>`` block), a JSON string, or the bare value. Values match exactly, else ignoring case
    and surrounding whitespace/quotes/full stops when that identifies one allowed value.

    Parameters
    ----------
    content
        The answer's text.
    allowed
        The values offered.
    field
        The JSON field holding the value.

    Returns
    -------
    value : str or None
        The answer's value; ``None`` when none could be read or it was not offered.
    reason : str
        ``"ok"``; ``"malformed"`` when no value could be read; ``"out_of_list"`` when JSON
        held a value that was not offered.
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
