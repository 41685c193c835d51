"""Cell token ids built from per-word (gene) token ids instead of tokenizing every cell sentence.

A cell sentence is its genes' names joined by single spaces. For tokenizers that split text at spaces
before their subword model runs (WordPiece, byte-level BPE, SentencePiece/Unigram with a whitespace or
Metaspace pre-tokenizer), the ids of a sentence are the concatenation of each word's ids, where a word
has one form at the start of the sentence (right after the prefix) and another inside it (after a
space: e.g. byte-level BPE's ``Ġ`` or SentencePiece's ``▁``). Each distinct word is then tokenized once
and every cell's ids are gathered with numpy. :meth:`WordTokenizer.check` tests that assumption on the
actual words; callers fall back to tokenizing sentences when it does not hold.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from itertools import chain, compress, repeat
from typing import Any

import numpy as np

from sc_llm._utils import format_examples

# Probe words that start with different characters classes, so the token run the prefix contributes to
# every sentence (the longest common start of their encodings) stops before any word's own tokens.
_PROBES = ("a", "b", "Z", "0", "7", "-", ".", "HES4", "MT-CO1")
# A word before the word tokenized for its inside-the-sentence form.
_ANCHOR = "a"
_CHECK_BLOCK = 256

Ragged = tuple[np.ndarray, np.ndarray]


class WordTokenizer:
    """Token ids of words as they appear inside a sentence, for one (tokenizer, prefix, max_tokens).

    Parameters
    ----------
    tokenizer
        A ``transformers`` fast tokenizer (what ``SentenceTransformer.tokenizer`` is).
    prefix
        Text put before every sentence (e.g. ``"A cell with genes ranked by expression: "``).
    max_tokens
        Token limit of the encoder, special tokens included.

    Notes
    -----
    :meth:`build` equals the tokenizer on the fitted sentence only for tokenizers that are
    concatenative on the words used; run :meth:`check` on the gene list first and fall back to
    tokenizing sentences when it returns ``False`` (``mismatch`` then says why).
    """

    def __init__(self, tokenizer: Any, *, prefix: str = "", max_tokens: int):
        self.tokenizer = tokenizer
        self.prefix = prefix or ""
        self.max_tokens = int(max_tokens)
        self.mismatch: str | None = None
        self._backend = _untruncated_backend(tokenizer)
        n_prefix = len(self._encode([self.prefix], special=False)[0]) if self.prefix else 0
        self._head, self._tail = self._special_ends()
        if n_prefix + len(self._head) + len(self._tail) >= self.max_tokens:
            raise ValueError(f"The prefix alone uses {n_prefix} tokens; the encoder reads {self.max_tokens}.")
        self._empty = np.asarray(self._encode([self.prefix], special=True)[0], dtype=np.int64)
        self._lead = np.concatenate([self._head, self._prefix_run()])
        # Tokens left for words once the specials and the prefix are counted.
        self._budget = self.max_tokens - len(self._lead) - len(self._tail)
        self._anchor = self._encode_words([_ANCHOR])[0]
        self._index: dict[str, int] = {}
        self._parts: list[tuple[list[list[int]], list[list[int]], list[bool]]] = []
        self._tables: dict[str, np.ndarray] | None = None
        # The cache grows while cells are built: one lock so a prefetching thread can build too.
        self._lock = threading.RLock()

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()

    # -- tokenizer access ----------------------------------------------------------------------
    def _encode(self, texts: list[str], *, special: bool, mask: bool = False):
        enc = self.tokenizer(
            texts,
            add_special_tokens=special,
            return_attention_mask=False,
            return_token_type_ids=False,
            return_special_tokens_mask=mask,
            verbose=False,  # check() tokenizes blocks longer than the model's limit on purpose
        )
        return (enc["input_ids"], enc["special_tokens_mask"]) if mask else enc["input_ids"]

    def _encode_words(self, texts: list[str]) -> list[list[int]]:
        """Ids without special tokens, from the Rust tokenizer when there is one.

        That skips the per-text Python conversion that dominates ``tokenizer(...)`` on short texts;
        :meth:`check` compares the result with ``tokenizer(...)`` itself.
        """
        if self._backend is None:
            return self._encode(texts, special=False)
        return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=False)]

    def _special_ends(self) -> tuple[np.ndarray, np.ndarray]:
        """Special tokens the post-processor puts before and after the text."""
        ids, mask = self._encode([self.prefix + _PROBES[0]], special=True, mask=True)
        ids, mask = np.asarray(ids[0], dtype=np.int64), np.asarray(mask[0], dtype=bool)
        content = np.flatnonzero(~mask)
        if content.size == 0:
            return ids, np.zeros(0, dtype=np.int64)
        return ids[: content[0]], ids[content[-1] + 1 :]

    def _prefix_run(self) -> np.ndarray:
        """Tokens of the prefix shared by every sentence: the common start of prefix-only and probes."""
        runs = self._encode_words([self.prefix, *(self.prefix + p for p in _PROBES)])
        n = min(len(r) for r in runs)
        first = runs[0]
        for k in range(n):
            if any(r[k] != first[k] for r in runs[1:]):
                n = k
                break
        return np.asarray(first[:n], dtype=np.int64)

    # -- the per-word cache --------------------------------------------------------------------
    def _add(self, words: list[str]) -> None:
        _check_words(words)
        lead = self._lead[len(self._head) :].tolist()
        anchor = self._anchor
        encoded = self._encode_words([self.prefix + w for w in words] + [f"{_ANCHOR} {w}" for w in words])
        firsts, inners = encoded[: len(words)], encoded[len(words) :]
        # A word whose encodings do not start with the shared prefix or anchor tokens merges with them:
        # no concatenation can reproduce it.
        ok = [
            f[: len(lead)] == lead and i[: len(anchor)] == anchor for f, i in zip(firsts, inners, strict=True)
        ]
        first = [f[len(lead) :] for f in firsts]
        inner = [i[len(anchor) :] for i in inners]
        start = len(self._index)
        self._parts.append((first, inner, ok))
        self._tables = None
        # Last, so a word visible in the index is always in the tables a concurrent build reads.
        self._index.update({w: start + k for k, w in enumerate(words)})

    def _rows(self, words: list[str]) -> np.ndarray:
        """Cache rows of ``words``, tokenizing the ones not seen before."""
        index = self._index
        rows = np.fromiter(map(index.get, words, repeat(-1)), dtype=np.int64, count=len(words))
        missing = rows < 0
        if missing.any():
            new = list(compress(words, missing))
            with self._lock:
                self._add([w for w in dict.fromkeys(new) if w not in index])
            rows[missing] = [index[w] for w in new]
        return rows

    def _table(self) -> dict[str, np.ndarray]:
        with self._lock:
            return self._tables or self._make_table()

    def _make_table(self) -> dict[str, np.ndarray]:
        first_flat, first_ptr = _to_csr([w for part in self._parts for w in part[0]])
        inner_flat, inner_ptr = _to_csr([w for part in self._parts for w in part[1]])
        first_len, inner_len = np.diff(first_ptr), np.diff(inner_ptr)
        self._tables = {
            "flat": np.concatenate([first_flat, inner_flat]),
            "first_start": first_ptr[:-1],
            "inner_start": inner_ptr[:-1] + first_flat.size,
            "first_len": first_len,
            "inner_len": inner_len,
            "ok": np.fromiter((o for part in self._parts for o in part[2]), dtype=bool),
            "min_len": min(first_len.min(initial=1), inner_len.min(initial=1)),
        }
        return self._tables

    def word_ids(
        self, words: np.ndarray | Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Token ids of each word at the sentence start (after the prefix) and inside the sentence.

        Parameters
        ----------
        words
            Words (gene names): non-empty, without whitespace.

        Returns
        -------
        ``(first_flat, first_ptr, inner_flat, inner_ptr)`` in CSR layout: word ``j``'s ids as the first
        word are ``first_flat[first_ptr[j]:first_ptr[j + 1]]`` (after the prefix's own tokens), and
        after a space ``inner_flat[inner_ptr[j]:inner_ptr[j + 1]]``. Each word is tokenized once per
        :class:`WordTokenizer`.
        """
        rows = self._rows(list(words))
        t = self._table()
        first = _take(t["flat"], t["first_start"][rows], t["first_len"][rows])
        inner = _take(t["flat"], t["inner_start"][rows], t["inner_len"][rows])
        return first, _ptr(t["first_len"][rows]), inner, _ptr(t["inner_len"][rows])

    # -- building cells ------------------------------------------------------------------------
    def build(self, codes: np.ndarray, indptr: np.ndarray, vocab: np.ndarray | Sequence[str]):
        """Token ids of cells given as rows of indices into ``vocab``, fitted to the token limit.

        Parameters
        ----------
        codes, indptr
            Cells in CSR layout: cell ``i``'s words are ``vocab[codes[indptr[i]:indptr[i + 1]]]`` in
            sentence order (e.g. ``sc_llm.pp._cell_sentences.rank_csr_rows`` output).
        vocab
            The words (e.g. gene names); the ones cells use are tokenized once and cached.

        Returns
        -------
        ``(flat_ids, ids_ptr, n_fit)``: cell ``i``'s ids are ``flat_ids[ids_ptr[i]:ids_ptr[i + 1]]``, equal
        to ``tokenizer(prefix + " ".join(words_i[:n_fit[i]]))["input_ids"]``, where ``n_fit[i]`` is the
        largest number of whole leading words that fits ``max_tokens`` (a word cut by the limit is
        dropped whole; a cell with no word fitted gets the specials and the prefix only). Exact when
        :meth:`check` holds for the words used.

        Notes
        -----
        Equal to :meth:`sc_llm.models.TextEncoder.fit` for every cell that keeps a word. A non-empty
        cell whose first word alone overflows gets ``tokenizer(prefix)`` like an empty cell; with a
        prefix ending in a space, byte-level BPE and Metaspace tokenizers end that in a lone space
        token, which ``fit`` drops (with Metaspace, or byte-level offsets not trimmed, ``fit`` instead
        keeps the cut word's first piece).
        """
        codes = np.asarray(codes, dtype=np.int64)
        indptr = np.asarray(indptr, dtype=np.int64)
        if indptr.ndim != 1 or indptr.size == 0 or indptr[0] != 0 or indptr[-1] != codes.size:
            raise ValueError(f"indptr must start at 0 and end at len(codes) = {codes.size}.")
        # Only the first max_tokens words can fit (as in TextEncoder.fit), and only words used are tokenized.
        codes, indptr = _leading(codes, indptr, self.max_tokens)
        used = np.zeros(len(vocab), dtype=bool)
        used[codes] = True
        rows = np.full(len(vocab), -1, dtype=np.int64)
        rows[used] = self._rows([vocab[j] for j in np.flatnonzero(used)])
        codes, indptr = self._leading(codes, indptr)
        return self._assemble(rows[codes], indptr, self._budget)

    def build_sentences(self, sentences: Sequence[str]):
        """:meth:`build` for sentence strings (words separated by single spaces).

        Only the first ``max_tokens`` words of a sentence are read (every word costs a token at least),
        as :meth:`sc_llm.models.TextEncoder.fit` does; words never seen are tokenized once and cached.
        """
        cap = self.max_tokens  # as in TextEncoder.fit
        words_per: list[list[str]] = [s.split(" ", cap)[:cap] if s else [] for s in sentences]
        if any("" in ws for ws in words_per):  # repeated spaces: empty words are no words
            words_per = [[w for w in ws if w] for ws in words_per]
        counts = np.fromiter(map(len, words_per), dtype=np.int64, count=len(words_per))
        rows, indptr = self._leading(self._rows(list(chain.from_iterable(words_per))), _ptr(counts))
        return self._assemble(rows, indptr, self._budget)

    def _leading(self, codes: np.ndarray, indptr: np.ndarray) -> Ragged:
        """Each cell cut to the words that can fit: when every word costs a token, at most the budget."""
        if self._table()["min_len"] < 1:
            return codes, indptr
        return _leading(codes, indptr, self._budget)

    def _assemble(self, rows: np.ndarray, indptr: np.ndarray, budget: float):
        t = self._table()
        n = indptr.size - 1
        counts = np.diff(indptr)
        cell = np.repeat(np.arange(n, dtype=np.int64), counts)
        lens, starts = t["inner_len"][rows], t["inner_start"][rows]
        first = indptr[:-1][counts > 0]
        lens[first], starts[first] = t["first_len"][rows[first]], t["first_start"][rows[first]]
        # Tokens up to and including each word, within its cell; word lengths are >= 0, so the words
        # that fit are a leading run of each cell.
        total = np.cumsum(lens)
        before = np.concatenate([[0], total])[indptr[:-1]]
        keep = (total - before[cell]) <= budget
        n_fit = np.bincount(cell[keep], minlength=n).astype(np.int64)
        n_word_tokens = np.bincount(cell[keep], weights=lens[keep], minlength=n).astype(np.int64)
        fitted = n_fit > 0
        lead, tail, empty = self._lead, self._tail, self._empty
        out_len = np.where(fitted, len(lead) + n_word_tokens + len(tail), len(empty))
        ids_ptr = _ptr(out_len)
        flat = np.empty(int(ids_ptr[-1]), dtype=np.int64)
        kept_lens = lens[keep]
        tok_cell = np.repeat(cell[keep], kept_lens)
        word_start = _ptr(n_word_tokens)[:-1]
        dest = np.arange(tok_cell.size, dtype=np.int64) + (ids_ptr[:-1] + len(lead) - word_start)[tok_cell]
        flat[dest] = _take(t["flat"], starts[keep], kept_lens)
        _fill(flat, ids_ptr[:-1][fitted], lead)
        _fill(flat, ids_ptr[1:][fitted] - len(tail), tail)
        _fill(flat, ids_ptr[:-1][~fitted], empty)
        return flat, ids_ptr, n_fit

    # -- checking the assumption ---------------------------------------------------------------
    def check(self, words: Sequence[str], n_samples: int | None = None, *, seed: int = 0) -> bool:
        """Whether word concatenation reproduces the tokenizer on sentences made of ``words``.

        Sentences compared with the tokenizer's own output (no token limit): all words joined in
        blocks of 256 in the given order and in a shuffled order, and every word as the first word
        of a two-word sentence. Costs about three tokenizer passes over the words.

        Parameters
        ----------
        words
            The words sentences are made of (e.g. all gene names).
        n_samples
            Check only this many randomly chosen words (``None``: all).
        seed
            Seed for the shuffled order and the sample.

        Returns
        -------
        ``True`` when every compared sentence matches. Otherwise ``False``, with the first difference
        in ``mismatch``; :meth:`build` is then not exact and callers should tokenize sentences.
        """
        words = list(dict.fromkeys(words))
        rng = np.random.default_rng(seed)
        if n_samples is not None and n_samples < len(words):
            words = [words[i] for i in np.sort(rng.choice(len(words), n_samples, replace=False))]
        self.mismatch = None
        if not words:
            return True
        rows = self._rows(words)
        bad = ~self._table()["ok"][rows]
        if bad.any():
            examples = format_examples(np.asarray(words, dtype=object)[bad])
            self.mismatch = f"words merge with the tokens before them: {examples}"
            return False
        blocks, pairs = _check_cells(len(words), rng)
        texts = [self.prefix + " ".join(words[j] for j in c) for c in blocks + pairs]
        # Blocks through ``tokenizer(...)`` itself; the many short pairs through its Rust tokenizer.
        expected = self._encode(texts[: len(blocks)], special=True) + self._encode_full(texts[len(blocks) :])
        cells = blocks + pairs
        got, got_ptr, _ = self._assemble(rows[np.concatenate(cells)], _ptr([len(c) for c in cells]), np.inf)
        want, want_ptr = _to_csr(expected)
        if np.array_equal(got_ptr, want_ptr) and np.array_equal(got, want):
            return True
        i = next(
            i for i in range(len(cells)) if not np.array_equal(got[got_ptr[i] : got_ptr[i + 1]], expected[i])
        )
        g, w = got[got_ptr[i] : got_ptr[i + 1]].tolist(), expected[i]
        k = next((k for k, (a, b) in enumerate(zip(g, w, strict=False)) if a != b), min(len(g), len(w)))
        self.mismatch = (
            f"{texts[i][:60]!r}: the tokenizer gives {self._tokens(w[k : k + 4])} at token {k}, "
            f"word by word {self._tokens(g[k : k + 4])}"
        )
        return False

    def _encode_full(self, texts: list[str]) -> list[list[int]]:
        if self._backend is None:
            return self._encode(texts, special=True)
        return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=True)]

    def _tokens(self, ids: list[int]) -> list[str]:
        convert = getattr(self.tokenizer, "convert_ids_to_tokens", None)
        return convert(ids) if convert is not None else ids


