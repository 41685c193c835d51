import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import sc_llm as scl


def reference_sentence(values: np.ndarray, names) -> str:
    """Independent per-cell reference: stable sort by descending value keeps var order for ties."""
    nz = np.flatnonzero(values)
    order = nz[np.argsort(-values[nz], kind="stable")]
    return " ".join(names[i] for i in order)


def random_adata(rng, n_obs=60, n_vars=40, density=0.3):
    X = sparse.random(n_obs, n_vars, density=density, format="csr", random_state=1, dtype=np.float32)
    X.data = np.rint(X.data * 4) + 0.0  # small integers: many ties
    X.eliminate_zeros()
    var = pd.DataFrame({"symbol": [f"SYM{i}" for i in range(n_vars)]}, index=[f"G{i}" for i in range(n_vars)])
    return ad.AnnData(X=X, var=var, obs=pd.DataFrame(index=[f"c{i}" for i in range(n_obs)]))


def test_matches_reference_on_pbmc(pbmc):
    scl.pp.cell_sentences(pbmc, execution=scl.Execution(chunk_size=97))
    dense = pbmc.X.toarray()
    names = list(pbmc.var_names)
    for i in range(0, pbmc.n_obs, 7):
        assert pbmc.obs["cell_sentence"].iloc[i] == reference_sentence(dense[i], names)
    assert pbmc.uns["cell_sentence"]["n_empty"] == 0
    assert "var" in pbmc.uns["cell_sentence"]["tie_rule"]


def test_ties_follow_var_order_and_zeros_are_omitted():
    X = sparse.csr_matrix(np.array([[0, 2, 5, 2, 0], [1, 1, 1, 0, 0]], dtype=np.float32))
    a = ad.AnnData(X=X, var=pd.DataFrame(index=list("ABCDE")))
    scl.pp.cell_sentences(a)
    assert list(a.obs["cell_sentence"]) == ["C B D", "A B C"]


def test_unsorted_indices_and_explicit_zeros_leave_matrix_untouched():
    X = sparse.csr_matrix((np.array([1.0, 0.0, 3.0]), np.array([2, 0, 1]), np.array([0, 3])), shape=(1, 3))
    a = ad.AnnData(X=X, var=pd.DataFrame(index=["A", "B", "C"]))
    scl.pp.cell_sentences(a)
    assert a.obs["cell_sentence"].iloc[0] == "B C"
    assert a.X.nnz == 3  # the explicit zero is still stored: the user's matrix was not modified


def test_dense_layer_raw_symbols_and_cap(rng):
    a = random_adata(rng)
    a.layers["dense"] = a.X.toarray()
    scl.pp.cell_sentences(a, key_added="s_sparse")
    scl.pp.cell_sentences(a, layer="dense", key_added="s_dense", execution=scl.Execution(chunk_size=13))
    assert (a.obs["s_sparse"] == a.obs["s_dense"]).all()
    scl.pp.cell_sentences(a, gene_symbols="symbol", n_genes=3, key_added="s_cap")
    for full, capped in zip(a.obs["s_sparse"], a.obs["s_cap"], strict=True):
        assert capped.split() == [w.replace("G", "SYM") for w in full.split()[:3]]
    a.raw = a
    scl.pp.cell_sentences(a, use_raw=True, key_added="s_raw")
    assert (a.obs["s_raw"] == a.obs["s_sparse"]).all()
    assert a.uns["s_cap"] == {
        "params": {
            "layer": None, "use_raw": False, "gene_symbols": "symbol", "n_genes": 3, "chunk_size": 4096, "store": None,
        },
        "tie_rule": scl.pp._cell_sentences.TIE_RULE,
        "n_empty": a.uns["s_cap"]["n_empty"],
    }  # fmt: skip


def test_copy_returns_new_object(rng):
    a = random_adata(rng)
    b = scl.pp.cell_sentences(a, copy=True)
    assert "cell_sentence" in b.obs and "cell_sentence" not in a.obs


def test_empty_cells_warn_with_count():
    X = sparse.csr_matrix(np.array([[0, 1], [0, 0], [0, 0]], dtype=np.float32))
    a = ad.AnnData(X=X, var=pd.DataFrame(index=["A", "B"]))
    with pytest.warns(UserWarning, match="2 cells have no expressed gene"):
        scl.pp.cell_sentences(a)
    assert list(a.obs["cell_sentence"]) == ["B", "", ""]
    assert a.uns["cell_sentence"]["n_empty"] == 2


@pytest.mark.parametrize(
    ("value", "match"),
    [(-1.0, "negative values \\(first in cell 'c1'\\)"), (np.nan, "NaN values \\(first in cell 'c1'\\)")],
)
def test_bad_values_name_the_cell(value, match):
    X = np.array([[1, 2], [value, 1]], dtype=np.float32)
    a = ad.AnnData(X=X, obs=pd.DataFrame(index=["c0", "c1"]), var=pd.DataFrame(index=["A", "B"]))
    with pytest.raises(ValueError, match=match):
        scl.pp.cell_sentences(a)


def test_bad_names_and_keys(rng):
    a = random_adata(rng)
    with pytest.raises(KeyError, match="Layer 'nope' not found"):
        scl.pp.cell_sentences(a, layer="nope")
    with pytest.raises(KeyError, match="Column 'nope' not found in var"):
        scl.pp.cell_sentences(a, gene_symbols="nope")
    with pytest.raises(KeyError, match="adata.raw is None"):
        scl.pp.cell_sentences(a, use_raw=True)
    a.var["dup"] = ["X"] * 2 + [f"Y{i}" for i in range(a.n_vars - 2)]
    with pytest.raises(ValueError, match="not unique: 'X'"):
        scl.pp.cell_sentences(a, gene_symbols="dup")
    a.var["spaced"] = ["HLA DRA"] + [f"Y{i}" for i in range(a.n_vars - 1)]
    with pytest.raises(ValueError, match="without whitespace: 'HLA DRA'"):
        scl.pp.cell_sentences(a, gene_symbols="spaced")


def test_ensembl_ids_warn(rng):
    a = random_adata(rng)
    a.var_names = [f"ENSG{i:011d}" for i in range(a.n_vars)]
    with pytest.warns(UserWarning, match="look like Ensembl IDs"):
        scl.pp.cell_sentences(a)


def test_existing_key_warns(rng):
    a = random_adata(rng)
    scl.pp.cell_sentences(a)
    with pytest.warns(UserWarning, match="already exists"):
        scl.pp.cell_sentences(a)


def test_float64_values_rank_exactly():
    # Values that collapse in float32 must still rank by their float64 value.
    X = sparse.csr_matrix(np.array([[1.0, 1.0 + 1e-12, 0.5]], dtype=np.float64))
    a = ad.AnnData(X=X, var=pd.DataFrame(index=["A", "B", "C"]))
    scl.pp.cell_sentences(a)
    assert a.obs["cell_sentence"].iloc[0] == "B A C"


def test_packed_sort_falls_back_without_overflow(rng):
    from sc_llm.pp._cell_sentences import _sort_within_rows

    rows = np.repeat(np.arange(50, dtype=np.int64), 4)
    values = rng.integers(1, 4, rows.size).astype(np.float32)
    cols = np.tile(np.array([7, 1, 5, 3], dtype=np.int64), 50)
    expected = cols[np.lexsort((cols, -values, rows))]
    np.testing.assert_array_equal(_sort_within_rows(rows, values, cols, 8), expected)
    # 2**40 columns would overflow an int64 key of row * n_cols + col
    np.testing.assert_array_equal(_sort_within_rows(rows, values, cols, 2**40), expected)
