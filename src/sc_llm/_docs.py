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

doc_chunks = """\
chunk_size
    Cells read and tokenized at a time: the unit of resuming and of distributed work. Memory besides the
    result is proportional to two chunks (on an accelerator the next one is prepared while the current
    one runs).
store
    Path of a zarr store (``"X_emb.zarr"``, needs ``sc-llm[scale]``). Each finished chunk's rows are
    written there with a done flag and digests of its input data and of its rows; a rerun with the same
    store computes only the chunks left (a killed run resumes). A store holding another computation
    (model, weights, parameters, cells) or computed from other data is refused, and a finished chunk
    whose file was deleted or damaged is computed again with a warning.
scheduler
    Run the forward passes on a dask.distributed cluster: ``"local"`` (a ``LocalCluster`` started and
    closed here), ``"cuda"`` (one worker per visible GPU, each pinned to its GPU), a scheduler address
    (``"tcp://host:8786"``) or a ``distributed.Client``. This process reads and tokenizes each chunk and
    sends its token arrays; a model given by name or folder is loaded once per worker (the folder must
    be readable there), a model object is sent once to every worker. Results equal a single-process
    run. ``None`` (default) runs here."""

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


def doc_params(**blocks: str) -> Callable[[F], F]:
    """Fill ``{name}`` placeholders of a numpy docstring with shared parameter blocks."""

    def decorate(fn: F) -> F:
        doc = inspect.cleandoc(fn.__doc__ or "")
        for name, text in blocks.items():
            doc = doc.replace("{" + name + "}", text)
        fn.__doc__ = doc
        return fn

    return decorate
