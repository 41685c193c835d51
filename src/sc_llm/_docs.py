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
    (:class:`sc_llm.Execution`). ``None`` runs here, in memory, in chunks of {chunk} cells. The 0.1
    keywords ``chunk_size``, ``store`` and ``scheduler`` still work, with a FutureWarning."""

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

doc_show_save = """\
ax
    Matplotlib Axes to draw into (default: a new figure).
save
    Path of a figure file to write.
show
    Show the figure (default: only when neither saving nor drawing into a given ``ax``)."""

doc_copy = """\
copy
    Return a copy instead of writing into ``adata``."""


def doc_params(**blocks: str) -> Callable[[F], F]:
    """Fill ``{name}`` placeholders of a numpy docstring with shared parameter blocks."""

    def decorate(fn: F) -> F:
        doc = inspect.cleandoc(fn.__doc__ or "")
        for name, text in blocks.items():
            doc = doc.replace("{" + name + "}", text)
        fn.__doc__ = doc
        return fn

    return decorate
