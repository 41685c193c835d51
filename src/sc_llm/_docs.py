"""Parameter documentation shared by several public functions (scanpy's ``_doc_params`` idea).

A docstring names a block by a placeholder on its own line (``{doc_store}``); :func:`doc_params`
fills it in, so a parameter shared by several functions is described once.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

doc_device_precision = """\
device
    Torch device; ``None`` picks CUDA, then MPS, then CPU.
precision
    ``"auto"`` (fp16 on CUDA, fp32 on CPU), ``"fp32"``, ``"bf16"`` or ``"fp16"`` (CUDA only). Reduced
    precision runs a copy of the weights made once per model, device and precision and reused by later
    calls; ``"bf16"`` is used on CPUs with native bf16 (AMX/AVX512-BF16, about 3× faster than fp32 there)
    and falls back to fp32 elsewhere, where emulated bf16 is slower."""

doc_execution = """\
execution
    How the work runs: chunk size, a zarr store that makes the run resumable, a dask scheduler
    (:class:`sc_llm.Execution`). ``None`` runs here, in memory, in chunks of {chunk} cells."""

doc_embedding_key = """\
key_added
    ``obsm`` key for the embedding; its record (``"params"`` with the model identity, and the
    results) goes to ``uns[key_added]``."""

doc_split = """\
split_key, train_value
    The training (reference) cells are those with ``obs[split_key] == train_value`` and a label; the
    others are evaluated (see :func:`sc_llm.pp.train_test_split`)."""

doc_random_state = """\
random_state
    Seed of every random choice made here; the same seed and inputs give the same result."""

_doc_save_show = """
save
    Path of a figure file to write.
show
    Show the figure (default: only when neither saving nor drawing into given Axes)."""

doc_show_save = "ax\n    Matplotlib Axes to draw into (default: a new figure)." + _doc_save_show

# For plots of several panels (one Axes each).
doc_axes_show_save = (
    "axes\n    Matplotlib Axes to draw into, one per panel (default: a new figure)." + _doc_save_show
)

doc_copy = """\
copy
    Return a copy instead of writing into ``adata``."""


doc_llm_model = """\
model
    Model name as the server knows it (``"o3-mini-2025-01-31"``, ``"Qwen/Qwen2.5-7B-Instruct"``), for a
    client built from ``client_kwargs`` for this call; or a configured :class:`sc_llm.llm.ChatClient`, used
    as is (its usage counters, negotiated response format and connections carry over between calls)."""

doc_llm_client_kwargs = """\
client_kwargs
    Keyword arguments of :class:`sc_llm.llm.ChatClient` when ``model`` is a name: ``base_url`` (``None``:
    OpenAI; a local server such as ``"http://localhost:8000/v1"``), ``api_key`` or ``api_key_env`` (default
    ``"OPENAI_API_KEY"``), ``temperature`` (``None``: the server's default), ``params`` (other request
    fields, e.g. ``{"reasoning_effort": "high", "seed": 0}``), ``max_concurrency`` (8), ``timeout`` (120 s,
    a deadline per attempt), ``max_retries`` (6), ``cache_dir`` (``None``: ``$SC_LLM_CACHE`` or
    ``~/.cache/sc_llm/chat``; ``False``: no cache), ``price_per_1m_tokens`` (``(input, output)``: adds a
    ``"cost"`` to the usage), … With a ChatClient as ``model`` only ``temperature``, ``params`` and
    ``price_per_1m_tokens`` may be given; they apply to this call's requests."""


def doc_params(**blocks: str) -> Callable[[F], F]:
    """Fill ``{name}`` placeholders of a numpy docstring with shared parameter blocks."""

    def decorate(fn: F) -> F:
        doc = inspect.cleandoc(fn.__doc__ or "")
        for name, text in blocks.items():
            doc = doc.replace("{" + name + "}", text)
        fn.__doc__ = doc
        return fn

    return decorate
