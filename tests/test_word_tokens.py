"""WordTokenizer: cell ids gathered from per-gene ids equal the tokenizer's own output, token for token."""

from __future__ import annotations

import copy
import pickle
import warnings

import numpy as np
import pytest
from _tokenizers import bpe_across_spaces, byte_level_bpe, joining_normalizer, unigram, wordpiece_cased

import sc_llm as scl
from sc_llm.models._word_tokens import WordTokenizer
from sc_llm.pp._cell_sentences import rank_csr_rows

PREFIX = "A cell with genes ranked by expression: "
# Words no trained vocabulary holds whole: letters outside the alphabets, mixed scripts, one letter.
UNSEEN = ["GENE-Ωα1", "ZZQX.9", "é-CD3", "x", "LINC00_ß2", "ENSG00000141510"]


@pytest.fixture(scope="module")
def pbmc_sentences():
    """pbmc68k with three cells emptied, and its cell sentences."""
    adata = scl.datasets.pbmc68k()
    X = adata.X.tolil()
    X[[5, 100, 699], :] = 0
    adata.X = X.tocsr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the empty-cell warning is expected
        scl.pp.cell_sentences(adata)
    return adata, list(adata.obs["cell_sentence"])


@pytest.fixture(scope="module")
def genes():
    return list(scl.datasets.pbmc68k().var_names)


@pytest.fixture(scope="module")
def families(genes):
    """Tokenizers of each family, trained on every other gene so the rest hold unseen pieces."""
    train = genes[::2]
    return {
        "wordpiece_cased": wordpiece_cased(train),
        "roberta_bpe": byte_level_bpe(train),
        "gpt2_bpe": byte_level_bpe(train, roberta=False),
        "t5_unigram": unigram(train),
        "xlmr_unigram": unigram(train, style="xlmr"),
        "llama_unigram": unigram(train, style="llama"),
    }


def _cells(ids, ptr):
    return [ids[ptr[i] : ptr[i + 1]].tolist() for i in range(len(ptr) - 1)]


def _fit(encoder, sentences, prefix, max_tokens):
    enc = copy.copy(encoder)  # the session encoder is shared: change the limit on a shallow copy
    enc.max_tokens = max_tokens
    return enc.fit(sentences, prefix)


@pytest.mark.parametrize("prefix", ["", PREFIX])
@pytest.mark.parametrize("max_tokens", [256, 40, 12])
def test_minilm_equals_fit_on_pbmc68k(text_encoder, pbmc_sentences, prefix, max_tokens):
    adata, sentences = pbmc_sentences
    expected_ids, expected_fit = _fit(text_encoder, sentences, prefix, max_tokens)
    wt = WordTokenizer(text_encoder.tokenizer, prefix=prefix, max_tokens=max_tokens)
    assert wt.check(adata.var_names), wt.mismatch

    ids, ptr, n_fit = wt.build_sentences(sentences)
    assert ids.dtype == ptr.dtype == n_fit.dtype == np.int64
    assert ptr.shape == (len(sentences) + 1,)
    np.testing.assert_array_equal(n_fit, expected_fit)
    assert _cells(ids, ptr) == expected_ids

    codes, indptr = rank_csr_rows(adata.X)
    ids2, ptr2, n_fit2 = wt.build(codes, indptr, adata.var_names.to_numpy())
    np.testing.assert_array_equal(ids2, ids)
    np.testing.assert_array_equal(ptr2, ptr)
    np.testing.assert_array_equal(n_fit2, n_fit)

    n_words = np.diff(indptr)
    assert (n_fit < n_words).sum() > 600  # nearly every cell is cut by the limit
    empty = n_words == 0
    assert empty.sum() == 3 and (n_fit[empty] == 0).all()
    prefix_only = text_encoder.tokenizer(prefix)["input_ids"]
    assert all(_cells(ids, ptr)[i] == prefix_only for i in np.flatnonzero(empty))
    assert (np.diff(ptr) <= max_tokens).all()


def _random_cells(words, rng, n_cells=60, max_words=60):
    """Random gene orders of random lengths, some empty."""
    lens = rng.integers(0, max_words, n_cells)
    lens[:3] = 0
    return [list(rng.permutation(words)[:k]) for k in lens]


def _assert_matches_tokenizer(tok, cells, prefix, max_tokens, ids, ptr, n_fit):
    """Each cell's ids are the tokenizer's ids of its fitted sentence, and one more word would not fit."""
    for i, words in enumerate(cells):
        k = int(n_fit[i])
        expected = tok(prefix + " ".join(words[:k]))["input_ids"]
        assert ids[ptr[i] : ptr[i + 1]].tolist() == expected, (i, words[: k + 1])
        assert len(expected) <= max_tokens
        if k < len(words):
            assert len(tok(prefix + " ".join(words[: k + 1]))["input_ids"]) > max_tokens


