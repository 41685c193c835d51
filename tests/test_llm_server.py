"""llm_annotate end to end against a real OpenAI-compatible server: llama-cpp-python's.

The server (``python -m llama_cpp.server``) serves a tiny random-weight llama model written by
tests/_gguf.py. Its text is garbage, so these tests check the protocol, not biology: the client
negotiates the response format the server takes (llama.cpp refuses ``json_schema`` with HTTP 500
and takes ``json_object`` with a ``schema``), spends no retry on the refusal, and schema-constrained
decoding makes every answer parse into an offered label; without constraints every garbage answer
is flagged, never written as a label.

Run with ``pytest -m server``; skipped when llama-cpp-python's server or ``gguf`` is not installed
(see docs/howto/llm.md, "Testing against a real server").
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import sc_llm as scl
from sc_llm.llm import ChatClient
from sc_llm.tl import LLMAnnotateConfig

try:
    import gguf  # noqa: F401
    import httpx
    import llama_cpp.server.app  # noqa: F401
except Exception as e:  # noqa: BLE001 - not installed, or llama_cpp's RuntimeError when its shared library does not load
    pytest.skip(f"needs llama-cpp-python[server] and gguf ({type(e).__name__}: {e})", allow_module_level=True)

pytestmark = pytest.mark.server
MODEL = "tiny-random-llama"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    from _gguf import write_tiny_llama

    folder = tmp_path_factory.mktemp("llama")
    model = write_tiny_llama(folder / "tiny.gguf")
    port = _free_port()
    log = open(folder / "server.log", "w")
    cmd = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", MODEL,
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--n_threads", "1", "--verbose", "false",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited: {(folder / 'server.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{base_url}/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("llama_cpp.server did not start within 120 s")
            time.sleep(0.25)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def query(pbmc):
    """pbmc68k with kNN candidates; 12 random held-out cells, sentences of 8 genes."""
    scl.pp.cell_sentences(pbmc)
    scl.pp.train_test_split(pbmc, "cell_type", random_state=0)
    scl.tl.knn_annotate(pbmc, use_rep="X_pca", labels_key="cell_type")
    return pbmc


def _client(base_url, tmp_path, **kw):
    return ChatClient(MODEL, base_url=base_url, cache_dir=tmp_path / "cache", max_concurrency=4, **kw)


def test_rerank_negotiates_json_object_and_every_answer_is_an_offered_label(llama_server, query, tmp_path):
    client = _client(llama_server, tmp_path)
    kw = {
        "n_cells": 12, "random_state": 1, "config": LLMAnnotateConfig(n_genes=8),
        "client_kwargs": {"temperature": 0, "params": {"max_tokens": 96, "seed": 0}},
    }  # fmt: skip
    scl.tl.llm_annotate(query, client, **kw)
    uns = query.uns["llm"]
    chosen = query.obs["llm"].notna().to_numpy()
    cand = query.obs.loc[chosen, ["knn_top1", "knn_top2", "knn_top3"]].astype(object)
    n_asked = int(cand.notna().sum(axis=1).ge(2).sum())
    assert chosen.sum() == 12 and n_asked >= 2
    # The server refused json_schema once (HTTP 500, not retried) and took json_object + schema.
    assert uns["response_format"] == "json_object" and uns["structured_output"] is True
    usage = uns["usage"]
    assert usage["rejected"] == 1 and usage["retries"] == 0 and usage["failed"] == 0
    assert usage["requests"] == n_asked + 1
    assert usage["completion_tokens"] > 0 and usage["prompt_tokens"] > 0
    # Grammar-constrained decoding: every answer parses and is one of the cell's own candidates.
    assert (query.obs.loc[chosen, "llm_fallback"] == "ok").all()
    for label, row in zip(query.obs.loc[chosen, "llm"], cand.itertuples(index=False), strict=True):
        assert label in {v for v in row if isinstance(v, str)}
    assert query.obs.loc[chosen, "llm_error"].isna().all()
    assert uns["outcomes"]["ok"] == 12 and uns["fallbacks"].empty
    first = query.obs["llm"].copy()

    # A rerun with a fresh client reads every answer from the cache: zero requests.
    with pytest.warns(UserWarning, match="already exists"):
        scl.tl.llm_annotate(query, _client(llama_server, tmp_path), **kw)
    assert query.uns["llm"]["usage"]["requests"] == 0 and query.uns["llm"]["usage"]["cached"] == n_asked
    assert query.obs["llm"].equals(first)


def test_zero_shot_labels_and_plain_text_fallback(llama_server, query, tmp_path):
    labels = sorted(query.obs["cell_type"].astype(str).unique())
    kw = {"mode": "zero_shot", "n_cells": 6, "config": LLMAnnotateConfig(labels=labels, n_genes=8)}
    client = _client(llama_server, tmp_path, structured_output="json_object")
    scl.tl.llm_annotate(query, client, client_kwargs={"temperature": 0, "params": {"max_tokens": 96}}, **kw)
    chosen = query.obs["llm"].notna()
    assert chosen.sum() == 6 and client.usage.rejected == 0 and client.usage.requests == 6
    assert (query.obs.loc[chosen, "llm_fallback"] == "ok").all()
    assert set(query.obs.loc[chosen, "llm"]) <= set(labels)

    # Plain text (no constraint): the random model writes garbage, which is flagged, never written.
    text = _client(llama_server, tmp_path / "text", structured_output=False)
    scl.tl.llm_annotate(
        query, text, key_added="plain", client_kwargs={"temperature": 0, "params": {"max_tokens": 12}}, **kw
    )
    body_reasons = query.obs.loc[chosen, "plain_fallback"].astype(str)
    assert text.usage.requests == 6 and text.usage.failed == 0
    assert set(body_reasons) <= {"ok", "malformed", "out_of_list"}
    flagged = body_reasons != "ok"
    assert flagged.sum() == len(query.uns["plain"]["fallbacks"])
    # A flagged cell gets the first label of the list; an "ok" one a label of the list.
    assert (query.obs.loc[chosen[chosen].index[flagged.to_numpy()], "plain"] == labels[0]).all()
    assert set(query.obs.loc[chosen, "plain"]) <= set(labels)
    assert np.all(query.obs.loc[chosen, "plain_error"].isna())
