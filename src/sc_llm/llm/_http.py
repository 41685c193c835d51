"""Wire-level pieces of the chat client: reading answer bodies, credentials, Retry-After, deadlines.

Kept apart from :class:`~sc_llm.llm.ChatClient` (which owns retries, concurrency and the cache) so each
piece can be read and tested on its own. httpx/httpcore are imported only inside the functions that
need them.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
import time
from collections.abc import Iterator, Sequence
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from sc_llm._utils import import_optional, logger

_REDACT = [
    (re.compile(r"(?i)\b(bearer|basic|token)(\s+)[A-Za-z0-9._~+/=:-]{4,}"), r"\1\2[REDACTED]"),
    (
        re.compile(
            r"(?i)([\"']?(?:authorization|api[-_]?key|x-api-key|access[-_]?token)[\"']?\s*[:=]\s*[\"']?)"
            r"(?!\[REDACTED\])[^\"'\s,;}]+"
        ),
        r"\1[REDACTED]",
    ),
    (re.compile(r"(?i)\b(sk-[A-Za-z0-9_-]{8,})"), "[REDACTED]"),
    (re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://)[^/\s@]+@"), r"\1[REDACTED]@"),
]
_DEADLINE = threading.local()  # per worker thread: time.monotonic() by which the attempt must end


@contextlib.contextmanager
def attempt_deadline(seconds: float) -> Iterator[None]:
    """Bound every socket operation of this thread's request to end within ``seconds`` from now."""
    _DEADLINE.value = time.monotonic() + seconds
    try:
        yield
    finally:
        _DEADLINE.value = None


def content_text(content: Any) -> str | None:
    """A message's text: a string, or the text parts of a list of content parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            p if isinstance(p, str) else p.get("text")
            for p in content
            if isinstance(p, str) or isinstance(p, dict) and isinstance(p.get("text"), str)
        ]
        return "".join(texts) if texts else None
    return None


def read_usage(raw: dict) -> dict[str, int]:
    """Prompt, completion and reasoning token counts of a response's ``usage`` object (0 when unreadable)."""
    details = raw.get("completion_tokens_details")
    details = details if isinstance(details, dict) else {}
    return {
        "prompt_tokens": _count(raw.get("prompt_tokens")),
        "completion_tokens": _count(raw.get("completion_tokens")),
        "reasoning_tokens": _count(details.get("reasoning_tokens")),
    }


def _count(value: Any) -> int:
    """A token count, or 0 for anything that is not a non-negative whole number."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, str):
        value = value.strip()
        return int(value) if value.isdigit() else 0
    if isinstance(value, int | float) and math.isfinite(value) and value >= 0 and float(value).is_integer():
        return int(value)
    return 0


def http_problem(response) -> str:
    """``"HTTP <status>: <the server's message>"`` of an error response (message cut at 300 characters)."""
    try:
        detail = response.json().get("error", {})
        detail = detail.get("message", detail) if isinstance(detail, dict) else detail
    except (ValueError, AttributeError):
        detail = response.text
    return f"HTTP {response.status_code}: {str(detail)[:300]}"


def redact(text: str, secrets: Sequence[str] = ()) -> str:
    """``text`` with each of ``secrets`` and anything that looks like a credential replaced by ``[REDACTED]``."""
    for secret in secrets:
        text = text.replace(secret, "[REDACTED]")
    for pattern, repl in _REDACT:
        text = pattern.sub(repl, text)
    return text


def split_userinfo(url: str) -> tuple[str, tuple[str, str] | None]:
    """``url`` without ``user:password@``, and the credentials (sent as basic auth, never stored)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    return urlunsplit(parts._replace(netloc=host)), (unquote(user), unquote(password))


def retry_after(headers) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (delta seconds or HTTP date)."""
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if not value:
            continue
        try:
            seconds = float(value) / scale
        except ValueError:
            if scale != 1.0:
                continue
            try:
                seconds = parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError):
                return None
        return seconds if math.isfinite(seconds) else None
    return None


# --- whole-request deadlines ------------------------------------------------------------------------
# httpx's timeouts bound each read, so a server that sends a byte just before each read times out
# keeps a request alive forever. Every socket operation of an attempt is clipped to the time left
# until the attempt's deadline (set per thread by attempt_deadline) by wrapping the connection
# pool's network backend.


def _time_left(kind: str, timeout: float | None) -> float | None:
    deadline = getattr(_DEADLINE, "value", None)
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        httpcore = import_optional("httpcore", "llm", "LLM annotation")
        error = {"read": httpcore.ReadTimeout, "write": httpcore.WriteTimeout}.get(
            kind, httpcore.ConnectTimeout
        )
        raise error("the request deadline (ChatClient.timeout) passed")
    return left if timeout is None else min(timeout, left)


def enforce_deadlines(client) -> None:
    """Make :func:`attempt_deadline` bound every socket operation of the ``httpx.Client`` ``client``."""
    httpcore = import_optional("httpcore", "llm", "LLM annotation")

    class Stream(httpcore.NetworkStream):
        def __init__(self, inner):
            self._inner = inner

        def read(self, max_bytes, timeout=None):
            return self._inner.read(max_bytes, _time_left("read", timeout))

        def write(self, buffer, timeout=None):
            return self._inner.write(buffer, _time_left("write", timeout))

        def close(self):
            self._inner.close()

        def start_tls(self, ssl_context, server_hostname=None, timeout=None):
            return Stream(self._inner.start_tls(ssl_context, server_hostname, _time_left("connect", timeout)))

        def get_extra_info(self, info):
            return self._inner.get_extra_info(info)

    class Backend(httpcore.NetworkBackend):
        def __init__(self, inner):
            self._inner = inner

        def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
            timeout = _time_left("connect", timeout)
            return Stream(self._inner.connect_tcp(host, port, timeout, local_address, socket_options))

        def connect_unix_socket(self, path, timeout=None, socket_options=None):
            return Stream(
                self._inner.connect_unix_socket(path, _time_left("connect", timeout), socket_options)
            )

        def sleep(self, seconds):
            self._inner.sleep(seconds)

    transports = [getattr(client, "_transport", None), *getattr(client, "_mounts", {}).values()]
    n = 0
    for transport in transports:
        pool = getattr(transport, "_pool", None)
        if pool is not None and hasattr(pool, "_network_backend"):
            pool._network_backend = Backend(pool._network_backend)
            n += 1
    if not n:  # pragma: no cover - a future httpx/httpcore layout
        logger.warning("Could not install the request deadline; ChatClient.timeout bounds each read only.")
