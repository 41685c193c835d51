"""llm_annotate / llm_marker_matching against a real HTTP chat server on 127.0.0.1 (sc_llm.testing.ChatServer)."""

import dataclasses
import inspect
import json
import re
import subprocess
import sys
import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import sc_llm as scl
from sc_llm.llm import RERANK_TEMPLATE, ZERO_SHOT_TEMPLATE, ChatClient, ChatError, ChatRequest, parse_answer
from sc_llm.testing import LLAMA_CPP_FORMAT_ERROR, ChatServer
from sc_llm.tl import LLMAnnotateConfig

MODEL = "test-model"
FIG5 = (
    "Given the cell described. Output ONLY the most likely cell type from the following list: {labels}\n"
    "If you are not certain about what cell type this is, conclude that it is the first option in the list\n"
    '"""{sentence}"""'
)
FIG4 = 'Given the cell described. Output ONLY the most likely cell type from the following list: {labels}\n"""{sentence}"""'


def answer(label):
    return json.dumps({"cell_type": label})


@pytest.fixture
def toy():
    """3 training and 5 held-out cells with hand-written kNN candidates (see test_rerank_bookkeeping)."""
    names = ["t0", "t1", "t2", "c0", "c1", "c2", "c3", "c4"]
    truth = ["B", "T", "NK", "T", "B", "NK", "Mono", "T"]
    top = [
        ["B", "T", None], ["T", None, None], ["NK", "B", None],
        ["B", "T", "NK"], ["B", "Mono", "T"], ["T", "NK", "B"], ["Mono", "B", None], ["NK", None, None],
    ]  # fmt: skip
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(truth),
            "split": ["train"] * 3 + ["test"] * 5,
            "cell_sentence": [f"G{i}A G{i}B G{i}C" for i in range(len(names))],
        },
        index=names,
    )
    cats = ["B", "Mono", "NK", "T"]
    for j in range(3):
        obs[f"knn_top{j + 1}"] = pd.Categorical([t[j] for t in top], categories=cats)
    adata = ad.AnnData(np.zeros((len(names), 2), dtype=np.float32), obs=obs)
    adata.uns["knn"] = {"params": {"labels_key": "cell_type"}}
    return adata


def sentence(adata, cell):
    return adata.obs.loc[cell, "cell_sentence"]


@pytest.fixture
def table(toy):
    """c0 right, c1 right, c2 out of list, c3 malformed JSON; c4 has one candidate and is never asked."""
    s = {c: sentence(toy, c) for c in toy.obs_names}
    return {
        s["c0"]: answer("T"),
        s["c1"]: answer("B"),
        s["c2"]: answer("Mono"),
        s["c3"]: '{"cell_type": "Mono"',
    }


@pytest.fixture
def server(table):
    with ChatServer(table) as srv:
        yield srv


def client(server, tmp_path, **kw):
    c = ChatClient(MODEL, base_url=server.base_url, cache_dir=tmp_path / "cache", **kw)
    c.sleeps = []
    c._sleep = c.sleeps.append  # record backoff waits instead of sleeping
    return c


def test_rerank_prompts_structured_output_and_bookkeeping(toy, server, tmp_path):
    scl.tl.llm_annotate(
        toy, MODEL, client_kwargs={"base_url": server.base_url, "cache_dir": tmp_path, "max_concurrency": 1}
    )
    # The paper's Figure 5 prompt, candidates in kNN order, and a json_schema enum of exactly those.
    first = server.requests[0]
    assert first["model"] == MODEL
    assert "temperature" not in first
    assert first["messages"] == [
        {"role": "user", "content": FIG5.format(labels="['B', 'T', 'NK']", sentence=sentence(toy, "c0"))}
    ]
    schema = first["response_format"]["json_schema"]["schema"]
    assert first["response_format"]["type"] == "json_schema"
    assert schema["properties"]["cell_type"]["enum"] == ["B", "T", "NK"]
    assert RERANK_TEMPLATE == FIG5 and ZERO_SHOT_TEMPLATE == FIG4
    assert server.n_requests == 4  # c4 has a single candidate: no request

    obs = toy.obs
    assert obs["llm"].isna()[:3].all()
    assert obs["llm"].iloc[3:].tolist() == ["T", "B", "T", "Mono", "NK"]  # c2 -> first option T, c3 -> Mono
    assert obs["llm_fallback"].iloc[3:].tolist() == ["ok", "ok", "out_of_list", "malformed", "ok"]
    uns = toy.uns["llm"]
    flagged = uns["fallbacks"]
    assert flagged["cell"].tolist() == ["c2", "c3"] and flagged["reason"].tolist() == [
        "out_of_list",
        "malformed",
    ]
    assert flagged["answer"].iloc[0] == answer("Mono")

    # By hand: truth T B NK Mono T vs predictions T B T Mono NK: 3/5 correct; candidates' top-1 B B T Mono NK: 2/5.
    m = uns["metrics"]
    assert m["accuracy_mean"] == pytest.approx(0.6) and m["n_cells"] == 5
    assert m["baseline_accuracy"] == pytest.approx(0.4)
    # Per class (B, Mono, NK, T): precision 1, 1, 0, 1/2; recall 1, 1, 0, 1/2.
    assert m["runs"]["1"]["precision"] == pytest.approx(0.625)
    assert m["runs"]["1"]["recall"] == pytest.approx(0.625)
    assert np.isnan(m["accuracy_sd"])

    usage = uns["usage"]
    prompt_tokens = sum(len(p.split()) for p in server.prompts())
    assert usage["requests"] == 4 and usage["cached"] == 0 and usage["retries"] == 0
    assert usage["prompt_tokens"] == prompt_tokens and usage["reasoning_tokens"] == 4
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert uns["structured_output"] is True
    assert uns["params"]["mode"] == "rerank" and uns["params"]["n_cells"] == 5

    toy.write_h5ad(tmp_path / "out.h5ad")  # everything in uns is serializable
    assert ad.read_h5ad(tmp_path / "out.h5ad").uns["llm"]["metrics"]["accuracy_mean"] == pytest.approx(0.6)


