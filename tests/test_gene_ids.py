import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import sc_llm as scl
from sc_llm.pp._gene_ids import convert_gene_ids, load_gene_table


def with_vars(names, column=None):
    X = sparse.random(3, len(names), density=0.5, format="csr", random_state=0, dtype=np.float32)
    var = pd.DataFrame(index=[f"g{i}" for i in range(len(names))]) if column else pd.DataFrame(index=names)
    if column:
        var[column] = names
    return ad.AnnData(X=X, var=var)


def test_pbmc_round_trip_returns_the_original_symbols(pbmc):
    X_before = pbmc.X.copy()
    scl.pp.map_gene_ids(pbmc, "ensembl")
    u = pbmc.uns["ensembl_id"]
    assert u["n_matched"] + u["n_ambiguous"] + u["n_unmatched"] == pbmc.n_vars
    assert u["n_matched"] / pbmc.n_vars > 0.97
    assert u["table"]["gencode"] == "GENCODE 48"
    matched = pbmc.var["ensembl_id"].notna().to_numpy()
    back = pbmc[:, matched].copy()
    scl.pp.map_gene_ids(back, "symbol", column="ensembl_id")
    exact = (back.var["ensembl_id_match"] == "exact").to_numpy()
    got, orig = back.var["gene_symbol"].astype(str).to_numpy(), back.var_names.to_numpy()
    assert (got[exact] == orig[exact]).mean() >= 0.99
    # Outdated symbols come back as today's names, never as something unrelated.
    renamed = dict(zip(orig[~exact], got[~exact], strict=True))
    assert renamed["IGJ"] == "JCHAIN" and renamed["SEPT7"] == "SEPTIN7"
    assert (pbmc.X != X_before).nnz == 0 and list(pbmc.var_names[:3]) == list(
        scl.datasets.pbmc68k().var_names[:3]
    )


def test_versions_case_previous_symbols_and_unnamed_genes():
    a = with_vars(
        ["ENSG00000141510.18", "ensg00000141510", "ENSG00000141510", "ENSG00000083622", "ENSG00000999999"]
    )
    with pytest.warns(UserWarning, match="1 symbol identifiers are reached from several genes"):
        scl.pp.map_gene_ids(a, "symbol")
    assert list(a.var["gene_symbol"].iloc[:3]) == ["TP53"] * 3
    assert list(a.var["gene_symbol_match"]) == ["version", "version", "exact", "no_symbol", "unmatched"]
    assert a.var["gene_symbol"].isna().sum() == 2 and a.uns["gene_symbol"]["n_unmatched"] == 2
    b = with_vars(["TP53", "tp53", "SEPT7", "ENSG00000083622", "NOTAGENE1"], column="sym")
    with pytest.warns(UserWarning, match="reached from several genes"):
        scl.pp.map_gene_ids(b, "ensembl", column="sym", key_added="ens")
    assert list(b.var["ens"].iloc[:4]) == [
        "ENSG00000141510",
        "ENSG00000141510",
        "ENSG00000122545",
        "ENSG00000083622",
    ]
    assert list(b.var["ens_match"]) == ["exact", "case", "alias", "exact", "unmatched"]
    many = b.uns["ens"]["many_to_one"]
    assert many.loc[0, "target"] == "ENSG00000141510" and many.loc[0, "names"] == "TP53; tp53"
    assert list(b.var_names) == [f"g{i}" for i in range(5)]  # var_names untouched


def test_one_to_many_is_reported_not_guessed():
    a = with_vars(["C7orf55", "CD3E"])
    scl.pp.map_gene_ids(a, "ensembl")
    assert (
        pd.isna(a.var.loc["C7orf55", "ensembl_id"])
        and a.var.loc["C7orf55", "ensembl_id_match"] == "ambiguous"
    )
    amb = a.uns["ensembl_id"]["ambiguous"]
    assert list(amb["name"]) == ["C7orf55"] and amb.loc[0, "n_candidates"] == 2
    assert set(amb.loc[0, "candidates"].split("; ")) == {"ENSG00000164898", "ENSG00000269955"}