def _check_cells(n: int, rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Word index lists: blocks in order and shuffled; and each word before its successor."""
    order = np.arange(n)
    cells = [order[s : s + _CHECK_BLOCK] for s in range(0, n, _CHECK_BLOCK)]
    perm = rng.permutation(n)
    cells += [perm[s : s + _CHECK_BLOCK] for s in range(0, n, _CHECK_BLOCK)]
    return cells, list(np.stack([order, np.roll(order, -1)], axis=1))


def _untruncated_backend(tokenizer):
    """A copy of the fast tokenizer's Rust tokenizer without truncation or padding, or ``None``.

    A copy, because ``tokenizer(..., truncation=True)`` leaves truncation switched on in the shared
    backend until its next call.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy


def _check_words(words: list[str]) -> None:
    bad = [w for w in words if not isinstance(w, str) or not w or any(c.isspace() for c in w)]
    if bad:
        raise ValueError(f"Words must be non-empty strings without whitespace: {format_examples(bad)}.")


def _to_csr(lists: list[list[int]]) -> Ragged:
    ptr = _ptr(np.fromiter(map(len, lists), dtype=np.int64, count=len(lists)))
    flat = np.fromiter((i for ids in lists for i in ids), dtype=np.int64, count=int(ptr[-1]))
    return flat, ptr


def _ptr(lengths) -> np.ndarray:
    ptr = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=ptr[1:])
    return ptr


def _leading(codes: np.ndarray, indptr: np.ndarray, limit: int) -> Ragged:
    """Each CSR row cut to its first ``limit`` entries."""
    counts = np.diff(indptr)
    if counts.max(initial=0) <= limit:
        return codes, indptr
    kept = np.minimum(counts, limit)
    return codes[_ragged_index(indptr[:-1], kept)], _ptr(kept)


def _ragged_index(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(starts[k], starts[k] + lens[k])`` over k, without a Python loop."""
    offsets = np.cumsum(lens) - lens
    return np.arange(int(lens.sum()), dtype=np.int64) + np.repeat(starts - offsets, lens)


def _take(flat: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenation of ``flat[starts[k]:starts[k] + lens[k]]`` over k."""
    return flat[_ragged_index(starts, lens)]


def _fill(flat: np.ndarray, at: np.ndarray, values: np.ndarray) -> None:
    if values.size and at.size:
        flat[at[:, None] + np.arange(values.size)] = values