def test_zero_shot_uses_training_labels_with_figure4_prompt(toy, tmp_path):
    s = {c: sentence(toy, c) for c in toy.obs_names}
    table = {
        s["c0"]: answer("T"),
        s["c1"]: answer("NK"),
        s["c2"]: answer("NK"),
        s["c3"]: "Mono",
        s["c4"]: answer("T"),
    }
    with ChatServer(table) as srv:
        scl.tl.llm_annotate(
            toy, MODEL, mode="zero_shot",
            client_kwargs={"base_url": srv.base_url, "cache_dir": tmp_path, "temperature": 0},
        )  # fmt: skip
        assert srv.n_requests == 5
        prompts = dict(zip([p.split('"""')[1] for p in srv.prompts()], srv.prompts(), strict=True))
        # Training cells are B, T, NK: Mono is not in the zero-shot list.
        assert prompts[s["c0"]] == FIG4.format(labels="['B', 'NK', 'T']", sentence=s["c0"])
        assert all(body["temperature"] == 0 for body in srv.requests)
    assert toy.uns["llm"]["labels"] == ["B", "NK", "T"]
    # c3 answers a bare "Mono", not JSON and not an allowed label: first label of the list, flagged.
    assert toy.obs["llm"].iloc[3:].tolist() == ["T", "NK", "NK", "B", "T"]
    assert toy.obs["llm_fallback"].iloc[6] == "malformed"
    assert toy.uns["llm"]["metrics"]["accuracy_mean"] == pytest.approx(3 / 5)
    assert "baseline_accuracy" not in toy.uns["llm"]["metrics"]


def test_explicit_labels_and_template(toy, tmp_path):
    with ChatServer(lambda prompt, body: answer("x")) as srv:
        scl.tl.llm_annotate(
            toy, MODEL, mode="zero_shot", split_key=None,
            config=LLMAnnotateConfig(labels=["x", "y"], template="{labels}|{sentence}"),
            client_kwargs={"base_url": srv.base_url, "cache_dir": tmp_path},
        )  # fmt: skip
        assert sorted(srv.prompts()) == [f"['x', 'y']|{s}" for s in sorted(toy.obs["cell_sentence"])]
    assert (toy.obs["llm"] == "x").all()
    assert toy.uns["llm"]["metrics"]["accuracy_mean"] == 0.0


def test_server_rejecting_json_schema_and_json_object_gets_json_in_the_prompt(toy, server, tmp_path):
    server.reject_format("json_schema")
    server.reject_format("json_object", status=422)
    scl.tl.llm_annotate(toy, MODEL, client_kwargs={"base_url": server.base_url, "cache_dir": tmp_path})
    kinds = [(b.get("response_format") or {}).get("type") for b in server.requests]
    # Negotiated once, by the first request alone: json_schema (400), json_object (422), then text.
    assert kinds == ["json_schema", "json_object"] + [None] * 4
    third = server.requests[2]["messages"][0]["content"]
    assert "JSON schema" in third and '"enum": ["B", "T", "NK"]' in third
    assert toy.obs["llm"].iloc[3:].tolist() == ["T", "B", "T", "Mono", "NK"]
    uns = toy.uns["llm"]
    assert uns["structured_output"] is False and uns["response_format"] == "text"
    assert uns["usage"]["rejected"] == 2 and uns["usage"]["retries"] == 0 and uns["usage"]["requests"] == 6


def test_429_then_success_honours_retry_after(toy, server, tmp_path):
    server.fail(429, times=2, retry_after="7")
    server.fail(503, times=2)
    c = client(server, tmp_path, backoff=0.5, max_retries=5, max_concurrency=1)
    scl.tl.llm_annotate(toy, model=c)
    assert c.sleeps[:2] == [7.0, 7.0]
    # Without Retry-After: exponential backoff with jitter in [0.5, 1] x 0.5 * 2**attempt.
    assert 0.5 * 0.5 * 4 <= c.sleeps[2] <= 0.5 * 4 and 0.5 * 0.5 * 8 <= c.sleeps[3] <= 0.5 * 8
    assert server.n_requests == 4 + 4
    assert toy.uns["llm"]["usage"]["retries"] == 4 and toy.uns["llm"]["usage"]["requests"] == 8
    assert toy.obs["llm"].iloc[3:].tolist() == ["T", "B", "T", "Mono", "NK"]


def test_persistent_500_flags_the_cell_and_a_rerun_asks_only_it(toy, server, tmp_path, caplog):
    server.fail(500, match=sentence(toy, "c2"))
    c = client(server, tmp_path, max_retries=2, max_concurrency=1)
    scl.tl.llm_annotate(toy, model=c)
    # c2 failed three times and is flagged with the reason; the others were answered and cached.
    assert server.n_requests == 3 + 3
    assert toy.obs["llm_fallback"].iloc[3:].tolist() == ["ok", "ok", "failed", "malformed", "ok"]
    assert toy.obs.loc["c2", "llm"] == "T"  # its first option, flagged
    assert (
        "HTTP 500" in toy.obs.loc["c2", "llm_error"] and "after 3 attempts" in toy.obs.loc["c2", "llm_error"]
    )
    assert toy.obs["llm_error"].isna().sum() == 7
    assert toy.uns["llm"]["outcomes"] == {"ok": 3, "malformed": 1, "out_of_list": 0, "failed": 1}
    assert toy.uns["llm"]["usage"]["failed"] == 1
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 3
    assert "1 of 5 answers failed" in caplog.text

    server.clear_rules()
    n = server.n_requests
    with pytest.warns(UserWarning, match="already exists"):
        scl.tl.llm_annotate(toy, model=client(server, tmp_path))
    assert server.n_requests - n == 1  # only c2
    assert toy.uns["llm"]["usage"]["cached"] == 3
    assert toy.obs.loc["c2", "llm_fallback"] == "out_of_list" and toy.obs["llm_error"].isna().all()
    first = toy.obs[["llm", "llm_fallback"]].copy()

    n = server.n_requests
    with pytest.warns(UserWarning, match="already exists"):
        scl.tl.llm_annotate(
            toy, MODEL, client_kwargs={"base_url": server.base_url, "cache_dir": tmp_path / "cache"}
        )
    assert server.n_requests == n  # everything from the cache: zero requests
    assert toy.uns["llm"]["usage"]["requests"] == 0 and toy.uns["llm"]["usage"]["cached"] == 4
    pd.testing.assert_frame_equal(toy.obs[["llm", "llm_fallback"]], first)


