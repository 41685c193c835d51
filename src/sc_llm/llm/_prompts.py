"""The paper's prompts, and filling a template's fields safely.

The words are the paper's (Figures 4 and 5, Appendix A.3.3); the label list is rendered as Python's
``str(list)``, which is what the figures' ``"+ [list] +"`` concatenation produces. The line breaks are
our choice.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

#: Zero-shot classification among all training labels (the paper's Figure 4).
ZERO_SHOT_TEMPLATE = (
    "Given the cell described. Output ONLY the most likely cell type from the following list: {labels}\n"
    '"""{sentence}"""'
)
#: Re-ranking the kNN candidates, the first when uncertain (the paper's Figure 5).
RERANK_TEMPLATE = (
    "Given the cell described. Output ONLY the most likely cell type from the following list: {labels}\n"
    "If you are not certain about what cell type this is, conclude that it is the first option in the list\n"
    '"""{sentence}"""'
)
#: Marker matching (the paper's Appendix A.3.3).
MARKER_TEMPLATE = (
    "Which of the following lists of marker genes belongs to the same cell type as the gene {gene}? "
    "Output ONLY the number of that list.\n{lists}"
)
_FIELD = re.compile(r"\{(\w+)\}")


def check_template(template: str, required: Sequence[str]) -> None:
    """Refuse a template that is not a string or lacks one of the ``required`` ``{field}`` s."""
    if not isinstance(template, str):
        raise TypeError(f"template must be a string, got {type(template).__name__}.")
    missing = ["{" + f + "}" for f in required if "{" + f + "}" not in template]
    if missing:
        need = " and ".join("{" + f + "}" for f in required)
        raise ValueError(
            f"The template lacks {', '.join(missing)}: it must contain {need}, got {template!r}."
        )


def render(template: str, **fields: str) -> str:
    """Fill ``{name}`` fields in one pass.

    Other braces (JSON examples) and braces inside the values are left alone, unlike ``str.format``.
    """
    return _FIELD.sub(lambda m: fields[m.group(1)] if m.group(1) in fields else m.group(0), template)