def test_mouse_and_wrong_species():
    m = with_vars(["Cd3e", "Xkr4", "Ptprc"])
    scl.pp.map_gene_ids(m, "ensembl", species="mouse")
    assert list(m.var["ensembl_id"]) == ["ENSMUSG00000032093", "ENSMUSG00000051951", "ENSMUSG00000026395"]
    with pytest.raises(ValueError, match="not human gene IDs.*species='mouse'"):
        scl.pp.map_gene_ids(with_vars(["ENSMUSG00000032093.3"]), "symbol")
    with pytest.warns(UserWarning, match="found only by ignoring case"):
        scl.pp.map_gene_ids(
            with_vars(
                ["Cd3e", "Cd8a", "Ptprc", "Ms4a1", "Lyz2", "Nkg7", "Gzma", "Cd4", "Foxp3", "Il7r", "Ccr7"]
            ),
            "ensembl",
        )


def test_bad_input():
    with pytest.raises(ValueError, match="Mixed identifier types: 1 Ensembl IDs and 2 other names"):
        scl.pp.map_gene_ids(with_vars(["ENSG00000141510", "TP53", "CD3E"]), "symbol")
    with pytest.raises(
        ValueError, match="Mixed identifier types: 1 Ensembl IDs of named genes among 2 symbols"
    ):
        scl.pp.map_gene_ids(with_vars(["ENSG00000141510", "TP53", "CD3E"]), "ensembl")
    with pytest.raises(ValueError, match="Ensembl IDs already"):
        scl.pp.map_gene_ids(with_vars(["ENSG00000141510", "ENSG00000167286"]), "ensembl")
    with pytest.raises(ValueError, match="look like symbols already"):
        scl.pp.map_gene_ids(with_vars(["TP53", "CD3E"]), "symbol")
    with pytest.raises(ValueError, match="No gene of var_names matched the human table"):
        scl.pp.map_gene_ids(with_vars(["NOTAGENE1", "NOTAGENE2"]), "ensembl")
    with pytest.raises(KeyError, match="'sym' not found in adata.var"):
        scl.pp.map_gene_ids(with_vars(["TP53"]), "ensembl", column="sym")
    with pytest.raises(ValueError, match="species must be one of"):
        scl.pp.map_gene_ids(with_vars(["TP53"]), "ensembl", species="rat")
    with pytest.raises(ValueError, match="to must be 'ensembl' or 'symbol'"):
        scl.pp.map_gene_ids(with_vars(["TP53"]), "entrez")
    a = with_vars(["TP53", "tp53"])
    with pytest.raises(ValueError, match="would duplicate 1 var names"):
        scl.pp.map_gene_ids(a, "ensembl", set_var_names=True)
    assert "ensembl_id" not in a.var and list(a.var_names) == ["TP53", "tp53"]


def test_set_var_names_keeps_the_old_names():
    a = with_vars(["TP53", "NOTAGENE1"])
    scl.pp.map_gene_ids(a, "ensembl", set_var_names=True)
    assert list(a.var_names) == ["ENSG00000141510", "NOTAGENE1"]
    assert list(a.var["ensembl_id_from"]) == ["TP53", "NOTAGENE1"]


def test_table_is_consistent_with_itself():
    """Every GENCODE-named human gene converts to its own ID and back (independent of the lookup order)."""
    table = load_gene_table("human")
    unique = [s for s, ids in table.by_symbol.items() if len(ids) == 1]
    rng = np.random.default_rng(0)
    sample = list(rng.choice(unique, 2000, replace=False))
    conv = convert_gene_ids(sample, "ensembl")
    assert (conv.status == "exact").all()
    back = convert_gene_ids(conv.converted, "symbol")
    assert list(back.converted) == sample