def test_client_raise_mode_names_the_cell_and_resumes(toy, server, tmp_path):
    """ChatClient.complete_many(errors="raise") keeps the old contract for direct users."""
    server.fail(500, match=sentence(toy, "c2"))
    c = client(server, tmp_path, max_retries=2, max_concurrency=1)
    reqs = [
        ChatRequest([{"role": "user", "content": f'x """{sentence(toy, n)}"""'}], name=n)
        for n in ("c0", "c2", "c3")
    ]
    with pytest.raises(
        ChatError, match=r"'c2'.*HTTP 500.*after 3 attempts.*1/3 answered, cached in .*rerun to resume"
    ):
        c.complete_many(reqs)
    assert server.n_requests == 1 + 3  # c3 never started


def completion(content, **extra):
    return json.dumps(
        {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}], **extra}
    )


def test_slow_response_hits_the_timeout(toy, server, tmp_path):
    server.slow(2.0, match=sentence(toy, "c1"))
    c = client(server, tmp_path, timeout=0.2, max_retries=1, max_concurrency=2)
    scl.tl.llm_annotate(toy, model=c)
    assert toy.obs.loc["c1", "llm_fallback"] == "failed"
    assert re.search(r"Timeout.*after 2 attempts", toy.obs.loc["c1", "llm_error"])
    server.clear_rules()
    server.slow(0.5, match=sentence(toy, "c1"), times=1)
    with pytest.warns(UserWarning, match="already exists"):
        scl.tl.llm_annotate(toy, model=client(server, tmp_path, timeout=0.2, max_retries=1))
    assert toy.obs.loc["c1", "llm"] == "B" and toy.obs.loc["c1", "llm_fallback"] == "ok"


def test_timeout_is_a_deadline_not_a_per_read_limit(toy, server, tmp_path):
    """B6: a server sending one byte every 0.25 s never lets a per-read timeout of 1 s fire; the
    attempt must still end at the 1 s deadline (before: the 62-byte answer arrived after 15 s)."""
    server.reply(completion(answer("B")), match=sentence(toy, "c1"), trickle=0.25)
    c = client(server, tmp_path, timeout=1.0, max_retries=0)
    scl.tl.llm_annotate(toy, model=c)
    assert toy.obs.loc["c1", "llm_fallback"] == "failed"
    assert "deadline" in toy.obs.loc["c1", "llm_error"]
    assert toy.obs.loc["c0", "llm"] == "T" and toy.obs.loc["c0", "llm_fallback"] == "ok"


def test_n_runs_mean_sd_and_independent_cache_entries(toy, tmp_path):
    s = {c: sentence(toy, c) for c in toy.obs_names}
    # Answers per run (requests go run by run with one worker): correct cells 3/5, 2/5, 3/5.
    table = {
        s["c0"]: [answer("T"), answer("B"), answer("T")],
        s["c1"]: [answer("B"), answer("B"), answer("B")],
        s["c2"]: [answer("NK"), answer("T"), answer("T")],
        s["c3"]: [answer("B"), answer("Mono"), answer("Mono")],
    }
    with ChatServer(table) as srv:
        kw = {
            "config": LLMAnnotateConfig(n_runs=3),
            "client_kwargs": {"base_url": srv.base_url, "cache_dir": tmp_path, "max_concurrency": 1},
        }
        scl.tl.llm_annotate(toy, MODEL, **kw)
        assert srv.n_requests == 12
        m = toy.uns["llm"]["metrics"]
        np.testing.assert_allclose(m["accuracy"], [3 / 5, 2 / 5, 3 / 5])
        assert m["accuracy_mean"] == pytest.approx(8 / 15)
        assert m["accuracy_sd"] == pytest.approx(np.sqrt(((1 / 15) ** 2 * 2 + (2 / 15) ** 2) / 2))
        assert toy.obs["llm_run2"].iloc[3:].tolist() == ["B", "B", "T", "Mono", "NK"]
        assert toy.obs["llm"].equals(toy.obs["llm_run1"])
        with pytest.warns(UserWarning, match="already exists"):
            scl.tl.llm_annotate(toy, MODEL, **kw)
        assert srv.n_requests == 12  # all three runs resumed from the cache
        np.testing.assert_allclose(toy.uns["llm"]["metrics"]["accuracy"], [3 / 5, 2 / 5, 3 / 5])


def test_cell_selection_subsample_is_seeded(toy, server, tmp_path):
    kw = {"model": MODEL, "client_kwargs": {"base_url": server.base_url, "cache_dir": tmp_path}}
    scl.tl.llm_annotate(toy, n_cells=2, random_state=3, **kw)
    held_out = np.flatnonzero(toy.obs["split"] != "train")
    expected = np.sort(np.random.default_rng(3).choice(held_out, size=2, replace=False))
    np.testing.assert_array_equal(np.flatnonzero(toy.obs["llm"].notna()), expected)
    scl.tl.llm_annotate(toy, cells=["c1", "c0"], key_added="two", **kw)
    assert toy.obs["two"].notna().tolist() == [False] * 3 + [True, True, False, False, False]
    with pytest.raises(KeyError, match="nope"):
        scl.tl.llm_annotate(toy, cells=["nope"], **kw)
    with pytest.raises(ValueError, match="more than once: 'c1'"):
        scl.tl.llm_annotate(toy, cells=["c1", "c0", "c1"], **kw)


def test_api_key_from_environment_and_errors(toy, server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-local-test")
    scl.tl.llm_annotate(toy, MODEL, client_kwargs={"base_url": server.base_url, "cache_dir": tmp_path})
    assert set(server.auth) == {"Bearer sk-local-test"}
    assert "sk-local-test" not in repr(ChatClient(MODEL, cache_dir=False))
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        scl.tl.llm_annotate(toy, MODEL, client_kwargs={"cache_dir": tmp_path})  # hosted default needs a key
    local = {"base_url": server.base_url}
    with pytest.raises(KeyError, match="knn_annotate"):
        scl.tl.llm_annotate(toy, MODEL, candidates_key="other", client_kwargs=local)
    with pytest.raises(KeyError, match="cell_sentences"):
        scl.tl.llm_annotate(toy, MODEL, sentence_key="missing", client_kwargs=local)
    with pytest.raises(ValueError, match="mode"):
        scl.tl.llm_annotate(toy, MODEL, mode="vote", client_kwargs=local)


def test_non_retryable_error_is_not_retried(tmp_path):
    with ChatServer({}) as srv:
        c = ChatClient(MODEL, base_url=srv.base_url, cache_dir=False)
        with pytest.raises(ChatError, match="HTTP 404.*no answer"):
            c.complete(ChatRequest([{"role": "user", "content": "hello"}], name="x"))
        assert srv.n_requests == 1


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"cell_type": "NK"}', ("NK", "ok")),
        ('```json\n{"cell_type": "nk"}\n```', ("NK", "ok")),
        ('<think>maybe {"cell_type": "B"}</think>\n{"cell_type": "T"}', ("T", "ok")),
        ('"T"', ("T", "ok")),
        ("T.", ("T", "ok")),
        ('{"cell_type": "Mono"}', (None, "out_of_list")),
        ('{"label": "T"}', (None, "malformed")),
        ('{"cell_type": "T"', (None, "malformed")),
        ("I think it is a T cell", (None, "malformed")),
        ("", (None, "malformed")),
    ],
)
def test_parse_answer(content, expected):
    assert parse_answer(content, ["B", "T", "NK"]) == expected


