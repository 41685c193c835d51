"""A deterministic OpenAI-compatible chat completions server on 127.0.0.1, for tests.

Answers come from a table keyed on the prompt (the user messages joined), or on the text between
triple quotes (the cell sentence of the paper's prompts), or from a callable. Failures are
programmable: HTTP errors for the next ``times`` matching requests (or forever), ``Retry-After``
headers, slow or trickled responses, raw 200 bodies of any shape, and rejection of
``response_format`` types the way real servers do it (HTTP 400, or llama.cpp's HTTP 500).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_QUOTED = re.compile(r'"""(.*?)"""', re.DOTALL)
# What llama-cpp-python 0.3.36's server answers (HTTP 500) to response_format type "json_schema".
LLAMA_CPP_FORMAT_ERROR = (
    "1 validation error:\n  {'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), "
    "'msg': \"Input should be 'text' or 'json_object'\", 'input': 'json_schema', "
    "'ctx': {'expected': \"'text' or 'json_object'\"}}"
)


@dataclass
class Rule:
    """Applies to requests whose prompt contains ``match`` (``None``: all), ``times`` times (``None``: always)."""

    match: str | None
    times: int | None
    status: int = 200
    retry_after: str | None = None
    delay: float = 0.0
    body: str | None = None
    trickle: float = 0.0
    headers: dict[str, str] | None = None

    def applies(self, prompt: str) -> bool:
        return (self.match is None or self.match in prompt) and (self.times is None or self.times > 0)


class ChatServer:
    """Start with ``with ChatServer(table) as server:``; then ``server.base_url`` ends in ``/v1``.

    ``table`` values are answer contents; a value that is a list gives the n-th answer on the n-th
    request for that key (cycling), so repeated runs can differ deterministically.
    """

    def __init__(self, table: Mapping[str, Any] | Callable[[str, dict], str] | None = None):
        self.table = table if table is not None else {}
        self.rejected_formats: dict[str, tuple[int, str]] = {}
        self.requests: list[dict] = []
        self.auth: list[str | None] = []
        self.rules: list[Rule] = []
        self._seen: Counter = Counter()
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    @property
    def n_requests(self) -> int:
        with self._lock:
            return len(self.requests)

    def prompts(self) -> list[str]:
        with self._lock:
            return [_prompt(body) for body in self.requests]

    def fail(self, status: int = 500, *, match=None, times=None, retry_after=None, body=None) -> None:
        self.rules.append(Rule(match, times, status=status, retry_after=retry_after, body=body))

    def slow(self, seconds: float, *, match=None, times=None) -> None:
        self.rules.append(Rule(match, times, delay=seconds))

    def reply(self, body: str, *, match=None, times=None, headers=None, trickle: float = 0.0) -> None:
        """Answer HTTP 200 with ``body`` verbatim (any shape), sent one byte per ``trickle`` seconds."""
        self.rules.append(Rule(match, times, body=body, headers=headers, trickle=trickle))

    def reject_format(self, kind: str, status: int = 400, message: str | None = None) -> None:
        """Refuse requests whose ``response_format.type`` is ``kind``."""
        self.rejected_formats[kind] = (status, message or f"response_format type {kind!r} is not supported")

    def clear_rules(self) -> None:
        self.rules.clear()

    def __enter__(self) -> ChatServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    # --- request handling (called from the handler threads) ---------------------------------

    def respond(self, body: dict, auth: str | None) -> tuple[int, dict[str, str], str, float]:
        prompt = _prompt(body)
        with self._lock:
            self.requests.append(body)
            self.auth.append(auth)
            rule = next((r for r in self.rules if r.applies(prompt)), None)
            if rule is not None and rule.times is not None:
                rule.times -= 1
        delay = rule.delay if rule else 0.0
        headers = dict(rule.headers or {}) if rule else {}
        if rule is not None and rule.retry_after is not None:
            headers["Retry-After"] = rule.retry_after
        if rule is not None and rule.status != 200:
            error = rule.body or json.dumps({"error": {"message": f"programmed failure {rule.status}"}})
            return rule.status, headers, error, delay
        if rule is not None and rule.body is not None:
            return 200, headers, rule.body, delay
        kind = (body.get("response_format") or {}).get("type")
        if kind in self.rejected_formats:
            status, message = self.rejected_formats[kind]
            return status, {}, json.dumps({"error": {"message": message, "type": "invalid_request"}}), delay
        content = self._answer(prompt, body)
        if content is None:
            return 404, {}, json.dumps({"error": {"message": f"no answer for prompt {prompt[:80]!r}"}}), delay
        return 200, headers, json.dumps(_completion(body, prompt, content)), delay

    def trickle_of(self, body: dict) -> float:
        prompt = _prompt(body)
        with self._lock:
            rule = next((r for r in self.rules if r.trickle and (r.match is None or r.match in prompt)), None)
        return rule.trickle if rule else 0.0

    def _answer(self, prompt: str, body: dict) -> str | None:
        if callable(self.table):
            return self.table(prompt, body)
        quoted = _QUOTED.search(prompt)
        key = prompt if prompt in self.table else (quoted.group(1) if quoted else None)
        if key not in self.table:
            return None
        value = self.table[key]
        if isinstance(value, list):
            with self._lock:
                n = self._seen[key]
                self._seen[key] += 1
            value = value[n % len(value)]
        return value


def _prompt(body: dict) -> str:
    return "\n".join(m.get("content", "") for m in body.get("messages", []) if m.get("role") == "user")


def _completion(body: dict, prompt: str, content: str) -> dict:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "model": body.get("model"),
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ],
        "usage": {
            "prompt_tokens": len(prompt.split()),
            "completion_tokens": len(content.split()),
            "total_tokens": len(prompt.split()) + len(content.split()),
            "completion_tokens_details": {"reasoning_tokens": 1},
        },
    }


def _handler(server: ChatServer):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            if not self.path.rstrip("/").endswith("/chat/completions"):
                self._send(404, {}, json.dumps({"error": {"message": f"unknown path {self.path}"}}))
                return
            length = int(self.headers.get("Content-Length", 0))
            try:
                body = json.loads(self.rfile.read(length))
            except ValueError:
                self._send(400, {}, json.dumps({"error": {"message": "body is not JSON"}}))
                return
            trickle = server.trickle_of(body)
            status, headers, text, delay = server.respond(body, self.headers.get("Authorization"))
            if delay:
                time.sleep(delay)
            self._send(status, headers, text, trickle)

        def _send(self, status: int, headers: dict[str, str], text: str, trickle: float = 0.0) -> None:
            data = text.encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                if not trickle:
                    self.wfile.write(data)
                    return
                for i in range(len(data)):  # one byte at a time, each just before a per-read timeout
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
                    time.sleep(trickle)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout test)

        def log_message(self, *args) -> None:
            pass

    return Handler
