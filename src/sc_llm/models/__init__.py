"""Encoder back ends and shared inference plumbing (device, precision, batching)."""

from ._runtime import resolve_device, resolve_precision, run_batched
from ._text import TextEncoder, default_model_path, load_text_encoder

__all__ = ["TextEncoder", "default_model_path", "load_text_encoder", "resolve_device", "resolve_precision", "run_batched"]