def test_marker_matching_counts_correct_matches(tmp_path):
    markers = {
        "B": ["MS4A1", "CD79A", "CD79B", "CD19", "BANK1", "EXTRA"],
        "NK": ["NKG7", "GNLY"],
        "T": ["CD3E", "CD3D"],
    }
    lists = "1. CD79A, CD79B, CD19, BANK1\n2. GNLY\n3. CD3D"

    def prompt(gene):
        return (
            f"Which of the following lists of marker genes belongs to the same cell type as the gene {gene}? "
            f"Output ONLY the number of that list.\n{lists}"
        )

    table = {prompt("MS4A1"): '{"list": "1"}', prompt("NKG7"): '{"list": "1"}', prompt("CD3E"): "no idea"}
    with ChatServer(table) as srv:
        result = scl.tl.llm_marker_matching(
            markers, MODEL, client_kwargs={"base_url": srv.base_url, "cache_dir": tmp_path}
        )
        assert srv.n_requests == 3 and all(b["temperature"] == 0 for b in srv.requests)
        assert srv.requests[0]["response_format"]["json_schema"]["schema"]["properties"]["list"]["enum"] == [
            "1",
            "2",
            "3",
        ]
    assert (result.n_correct, result.n_total, str(result)) == (1, 3, "1/3")
    t = result.table
    assert t["held_out"].tolist() == ["MS4A1", "NKG7", "CD3E"]
    assert t["correct"].tolist() == [True, False, False]
    assert t.loc["NK", "answered_type"] == "B" and t.loc["T", "reason"] == "malformed"
    assert result.usage["requests"] == 3
    frame = pd.DataFrame({"B": ["MS4A1", "CD79A"], "NK": ["NKG7", "GNLY"]})
    with pytest.raises(ValueError, match="fewer than 2"):
        scl.tl.llm_marker_matching(
            {"B": ["MS4A1"], "T": ["CD3E", "CD3D"]}, MODEL, client_kwargs={"base_url": srv.base_url}
        )
    with ChatServer(lambda p, b: '{"list": "2"}' if "NKG7" in p else '{"list": "1"}') as srv:
        result = scl.tl.llm_marker_matching(
            frame, MODEL, client_kwargs={"base_url": srv.base_url, "cache_dir": False}
        )
    assert str(result) == "2/2"


def test_rerank_on_real_pbmc_with_an_oracle_server(pbmc, tmp_path):
    """End to end on pbmc68k: kNN candidates, 100 random test cells, a server that knows the truth."""
    scl.pp.cell_sentences(pbmc)
    scl.pp.train_test_split(pbmc, "cell_type", random_state=0)
    scl.tl.knn_annotate(pbmc, use_rep="X_pca", labels_key="cell_type")
    truth = dict(zip(pbmc.obs["cell_sentence"], pbmc.obs["cell_type"].astype(str), strict=True))

    def oracle(prompt, body):
        allowed = body["response_format"]["json_schema"]["schema"]["properties"]["cell_type"]["enum"]
        label = truth[prompt.split('"""')[1]]
        return answer(label if label in allowed else "not a label")

    with ChatServer(oracle) as srv:
        scl.tl.llm_annotate(
            pbmc, MODEL, n_cells=100, client_kwargs={"base_url": srv.base_url, "cache_dir": tmp_path}
        )
        n_requests = srv.n_requests
    chosen = pbmc.obs["llm"].notna().to_numpy()
    assert chosen.sum() == 100 and (pbmc.obs["split"][chosen] == "test").all()
    cand = pbmc.obs.loc[chosen, ["knn_top1", "knn_top2", "knn_top3"]].astype(object)
    y = pbmc.obs.loc[chosen, "cell_type"].astype(str)
    in_top3 = np.array([t in set(row) for t, row in zip(y, cand.itertuples(index=False), strict=True)])
    assert n_requests == int(cand.notna().sum(axis=1).ge(2).sum())
    m = pbmc.uns["llm"]["metrics"]
    assert m["accuracy_mean"] == pytest.approx(in_top3.mean())  # oracle: right whenever the truth is offered
    assert m["baseline_accuracy"] == pytest.approx((cand["knn_top1"] == y).mean())
    assert m["accuracy_mean"] >= m["baseline_accuracy"]


def test_retry_after_header_forms():
    from email.utils import formatdate

    import httpx

    from sc_llm.llm._http import retry_after

    assert retry_after(httpx.Headers({"Retry-After": "3"})) == 3.0
    assert retry_after(httpx.Headers({"retry-after-ms": "250", "Retry-After": "1"})) == 0.25
    assert 8 < retry_after(httpx.Headers({"Retry-After": formatdate(time.time() + 10, usegmt=True)})) <= 10
    assert retry_after(httpx.Headers({"Retry-After": "soon"})) is None
    assert retry_after(httpx.Headers({})) is None


