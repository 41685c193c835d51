"""Write a tiny random-weight llama model as GGUF, for tests against a real llama.cpp server.

The model has one transformer block of width 64 and a SentencePiece-style ("llama") vocabulary of
the 256 byte tokens plus every printable ASCII character, so it can spell any ASCII label (and the
JSON around it) one character at a time. Its weights are random: it writes garbage unless a
grammar (a JSON schema's ``enum``) leaves it no choice, which is exactly what a protocol test needs.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np

SPACE = "\u2581"  # SentencePiece's visible space
# Plain chat template (the server renders it with jinja2), so no chat format is guessed from names.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types: <unk>, <s>, </s>, <0x00>…<0xFF>, then printable characters."""
    import gguf

    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    chars = [SPACE if c == " " else c for c in string.printable if c not in "\t\n\r\x0b\x0c"]
    tokens += chars
    types += [gguf.TokenType.NORMAL] * len(chars)
    scores = [0.0] * 259 + [-float(i) for i in range(len(chars))]
    return tokens, scores, [int(t) for t in types]


def write_tiny_llama(
    path: str | Path, *, n_embd: int = 64, n_head: int = 4, n_ff: int = 128, n_ctx: int = 4096, seed: int = 0
) -> Path:
    """Write the model to ``path`` (about 0.2 MB) and return the path."""
    import gguf

    path = Path(path)
    tokens, scores, types = vocabulary()
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("sc-llm-test-tiny-llama")
    writer.add_context_length(n_ctx)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(1)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    ones = np.ones(n_embd, dtype=np.float32)
    writer.add_tensor("token_embd.weight", w(n_vocab, n_embd))
    writer.add_tensor("output_norm.weight", ones)
    writer.add_tensor("output.weight", w(n_vocab, n_embd))
    writer.add_tensor("blk.0.attn_norm.weight", ones)
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        writer.add_tensor(f"blk.0.{name}.weight", w(n_embd, n_embd))
    writer.add_tensor("blk.0.ffn_norm.weight", ones)
    writer.add_tensor("blk.0.ffn_gate.weight", w(n_ff, n_embd))
    writer.add_tensor("blk.0.ffn_up.weight", w(n_ff, n_embd))
    writer.add_tensor("blk.0.ffn_down.weight", w(n_embd, n_ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