@pytest.mark.parametrize(
    "family", ["wordpiece_cased", "roberta_bpe", "gpt2_bpe", "t5_unigram", "xlmr_unigram", "llama_unigram"]
)
@pytest.mark.parametrize("prefix", ["", PREFIX])
def test_families_match_tokenizer(families, genes, family, prefix):
    tok = families[family]
    words = genes + UNSEEN
    rng = np.random.default_rng(sum(map(ord, family + prefix)))
    n_lead = len(tok(prefix)["input_ids"])
    for max_tokens in [n_lead + 2, n_lead + 7, n_lead + 40, 512]:
        wt = WordTokenizer(tok, prefix=prefix, max_tokens=max_tokens)
        assert wt.check(words), wt.mismatch
        cells = _random_cells(words, rng)
        ids, ptr, n_fit = wt.build_sentences([" ".join(c) for c in cells])
        _assert_matches_tokenizer(tok, cells, prefix, max_tokens, ids, ptr, n_fit)
        # The same cells as codes into a vocabulary (genes and unseen words together).
        vocab = np.asarray(words, dtype=object)
        pos = {w: j for j, w in enumerate(words)}
        codes = np.asarray([pos[w] for c in cells for w in c], dtype=np.int64)
        indptr = np.concatenate([[0], np.cumsum([len(c) for c in cells])])
        for got, want in zip(wt.build(codes, indptr, vocab), (ids, ptr, n_fit), strict=True):
            np.testing.assert_array_equal(got, want)
        if max_tokens == n_lead + 7:
            assert 0 < (n_fit < [len(c) for c in cells]).sum()


@pytest.mark.parametrize("family", ["wordpiece_cased", "roberta_bpe", "t5_unigram"])
def test_families_equal_fit_when_a_word_fits(families, genes, text_encoder, family):
    """Against today's TextEncoder.fit on the same tokenizer, for every cell that keeps a word.

    A cell whose first word alone overflows differs: the tokenizer on the bare prefix (what
    WordTokenizer returns, like an empty cell) ends in a lone space token for byte-level and
    Metaspace tokenizers, while fit drops it, or keeps a piece of the cut word for Metaspace.
    """
    tok = families[family]
    enc = copy.copy(text_encoder)
    enc.tokenizer, enc.n_special = tok, len(tok("")["input_ids"])
    rng = np.random.default_rng(1)
    sentences = [" ".join(c) for c in _random_cells(genes + UNSEEN, rng, n_cells=120)]
    for prefix in ["", PREFIX]:
        max_tokens = len(tok(prefix)["input_ids"]) + 6
        expected_ids, expected_fit = _fit(enc, sentences, prefix, max_tokens)
        ids, ptr, n_fit = WordTokenizer(tok, prefix=prefix, max_tokens=max_tokens).build_sentences(sentences)
        np.testing.assert_array_equal(n_fit, expected_fit)
        cells = _cells(ids, ptr)
        kept = np.flatnonzero(n_fit > 0)
        assert len(kept) > 30
        assert [cells[i] for i in kept] == [expected_ids[i] for i in kept]


def test_word_forms(families):
    """Byte-level BPE marks inner words with Ġ; Metaspace marks every word with ▁; WordPiece marks none."""
    words = ["HLA-DRA", "RP11-782C8.1", "MT-CO1"]
    bpe = families["roberta_bpe"]
    first, first_ptr, inner, inner_ptr = WordTokenizer(bpe, max_tokens=64).word_ids(np.asarray(words))
    assert first_ptr.shape == inner_ptr.shape == (4,)
    for j, w in enumerate(words):
        f = bpe.convert_ids_to_tokens(first[first_ptr[j] : first_ptr[j + 1]].tolist())
        i = bpe.convert_ids_to_tokens(inner[inner_ptr[j] : inner_ptr[j + 1]].tolist())
        assert f == bpe.tokenize(w) and not f[0].startswith("Ġ")
        assert i[0].startswith("Ġ") and "".join(i) == "Ġ" + "".join(f)
    t5 = families["t5_unigram"]
    first, first_ptr, inner, inner_ptr = WordTokenizer(t5, prefix=PREFIX, max_tokens=128).word_ids(words)
    np.testing.assert_array_equal(first, inner)
    assert t5.convert_ids_to_tokens([int(first[0])])[0].startswith("▁")
    wp = families["wordpiece_cased"]
    first, _, inner, _ = WordTokenizer(wp, max_tokens=64).word_ids(words)
    assert wp.convert_ids_to_tokens(first.tolist())[:3] == ["HLA", "-", "DR"]
    np.testing.assert_array_equal(first, inner)
    # Unseen letters: WordPiece gives up on the whole piece, Unigram and byte-level split further.
    assert "[UNK]" in wp.convert_ids_to_tokens(
        WordTokenizer(wp, max_tokens=64).word_ids(["GENE-Ωα1"])[0].tolist()
    )
    assert "<unk>" in t5.convert_ids_to_tokens(
        WordTokenizer(t5, max_tokens=64).word_ids(["GENE-Ωα1"])[0].tolist()
    )


