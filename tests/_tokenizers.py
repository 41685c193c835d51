"""Small tokenizers of the common families, trained locally on gene names (no model hub).

Each is a ``transformers.PreTrainedTokenizerFast`` with the special tokens and post-processor of the
family it imitates, trained on a part of the genes so the rest contain pieces the vocabulary lacks.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# Plain words so the vocabularies also hold a prompt prefix's words.
PROSE = "A cell with genes ranked by expression: the top genes of a T cell, B cell or monocyte are"


def _wrap(tok: Tokenizer, **special: str) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def _corpus(genes: Sequence[str]) -> list[str]:
    genes = list(genes)
    return [PROSE] * 200 + [" ".join(genes[i : i + 40]) for i in range(0, len(genes), 40)]


def wordpiece_cased(genes: Sequence[str], vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """BERT-style cased WordPiece: ``[CLS] … [SEP]``; a word with a letter not in training is ``[UNK]``."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials)
    tok.train_from_iterator(_corpus(genes), trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return _wrap(
        tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
    )


def byte_level_bpe(
    genes: Sequence[str], *, roberta: bool = True, vocab_size: int = 700
) -> PreTrainedTokenizerFast:
    """Byte-level BPE: RoBERTa (``<s> … </s>``) or GPT-2 (no special tokens around the text).

    ``add_prefix_space=False``, so a sentence's first word has no ``Ġ`` and the others do.
    """
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(genes), trainer)
    if roberta:
        tok.post_processor = processors.RobertaProcessing(
            ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")), trim_offsets=True
        )
        return _wrap(tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return _wrap(tok, eos_token="</s>", pad_token="<pad>")


def unigram(genes: Sequence[str], *, style: str = "t5", vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """SentencePiece-style Unigram with a Metaspace pre-tokenizer.

    ``style="t5"``: ``… </s>`` and ``▁`` before every word; ``"xlmr"``: ``<s> … </s>``;
    ``"llama"``: ``<s> …`` with ``▁`` before the first word only when ``prepend_scheme="first"``.
    """
    specials = ["<pad>", "</s>", "<unk>", "<s>"]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    scheme = "first" if style == "llama" else "always"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme)
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>")
    tok.train_from_iterator(_corpus(genes), trainer)
    ids = {t: tok.token_to_id(t) for t in specials}
    single = {"t5": "$A </s>", "xlmr": "<s> $A </s>", "llama": "<s> $A"}[style]
    used = [(t, ids[t]) for t in ("<s>", "</s>") if t in single]
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=used)
    return _wrap(tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", bos_token="<s>")


def bpe_across_spaces(genes: Sequence[str], vocab_size: int = 800) -> PreTrainedTokenizerFast:
    """BPE with no pre-tokenizer (SentencePiece's ``split_by_whitespace=False``): merges span words."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"])
    # Frequent gene pairs, so merges across "▁" are learned.
    genes = list(genes)
    pairs = [f"{genes[i]} {genes[i + 1]}" for i in range(min(len(genes) - 1, 60))] * 20
    tok.train_from_iterator(_corpus(genes) + pairs, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    return _wrap(tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def joining_normalizer(genes: Sequence[str]) -> PreTrainedTokenizerFast:
    """WordPiece behind a normalizer that deletes the spaces, so neighbouring words run together."""
    fast = wordpiece_cased(genes)
    fast.backend_tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Replace(" ", ""), normalizers.NFC()]
    )
    return fast
