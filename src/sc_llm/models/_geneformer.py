"""Geneformer inference from a model folder plus its token and gene-median dictionaries.

Geneformer is a BERT encoder over rank-value-encoded cells: each cell's counts are normalized
by its total, scaled to 10,000 and divided by each gene's median over the pretraining corpus;
genes are then sorted by that value (highest first) and truncated to the model's input size.
V1 models (2048 positions) use the genes alone; V2 models (4096 positions) add ``<cls>`` first
and ``<eos>`` last. The folder is a transformers ``BertForMaskedLM`` checkpoint (``config.json``
with ``model.safetensors`` or ``pytorch_model.bin``); only its ``BertModel`` part is loaded.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._utils import format_examples
from ._runtime import file_digest, pad_batch, reduced_copy, require_torch, resolve_device, run_batched

logger = logging.getLogger("sc_llm")

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def read_dictionary(value: str | Path | Mapping, what: str) -> dict:
    """A Geneformer dictionary given as a mapping or a pickle path (as shipped with Geneformer)."""
    if isinstance(value, Mapping):
        return dict(value)
    path = Path(value)
    if not path.exists():
        raise FileNotFoundError(f"{what} file {path} does not exist.")
    # Geneformer ships these dictionaries only as pickles; load only files you trust.
    with open(path, "rb") as f:
        obj = pickle.load(f)
    if not isinstance(obj, Mapping):
        raise TypeError(f"{what} file {path} holds a {type(obj).__name__}, expected a dict.")
    return dict(obj)


class GeneformerEncoder:
    """A loaded Geneformer folder, ready to embed rank-value-encoded cells.

    Use :func:`load_geneformer`. Attributes: ``model`` (transformers ``BertModel``, eval mode),
    ``n_layers``, ``dim``, ``input_size`` (``max_position_embeddings``), ``pad_id``, ``device``.
    """

    def __init__(self, model_dir: str | Path, device: Any = None):
        torch = require_torch()
        from transformers import BertModel

        self.path = Path(model_dir)
        if not (self.path / "config.json").exists():
            raise FileNotFoundError(f"{self.path} is not a Geneformer model folder: no config.json.")
        self.weights = next((self.path / f for f in _WEIGHT_FILES if (self.path / f).exists()), None)
        if self.weights is None:
            raise FileNotFoundError(f"{self.path} has no weights ({' or '.join(_WEIGHT_FILES)}).")
        self.device = resolve_device(device)
        with _quiet_transformers():
            # Masked-LM head keys (cls.predictions.*) are expected extras; missing encoder keys are checked below.
            model, info = BertModel.from_pretrained(
                str(self.path), add_pooling_layer=False, output_loading_info=True
            )
        missing = [k for k in info.get("missing_keys", []) if not k.startswith("pooler.")]
        if missing:
            raise ValueError(
                f"{self.weights} lacks BERT encoder weights: {format_examples(sorted(missing), 8)}. "
                "Expected a Geneformer (BertForMaskedLM or BertModel) checkpoint."
            )
        self.model = model.float().to(self.device).eval()
        cfg = model.config
        self.n_layers = int(cfg.num_hidden_layers)
        self.dim = int(cfg.hidden_size)
        self.input_size = int(cfg.max_position_embeddings)
        self.pad_id = int(cfg.pad_token_id or 0)
        self.vocab_size = int(cfg.vocab_size)
        self._reduced: dict[str, Any] = {}
        self._torch = torch

    def identity(self) -> dict[str, Any]:
        """Where the weights came from and what they are, for ``uns``."""
        return {
            "path": str(self.path),
            "weights_sha256": file_digest(str(self.weights)),
            "dim": self.dim,
            "n_layers": self.n_layers,
            "input_size": self.input_size,
        }

    def model_in(self, precision: str):
        if precision == "fp32":
            return self.model
        if precision not in self._reduced:
            self._reduced[precision] = reduced_copy(self.model, precision)
        return self._reduced[precision]

    def hidden_index(self, emb_layer: int) -> int:
        """Index into ``hidden_states`` for Geneformer's ``emb_layer`` (0: last layer, -1: second to last)."""
        if not -self.n_layers <= emb_layer <= 0:
            raise ValueError(
                f"emb_layer must be in [-{self.n_layers}, 0] for this {self.n_layers}-layer model "
                f"(0 = last layer, -1 = second to last, -{self.n_layers} = input embeddings), got {emb_layer}."
            )
        return self.n_layers + emb_layer

    def encode(
        self,
        tokens: Sequence[np.ndarray],
        *,
        emb_layer: int = -1,
        special_tokens: bool = False,
        emb_mode: str = "mean",
        batch_size: int = 32,
        precision: str = "fp32",
        bar=None,
    ) -> np.ndarray:
        """Cell embeddings (float32, input order) of token sequences from rank value encoding.

        ``emb_mode="mean"`` averages the chosen layer over gene tokens (``<cls>``/``<eos>`` and
        padding excluded, as Geneformer's extractor does); ``"cls"`` takes the ``<cls>`` output.
        """
        torch = self._torch
        layer = self.hidden_index(emb_layer)
        model = self.model_in(precision)
        skip = 1 if special_tokens else 0

        def forward(idx):
            seqs = [tokens[i] for i in idx]
            ids, mask = pad_batch(seqs, self.pad_id, self.device, pin=True)
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            hidden = out.hidden_states[layer].float()
            if emb_mode == "cls":
                return hidden[:, 0, :]
            lengths = torch.tensor([len(s) - 2 * skip for s in seqs], device=self.device)
            pos = torch.arange(hidden.shape[1], device=self.device)[None, :]
            genes = ((pos >= skip) & (pos < lengths[:, None] + skip)).to(hidden.dtype)
            return (hidden * genes[..., None]).sum(1) / lengths[:, None].to(hidden.dtype)

        # Weights already carry the precision; autocast on top would only add casts.
        return run_batched(
            len(tokens),
            [len(t) for t in tokens],
            forward,
            batch_size=batch_size,
            device=self.device,
            precision="fp32",
            desc="embed_geneformer",
            out_dim=self.dim,
            bar=bar,
        )


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


@functools.lru_cache(maxsize=2)
def _cached(path: str, mtime_ns: int, device: str | None) -> GeneformerEncoder:
    return GeneformerEncoder(path, device)


def load_geneformer(model_dir: str | Path | GeneformerEncoder, device: Any = None) -> GeneformerEncoder:
    """Load a Geneformer model folder (cached per folder, file time and device).

    Parameters
    ----------
    model_dir
        A transformers BERT folder (``config.json`` + ``model.safetensors`` or
        ``pytorch_model.bin``), e.g. Geneformer's ``gf-12L-95M-i4096/`` or the V1 root folder;
        or an already loaded :class:`GeneformerEncoder` (returned as is).
    device
        Torch device; ``None`` picks CUDA, then MPS, then CPU.
    """
    if isinstance(model_dir, GeneformerEncoder):
        return model_dir
    path = Path(model_dir)
    mtimes = [(path / f).stat().st_mtime_ns for f in _WEIGHT_FILES if (path / f).exists()]
    return _cached(str(path.resolve()), max(mtimes, default=0), None if device is None else str(device))
