"""Docstrings of the public API: numpydoc Returns entries, and Examples that run (as doctests).

Every public function of every namespace is checked, so a function added later is held to the same
rules without editing this file.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import re

import pytest

import sc_llm

NAMESPACES = ("pp", "tl", "pl", "llm", "models", "datasets", "testing")
# The most used functions: each shows a call on the bundled data in an Examples section.
WITH_EXAMPLES = (
    "pp.cell_sentences", "tl.embed_text", "tl.embed_scgpt", "tl.embed_geneformer", "tl.knn_annotate",
    "tl.fuse_train", "tl.map_labels", "tl.llm_annotate", "tl.ablate", "tl.attribute",
)  # fmt: skip
HEADER = re.compile(r"^(\S[^\n]*)\n-{3,}$", re.M)
ENTRY = re.compile(r"^[A-Za-z_]\w* : \S.*$")


def public_objects() -> dict[str, object]:
    objects = {n: getattr(sc_llm, n) for n in sc_llm.__all__ if n not in NAMESPACES and not n.startswith("_")}
    for ns in NAMESPACES:
        module = importlib.import_module(f"sc_llm.{ns}")
        objects |= {f"{ns}.{n}": getattr(module, n) for n in module.__all__}
    return objects


PUBLIC = public_objects()
FUNCTIONS = sorted(n for n, o in PUBLIC.items() if inspect.isfunction(o))


def sections(doc: str) -> dict[str, list[str]]:
    """Section title -> its lines, for a numpydoc docstring (``inspect.getdoc`` dedented)."""
    found = list(HEADER.finditer(doc))
    return {
        m.group(1).strip(): doc[m.end() : found[i + 1].start() if i + 1 < len(found) else len(doc)].split(
            "\n"
        )
        for i, m in enumerate(found)
    }


def returns_problems(func) -> list[str]:
    """What is wrong with a function's Returns section (empty when nothing)."""
    doc = inspect.getdoc(func) or ""
    annotation = inspect.signature(func).return_annotation
    returns_none = annotation in (None, "None")
    lines = sections(doc).get("Returns")
    if lines is None:
        return [] if returns_none else ["no Returns section"]
    entries = [line for line in lines if line.strip() and not line[0].isspace()]
    if not entries:
        return ["Returns has no entry"]
    if returns_none:
        return [] if entries == ["None"] else [f"returns None but Returns lists {entries}"]
    bad = [e for e in entries if not ENTRY.match(e)]
    return [f"Returns entry {e!r} is not 'name : type'" for e in bad]


def test_sections_parser_reads_numpydoc():
    doc = "Summary.\n\nReturns\n-------\nadata : AnnData or None\n    Prose.\n\nNotes\n-----\nText."
    assert sections(doc)["Returns"] == ["", "adata : AnnData or None", "    Prose.", "", ""]
    assert sections(doc)["Notes"] == ["", "Text."]


def test_returns_check_flags_prose_and_accepts_typed_entries():
    def prose(x) -> int:
        """Summary.

        Returns
        -------
        The number of cells.
        """

    def typed(x) -> tuple[int, str]:
        """Summary.

        Returns
        -------
        n : int
            Cells.
        name : str
            The key.
        """

    def nothing(x) -> None:
        """Summary."""

    assert returns_problems(prose) == ["Returns entry 'The number of cells.' is not 'name : type'"]
    assert returns_problems(typed) == []
    assert returns_problems(nothing) == []
    assert returns_problems(lambda x: x) == ["no Returns section"]


def test_there_are_public_functions_to_check():
    assert {"tl.embed_text", "pl.annotation_embedding", "testing.write_scgpt"} <= set(FUNCTIONS)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_returns_section_has_named_typed_entries(name):
    assert returns_problems(PUBLIC[name]) == [], f"sc_llm.{name}"


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_most_used_functions_have_examples(name):
    assert "Examples" in sections(inspect.getdoc(PUBLIC[name]) or ""), (
        f"sc_llm.{name} has no Examples section"
    )


def doctests() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(recurse=False)
    found = []
    for name, obj in sorted(PUBLIC.items()):
        if inspect.isfunction(obj) or inspect.isclass(obj):
            found += [t for t in finder.find(obj, f"sc_llm.{name}", globs={}) if t.examples]
    return found


DOCTESTS = doctests()


def test_every_function_with_examples_has_a_doctest():
    assert {f"sc_llm.{n}" for n in WITH_EXAMPLES} <= {t.name for t in DOCTESTS}


@pytest.mark.parametrize("test", DOCTESTS, ids=lambda t: t.name)
def test_examples_run(test, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an example that writes a file writes it here
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    out: list[str] = []
    result = runner.run(test, out=out.append, clear_globs=True)
    assert result.failed == 0, "".join(out)
