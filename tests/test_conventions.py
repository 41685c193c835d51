"""Package-wide conventions: parameter counts and docs, real signatures, uns shape."""

import inspect
import re

import pytest

import sc_llm as scl

MAX_PARAMS = 16  # "about 15": more settings go into a config object


def _public_functions():
    for ns in (scl.pp, scl.tl, scl.pl):
        for name in ns.__all__:
            obj = getattr(ns, name)
            if inspect.isfunction(obj):
                yield f"{ns.__name__}.{name}", obj


@pytest.mark.parametrize(
    ("name", "fn"), list(_public_functions()), ids=lambda x: x if isinstance(x, str) else ""
)
def test_public_function_has_few_documented_parameters(name, fn):
    params = [p for p in inspect.signature(fn).parameters if p not in ("args", "kwargs")]
    assert len(params) <= MAX_PARAMS, f"{name} has {len(params)} parameters; group some in a config object"
    doc = inspect.getdoc(fn) or ""
    assert "Parameters\n----------" in doc, f"{name} has no numpy Parameters section"
    section = re.split(r"\n\s*\n[A-Z][A-Za-z ]+\n-{3,}", doc.split("Parameters\n----------", 1)[1])[0]
    documented = set()
    for line in section.splitlines():
        if line and not line.startswith(" "):
            documented.update(part.strip().lstrip("*") for part in line.split(","))
    undocumented = [p for p in params if p not in documented]
    assert not undocumented, f"{name}: parameters not documented: {undocumented}"


def test_execution_is_validated():
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        scl.Execution(chunk_size=0)
    with pytest.raises(TypeError, match="store must be a path"):
        scl.Execution(store=3)


def test_cell_sentences_and_split_record_params(pbmc):
    adata = pbmc[:50].copy()
    scl.pp.cell_sentences(adata, n_genes=5)
    assert adata.uns["cell_sentence"]["params"]["n_genes"] == 5
    assert adata.uns["cell_sentence"]["params"]["store"] is None
    scl.pp.train_test_split(adata, "bulk_labels", test_size=0.5, random_state=3)
    rec = adata.uns["split"]
    assert rec["params"] == {"labels_key": "bulk_labels", "test_size": 0.5, "random_state": 3}
    assert rec["n_train"] + rec["n_test"] == 50 and rec["n_test"] == (adata.obs["split"] == "test").sum()


@pytest.mark.parametrize(
    ("name", "fn"), list(_public_functions()), ids=lambda x: x if isinstance(x, str) else ""
)
def test_signatures_show_every_keyword(name, fn):
    """No wrapper admits keywords the signature does not show (nothing has been released: no aliases)."""
    assert not hasattr(fn, "__wrapped__"), f"{name} is wrapped; its signature may hide keywords"
    kinds = {p.kind for p in inspect.signature(fn).parameters.values()}
    allowed_var_kw = {"mlp_annotate"}  # forwards scikit-learn MLPClassifier's own keywords
    assert inspect.Parameter.VAR_KEYWORD not in kinds or name.split(".")[-1] in allowed_var_kw, name


def test_unknown_keywords_are_refused(pbmc):
    with pytest.raises(TypeError, match="chunk_size"):
        scl.pp.cell_sentences(pbmc[:5].copy(), chunk_size=5)
