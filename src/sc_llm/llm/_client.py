"""A small, robust client for OpenAI-compatible chat completion APIs.

Hosted APIs (OpenAI, Fireworks, Together, …) and local servers (vLLM, llama.cpp's
``llama-server``, Ollama, LM Studio) all speak ``POST {base_url}/chat/completions``. This client
adds what a many-thousand-request annotation run needs and the bare protocol lacks:

- a deadline per attempt (the whole request, not each read), and retries with exponential backoff
  and jitter on 408/409/429/5xx and connection errors, honouring ``Retry-After`` (seconds or HTTP
  date) and ``retry-after-ms``;
- bounded concurrency (a thread pool sharing one connection pool);
- an on-disk cache, one JSON file per request keyed by a hash of (server, model, messages,
  parameters, schema, tag), written atomically as each answer arrives and only once it parsed, so
  an interrupted run resumes without paying again and nothing already answered is lost;
- per-request outcomes: one request that fails for good is reported as that request's failure
  (:attr:`ChatResult.error`) instead of aborting the others;
- structured output negotiated once per client: ``response_format`` of type ``json_schema``
  (OpenAI, vLLM), else ``json_object`` with a ``schema`` (llama.cpp), else plain text with the
  schema in the prompt; a request the server rejects as malformed is never retried;
- error texts with credentials redacted, and token usage accounting (prompt, completion,
  reasoning tokens; cache hits; retries).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from sc_llm._progress import progress
from sc_llm._utils import import_optional, logger

from ._http import (
    attempt_deadline,
    content_text,
    enforce_deadlines,
    http_problem,
    read_usage,
    redact,
    retry_after,
    split_userinfo,
)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
RETRY_STATUS = frozenset({408, 409, 425, 429})
MAX_RETRY_AFTER = 600.0
JSON_INSTRUCTION = "Respond with only a JSON object matching this JSON schema, and nothing else: {schema}"
#: Structured-output forms, most to least constrained; a client starts at the first and steps down
#: when the server rejects one (OpenAI and vLLM take json_schema, llama.cpp json_object + schema).
RESPONSE_FORMATS = ("json_schema", "json_object", "text")
_CACHE_VERSION = 2  # 2: the server address is part of the key
_FORMAT_WORDS = re.compile(r"response_format|json_schema|json_object|structured output|guided", re.IGNORECASE)
# llama-cpp-python answers an unknown response_format type with HTTP 500 and pydantic's message.
_LLAMA_CPP_FORMAT_500 = re.compile(
    r"response_format.*(Input should be|literal_error|validation error)", re.I | re.S
)


class ChatError(RuntimeError):
    """A chat request failed for good (non-retryable status, retries exhausted, unusable answer)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        name: str | None = None,
        rejected_format: bool = False,
    ):
        super().__init__(message)
        self.status = status
        self.name = name
        self.rejected_format = rejected_format


@dataclass
class ChatRequest:
    """One logical request: the messages, an optional JSON schema for the answer, and a cache tag.

    ``tag`` is part of the cache key but never sent: it makes repeated runs of the same prompt
    (``{"run": 2}``) independent calls. ``name`` only appears in error messages (e.g. a cell name).
    ``params`` are request fields added to (and overriding) the client's ``params``. ``refresh``
    asks again even when the cache holds an answer, and replaces it.
    """

    messages: list[dict[str, str]]
    schema: dict[str, Any] | None = None
    tag: Any = None
    name: str | None = None
    params: dict[str, Any] | None = None
    refresh: bool = False


@dataclass
class ChatResult:
    """An answer (``error is None``) or the reason there is none.

    ``response_format`` is the form the answer was asked in (``"json_schema"``, ``"json_object"``
    or ``"text"``); ``structured`` is true when the server was asked to constrain it.
    """

    content: str
    usage: dict[str, int]
    cached: bool
    structured: bool
    error: str | None = None
    status: int | None = None
    response_format: str | None = None

    @property
    def ok(self) -> bool:
        """Whether there is an answer."""
        return self.error is None