# --- issue 14: reliability --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "headers", "reason", "needle"),
    [
        # B7: shapes a 200 can take; each ends as an answer or a per-cell failure, never a crash.
        (json.dumps({"choices": [{"message": "B"}]}), None, "failed", "message is not an object"),
        (completion(answer("B"), usage="lots"), None, "ok", None),
        (completion(answer("B"), usage={"prompt_tokens": "many", "completion_tokens": -3}), None, "ok", None),
        (
            completion([{"type": "text", "text": '{"cell_type": '}, {"type": "text", "text": '"B"}'}]),
            None,
            "ok",
            None,
        ),
        (
            completion([{"type": "image_url", "image_url": {"url": "x"}}]),
            None,
            "failed",
            "without text content",
        ),
        (json.dumps({"choices": []}), None, "failed", "without choices"),
        (
            json.dumps({"choices": [{"message": {"role": "assistant", "refusal": "no"}}]}),
            None,
            "failed",
            "refusal",
        ),
        (
            json.dumps({"choices": [{"message": {"role": "assistant"}}]}),
            None,
            "failed",
            "without text content",
        ),
        (json.dumps(["not", "an", "object"]), None, "failed", "without choices"),
        ("<html>proxy error</html>", None, "failed", "not JSON"),
        (completion(answer("B")), {"Retry-After": "nan"}, "ok", None),
    ],
)
def test_unexpected_200_shapes_give_an_answer_or_a_flag(toy, server, tmp_path, raw, headers, reason, needle):
    server.reply(raw, match=sentence(toy, "c1"), times=1, headers=headers)
    c = client(server, tmp_path, max_concurrency=1)
    scl.tl.llm_annotate(toy, model=c)
    assert toy.obs.loc["c1", "llm_fallback"] == reason
    assert toy.obs.loc["c1", "llm"] == "B"  # the right answer, or the first option when flagged
    if needle is not None:
        assert needle in toy.obs.loc["c1", "llm_error"]
    assert toy.obs.loc["c0", "llm_fallback"] == "ok" and server.n_requests == 4  # a 200 is never retried
    assert c.usage.retries == 0
    # Nothing is cached before it parses: a rerun asks again only for a failed cell, and reads the
    # joined list of parts back as text.
    n = server.n_requests
    with pytest.warns(UserWarning, match="already exists"):
        scl.tl.llm_annotate(toy, model=client(server, tmp_path))
    assert server.n_requests - n == (reason == "failed")
    assert toy.obs.loc["c1", "llm"] == "B" and toy.obs.loc["c1", "llm_fallback"] == "ok"


def test_retry_after_nan_and_inf_fall_back_to_backoff(toy, server, tmp_path):
    server.fail(429, times=1, retry_after="nan")
    server.fail(503, times=1, retry_after="inf")
    c = client(server, tmp_path, backoff=0.5, max_concurrency=1)
    scl.tl.llm_annotate(toy, model=c)
    assert len(c.sleeps) == 2 and all(0.25 * 2**i <= w <= 0.5 * 2**i for i, w in enumerate(c.sleeps))
    assert toy.obs["llm_fallback"].iloc[3:].tolist() == ["ok", "ok", "out_of_list", "malformed", "ok"]


def test_usage_counts_of_odd_types_are_read_or_zero():
    from sc_llm.llm._client import _parse_completion

    data = json.loads(
        completion(
            "x", usage={"prompt_tokens": 7.0, "completion_tokens": "12", "completion_tokens_details": "?"}
        )
    )
    assert _parse_completion(data, "text").usage == {
        "prompt_tokens": 7,
        "completion_tokens": 12,
        "reasoning_tokens": 0,
    }
    data = json.loads(completion("x", usage={"prompt_tokens": True, "completion_tokens": float("nan")}))
    assert _parse_completion(data, "text").usage == {
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "reasoning_tokens": 0,
    }


def test_non_retryable_4xx_on_one_cell_flags_only_that_cell(toy, server, tmp_path):
    """B8: before, one 400 aborted llm_annotate for every cell."""
    server.fail(400, match=sentence(toy, "c3"), body=json.dumps({"error": {"message": "prompt too long"}}))
    c = client(server, tmp_path, max_concurrency=1)
    scl.tl.llm_annotate(toy, model=c)
    assert toy.obs["llm_fallback"].iloc[3:].tolist() == ["ok", "ok", "out_of_list", "failed", "ok"]
    assert "HTTP 400: prompt too long" in toy.obs.loc["c3", "llm_error"]
    # The 400 is not about the response format: the next form is tried once for that cell, and the
    # client stays on json_schema for the others.
    kinds = [(b.get("response_format") or {}).get("type") for b in server.requests]
    assert kinds == ["json_schema", "json_schema", "json_schema", "json_schema", "json_object", None]
    assert toy.uns["llm"]["response_format"] == "json_schema" and c.usage.retries == 0
    flagged = toy.uns["llm"]["fallbacks"].set_index("cell")
    assert flagged.loc["c3", "reason"] == "failed" and "prompt too long" in flagged.loc["c3", "error"]
    toy.write_h5ad(tmp_path / "out.h5ad")
    back = ad.read_h5ad(tmp_path / "out.h5ad")
    assert (
        back.obs.loc["c3", "llm_error"] == toy.obs.loc["c3", "llm_error"]
        and back.obs["llm_error"].isna().sum() == 7
    )


def test_every_request_failing_stops_early_and_raises(toy, server, tmp_path):
    server.fail(401, body=json.dumps({"error": {"message": "invalid api key"}}))
    c = client(server, tmp_path, max_concurrency=1, max_consecutive_failures=2)
    with pytest.raises(
        ChatError, match=r"HTTP 401: invalid api key.*first 2 requests all failed.*0/4 answered"
    ):
        scl.tl.llm_annotate(toy, model=c)
    assert server.n_requests == 2 and "llm" not in toy.obs


def test_failures_in_a_row_after_answers_leave_the_rest_flagged_not_sent(toy, server, tmp_path):
    server.fail(503, match=sentence(toy, "c1"))
    server.fail(503, match=sentence(toy, "c2"))
    c = client(server, tmp_path, max_concurrency=1, max_retries=0, max_consecutive_failures=2)
    scl.tl.llm_annotate(toy, model=c)
    assert server.n_requests == 3  # c0 answered, c1 and c2 failed, c3 not sent
    assert toy.obs["llm_fallback"].iloc[3:].tolist() == ["ok", "failed", "failed", "failed", "ok"]
    assert toy.obs.loc["c3", "llm_error"].startswith("not sent: 2 requests in a row failed")
    assert c.usage.failed == 3
    server.clear_rules()
    with pytest.warns(UserWarning, match="already exists"):
        scl.tl.llm_annotate(toy, model=client(server, tmp_path))
    assert server.n_requests == 3 + 3 and toy.obs["llm_error"].isna().all()


