"""Tools: embeddings, annotation, evaluation."""


from ._ablate import ablate, ablation_study
from ._attribute import AttributionConfig, attribute
from ._compare import compare_annotators
from ._coverage import to_model_ids, vocab_coverage
from ._embed_geneformer import embed_geneformer
from ._embed_genes import embed_text_genes
from ._embed_scgpt import embed_scgpt
from ._embed_text import embed_text
from ._fusion import FusionConfig, fuse_predict, fuse_train
from ._knn import knn_annotate
from ._llm import LLMAnnotateConfig, llm_annotate
from ._map_labels import map_labels
from ._marker_matching import MarkerMatching, llm_marker_matching
from ._markers import marker_overlap, marker_similarity, read_markers
from ._metrics import classification_metrics, cluster_metrics
from ._mlp import mlp_annotate
from ._mudata import from_mudata, to_mudata

__all__ = ["classification_metrics", "cluster_metrics", "embed_text", "knn_annotate"]
__all__ += ["embed_geneformer", "embed_scgpt"]
__all__ += ["embed_text_genes"]
__all__ += ["LLMAnnotateConfig", "MarkerMatching", "llm_annotate", "llm_marker_matching"]
__all__ += ["from_mudata", "to_mudata"]
__all__ += ["map_labels", "to_model_ids", "vocab_coverage"]
__all__ += ["ablate", "ablation_study", "attribute", "marker_overlap", "marker_similarity", "read_markers"]
__all__ += ["AttributionConfig"]

# FusionModel subclasses torch.nn.Module: resolved on first access so `import sc_llm` stays free of torch.
__all__ += ["FusionConfig", "FusionModel", "compare_annotators", "fuse_predict", "fuse_train", "mlp_annotate"]


def __getattr__(name: str):
    if name == "FusionModel":
        from sc_llm.models._fusion import FusionModel

        return FusionModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
