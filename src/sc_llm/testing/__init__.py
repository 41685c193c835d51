"""Helpers for testing code that uses sc_llm (as ``scanpy.testing`` does for scanpy).

- Tiny random checkpoints written in exactly the upstream on-disk formats, for code that loads scGPT or
  Geneformer folders without downloading them: :func:`write_scgpt`, :func:`write_geneformer`,
  :func:`scgpt_args`, :func:`scgpt_state_dict`, :func:`ensembl_ids`. They need torch and transformers.
- :class:`ChatServer`: a deterministic OpenAI-compatible chat server on 127.0.0.1 with scripted answers,
  for testing LLM annotation without a real model.
- :func:`pbmc68k_embedded`: the bundled pbmc68k with sentences, a split and the text embedding, cached
  between runs in ``SC_LLM_TEST_CACHE`` when set.

Nothing here is imported by ``import sc_llm``.
"""

from ._chat_server import LLAMA_CPP_FORMAT_ERROR, ChatServer, Rule
from ._checkpoints import ensembl_ids, scgpt_args, scgpt_state_dict, write_geneformer, write_scgpt
from ._data import pbmc68k_embedded

__all__ = ["LLAMA_CPP_FORMAT_ERROR", "ChatServer", "Rule", "ensembl_ids", "scgpt_args", "scgpt_state_dict"]
__all__ += ["pbmc68k_embedded", "write_geneformer", "write_scgpt"]