def test_retry_flagged_asks_again_only_for_flagged_cached_answers(toy, server, tmp_path, table):
    scl.tl.llm_annotate(toy, model=client(server, tmp_path))
    assert toy.obs["llm_fallback"].iloc[3:].tolist() == ["ok", "ok", "out_of_list", "malformed", "ok"]
    table[sentence(toy, "c2")] = answer("NK")
    table[sentence(toy, "c3")] = answer("B")
    n = server.n_requests
    kw = {"model": MODEL, "client_kwargs": {"base_url": server.base_url, "cache_dir": tmp_path / "cache"}}
    with pytest.warns(UserWarning, match="already exists"):
        scl.tl.llm_annotate(toy, **kw)
    assert server.n_requests == n  # by default a flagged answer is an answer: not paid for again
    with pytest.warns(UserWarning, match="already exists"):
        scl.tl.llm_annotate(toy, config=LLMAnnotateConfig(retry_flagged=True), **kw)
    assert sorted(server.prompts()[n:]) == sorted(p for p in server.prompts()[:4] if "G5" in p or "G6" in p)
    assert toy.obs["llm"].iloc[3:].tolist() == ["T", "B", "NK", "B", "NK"]
    assert (toy.obs["llm_fallback"].iloc[3:] == "ok").all()
    n = server.n_requests
    with pytest.warns(UserWarning, match="already exists"):
        scl.tl.llm_annotate(toy, config=LLMAnnotateConfig(retry_flagged=True), **kw)
    assert server.n_requests == n  # the new answers replaced the flagged ones in the cache


def test_cache_key_includes_the_server(toy, tmp_path):
    """B13: a second server with the same model name got the first one's answers."""
    s = {c: sentence(toy, c) for c in toy.obs_names}
    with (
        ChatServer(dict.fromkeys(s.values(), answer("B"))) as one,
        ChatServer(dict.fromkeys(s.values(), answer("T"))) as two,
    ):
        for srv, key in ((one, "one"), (two, "two")):
            scl.tl.llm_annotate(
                toy, MODEL, key_added=key, client_kwargs={"base_url": srv.base_url, "cache_dir": tmp_path}
            )
        assert one.n_requests == 4 and two.n_requests == 4
    assert (toy.obs["one"].iloc[3:7] == "B").all() and toy.obs.loc["c0", "two"] == "T"


