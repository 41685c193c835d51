"""Encoder back ends and shared inference plumbing (device, precision, batching)."""

from ._encoder import CellEncoder, Tokens
from ._runtime import encode_tokens, resolve_device, resolve_precision
from ._text import TextEncoder, TextTokenizer, default_model_path, load_text_encoder
from ._word_tokens import WordTokenizer

__all__ = ["CellEncoder", "TextEncoder", "TextTokenizer", "Tokens", "WordTokenizer", "default_model_path"]
__all__ += ["encode_tokens", "load_text_encoder", "resolve_device", "resolve_precision"]

# FusionModel subclasses torch.nn.Module: resolved on first access so `import sc_llm` stays free of torch.
__all__ += ["FusionModel"]
# Its training (settings, loops, folds, seeds) imports torch only when it runs.
from ._training import DEFAULT_GRID as DEFAULT_GRID  # noqa: E402
from ._training import FusionConfig, FusionFit, train_fusion  # noqa: E402

__all__ += ["FusionConfig", "FusionFit", "train_fusion"]  # DEFAULT_GRID is importable; FusionConfig documents it


# scGPT / Geneformer back ends, also resolved on first access (they import torch and transformers).
_LAZY = {
    "ScGPTEncoder": "._scgpt",
    "ScGPTModel": "._scgpt",
    "load_scgpt": "._scgpt",
    "GeneformerEncoder": "._geneformer",
    "load_geneformer": "._geneformer",
}
__all__ += list(_LAZY)


def __getattr__(name: str):
    if name == "FusionModel":
        from ._fusion import FusionModel

        return FusionModel
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
