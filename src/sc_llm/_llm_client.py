"""A small, robust client for OpenAI-compatible chat completion APIs.

Hosted APIs (OpenAI, Fireworks, Together, …) and local servers (vLLM, llama.cpp's
``llama-server``, Ollama, LM Studio) all speak ``POST {base_url}/chat/completions``. This client
adds what a many-thousand-request annotation run needs and the bare protocol lacks:

- timeouts, and retries with exponential backoff and jitter on 408/409/429/5xx and connection
  errors, honouring ``Retry-After`` (seconds or HTTP date) and ``retry-after-ms``;
- bounded concurrency (a thread pool sharing one connection pool);
- an on-disk cache, one JSON file per request keyed by a hash of (model, messages, parameters,
  schema, tag), written atomically as each answer arrives, so an interrupted run resumes
  without paying again and nothing already answered is lost;
- structured output (``response_format`` of type ``json_schema``) with an automatic switch to a
  plain-text request that asks for the same JSON when the server rejects the schema (HTTP 400);
- token usage accounting (prompt, completion, reasoning tokens; cache hits; retries).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from ._progress import progress

logger = logging.getLogger("sc_llm")

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
RETRY_STATUS = frozenset({408, 409, 425, 429})
MAX_RETRY_AFTER = 600.0
JSON_INSTRUCTION = "Respond with only a JSON object matching this JSON schema, and nothing else: {schema}"
_CACHE_VERSION = 1


class ChatError(RuntimeError):
    """A chat request failed for good (non-retryable status, or retries exhausted)."""

    def __init__(self, message: str, *, status: int | None = None, name: str | None = None):
        super().__init__(message)
        self.status = status
        self.name = name


@dataclass
class ChatRequest:
    """One logical request: the messages, an optional JSON schema for the answer, and a cache tag.

    ``tag`` is part of the cache key but never sent: it makes repeated runs of the same prompt
    (``{"run": 2}``) independent calls. ``name`` only appears in error messages (e.g. a cell name).
    ``params`` are request fields added to (and overriding) the client's ``params``.
    """

    messages: list[dict[str, str]]
    schema: dict[str, Any] | None = None
    tag: Any = None
    name: str | None = None
    params: dict[str, Any] | None = None


@dataclass
class ChatResult:
    content: str
    usage: dict[str, int]
    cached: bool
    structured: bool


@dataclass
class Usage:
    """Token and request counters (cache hits cost nothing and are counted apart)."""

    requests: int = 0
    retries: int = 0
    cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0

    def add(self, other: Usage) -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)

    def since(self, before: Usage) -> Usage:
        return Usage(**{k: v - getattr(before, k) for k, v in asdict(self).items()})

    def summary(self, price_per_1m_tokens: tuple[float, float] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = asdict(self)
        out["total_tokens"] = self.prompt_tokens + self.completion_tokens
        if price_per_1m_tokens is not None:
            p_in, p_out = price_per_1m_tokens
            out["cost"] = (self.prompt_tokens * p_in + self.completion_tokens * p_out) / 1e6
        return out


def default_cache_dir() -> Path:
    """``$SC_LLM_CACHE`` or ``$XDG_CACHE_HOME/sc_llm/chat`` (``~/.cache/sc_llm/chat``)."""
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
        ``http://localhost:11434/v1``.
    api_key
        Bearer token. ``None`` reads the environment variable ``api_key_env``; with neither,
        no ``Authorization`` header is sent (fine for local servers).
    api_key_env
        Environment variable holding the key.
    params
        Extra request fields sent with every call (``temperature``, ``seed``, ``max_tokens``,
        ``reasoning_effort``…); they are part of the cache key.
    timeout
        Seconds to wait for a response (per attempt).
    max_retries
        Retries after the first attempt on 408/409/425/429/5xx and connection errors or timeouts.
    backoff, max_backoff
        Wait before retry ``i`` (0-based): uniform in ``[0.5, 1] × min(max_backoff, backoff · 2**i)``
        seconds, unless the server sent ``Retry-After`` (honoured up to 600 s).
    max_concurrency
        Requests in flight at once.
    cache_dir
        Directory of the answer cache; ``None`` uses :func:`default_cache_dir`, ``False`` disables it.
    structured_output
        Ask for ``response_format={"type": "json_schema", …}`` when a request has a schema. Set
        ``False`` for servers without it; it also switches off by itself after the server answers
        such a request with HTTP 400/422, and then the schema is put into the prompt instead.
    headers
        Extra HTTP headers.
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
    structured_output: bool = True
    headers: dict[str, str] | None = None
    usage: Usage = field(default_factory=Usage, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {self.max_concurrency}.")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be non-negative, got {self.max_retries}.")
        self.base_url = (self.base_url or DEFAULT_BASE_URL).rstrip("/")
        if self.api_key is None:
            self.api_key = os.environ.get(self.api_key_env) or None
        if self.api_key is None and self.base_url == DEFAULT_BASE_URL:
            raise ValueError(f"No API key: pass api_key= or set the environment variable {self.api_key_env}.")
        if self.cache_dir is None or self.cache_dir is True:
            self.cache_dir = default_cache_dir()
        self._cache = Path(self.cache_dir) if self.cache_dir is not False else None
        self._lock = threading.Lock()
        self._http = None
        self._sleep: Callable[[float], None] = time.sleep  # tests swap this to record waits
        self._random = random.Random()

    # --- public -----------------------------------------------------------------------------

    def complete(self, request: ChatRequest) -> ChatResult:
        """Answer one request, from the cache when possible."""
        return self.complete_many([request], desc="")[0]

    def complete_many(self, requests: Sequence[ChatRequest], *, desc: str = "chat") -> list[ChatResult]:
        """Answer many requests concurrently, in input order.

        Cached answers are returned without a request. If one request fails for good, requests
        not yet started are cancelled, those in flight finish (and are cached), and a
        :class:`ChatError` naming the failed request is raised; a rerun resumes from the cache.
        """
        results: list[ChatResult | None] = [None] * len(requests)
        todo = []
        for i, req in enumerate(requests):
            hit = self._cache_get(self.cache_key(req))
            if hit is None:
                todo.append(i)
            else:
                results[i] = hit
        with self._lock:
            self.usage.cached += len(requests) - len(todo)
        if todo:
            self._run(requests, todo, results, desc)
        return results  # type: ignore[return-value]

    def cache_key(self, request: ChatRequest) -> str:
        """Hash of everything that determines the answer (the base URL is left out on purpose:
        the same model behind another address or port gives the same kind of answer)."""
        material = {
            "v": _CACHE_VERSION,
            "model": self.model,
            "messages": request.messages,
            "params": {**self.params, **(request.params or {})},
            "schema": request.schema,
            "tag": request.tag,
        }
        blob = json.dumps(material, sort_keys=True, ensure_ascii=False, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    # --- concurrency --------------------------------------------------------------------------

    def _run(self, requests, todo, results, desc) -> None:
        failures: list[tuple[int, ChatError]] = []
        stop = threading.Event()
        bar = progress(total=len(requests), desc=desc, unit="req", disable=None if desc else True)
        bar.update(len(requests) - len(todo))
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(todo))) as pool:
            pending = {pool.submit(self._guarded, requests[i], stop): i for i in todo}
            try:
                self._collect(pending, results, failures, bar)
            except BaseException:
                # Ctrl-C or an unexpected error: start nothing new; requests in flight finish and
                # are cached when the pool shuts down, so a rerun loses nothing.
                stop.set()
                for fut in pending:
                    fut.cancel()
                raise
            finally:
                bar.close()
        if failures:
            i, exc = min(failures, key=lambda f: f[0])
            n_done = sum(r is not None for r in results)
            who = f" for {requests[i].name!r}" if requests[i].name is not None else ""
            raise ChatError(
                f"Chat request{who} failed: {exc} ({n_done}/{len(requests)} answered"
                f"{', cached in ' + str(self._cache) + '; rerun to resume' if self._cache else ''}).",
                status=exc.status,
                name=requests[i].name,
            ) from exc

    @staticmethod
    def _collect(pending, results, failures, bar) -> None:
        while pending:
            done, _ = wait(pending, return_when=FIRST_EXCEPTION)
            for fut in done:
                i = pending.pop(fut)
                if fut.cancelled():
                    continue
                exc = fut.exception()
                if exc is None:
                    results[i] = fut.result()
                    bar.update(results[i] is not None)
                elif isinstance(exc, ChatError):
                    failures.append((i, exc))
                    for other in pending:
                        other.cancel()
                else:
                    raise exc

    # --- one request ----------------------------------------------------------------------------

    def _guarded(self, request: ChatRequest, stop: threading.Event) -> ChatResult | None:
        """Answer unless another request already failed for good (then skip: ``None``)."""
        if stop.is_set():
            return None
        try:
            return self._answer(request)
        except ChatError:
            # Set from the worker itself, so no queued request starts before the pool sees the failure.
            stop.set()
            raise

    def _answer(self, request: ChatRequest) -> ChatResult:
        structured = self.structured_output and request.schema is not None
        try:
            data = self._post(self._body(request, structured))
        except ChatError as e:
            if not (structured and e.status in (400, 422)):
                raise
            if self.structured_output:
                logger.warning(
                    "The server rejected json_schema output (%s); asking for JSON in the prompt.", e
                )
            self.structured_output = False
            structured = False
            data = self._post(self._body(request, structured))
        result = _parse_completion(data, structured)
        with self._lock:
            self.usage.prompt_tokens += result.usage.get("prompt_tokens", 0)
            self.usage.completion_tokens += result.usage.get("completion_tokens", 0)
            self.usage.reasoning_tokens += result.usage.get("reasoning_tokens", 0)
        self._cache_put(self.cache_key(request), result)
        return result

    def _body(self, request: ChatRequest, structured: bool) -> dict[str, Any]:
        messages = [dict(m) for m in request.messages]
        body: dict[str, Any] = {"model": self.model, **self.params, **(request.params or {})}
        if request.schema is not None and structured:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "strict": True, "schema": request.schema},
            }
        elif request.schema is not None:
            hint = JSON_INSTRUCTION.format(schema=json.dumps(request.schema, ensure_ascii=False))
            messages[-1]["content"] = f"{messages[-1]['content']}\n{hint}"
        body["messages"] = messages
        return body

    def _client(self):
        if self._http is None:
            try:
                import httpx
            except ImportError as e:  # pragma: no cover - httpx ships with the llm extra
                raise ImportError("LLM annotation needs httpx: pip install 'sc-llm[llm]'.") from e
            headers = {"Content-Type": "application/json", **(self.headers or {})}
            if self.api_key:
                headers["Authorization"] = f"Bearer {self.api_key}"
            limits = httpx.Limits(
                max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency
            )
            timeout = httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0))
            self._http = httpx.Client(headers=headers, timeout=timeout, limits=limits)
        return self._http

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        url = f"{self.base_url}/chat/completions"
        client = self._client()
        for attempt in range(self.max_retries + 1):
            retry_after = None
            with self._lock:
                self.usage.requests += 1
            try:
                response = client.post(url, json=body)
            except httpx.TransportError as e:
                problem, status = f"{type(e).__name__}: {e or 'no detail'}", None
            else:
                status = response.status_code
                if status == 200:
                    try:
                        return response.json()
                    except ValueError:
                        problem = f"HTTP 200 with a body that is not JSON: {response.text[:200]!r}"
                elif status in RETRY_STATUS or status >= 500:
                    problem, retry_after = _http_problem(response), _retry_after(response.headers)
                else:
                    raise ChatError(f"{_http_problem(response)} from {url}", status=status)
            if attempt == self.max_retries:
                raise ChatError(f"{problem} after {attempt + 1} attempts to {url}", status=status)
            wait_s = self._wait(attempt, retry_after)
            logger.info("Chat request failed (%s); retry %d in %.2f s.", problem, attempt + 1, wait_s)
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
        return ChatResult(
            entry["content"], entry.get("usage", {}), cached=True, structured=entry["structured"]
        )

    def _cache_put(self, key: str, result: ChatResult) -> None:
        if self._cache is None:
            return
        path = self._cache_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = {
            "model": self.model,
            "content": result.content,
            "usage": result.usage,
            "structured": result.structured,
        }
        # Write then rename, so a crash never leaves a half-written entry behind.
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(entry, f, ensure_ascii=False)
        os.replace(tmp, path)


def _parse_completion(data: dict[str, Any], structured: bool) -> ChatResult:
    try:
        message = data["choices"][0]["message"]
    except (KeyError, IndexError, TypeError) as e:
        raise ChatError(f"Unexpected response without choices[0].message: {str(data)[:200]!r}") from e
    usage_in = data.get("usage") or {}
    details = usage_in.get("completion_tokens_details") or {}
    usage = {
        "prompt_tokens": int(usage_in.get("prompt_tokens") or 0),
        "completion_tokens": int(usage_in.get("completion_tokens") or 0),
        "reasoning_tokens": int(details.get("reasoning_tokens") or 0),
    }
    return ChatResult(message.get("content") or "", usage, cached=False, structured=structured)


def _http_problem(response) -> str:
    try:
        detail = response.json().get("error", {})
        detail = detail.get("message", detail) if isinstance(detail, dict) else detail
    except (ValueError, AttributeError):
        detail = response.text
    return f"HTTP {response.status_code}: {str(detail)[:300]}"


def _retry_after(headers) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (delta seconds or HTTP date)."""
    if headers.get("retry-after-ms"):
        try:
            return float(headers["retry-after-ms"]) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return parsedate_to_datetime(value).timestamp() - time.time()
    except (TypeError, ValueError):
        return None
