"""Package-wide conventions (0.2.0): parameter counts and docs, uns shape, deprecated 0.1 names."""

import inspect
import re
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
from scipy import sparse

import sc_llm as scl
from sc_llm._deprecations import moved_to_config, renamed_params
from sc_llm.testing import ensembl_ids, write_geneformer, write_scgpt

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


def test_old_execution_keywords_warn_and_give_the_same_result(pbmc, text_encoder, tmp_path):
    adata = pbmc[:24].copy()
    scl.tl.embed_text(
        adata, text_encoder, precision="fp32", execution=scl.Execution(chunk_size=5), key_added="new"
    )
    with pytest.warns(FutureWarning, match=r"embed_text\(\): `chunk_size/store` is deprecated.*Execution\("):
        scl.tl.embed_text(
            adata, text_encoder, precision="fp32", chunk_size=5, store=tmp_path / "x.zarr", key_added="old"
        )
    np.testing.assert_array_equal(adata.obsm["new"], adata.obsm["old"])
    params = adata.uns["old"]["params"]
    assert params["chunk_size"] == 5 and params["store"] == str(tmp_path / "x.zarr")
    assert adata.uns["new"]["params"]["store"] is None and "dim" in adata.uns["new"]


def test_renamed_scgpt_keywords_warn_and_give_the_same_result(pbmc, tmp_path):
    cells = pbmc[:6].copy()
    cells.X = sparse.csr_matrix(cells.X)
    cells.var["symbol"] = list(cells.var_names)
    model_dir = write_scgpt(tmp_path / "scgpt", list(cells.var_names[:400]))
    scl.tl.embed_scgpt(cells, model_dir, gene_symbols="symbol", precision="fp32", key_added="new")
    with pytest.warns(FutureWarning, match="`gene_col` is deprecated, use `gene_symbols`") as caught:
        scl.tl.embed_scgpt(cells, model_dir=model_dir, gene_col="symbol", precision="fp32", key_added="old")
    assert {w.filename for w in caught if w.category is FutureWarning} == {__file__}  # the user's line
    np.testing.assert_array_equal(cells.obsm["new"], cells.obsm["old"])
    with pytest.raises(TypeError, match="got both `gene_col` \\(deprecated\\) and `gene_symbols`"):
        scl.tl.embed_scgpt(cells, model_dir, gene_col="symbol", gene_symbols="symbol")


def test_renamed_geneformer_keywords_warn_and_give_the_same_result(pbmc, tmp_path):
    cells = pbmc[:6].copy()
    cells.X = sparse.csr_matrix(cells.X)
    cells.layers["counts"] = cells.X.copy()
    cells.var["ids"] = ensembl_ids(cells.n_vars)
    model_dir, tok, med = write_geneformer(tmp_path / "gf", list(cells.var["ids"][:500]))
    common = {"token_dictionary": tok, "gene_median_dictionary": med, "precision": "fp32"}
    scl.tl.embed_geneformer(cells, model_dir, gene_ids="ids", layer="counts", key_added="new", **common)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scl.tl.embed_geneformer(
            cells, model_dir, ensembl_col="ids", counts_layer="counts", key_added="old", **common
        )
    messages = [str(w.message) for w in caught if w.category is FutureWarning]
    assert any("`ensembl_col` is deprecated, use `gene_ids`" in m for m in messages)
    assert any("`counts_layer` is deprecated, use `layer`" in m for m in messages)
    np.testing.assert_array_equal(cells.obsm["new"], cells.obsm["old"])
    assert cells.uns["old"]["params"]["gene_ids"] == "ids" and cells.uns["old"]["params"]["layer"] == "counts"


@dataclass(frozen=True)
class _Config:
    a: int = 1
    b: int = 2


@moved_to_config("config", _Config, ("a", "b"))
def _takes_config(config: _Config | None = None) -> _Config:
    return config


def test_moved_keywords_update_a_given_config():
    with pytest.warns(FutureWarning, match=r"`config=_Config\(a=…\)`"):
        assert _takes_config(a=5) == _Config(a=5)
    with pytest.warns(FutureWarning):
        assert _takes_config(config=_Config(b=7), a=5) == _Config(a=5, b=7)
    assert _takes_config() is None
    with pytest.raises(ValueError, match="has no fields"):
        moved_to_config("config", _Config, ("c",))


def test_renamed_params_keep_the_signature():
    @renamed_params(old="new")
    def f(new: int = 0) -> int:
        """Doc."""
        return new

    assert list(inspect.signature(f).parameters) == ["new"] and f.__doc__ == "Doc."
    with pytest.warns(FutureWarning):
        assert f(old=3) == 3