def test_words_tokenized_once(text_encoder, pbmc_sentences):
    """Words are cached: a second build tokenizes nothing; unseen words are added as they come."""
    _, sentences = pbmc_sentences
    wt = WordTokenizer(text_encoder.tokenizer, max_tokens=64)
    first = wt.build_sentences(sentences[:50])
    assert len(wt._index) == len({w for s in sentences[:50] for w in s.split(" ")[:64] if w})
    calls = []
    wt._backend = _Counting(wt._backend, calls)
    again = wt.build_sentences(sentences[:50])
    assert calls == []
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    wt.build_sentences(["NOTAGENE1 HES4"])
    assert calls == [["NOTAGENE1", "a NOTAGENE1"]]


def test_pickles_with_its_cache(text_encoder, pbmc_sentences):
    """For dask workers: a pickled WordTokenizer builds the same ids and keeps its cached words."""
    _, sentences = pbmc_sentences
    wt = WordTokenizer(text_encoder.tokenizer, prefix=PREFIX, max_tokens=40)
    expected = wt.build_sentences(sentences[:30])
    clone = pickle.loads(pickle.dumps(wt))
    assert clone._index == wt._index
    for a, b in zip(clone.build_sentences(sentences[:30]), expected, strict=True):
        np.testing.assert_array_equal(a, b)


def test_threads_share_one_cache(text_encoder, pbmc_sentences):
    """A prefetching thread and the caller may build at once while new words are being added."""
    from concurrent.futures import ThreadPoolExecutor

    _, sentences = pbmc_sentences
    parts = [sentences[i : i + 50] for i in range(0, 700, 50)]
    reference = [WordTokenizer(text_encoder.tokenizer, max_tokens=48).build_sentences(p) for p in parts]
    shared = WordTokenizer(text_encoder.tokenizer, max_tokens=48)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(shared.build_sentences, parts))
    for got, want in zip(results, reference, strict=True):
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
    assert len(shared._index) == len(set(shared._index.values()))


def test_build_tokenizes_only_words_used(text_encoder, pbmc_sentences):
    adata, _ = pbmc_sentences
    codes, indptr = rank_csr_rows(adata.X[:20])
    wt = WordTokenizer(text_encoder.tokenizer, max_tokens=16)
    wt.build(codes, indptr, adata.var_names.to_numpy())
    # Only a cell's first max_tokens genes can fit: later ones are never tokenized.
    used = {int(c) for i in range(20) for c in codes[indptr[i] : indptr[i + 1]][:16]}
    assert len(wt._index) == len(used) < adata.n_vars


class _Counting:
    def __init__(self, backend, calls):
        self.backend, self.calls = backend, calls

    def encode_batch(self, texts, **kwargs):
        self.calls.append(list(texts))
        return self.backend.encode_batch(texts, **kwargs)


@pytest.mark.parametrize("make", [bpe_across_spaces, joining_normalizer])
def test_check_false_when_not_concatenative(genes, pbmc_sentences, make):
    """Merges across spaces, or a normalizer that joins words: check says no, and it is right."""
    tok = make(genes[::2])
    wt = WordTokenizer(tok, max_tokens=128)
    assert not wt.check(genes)
    assert isinstance(wt.mismatch, str) and wt.mismatch
    # The lookup really differs from the tokenizer on real sentences: callers must fall back.
    _, sentences = pbmc_sentences
    ids, ptr, n_fit = wt.build_sentences(sentences[:40])
    differ = [
        ids[ptr[i] : ptr[i + 1]].tolist() != tok(" ".join(s.split(" ")[: n_fit[i]]))["input_ids"]
        for i, s in enumerate(sentences[:40])
    ]
    assert sum(differ) > 10


def test_check_samples_and_resets(families, genes):
    tok = families["roberta_bpe"]
    wt = WordTokenizer(tok, max_tokens=64)
    assert wt.check(genes, n_samples=50)
    assert len(wt._index) == 50  # only the sampled words were tokenized
    assert not WordTokenizer(bpe_across_spaces(genes[::2]), max_tokens=64).check(genes, n_samples=50)
    assert wt.check([]) and wt.mismatch is None


def test_errors(text_encoder):
    tok = text_encoder.tokenizer
    with pytest.raises(ValueError, match="prefix alone uses"):
        WordTokenizer(tok, prefix="a long prefix " * 10, max_tokens=20)
    wt = WordTokenizer(tok, max_tokens=32)
    with pytest.raises(ValueError, match="without whitespace: 'HES4 CD3D'"):
        wt.word_ids(["HES4 CD3D"])
    with pytest.raises(ValueError, match="without whitespace: ''"):
        wt.build(np.array([0]), np.array([0, 1]), np.array([""], dtype=object))
    with pytest.raises(ValueError, match="indptr must start at 0 and end at len"):
        wt.build(np.array([0, 1]), np.array([0, 1]), np.array(["HES4", "CD3D"], dtype=object))