def test_unwritable_cache_fails_before_any_request(toy, server, tmp_path):
    """B14: answers were paid for, then the cache write failed."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match=r"answer cache .*file/cache is not writable.*cache_dir=False"):
        scl.tl.llm_annotate(
            toy, MODEL, client_kwargs={"base_url": server.base_url, "cache_dir": blocker / "cache"}
        )
    assert server.n_requests == 0 and "llm" not in toy.obs


def test_cache_entry_without_content_is_asked_again(toy, server, tmp_path):
    """B15: an entry without "content" raised KeyError."""
    c = client(server, tmp_path)
    scl.tl.llm_annotate(toy, model=c)
    entries = sorted((tmp_path / "cache").rglob("*.json"))
    for path, broken in zip(
        entries, [{"model": MODEL, "structured": True}, ["a list"], {"content": 3}], strict=False
    ):
        path.write_text(json.dumps(broken))
    n = server.n_requests
    with pytest.warns(UserWarning, match="already exists"):
        scl.tl.llm_annotate(toy, model=client(server, tmp_path))
    assert server.n_requests - n == 3
    assert toy.obs["llm"].iloc[3:].tolist() == ["T", "B", "T", "Mono", "NK"]


def test_error_bodies_and_logs_are_redacted(toy, server, tmp_path, caplog):
    """B15: a proxy echoing the Authorization header leaked the key into ChatError and the logs."""
    key = "sk-proj-abcdefghijklmnop0123456789"
    echo = json.dumps(
        {"error": {"message": f"bad request, headers: {{'Authorization': 'Bearer {key}'}} api_key={key}"}}
    )
    server.fail(502, match=sentence(toy, "c0"), times=1, body=echo)
    server.fail(400, match=sentence(toy, "c1"), body=echo)
    c = client(server, tmp_path, api_key=key, max_concurrency=1)
    caplog.set_level("DEBUG", logger="sc_llm")
    scl.tl.llm_annotate(toy, model=c)
    assert server.auth[0] == f"Bearer {key}"  # the key is sent…
    error = toy.obs.loc["c1", "llm_error"]
    assert "HTTP 400" in error and "[REDACTED]" in error
    assert key not in error and key not in caplog.text and key[-12:] not in caplog.text  # …and never echoed
    assert "retry 1" in caplog.text
    with pytest.raises(ChatError) as info:
        c.complete(ChatRequest([{"role": "user", "content": f'"""{sentence(toy, "c1")}"""'}]))
    assert key not in str(info.value) and "[REDACTED]" in str(info.value)


def test_redact_patterns():
    from sc_llm.llm._http import redact

    text = (
        'Authorization: Bearer abc.def-123 {"api_key": "k-9876543210"} x-api-key=zzzzzzzz '
        "https://user:pw123456@example.org/v1 token sk-ABCDEFGH12345678 keep this"
    )
    out = redact(text, ["k-9876543210"])
    for secret in ("abc.def-123", "9876543210", "zzzzzzzz", "pw123456", "sk-ABCDEFGH12345678"):
        assert secret not in out
    assert out.endswith("keep this") and "example.org/v1" in out


def test_key_in_base_url_userinfo_is_sent_but_never_stored(toy, server, tmp_path):
    """B15: a key in base_url userinfo was stored in uns and the h5ad."""
    url = server.base_url.replace("http://", "http://me:sk-userinfo-secret-42@")
    scl.tl.llm_annotate(toy, MODEL, client_kwargs={"base_url": url, "cache_dir": tmp_path})
    assert toy.uns["llm"]["params"]["base_url"] == server.base_url
    assert server.auth[0].startswith("Basic ")  # sent as basic auth
    toy.write_h5ad(tmp_path / "out.h5ad")
    assert b"sk-userinfo-secret-42" not in (tmp_path / "out.h5ad").read_bytes()
    assert not any(b"sk-userinfo-secret-42" in p.read_bytes() for p in tmp_path.rglob("*.json"))
    assert "sk-userinfo-secret-42" not in repr(ChatClient(MODEL, base_url=url, cache_dir=False))


def test_template_with_braces_is_filled_safely(toy, server, tmp_path):
    """B20: a JSON example in the template raised KeyError (str.format)."""
    template = 'Answer like {"cell_type": "X"} with one of {labels}; {{kept}} {other}\n"""{sentence}"""'
    scl.tl.llm_annotate(
        toy, MODEL, config=LLMAnnotateConfig(template=template),
        client_kwargs={"base_url": server.base_url, "cache_dir": tmp_path, "max_concurrency": 1},
    )  # fmt: skip
    assert server.prompts()[0] == (
        f'Answer like {{"cell_type": "X"}} with one of [\'B\', \'T\', \'NK\']; {{{{kept}}}} {{other}}\n"""{sentence(toy, "c0")}"""'
    )
    assert toy.obs["llm"].iloc[3:].tolist() == ["T", "B", "T", "Mono", "NK"]


def test_sentence_with_braces_is_not_substituted_again(tmp_path):
    from sc_llm.llm._prompts import render

    assert render("{labels}|{sentence}", labels="['a']", sentence="{labels} {x}") == "['a']|{labels} {x}"


@pytest.mark.parametrize("template", ["{labels} only", "no fields", '"""{sentence}"""'])
def test_template_without_required_fields_is_refused(toy, server, template):
    """B21: a template without {sentence} was accepted (every prompt lacked the cell)."""
    with pytest.raises(ValueError, match=r"template lacks .*must contain \{labels\} and \{sentence\}"):
        scl.tl.llm_annotate(
            toy,
            MODEL,
            config=LLMAnnotateConfig(template=template),
            client_kwargs={"base_url": server.base_url},
        )
    with pytest.raises(ValueError, match=r"template lacks \{gene\}"):
        scl.tl.llm_marker_matching(
            {"B": ["A", "B"], "T": ["C", "D"]},
            MODEL,
            template="{lists}",
            client_kwargs={"base_url": server.base_url},
        )
    assert server.n_requests == 0


@pytest.mark.parametrize("split", ["all_test", "no_column"])
def test_rerank_on_query_cells_only(toy, server, tmp_path, split):
    """Re-ranking needs no training cells: before, "No cell has obs['split'] == 'train'"."""
    query = toy[3:].copy()
    if split == "no_column":
        del query.obs["split"]
    local = {"base_url": server.base_url, "cache_dir": tmp_path}
    scl.tl.llm_annotate(query, MODEL, client_kwargs=local)
    assert query.obs["llm"].tolist() == ["T", "B", "T", "Mono", "NK"]
    with pytest.raises((KeyError, ValueError), match="split"):  # zero-shot without labels still needs them
        scl.tl.llm_annotate(query, MODEL, mode="zero_shot", client_kwargs=local)


def test_llama_cpp_style_500_negotiates_json_object_once_without_retries(toy, server, tmp_path):
    """The real-server failure: llama.cpp answers json_schema with HTTP 500; every cell used to be
    retried 7 times and the call ended with 0 answers."""
    server.reject_format("json_schema", status=500, message=LLAMA_CPP_FORMAT_ERROR)
    c = client(server, tmp_path, max_concurrency=8)
    scl.tl.llm_annotate(toy, model=c)
    kinds = [b["response_format"]["type"] for b in server.requests]
    assert kinds == ["json_schema"] + ["json_object"] * 4  # negotiated once, before the others start
    assert all(b["response_format"]["schema"]["required"] == ["cell_type"] for b in server.requests[1:])
    assert c.usage.retries == 0 and c.usage.rejected == 1 and c.sleeps == []
    assert toy.uns["llm"]["response_format"] == "json_object" and toy.uns["llm"]["structured_output"] is True
    assert toy.obs["llm"].iloc[3:].tolist() == ["T", "B", "T", "Mono", "NK"]
    # The client remembers: a second call with the same client asks json_object straight away.
    n = server.n_requests
    scl.tl.llm_annotate(toy, c, key_added="again", config=LLMAnnotateConfig(n_runs=2))
    assert {b["response_format"]["type"] for b in server.requests[n:]} == {"json_object"}


def test_an_ordinary_500_is_still_retried(toy, server, tmp_path):
    server.fail(500, times=1, body=json.dumps({"error": {"message": "CUDA out of memory"}}))
    c = client(server, tmp_path, max_concurrency=1)
    scl.tl.llm_annotate(toy, model=c)
    assert (
        c.usage.retries == 1 and c.usage.rejected == 0 and toy.uns["llm"]["response_format"] == "json_schema"
    )


def test_structured_output_argument_forms(server, tmp_path):
    assert ChatClient(MODEL, base_url=server.base_url, structured_output=False).response_format == "text"
    assert (
        ChatClient(MODEL, base_url=server.base_url, structured_output="json_object").response_format
        == "json_object"
    )
    with pytest.raises(ValueError, match="structured_output"):
        ChatClient(MODEL, base_url=server.base_url, structured_output="grammar")


def test_marker_matching_flags_a_failed_request(tmp_path):
    markers = {"B": ["MS4A1", "CD79A"], "NK": ["NKG7", "GNLY"], "T": ["CD3E", "CD3D"]}
    with ChatServer(lambda p, b: '{"list": "3"}' if "CD3E" in p else '{"list": "1"}') as srv:
        srv.fail(400, match="NKG7", body=json.dumps({"error": {"message": "bad"}}))
        result = scl.tl.llm_marker_matching(
            markers, MODEL, client_kwargs={"base_url": srv.base_url, "cache_dir": tmp_path}
        )
    t = result.table
    assert t["reason"].tolist() == ["ok", "failed", "ok"] and t["correct"].tolist() == [True, False, True]
    assert "HTTP 400: bad" in t.loc["NK", "error"] and pd.isna(t.loc["NK", "answer"])
    assert str(result) == "2/3"


def test_a_cache_write_failure_keeps_the_answer(server, tmp_path, caplog):
    c = client(server, tmp_path)
    req = ChatRequest([{"role": "user", "content": 'x """G3A G3B G3C"""'}], schema=None)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / c.cache_key(req)[:2]).write_text("a file where the entry's folder should be")
    assert c.complete(req).content == answer("T")
    assert "Could not write to the answer cache" in caplog.text


def test_deadline_also_bounds_trickled_headers(tmp_path):
    """The status line and headers, sent one byte per 0.2 s, must not outlive the deadline either."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nX-Padding: " + b"a" * 100:  # ~20 s if nobody hangs up
                if stop.is_set():
                    break
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    break
                time.sleep(0.2)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    c = ChatClient(
        MODEL,
        base_url=f"http://127.0.0.1:{listener.getsockname()[1]}/v1",
        cache_dir=False,
        timeout=1.0,
        max_retries=0,
    )
    try:
        with pytest.raises(ChatError, match="ReadTimeout: no complete answer within the 1 s deadline"):
            c.complete(ChatRequest([{"role": "user", "content": "hello"}]))
    finally:
        stop.set()
        c.close()
        thread.join(5)
        listener.close()


