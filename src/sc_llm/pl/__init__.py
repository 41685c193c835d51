"""Plotting: matplotlib figures of annotation, ablation and attribution results."""

from ._ablation import ablation, sentence_length
from ._attributions import attributions
from ._embedding import annotation_embedding
from ._metrics import annotation_metrics

__all__ = ["annotation_embedding"]
__all__ += ["annotation_metrics"]
__all__ += ["ablation", "attributions", "sentence_length"]
