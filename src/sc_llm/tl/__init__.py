"""Tools: embeddings, annotation, evaluation."""

from ._embed_text import embed_text
from ._knn import knn_annotate
from ._llm import ChatClient, MarkerMatching, llm_annotate, llm_marker_matching
from ._metrics import classification_metrics, cluster_metrics

__all__ = ["classification_metrics", "cluster_metrics", "embed_text", "knn_annotate"]
__all__ += ["ChatClient", "MarkerMatching", "llm_annotate", "llm_marker_matching"]
