"""scl.tl.ablate / ablation_study: each ablation's exact definition, and Table 2's layout on pbmc68k."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest

import sc_llm as scl
from sc_llm.tl._ablate import n_top

HEX10 = re.compile(r"^[0-9a-f]{10}$")


def _fit_count(tokenizer, max_tokens: int, words: list[str]) -> int:
    """Independent reference: the most leading whole words whose tokens fit the limit (specials included)."""
    n = 0
    while n < len(words) and len(tokenizer(" ".join(words[: n + 1]))["input_ids"]) <= max_tokens:
        n += 1
    return n


@pytest.fixture
def small(pbmc_embedded):
    return pbmc_embedded[:40].copy()


def _words(adata, key):
    return [s.split() for s in adata.obs[key]]


def test_gene_hash_is_truncated_sha256_and_deterministic(small):
    scl.tl.ablate(small, "gene_hash")
    orig, hashed = _words(small, "cell_sentence"), _words(small, "cell_sentence_gene_hash")
    mapping = {}
    for o, h in zip(orig, hashed, strict=True):
        assert len(o) == len(h)
        for gene, code in zip(o, h, strict=True):
            assert code == hashlib.sha256(gene.encode("utf-8")).hexdigest()[:10]
            assert mapping.setdefault(gene, code) == code
    assert small.uns["cell_sentence_gene_hash"] == {
        "params": {"kind": "gene_hash", "fraction": None, "random_state": 0, "sentence_key": "cell_sentence"}
    }
    assert "cell_sentence" in small.obs and small.obs["cell_sentence"].iloc[0].split() == orig[0]


def test_per_instance_hash_is_fresh_per_occurrence_and_seeded(small):
    scl.tl.ablate(small, "per_instance_hash", random_state=1)
    first = _words(small, "cell_sentence_per_instance_hash")
    assert [len(w) for w in first] == [len(w) for w in _words(small, "cell_sentence")]
    flat = [w for row in first for w in row]
    assert all(HEX10.match(w) for w in flat)
    # FTL is in every cell's sentence: its occurrences must all get different strings.
    assert len(set(flat)) == len(flat)
    with pytest.warns(UserWarning, match="already exists"):
        scl.tl.ablate(small, "per_instance_hash", random_state=1)
    assert _words(small, "cell_sentence_per_instance_hash") == first
    scl.tl.ablate(small, "per_instance_hash", random_state=2, key_added="other")
    assert _words(small, "other") != first


def test_shuffle_all_permutes_every_gene(small):
    scl.tl.ablate(small, "shuffle_all", random_state=0)
    orig, shuf = _words(small, "cell_sentence"), _words(small, "cell_sentence_shuffle_all")
    assert all(sorted(o) == sorted(s) for o, s in zip(orig, shuf, strict=True))
    # A long random permutation moves genes far beyond any context window.
    assert all(o[:5] != s[:5] for o, s in zip(orig, shuf, strict=True))
    with pytest.warns(UserWarning, match="already exists"):
        again = scl.tl.ablate(small, "shuffle_all", random_state=0, copy=True)
    assert _words(again, "cell_sentence_shuffle_all") == shuf


def test_shuffle_in_context_only_moves_genes_that_fit(small, text_encoder):
    scl.tl.ablate(small, "shuffle_in_context", model=text_encoder)
    orig, shuf = _words(small, "cell_sentence"), _words(small, "cell_sentence_shuffle_in_context")
    tok, limit = text_encoder.tokenizer, text_encoder.max_tokens
    counts = []
    for o, s in zip(orig, shuf, strict=True):
        n = _fit_count(tok, limit, o)
        counts.append(n)
        assert 0 < n < len(o)
        assert sorted(s[:n]) == sorted(o[:n]) and s[n:] == o[n:]
        assert _fit_count(tok, limit, s) == n  # the same genes are still the ones read
    assert sum(o[:n] != s[:n] for o, s, n in zip(orig, shuf, counts, strict=True)) == len(orig)
    info = small.uns["cell_sentence_shuffle_in_context"]
    assert info["genes_in_context"]["mean"] == pytest.approx(np.mean(counts))
    assert (
        info["params"]["model"] == text_encoder.identity() and info["params"]["kind"] == "shuffle_in_context"
    )
    assert set(info) == {"params", "genes_in_context"}


@pytest.mark.parametrize("fraction", [None, 0.25])
def test_shuffle_top_moves_only_the_top_fraction(small, text_encoder, fraction):
    scl.tl.ablate(small, "shuffle_top", fraction=fraction, model=text_encoder)
    key = f"cell_sentence_shuffle_top_{fraction or 0.1:g}"
    orig, shuf = _words(small, "cell_sentence"), _words(small, key)
    for o, s in zip(orig, shuf, strict=True):
        n = _fit_count(text_encoder.tokenizer, text_encoder.max_tokens, o)
        k = int(np.floor((fraction or 0.1) * n + 0.5))
        assert sorted(s[:k]) == sorted(o[:k]) and s[k:] == o[k:]
    assert small.uns[key]["params"]["fraction"] == (fraction or 0.1)
    assert small.uns[key]["params"]["rounding"].startswith(
        "n_top = max(1, floor(fraction * n_in_context + 0.5))"
    )


def test_hash_shuffle_in_context_counts_context_on_hashed_sentence(small, text_encoder):
    scl.tl.ablate(small, "gene_hash")
    scl.tl.ablate(small, "hash_shuffle_in_context", model=text_encoder)
    hashed, both = (
        _words(small, "cell_sentence_gene_hash"),
        _words(small, "cell_sentence_hash_shuffle_in_context"),
    )
    for h, b in zip(hashed, both, strict=True):
        n = _fit_count(text_encoder.tokenizer, text_encoder.max_tokens, h)
        assert sorted(b[:n]) == sorted(h[:n]) and b[n:] == h[n:]


@pytest.mark.parametrize("fraction", [0.1, 0.5, 1.0])
def test_truncate_keeps_top_fraction_of_in_context_genes(small, text_encoder, fraction):
    scl.tl.ablate(small, "truncate", fraction=fraction, model=text_encoder, key_added="short")
    for o, t in zip(_words(small, "cell_sentence"), _words(small, "short"), strict=True):
        n = _fit_count(text_encoder.tokenizer, text_encoder.max_tokens, o)
        assert t == o[: int(np.floor(fraction * n + 0.5))]
    assert small.uns["short"]["genes_kept"]["max"] <= small.uns["short"]["genes_in_context"]["max"]


def test_n_top_rounding():
    assert n_top(150, 0.1) == 15 and n_top(76, 0.1) == 8 and n_top(15, 0.1) == 2
    assert n_top(5, 0.1) == 1 and n_top(0, 0.1) == 0 and n_top(7, 1.0) == 7


def test_ablate_errors(small):
    with pytest.raises(ValueError, match="Unknown ablation kind 'hash'"):
        scl.tl.ablate(small, "hash")
    with pytest.raises(ValueError, match="takes no fraction"):
        scl.tl.ablate(small, "gene_hash", fraction=0.2)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        scl.tl.ablate(small, "truncate", fraction=0)
    with pytest.raises(KeyError, match="'nope' not found"):
        scl.tl.ablate(small, "gene_hash", sentence_key="nope")
    small.obs.loc[small.obs_names[3], "cell_sentence"] = np.nan
    with pytest.raises(ValueError, match=small.obs_names[3]):
        scl.tl.ablate(small, "gene_hash")


def test_ablation_study_layout_and_baseline(pbmc_embedded, text_encoder, tmp_path):
    adata = pbmc_embedded[::6].copy()
    obs_before, obsm_before = adata.obs.copy(), set(adata.obsm)
    kinds = ["shuffle_all", ("truncate", 0.2), ("truncate", 0.5)]
    table = scl.tl.ablation_study(adata, "cell_type", model=text_encoder, kinds=kinds)
    assert list(table.index) == ["accuracy", "precision", "recall", "f1", "kmeans_ari", "kmeans_ami"]
    assert list(table.columns) == ["baseline", "shuffle_all", "truncate_0.2", "truncate_0.5"]
    assert adata.uns["ablation_study"]["table"] is table
    assert adata.obs.equals(obs_before) and set(adata.obsm) == obsm_before
    # The baseline column equals a direct run of embed_text + knn_annotate + cluster_metrics.
    ref = adata.copy()
    scl.tl.embed_text(ref, text_encoder, key_added="X_ref")
    scl.tl.knn_annotate(ref, "X_ref", "cell_type", key_added="ref")
    clusters = scl.tl.cluster_metrics(ref, "X_ref", "cell_type")
    for metric in ("accuracy", "precision", "recall", "f1"):
        assert table.loc[metric, "baseline"] == pytest.approx(ref.uns["ref"]["metrics"][metric])
    assert table.loc["kmeans_ari", "baseline"] == pytest.approx(clusters["ari"])
    # Full shuffling leaves no signal beyond chance; the intact sentences carry a lot.
    assert table.loc["accuracy", "baseline"] > table.loc["accuracy", "shuffle_all"] + 0.2
    counts = adata.uns["ablation_study"]["genes_in_context"]
    assert counts["truncate_0.2"] < counts["truncate_0.5"] < counts["baseline"]

    scl.pl.ablation(adata, save=tmp_path / "ablation.png")
    scl.pl.sentence_length(
        adata, baselines={"other encoder": {"accuracy": 0.5, "f1": 0.4}}, save=tmp_path / "len.png"
    )
    assert (tmp_path / "ablation.png").stat().st_size > 0 and (tmp_path / "len.png").stat().st_size > 0
    with pytest.raises(ValueError, match="listed twice"):
        scl.tl.ablation_study(adata, "cell_type", kinds=["gene_hash", "gene_hash"])
