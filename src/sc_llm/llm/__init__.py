"""Generative LLMs over OpenAI-compatible chat APIs: the client, the paper's prompts, answer parsing.

:func:`sc_llm.tl.llm_annotate` and :func:`sc_llm.tl.llm_marker_matching` are built on these pieces;
use them directly to ask other questions with the same retries, deadlines, resumable cache and
negotiated structured output::

    from sc_llm.llm import ChatClient, ChatRequest, answer_schema, parse_answer

    client = ChatClient("qwen2.5", base_url="http://localhost:8080/v1", temperature=0)
    allowed = ["B cell", "T cell"]
    request = ChatRequest([{"role": "user", "content": "CD79A is a marker of?"}], schema=answer_schema(allowed))
    label, reason = parse_answer(client.complete(request).content, allowed)

Importing this module does not import httpx; the first request does.
"""

from ._answers import ANSWER_FIELD, REASONS, answer_schema, parse_answer
from ._client import (
    DEFAULT_API_KEY_ENV,
    RESPONSE_FORMATS,
    ChatClient,
    ChatError,
    ChatRequest,
    ChatResult,
    Usage,
    default_cache_dir,
)
from ._prompts import MARKER_TEMPLATE, RERANK_TEMPLATE, ZERO_SHOT_TEMPLATE

__all__ = ["ChatClient", "ChatError", "ChatRequest", "ChatResult", "Usage", "default_cache_dir"]
__all__ += ["DEFAULT_API_KEY_ENV", "RESPONSE_FORMATS"]
__all__ += ["ANSWER_FIELD", "REASONS", "answer_schema", "parse_answer"]
__all__ += ["MARKER_TEMPLATE", "RERANK_TEMPLATE", "ZERO_SHOT_TEMPLATE"]