@dataclass
class Usage:
    """Token and request counters (cache hits cost nothing and are counted apart).

    ``requests`` counts HTTP requests sent, ``retries`` those repeated after a transient failure,
    ``rejected`` those the server refused as malformed during response-format negotiation, and
    ``failed`` logical requests that ended without an answer.
    """

    requests: int = 0
    retries: int = 0
    cached: int = 0
    rejected: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0

    def add(self, other: Usage) -> None:
        """Add ``other``'s counts to these."""
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)

    def since(self, before: Usage) -> Usage:
        """The counts accumulated since the copy ``before`` was taken."""
        return Usage(**{k: v - getattr(before, k) for k, v in asdict(self).items()})

    def summary(self, price_per_1m_tokens: tuple[float, float] | None = None) -> dict[str, Any]:
        """The counts as a dict with ``total_tokens``, and the ``cost`` when prices per million tokens are given."""
        out: dict[str, Any] = asdict(self)
        out["total_tokens"] = self.prompt_tokens + self.completion_tokens
        if price_per_1m_tokens is not None:
            p_in, p_out = price_per_1m_tokens
            out["cost"] = (self.prompt_tokens * p_in + self.completion_tokens * p_out) / 1e6
        return out


def with_temperature(params: Mapping[str, Any] | None, temperature: float | None) -> dict[str, Any]:
    """A copy of the request fields ``params`` with ``temperature`` added (unless ``None``).

    A temperature given both ways must agree, so that no call silently drops one of them.
    """
    out = dict(params or {})
    if temperature is not None:
        if out.get("temperature", temperature) != temperature:
            raise ValueError(
                f"temperature={temperature} and params['temperature']={out['temperature']} disagree; "
                "pass one of them."
            )
        out["temperature"] = temperature
    return out


