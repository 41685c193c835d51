"""A deterministic OpenAI-compatible chat completions server on 127.0.0.1, for tests.

Answers come from a table keyed on the prompt (the user messages joined), or on the text between
triple quotes (the cell sentence of the paper's prompts), or from a callable. Failures are
programmable: HTTP errors for the next ``times`` matching requests (or forever), ``Retry-After``
headers, slow responses, and rejection of ``response_format`` json_schema requests.
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


@dataclass
class Rule:
    """Applies to requests whose prompt contains ``match`` (``None``: all), ``times`` times (``None``: always)."""

    match: str | None
    times: int | None
    status: int = 200
    retry_after: str | None = None
    delay: float = 0.0
    body: str | None = None

    def applies(self, prompt: str) -> bool:
        return (self.match is None or self.match in prompt) and (self.times is None or self.times > 0)


class ChatServer:
    """Start with ``with ChatServer(table) as server:``; then ``server.base_url`` ends in ``/v1``.

    ``table`` values are answer contents; a value that is a list gives the n-th answer on the n-th
    request for that key (cycling), so repeated runs can differ deterministically.
    """

    def __init__(self, table: Mapping[str, Any] | Callable[[str, dict], str] | None = None):
        self.table = table if table is not None else {}
        self.reject_json_schema = False
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
        if rule is not None and rule.status != 200:
            headers = {"Retry-After": rule.retry_after} if rule.retry_after is not None else {}
            error = rule.body or json.dumps({"error": {"message": f"programmed failure {rule.status}"}})
            return rule.status, headers, error, delay
        if self.reject_json_schema and "response_format" in body:
            return 400, {}, json.dumps({"error": {"message": "response_format is not supported"}}), delay
        content = self._answer(prompt, body)
        if content is None:
            return 404, {}, json.dumps({"error": {"message": f"no answer for prompt {prompt[:80]!r}"}}), delay
        return 200, {}, json.dumps(_completion(body, prompt, content)), delay

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
            status, headers, text, delay = server.respond(body, self.headers.get("Authorization"))
            if delay:
                time.sleep(delay)
            self._send(status, headers, text)

        def _send(self, status: int, headers: dict[str, str], text: str) -> None:
            data = text.encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout test)

        def log_message(self, *args) -> None:
            pass

    return Handler
