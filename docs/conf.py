"""Sphinx configuration for sc_llm."""

from __future__ import annotations

import shutil
import sys
from datetime import date
from importlib.metadata import version as _pkg_version
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "_ext"))

from offline_inventories import intersphinx_mapping as _offline_intersphinx  # noqa: E402

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
    "sphinx.ext.intersphinx",
    "figure_check",
]
templates_path = ["_templates"]
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
# docs/_ext/figure_check.py makes the kernels draw as in a user's Jupyter (it clears an inherited
# MPLBACKEND) and fails the build when a page that draws shows no figure. These pages must show one
# whatever their code does:
figure_check_pages = ["index"]
# .rst first: autosummary writes its stub pages with the first suffix, and rst stubs read as Markdown
# would show their directives as text instead of the documented objects.
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "jupyter_execute"]
html_theme = "sphinx_book_theme"
html_title = "sc_llm"
html_theme_options = {"repository_url": "https://github.com/scverse/sc_llm", "use_repository_button": False}
suppress_warnings = ["config.cache", "mystnb.unknown_mime_type"]

# Every cross-reference must resolve. sc_llm's own objects always do (the API page documents every
# public name); other projects resolve through intersphinx where an inventory can be had without
# network (docs/_ext/offline_inventories.py: Debian's documentation packages). The rest is listed
# below, each with its reason.
nitpicky = True
intersphinx_mapping = _offline_intersphinx()
intersphinx_timeout = 10
nitpick_ignore_regex = [
    # No inventory reachable offline (no Debian documentation package): the scverse stack, the deep
    # learning stack, numpy and matplotlib (Debian 12 ships no numpy or matplotlib docs), the HTTP and
    # cluster libraries. Their names in signatures and prose render as code, without a link.
    (r"py:.*", r"(anndata|scanpy|mudata|squidpy|spatialdata)(\..*)?"),
    (r"py:.*", r"(torch|nn|transformers|sentence_transformers|captum|lime)(\..*)?"),
    (r"py:.*", r"(numpy|np|matplotlib)(\..*)?"),
    (r"py:.*", r"(httpx|dask|distributed|zarr)(\..*)?"),
]
nitpick_ignore = [
    # The only sc_llm names here: private tokenizer types that public encoders' tokenizer() methods
    # return (the method's docstring says what they do); the runner is their only caller.
    ("py:class", "sc_llm.models._scgpt.ScGPTTokenizer"),
    ("py:class", "sc_llm.models._geneformer.GeneformerTokenizer"),
]


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


def _aliases(public: list[str]) -> dict[str, str]:
    """Public names that re-export another public name's object (``tl.FusionModel``), to its home.

    The home is the name in the namespace that defines the object; an alias gets no page of its own
    (autodoc would describe the object twice) and references to it resolve to the home's page.
    """
    import importlib

    def obj(name):
        ns, _, attr = name.rpartition(".")
        return getattr(importlib.import_module(f"sc_llm.{ns}" if ns else "sc_llm"), attr)

    by_id: dict[int, list[str]] = {}
    for name in public:
        if isinstance(obj(name), type):
            by_id.setdefault(id(obj(name)), []).append(name)
    aliases = {}
    for names in by_id.values():
        module = obj(names[0]).__module__
        home = next((n for n in names if module.startswith(f"sc_llm.{n.rpartition('.')[0]}.")), names[0])
        aliases.update({n: home for n in names if n != home})
    return aliases


def _write_api(app) -> None:
    """Generate the API page, grouped by task, checking that no public name is left out or listed twice."""
    public = _public_names()
    aliases = _aliases(public)
    API_ALIASES.update({f"sc_llm.{a}": f"sc_llm.{h}" for a, h in aliases.items()})
    # Each namespace is a module target too, so that {mod}`sc_llm.testing` resolves.
    modules = [".. module:: sc_llm", *(f".. module:: sc_llm.{ns}" for ns in NAMESPACES)]
    lines = ["# API reference", "", "```{eval-rst}", *modules, "```", ""]
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
        lines += [f"   {name}" for name in names if name not in aliases]
        lines += ["```", ""]
        lines += [f"`sc_llm.{n}` is {{class}}`sc_llm.{aliases[n]}`, re-exported." for n in names if n in aliases]
        lines += [""] if any(n in aliases for n in names) else []
    missing = sorted(set(public) - set(placed))
    twice = sorted({n for n in placed if placed.count(n) > 1})
    if missing or twice:
        raise RuntimeError(f"docs/conf.py API_GROUPS: not placed {missing}, placed twice {twice}.")
    text = "\n".join(lines)
    api = HERE / "api.md"
    if not api.exists() or api.read_text() != text:
        api.write_text(text)


# Full names of re-exported classes -> the name they are documented under (filled by _write_api).
API_ALIASES: dict[str, str] = {}
# Names that type hints spell by their defining module, -> the name the project's inventory lists.
QUALNAME_OVERRIDES = {
    "pandas.core.frame.DataFrame": "pandas.DataFrame",
    "pandas.core.series.Series": "pandas.Series",
}


def _resolve_renamed(app, env, node, contnode):
    """Resolve a reference to an alias (ours, or a qualified name from a type hint) by its other name."""
    target = node.get("reftarget", "")
    if node.get("refdomain") != "py" or target not in API_ALIASES | QUALNAME_OVERRIDES:
        return None
    if target in API_ALIASES:
        py = env.get_domain("py")
        return py.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], API_ALIASES[target], node, contnode)
    from sphinx.ext.intersphinx import missing_reference

    renamed = node.deepcopy()
    renamed["reftarget"] = QUALNAME_OVERRIDES[target]
    return missing_reference(app, env, renamed, contnode)


def setup(app):
    app.connect("missing-reference", _resolve_renamed)


# Generated while the configuration loads, before autosummary looks for the names to document.
_copy_tutorials(None)
_write_api(None)
