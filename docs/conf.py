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


NAMESPACES = {
    "pp": "Preprocessing",
    "tl": "Tools",
    "pl": "Plotting",
    "models": "Encoder back ends",
    "datasets": "Datasets",
    "testing": "Testing helpers",
}


def _write_api(app) -> None:
    """Generate the API page from each namespace's ``__all__`` so new functions can never be left out."""
    import importlib

    lines = ["# API reference", "", "```{eval-rst}", ".. module:: sc_llm", "```", ""]
    for ns, title in NAMESPACES.items():
        module = importlib.import_module(f"sc_llm.{ns}")
        lines += [f"## {title}: `sc_llm.{ns}`", "", "```{eval-rst}", ".. currentmodule:: sc_llm", "",
                  ".. autosummary::", "   :toctree: generated/", ""]
        lines += [f"   {ns}.{name}" for name in sorted(module.__all__)]
        lines += ["```", ""]
    text = "\n".join(lines)
    api = HERE / "api.md"
    if not api.exists() or api.read_text() != text:
        api.write_text(text)


# Generated while the configuration loads, before autosummary looks for the names to document.
_copy_tutorials(None)
_write_api(None)