def default_cache_dir() -> Path:
    """``$SC_LLM_CACHE`` or ``$XDG_CACHE_HOME/sc_llm/chat`` (``~/.cache/sc_llm/chat``).

    Returns
    -------
    path : pathlib.Path
        The folder (not created here).
    """
    if os.environ.get("SC_LLM_CACHE"):
        return Path(os.environ["SC_LLM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sc_llm" / "chat"


@dataclass
class ChatClient:
    """Chat completions over an OpenAI-compatible HTTP API.

    Parameters
    ----------
    model
        Model name as the server knows it (``"o3-mini-2025-01-31"``, ``"Qwen/Qwen2.5-7B-Instruct"``, …).
    base_url
        API root ending in ``/v1`` (``None``: OpenAI's). Local servers: vLLM
        ``http://localhost:8000/v1``, llama.cpp ``http://localhost:8080/v1``, Ollama
        ``http://localhost:11434/v1``. Credentials in the address (``https://user:key@host/v1``)
        are sent as HTTP basic auth and removed from ``base_url``, so they are never stored.
    api_key
        Bearer token. ``None`` reads the environment variable ``api_key_env``; with neither,
        no ``Authorization`` header is sent (fine for local servers).
    api_key_env
        Environment variable holding the key.
    params
        Extra request fields sent with every call (``temperature``, ``seed``, ``max_tokens``,
        ``reasoning_effort``…); they are part of the cache key.
    timeout
        Deadline in seconds for one attempt, from sending the request to the last byte of the
        answer (a server that trickles bytes cannot stretch it).
    max_retries
        Retries after the first attempt on 408/409/425/429/5xx and connection errors or timeouts.
    backoff, max_backoff
        Wait before retry ``i`` (0-based): uniform in ``[0.5, 1] × min(max_backoff, backoff · 2**i)``
        seconds, unless the server sent ``Retry-After`` (honoured up to 600 s).
    max_concurrency
        Requests in flight at once.
    cache_dir
        Directory of the answer cache; ``None`` uses :func:`default_cache_dir`, ``False`` disables it.
        It is checked for writability before the first request.
    structured_output
        How a request with a schema asks for it: ``True`` negotiates (``"json_schema"``, then
        ``"json_object"`` with the schema, then ``"text"`` with the schema in the prompt), a form
        from :data:`RESPONSE_FORMATS` starts there, ``False`` means ``"text"``. The first request
        negotiates alone; the form the server accepts is kept for the client's lifetime
        (:attr:`response_format`).
    max_consecutive_failures
        After this many requests in a row failed for good, no new request is started: the call
        raises :class:`ChatError` when nothing was answered yet, otherwise the requests not sent
        are reported as failed (``ChatResult.error``).
    headers
        Extra HTTP headers.
    temperature
        Sampling temperature sent with every request, the same as ``params={"temperature": …}``
        (``None``: not sent, the server's default).
    price_per_1m_tokens
        ``(input, output)`` price per million tokens: usage summaries then include a ``"cost"``.
    """

    model: str
    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    api_key_env: str = DEFAULT_API_KEY_ENV
    params: dict[str, Any] = field(default_factory=dict)
    timeout: float = 120.0
    max_retries: int = 6
    backoff: float = 1.0
    max_backoff: float = 60.0
    max_concurrency: int = 8
    cache_dir: str | os.PathLike | bool | None = None
    structured_output: bool | Literal["json_schema", "json_object", "text"] = True
    max_consecutive_failures: int = 5
    headers: dict[str, str] | None = None
    temperature: float | None = None
    price_per_1m_tokens: tuple[float, float] | None = None
    usage: Usage = field(default_factory=Usage, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {self.max_concurrency}.")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be non-negative, got {self.max_retries}.")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be positive, got {self.timeout}.")
        if self.max_consecutive_failures < 1:
            raise ValueError(
                f"max_consecutive_failures must be at least 1, got {self.max_consecutive_failures}."
            )
        self.params = with_temperature(self.params, self.temperature)
        if self.structured_output is True:
            self._format = RESPONSE_FORMATS[0]
        elif self.structured_output is False:
            self._format = "text"
        elif self.structured_output in RESPONSE_FORMATS:
            self._format = self.structured_output
        else:
            raise ValueError(
                f"structured_output must be True, False or one of {RESPONSE_FORMATS}, got {self.structured_output!r}."
            )
        self.base_url, self._basic_auth = split_userinfo((self.base_url or DEFAULT_BASE_URL).rstrip("/"))
        if self.api_key is None:
            self.api_key = os.environ.get(self.api_key_env) or None
        if self.api_key is None and self._basic_auth is None and self.base_url == DEFAULT_BASE_URL:
            raise ValueError(f"No API key: pass api_key= or set the environment variable {self.api_key_env}.")
        if self.cache_dir is None or self.cache_dir is True:
            self.cache_dir = default_cache_dir()
        self._cache = Path(self.cache_dir) if self.cache_dir is not False else None
        self._secrets = [s for s in (self.api_key, *(self._basic_auth or ())) if s and len(s) >= 4]
        self._lock = threading.Lock()
        self._negotiation = threading.Lock()
        self._settled = False
        self._cache_write_failed = False
        self._http = None
        self._sleep: Callable[[float], None] = time.sleep  # tests swap this to record waits
        self._random = random.Random()

    # --- public -----------------------------------------------------------------------------

    @property
    def response_format(self) -> str:
        """The structured-output form requests with a schema use now (see ``structured_output``)."""
        return self._format

    def complete(self, request: ChatRequest) -> ChatResult:
        """Answer one request, from the cache when possible; raise :class:`ChatError` if it fails."""
        return self.complete_many([request], desc="")[0]

    def complete_many(
        self,
        requests: Sequence[ChatRequest],
        *,
        desc: str = "chat",
        errors: Literal["raise", "return"] = "raise",
    ) -> list[ChatResult]:
        """Answer many requests concurrently, in input order.

        Cached answers are returned without a request (unless ``request.refresh``). With
        ``errors="return"`` a request that fails for good gives a :class:`ChatResult` whose
        ``error`` says why, and the others go on; only a run whose first
        ``max_consecutive_failures`` requests all fail raises. With ``errors="raise"`` the first
        failure cancels the requests not yet started, those in flight finish (and are cached), and
        a :class:`ChatError` naming the failed request is raised. Either way a rerun resumes from
        the cache and asks again only what has no answer.
        """
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}.")
        results: list[ChatResult | None] = [None] * len(requests)
        todo = []
        for i, req in enumerate(requests):
            hit = None if req.refresh else self._cache_get(self.cache_key(req))
            if hit is None:
                todo.append(i)
            else:
                results[i] = hit
        with self._lock:
            self.usage.cached += len(requests) - len(todo)
        if todo:
            self._check_cache_writable()
            self._run(requests, todo, results, desc, errors)
        return results  # type: ignore[return-value]

    def cache_key(self, request: ChatRequest) -> str:
        """Hash of everything that determines the answer.

        That is the server address (without credentials), model, messages, request parameters, schema and tag.
        """
        material = {
            "v": _CACHE_VERSION,
            "base_url": self.base_url,
            "model": self.model,
            "messages": request.messages,
            "params": {**self.params, **(request.params or {})},
            "schema": request.schema,
            "tag": request.tag,
        }
        blob = json.dumps(material, sort_keys=True, ensure_ascii=False, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def redact(self, text: str) -> str:
        """``text`` with this client's key and anything that looks like a credential replaced."""
        return redact(text, self._secrets)

    def close(self) -> None:
        """Close the connection pool (a later request opens a new one)."""
        if self._http is not None:
            self._http.close()
            self._http = None

    # --- concurrency --------------------------------------------------------------------------

    def _run(self, requests, todo, results, desc, errors) -> None:
        state = _RunState(
            stop=threading.Event(), limit=1 if errors == "raise" else self.max_consecutive_failures
        )
        bar = progress(total=len(requests), desc=desc, unit="req", disable=None if desc else True)
        bar.update(len(requests) - len(todo))
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(todo))) as pool:
            pending = {pool.submit(self._guarded, requests[i], state): i for i in todo}
            try:
                self._collect(pending, results, state, bar, errors)
            except BaseException:
                # Ctrl-C or an unexpected error: start nothing new; requests in flight finish and
                # are cached when the pool shuts down, so a rerun loses nothing.
                state.stop.set()
                for fut in pending:
                    fut.cancel()
                raise
            finally:
                bar.close()
        with self._lock:
            self.usage.failed += len(state.failures)
        if not state.failures:
            return
        i, exc = min(state.failures, key=lambda f: f[0])
        n_done = sum(r is not None and r.ok for r in results)
        where = f", cached in {self._cache}; rerun to resume" if self._cache else ""
        who = f" for {requests[i].name!r}" if requests[i].name is not None else ""
        if errors == "raise" or state.n_ok == 0 and state.stop.is_set():
            why = (
                f" (the first {len(state.failures)} requests all failed: stopped)"
                if errors == "return"
                else ""
            )
            raise ChatError(
                f"Chat request{who} failed: {exc}{why} ({n_done}/{len(requests)} answered{where}).",
                status=exc.status,
                name=requests[i].name,
            ) from exc
        skipped = f"not sent: {self.max_consecutive_failures} requests in a row failed (last: {state.last})"
        not_sent = [j for j in todo if results[j] is None]
        for j in not_sent:
            results[j] = ChatResult("", {}, cached=False, structured=False, error=skipped)
        with self._lock:
            self.usage.failed += len(not_sent)
        logger.warning(
            "%d of %d chat requests failed (first%s: %s); %d answered%s.",
            sum(r is not None and not r.ok for r in results), len(requests), who, exc, n_done, where,
        )  # fmt: skip

    def _collect(self, pending, results, state, bar, errors) -> None:
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                i = pending.pop(fut)
                if fut.cancelled():
                    continue
                exc = fut.exception()
                if exc is None:
                    results[i] = fut.result()
                    bar.update(results[i] is not None)
                    continue
                if not isinstance(exc, ChatError):
                    raise exc
                state.failures.append((i, exc))
                if errors == "return":
                    results[i] = ChatResult(
                        "", {}, cached=False, structured=False, error=str(exc), status=exc.status
                    )
                    bar.update(1)
                if state.stop.is_set():
                    for other in pending:
                        other.cancel()

    # --- one request ----------------------------------------------------------------------------

    def _guarded(self, request: ChatRequest, state: _RunState) -> ChatResult | None:
        """Answer unless the run was stopped (then skip: ``None``)."""
        if state.stop.is_set():
            return None
        try:
            result = self._answer(request)
        except ChatError as e:
            error = ChatError(self.redact(str(e)), status=e.status, name=request.name)
            with state.lock:
                state.in_a_row += 1
                state.last = str(error)
                # Set from the worker itself, so no queued request starts before the pool sees it.
                if state.in_a_row >= state.limit:
                    state.stop.set()
            raise error from None
        with state.lock:
            state.n_ok += 1
            state.in_a_row = 0
        return result

    def _answer(self, request: ChatRequest) -> ChatResult:
        if request.schema is None:
            return self._finish(request, self._post(self._body(request, "text")), "text")
        if self._settled:
            return self._negotiate(request)
        # The first request finds the form the server accepts, alone, so that a rejected form costs
        # one request instead of one per worker; the others wait and then go concurrently.
        with self._negotiation:
            result = self._negotiate(request)
            self._settled = True
            return result

    def _negotiate(self, request: ChatRequest) -> ChatResult:
        """Ask in the client's form, stepping down while the server rejects the form itself."""
        start = fmt = self._format
        while True:
            try:
                data = self._post(self._body(request, fmt))
            except ChatError as e:
                rejected = e.rejected_format or (e.status in (400, 422) and fmt != "text")
                if not rejected or fmt == "text":
                    raise
                with self._lock:
                    self.usage.rejected += 1
                nxt = RESPONSE_FORMATS[RESPONSE_FORMATS.index(fmt) + 1]
                logger.info(
                    "The server rejected response_format %r (%s); trying %r.", fmt, self.redact(str(e)), nxt
                )
                if e.rejected_format:
                    self._step_down(fmt, nxt)  # the server named the form: everyone moves on now
                fmt = nxt
                continue
            result = self._finish(request, data, fmt)
            if fmt != start:
                self._step_down(start, fmt)
            return result

    def _step_down(self, old: str, new: str) -> None:
        with self._lock:
            if RESPONSE_FORMATS.index(self._format) < RESPONSE_FORMATS.index(new):
                logger.warning("The server does not take response_format %r; using %r from now on.", old, new)
                self._format = new

    def _finish(self, request: ChatRequest, data: Any, fmt: str) -> ChatResult:
        result = _parse_completion(data, fmt)  # raises ChatError: nothing unparsed reaches the cache
        with self._lock:
            self.usage.prompt_tokens += result.usage.get("prompt_tokens", 0)
            self.usage.completion_tokens += result.usage.get("completion_tokens", 0)
            self.usage.reasoning_tokens += result.usage.get("reasoning_tokens", 0)
        self._cache_put(self.cache_key(request), result)
        return result

    def _body(self, request: ChatRequest, fmt: str) -> dict[str, Any]:
        messages = [dict(m) for m in request.messages]
        body: dict[str, Any] = {"model": self.model, **self.params, **(request.params or {})}
        if request.schema is not None and fmt == "json_schema":
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "strict": True, "schema": request.schema},
            }
        elif request.schema is not None and fmt == "json_object":
            body["response_format"] = {"type": "json_object", "schema": request.schema}
        elif request.schema is not None:
            hint = JSON_INSTRUCTION.format(schema=json.dumps(request.schema, ensure_ascii=False))
            messages[-1]["content"] = f"{messages[-1]['content']}\n{hint}"
        body["messages"] = messages
        return body

    def _client(self):
        if self._http is None:
            httpx = import_optional("httpx", "llm", "LLM annotation")
            headers = {"Content-Type": "application/json", **(self.headers or {})}
            if self.api_key:
                headers["Authorization"] = f"Bearer {self.api_key}"
            limits = httpx.Limits(
                max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency
            )
            timeout = httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0))
            self._http = httpx.Client(headers=headers, timeout=timeout, limits=limits, auth=self._basic_auth)
            enforce_deadlines(self._http)
        return self._http

    def _post(self, body: dict[str, Any]) -> Any:
        url = f"{self.base_url}/chat/completions"
        client = self._client()
        httpx = import_optional("httpx", "llm", "LLM annotation")
        for attempt in range(self.max_retries + 1):
            wait_hint = None
            with self._lock:
                self.usage.requests += 1
            try:
                with attempt_deadline(self.timeout):
                    response = client.post(url, json=body)
            except httpx.TransportError as e:
                problem, status = f"{type(e).__name__}: {e or 'no detail'}", None
                if isinstance(e, httpx.TimeoutException):
                    problem = f"{type(e).__name__}: no complete answer within the {self.timeout:g} s deadline"
            else:
                status = response.status_code
                if status == 200:
                    try:
                        return response.json()
                    except ValueError:
                        # Paid for but unreadable: retrying would pay again, so it fails here.
                        raise ChatError(
                            f"HTTP 200 with a body that is not JSON: {response.text[:200]!r} from {url}",
                            status=200,
                        ) from None
                problem = http_problem(response)
                if "response_format" in body and _LLAMA_CPP_FORMAT_500.search(response.text):
                    raise ChatError(f"{problem} from {url}", status=status, rejected_format=True)
                if status in RETRY_STATUS or status >= 500:
                    wait_hint = retry_after(response.headers)
                else:
                    named = "response_format" in body and bool(_FORMAT_WORDS.search(problem))
                    raise ChatError(f"{problem} from {url}", status=status, rejected_format=named)
            if attempt == self.max_retries:
                raise ChatError(f"{problem} after {attempt + 1} attempts to {url}", status=status)
            wait_s = self._wait(attempt, wait_hint)
            logger.info(
                "Chat request failed (%s); retry %d in %.2f s.", self.redact(problem), attempt + 1, wait_s
            )
            with self._lock:
                self.usage.retries += 1
            self._sleep(wait_s)
        raise AssertionError("unreachable")  # pragma: no cover

    def _wait(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), MAX_RETRY_AFTER)
        # Jitter keeps many clients that failed together from retrying in lockstep.
        return min(self.max_backoff, self.backoff * 2**attempt) * self._random.uniform(0.5, 1.0)

    # --- cache ----------------------------------------------------------------------------------

    def _cache_path(self, key: str) -> Path:
        return self._cache / key[:2] / f"{key}.json"

    def _check_cache_writable(self) -> None:
        """Fail before the first (paid) request, not after, when answers could not be kept."""
        if self._cache is None:
            return
        try:
            self._cache.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self._cache, suffix=".probe")
            os.close(fd)
            os.remove(probe)
        except OSError as e:
            raise OSError(
                f"The answer cache {self._cache} is not writable ({e}); pass cache_dir= a writable "
                "directory (or set SC_LLM_CACHE), or cache_dir=False to keep no cache."
            ) from e

    def _cache_get(self, key: str) -> ChatResult | None:
        if self._cache is None:
            return None
        path = self._cache_path(key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            logger.warning("Ignoring unreadable cache entry %s.", path)
            return None
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            logger.warning("Ignoring cache entry %s without a text 'content'; asking again.", path)
            return None
        usage = entry.get("usage")
        return ChatResult(
            entry["content"],
            read_usage(usage) if isinstance(usage, dict) else {},
            cached=True,
            structured=bool(entry.get("structured", False)),
            response_format=entry.get("response_format")
            if isinstance(entry.get("response_format"), str)
            else None,
        )

    def _cache_put(self, key: str, result: ChatResult) -> None:
        if self._cache is None:
            return
        path = self._cache_path(key)
        entry = {
            "model": self.model,
            "content": result.content,
            "usage": result.usage,
            "structured": result.structured,
            "response_format": result.response_format,
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename, so a crash never leaves a half-written entry behind.
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(entry, f, ensure_ascii=False)
            os.replace(tmp, path)
        except OSError as e:
            # The answer is still returned; losing the copy must not lose the answer.
            with self._lock:
                first, self._cache_write_failed = not self._cache_write_failed, True
            if first:
                logger.warning("Could not write to the answer cache %s (%s); answers are not kept.", path, e)


@dataclass
class _RunState:
    """Book-keeping of one complete_many call: consecutive failures stop it at ``limit``."""

    stop: threading.Event
    limit: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    failures: list = field(default_factory=list)
    n_ok: int = 0
    in_a_row: int = 0
    last: str = ""


def _parse_completion(data: Any, fmt: str) -> ChatResult:
    """The answer text and token counts of a 200 response, or a :class:`ChatError` saying what is wrong."""
    snippet = repr(str(data)[:200])
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices:
        raise ChatError(f"HTTP 200 without choices: {snippet}", status=200)
    message = choices[0].get("message") if isinstance(choices[0], dict) else None
    if not isinstance(message, dict):
        raise ChatError(f"HTTP 200 whose choices[0].message is not an object: {snippet}", status=200)
    content = content_text(message.get("content"))
    if content is None:
        refusal = message.get("refusal")
        why = f" (refusal: {str(refusal)[:200]!r})" if refusal else ""
        raise ChatError(f"HTTP 200 without text content{why}: {snippet}", status=200)
    usage = data.get("usage")
    if usage is not None and not isinstance(usage, dict):
        logger.debug("Ignoring a usage field that is not an object: %r", usage)
    usage = read_usage(usage) if isinstance(usage, dict) else {}
    return ChatResult(content, usage, cached=False, structured=fmt != "text", response_format=fmt)
