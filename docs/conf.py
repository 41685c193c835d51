"""Sphinx configuration for sc_llm."""

from __future__ import annotations

import shutil
from datetime import date
from importlib.metadata import version as _pkg_version
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent

project = "sc_llm"
author = "sc_llm developers"
copyright = f"{date.today().year}, {author}"
release = version = _pkg_version("sc-llm")

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx_autodoc_typehints",
]
autosummary_generate = True
autodoc_member_order = "bysource"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
typehints_defaults = "braces"
always_document_param_types = False
myst_enable_extensions = ["colon_fence", "dollarmath", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "cache"
nb_execution_timeout = 900
nb_execution_raise_on_error = True
nb_merge_streams = True
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "jupyter_execute"]
html_theme = "sphinx_book_theme"
html_title = "sc_llm"
html_theme_options = {"repository_url": "https://github.com/scverse/sc_llm", "use_repository_button": False}
# No intersphinx: CI has no network, and the build treats warnings as errors.
suppress_warnings = ["config.cache", "mystnb.unknown_mime_type"]
nitpicky = False


def _copy_tutorials(app) -> None:
    """Tutorials live in ``tutorials/`` at the repository root; the docs execute copies of them."""
    target = HERE / "tutorials"
    target.mkdir(exist_ok=True)
    for nb in sorted((ROOT / "tutorials").glob("*.ipynb")):
        dest = target / nb.name
        if not dest.exists() or dest.read_bytes() != nb.read_bytes():
            shutil.copyfile(nb, dest)


NAMESPACES = ("pp", "tl", "pl", "llm", "models", "datasets", "testing")

# The API page is grouped by task (as cookiecutter-scverse's docs/api.md); "ns.*" takes a whole namespace.
# Every public name must be in exactly one group: the build stops naming any that is not.
API_GROUPS = {
    "Cell sentences and data preparation": [
        "pp.cell_sentences", "pp.spatial_sentences", "pp.train_test_split", "pp.map_gene_ids", "datasets.*",
    ],
    "Embeddings": [
        "tl.embed_text", "tl.embed_text_genes", "tl.embed_scgpt", "tl.embed_geneformer", "tl.vocab_coverage",
        "tl.to_model_ids", "Execution",
    ],
    "Annotation": [
        "tl.knn_annotate", "tl.map_labels", "tl.mlp_annotate", "tl.fuse_train", "tl.fuse_predict", "tl.FusionModel",
        "tl.FusionConfig", "tl.compare_annotators",
    ],
    "Generative LLMs": [
        "tl.llm_annotate", "tl.LLMAnnotateConfig", "tl.llm_marker_matching", "tl.MarkerMatching", "llm.*",
    ],
    "Interpretation: ablation, attribution, markers": [
        "tl.ablate", "tl.ablation_study", "tl.attribute", "tl.AttributionConfig", "tl.marker_overlap", "tl.marker_similarity",
        "tl.read_markers",
    ],
    "Evaluation": ["tl.classification_metrics", "tl.cluster_metrics"],
    "MuData": ["tl.to_mudata", "tl.from_mudata"],
    "Plotting": ["pl.*"],
    "Encoder back ends": ["models.*"],
    "Testing helpers": ["testing.*"],
}  # fmt: skip


def _public_names() -> list[str]:
    import importlib

    import sc_llm

    names = [n for n in sc_llm.__all__ if n not in NAMESPACES and not n.startswith("_")]
    for ns in NAMESPACES:
        names += [f"{ns}.{n}" for n in importlib.import_module(f"sc_llm.{ns}").__all__]
    return names


def _write_api(app) -> None:
    """Generate the API page, grouped by task, checking that no public name is left out or listed twice."""
    public = _public_names()
    lines = ["# API reference", "", "```{eval-rst}", ".. module:: sc_llm", "```", ""]
    placed: list[str] = []
    for title, entries in API_GROUPS.items():
        names = []
        for entry in entries:
            if entry.endswith(".*"):
                names += sorted(n for n in public if n.startswith(entry[:-1]))
            elif entry in public:
                names.append(entry)
        placed += names
        lines += [f"## {title}", "", "```{eval-rst}", ".. currentmodule:: sc_llm", "",
                  ".. autosummary::", "   :toctree: generated/", ""]
        lines += [f"   {name}" for name in names]
        lines += ["```", ""]
    missing = sorted(set(public) - set(placed))
    twice = sorted({n for n in placed if placed.count(n) > 1})
    if missing or twice:
        raise RuntimeError(f"docs/conf.py API_GROUPS: not placed {missing}, placed twice {twice}.")
    text = "\n".join(lines)
    api = HERE / "api.md"
    if not api.exists() or api.read_text() != text:
        api.write_text(text)


# Generated while the configuration loads, before autosummary looks for the names to document.
_copy_tutorials(None)
_write_api(None)