# --- model + client_kwargs, LLMAnnotateConfig ------------------------------------------------------


def _bodies(requests):
    return sorted(json.dumps(b, sort_keys=True) for b in requests)


def _cache_names(folder):
    return sorted(p.name for p in folder.rglob("*.json"))


def test_client_kwargs_are_checked(toy, server, tmp_path):
    c = client(server, tmp_path)
    with pytest.raises(ValueError, match=r"client_kwargs \['cache_dir', 'timeout'\] configure a new client"):
        scl.tl.llm_annotate(toy, c, client_kwargs={"timeout": 5, "cache_dir": tmp_path, "temperature": 0})
    with pytest.raises(TypeError, match=r"ChatClient does not take: \['temprature'\]"):
        scl.tl.llm_annotate(toy, MODEL, client_kwargs={"temprature": 0})
    with pytest.raises(TypeError, match="unexpected keyword argument 'base_url'"):
        scl.tl.llm_annotate(toy, MODEL, base_url="http://x/v1")
    with pytest.raises(TypeError, match="model must be a model name or a ChatClient"):
        scl.tl.llm_annotate(toy, 3, client_kwargs={"base_url": server.base_url})
    with pytest.raises(ValueError, match="disagree"):
        scl.tl.llm_annotate(toy, c, client_kwargs={"temperature": 0, "params": {"temperature": 1}})
    assert server.n_requests == 0 and "llm" not in toy.obs


def test_config_is_frozen_and_validated():
    config = LLMAnnotateConfig(labels=["B", "T"], n_runs=3)
    assert config.labels == ("B", "T")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.n_runs = 1
    with pytest.raises(ValueError, match="n_runs must be at least 1"):
        LLMAnnotateConfig(n_runs=0)
    with pytest.raises(ValueError, match="n_genes must be positive"):
        LLMAnnotateConfig(n_genes=0)
    with pytest.raises(TypeError, match="got the string 'B'"):
        LLMAnnotateConfig(labels="B")
    with pytest.raises(ValueError, match=r"template lacks \{sentence\}"):
        LLMAnnotateConfig(template="{labels}")
    with pytest.raises(TypeError, match="config must be an LLMAnnotateConfig"):
        scl.tl.llm_annotate(ad.AnnData(np.zeros((1, 1))), MODEL, config={"n_runs": 2})
    # The two tools stay within the conventions' ~15 parameters.
    assert len(inspect.signature(scl.tl.llm_annotate).parameters) <= 15
    assert len(inspect.signature(scl.tl.llm_marker_matching).parameters) <= 15


def test_chat_client_temperature_and_price():
    params = {"seed": 1}
    c = ChatClient(MODEL, base_url="http://127.0.0.1:9/v1", cache_dir=False, temperature=0.3, params=params)
    assert c.params == {"seed": 1, "temperature": 0.3} and params == {"seed": 1}  # the caller's dict is kept
    assert ChatClient(MODEL, base_url="http://h/v1", params={"temperature": 0.3}, temperature=0.3).params == {
        "temperature": 0.3
    }
    with pytest.raises(ValueError, match="disagree"):
        ChatClient(MODEL, base_url="http://h/v1", params={"temperature": 1.0}, temperature=0.3)
    usage = scl.llm.Usage(prompt_tokens=2_000_000, completion_tokens=1_000_000)
    assert usage.summary((0.5, 4.0))["cost"] == pytest.approx(5.0)


def test_marker_matching_temperature_and_params(tmp_path):
    markers = {"B": ["MS4A1", "CD79A", "MS4A1", "CD19"], "NK": ["NKG7", "GNLY"], "T": ["CD3E", "CD3D"]}
    with ChatServer(lambda p, b: '{"list": "1"}' if "MS4A1" in p else '{"list": "2"}') as srv:
        new = scl.tl.llm_marker_matching(
            markers, MODEL, client_kwargs={"base_url": srv.base_url, "cache_dir": False}
        )
        assert [b["temperature"] for b in srv.requests] == [0.0] * 3  # the paper's, by default
        # The duplicated MS4A1 is dropped: it would otherwise give its own list away.
        assert srv.requests[0]["messages"][0]["content"].endswith("1. CD79A, CD19\n2. GNLY\n3. CD3D")
        again = scl.tl.llm_marker_matching(
            markers, model=MODEL, client_kwargs={"base_url": srv.base_url, "cache_dir": False}
        )
        assert _bodies(srv.requests[3:6]) == _bodies(srv.requests[:3])
        scl.tl.llm_marker_matching(
            markers, MODEL, client_kwargs={"base_url": srv.base_url, "cache_dir": False, "temperature": None}
        )
        assert all("temperature" not in b for b in srv.requests[6:9])
        warm = ChatClient(MODEL, base_url=srv.base_url, cache_dir=False, temperature=0.7)
        result = scl.tl.llm_marker_matching(markers, warm, client_kwargs={"price_per_1m_tokens": (1.0, 1.0)})
        assert all(b["temperature"] == 0.7 for b in srv.requests[9:])
    pd.testing.assert_frame_equal(again.table, new.table)
    assert str(new) == str(again) == "2/3" and new.params == again.params
    assert new.params["n_markers"] == 5 and json.loads(new.params["request_params"]) == {"temperature": 0.0}
    assert json.loads(result.params["request_params"]) == {"temperature": 0.7} and "cost" in result.usage


def test_marker_matching_reads_a_gmt_file(tmp_path):
    gmt = tmp_path / "markers.gmt"
    gmt.write_text("B\tna\tMS4A1\tCD79A\nT\tna\tCD3E\tCD3D\n")
    with ChatServer(lambda p, b: '{"list": "1"}' if "MS4A1" in p else '{"list": "2"}') as srv:
        result = scl.tl.llm_marker_matching(
            gmt, MODEL, client_kwargs={"base_url": srv.base_url, "cache_dir": False}
        )
    assert str(result) == "2/2" and result.table["held_out"].tolist() == ["MS4A1", "CD3E"]


def test_import_stays_free_of_httpx_and_torch():
    code = "import sys, sc_llm, sc_llm.llm; print(sorted({'httpx', 'httpcore', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
