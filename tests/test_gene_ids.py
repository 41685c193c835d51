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


def test_pbmc_table_round_trip_gives_todays_symbols(pbmc):
    """restore=False: the table's own answer, so outdated symbols come back under today's name."""
    X_before = pbmc.X.copy()
    scl.pp.map_gene_ids(pbmc, "ensembl")
    u = pbmc.uns["ensembl_id"]
    assert u["n_matched"] + u["n_ambiguous"] + u["n_unmatched"] == pbmc.n_vars
    assert u["n_matched"] / pbmc.n_vars > 0.97
    assert u["table"]["gencode"] == "GENCODE 48" and u["table"]["official"].startswith("NCBI Gene 2022")
    assert list(pbmc.var["ensembl_id_from"]) == list(pbmc.var_names)
    matched = pbmc.var["ensembl_id"].notna().to_numpy()
    back = pbmc[:, matched].copy()
    scl.pp.map_gene_ids(back, "symbol", column="ensembl_id", restore=False)
    assert back.uns["gene_symbol"]["restored_from"] == "" and back.uns["gene_symbol"]["n_restored"] == 0
    exact = (back.var["ensembl_id_match"] == "exact").to_numpy()
    got, orig = back.var["gene_symbol"].astype(str).to_numpy(), back.var_names.to_numpy()
    assert (got[exact] == orig[exact]).all()
    # Outdated symbols come back as today's names, never as something unrelated.
    renamed = dict(zip(orig[~exact], got[~exact], strict=True))
    assert renamed["IGJ"] == "JCHAIN" and renamed["SEPT7"] == "SEPTIN7"
    assert (pbmc.X != X_before).nnz == 0 and list(pbmc.var_names[:3]) == list(
        scl.datasets.pbmc68k().var_names[:3]
    )


def test_round_trip_restores_the_users_names_through_h5ad(pbmc, tmp_path):
    orig = pbmc.var_names.copy()
    scl.pp.map_gene_ids(pbmc, "ensembl", set_var_names=True)
    assert pbmc.var_names[orig.get_loc("IGJ")] == "ENSG00000132465"
    unconverted = pbmc.var["ensembl_id"].isna().to_numpy()
    assert unconverted.sum() == 14 and (pbmc.var_names[unconverted] == orig[unconverted]).all()
    pbmc.write_h5ad(tmp_path / "ens.h5ad")
    back = ad.read_h5ad(tmp_path / "ens.h5ad")[:, ::-1].copy()  # subset and reorder: matched per gene
    # The 14 names left as symbols would be "mixed identifier types" without the record.
    scl.pp.map_gene_ids(back, "symbol", set_var_names=True)
    assert list(back.var_names) == list(orig[::-1])
    u = back.uns["gene_symbol"]
    assert u["restored_from"] == "ensembl_id" and u["n_restored"] == pbmc.n_vars == u["n_matched"]
    assert u["params"]["restore"] is True and set(back.var["gene_symbol_match"]) == {"restored"}
    assert back.var.loc["IGJ", "gene_symbol_from"] == "ENSG00000132465"
    # Converting forward again restores the IDs (the record of the symbol call is used now).
    with pytest.warns(UserWarning, match=r"\['ensembl_id'\] already exists"):
        scl.pp.map_gene_ids(back, "ensembl")
    assert back.uns["ensembl_id"]["restored_from"] == "gene_symbol"
    assert back.var.loc["IGJ", "ensembl_id"] == "ENSG00000132465"
    table = ad.read_h5ad(tmp_path / "ens.h5ad")
    with pytest.raises(ValueError, match="Mixed identifier types: 751 Ensembl IDs and 14 other names"):
        scl.pp.map_gene_ids(table, "symbol", restore=False)


def test_restore_only_genes_whose_id_is_unchanged():
    a = with_vars(["IGJ", "TP53", "SEPT7"])
    scl.pp.map_gene_ids(a, "ensembl", set_var_names=True)
    a.var_names = ["ENSG00000132465", "ENSG00000141510.18", "ENSG00000167286"]  # 2nd versioned, 3rd replaced
    scl.pp.map_gene_ids(a, "symbol")
    assert list(a.var["gene_symbol"]) == ["IGJ", "TP53", "CD3D"]
    assert list(a.var["gene_symbol_match"]) == ["restored", "version", "exact"]
    scl.pp.map_gene_ids(a, "symbol", restore=False, key_added="today")
    assert a.var.loc["ENSG00000132465", "today"] == "JCHAIN" and a.uns["today"]["params"]["restore"] is False


def test_ensembl_first_round_trip_restores_versioned_ids():
    a = with_vars(["ENSG00000141510.18", "ENSG00000132465.12", "ENSG00000999999.1"])
    scl.pp.map_gene_ids(a, "symbol", set_var_names=True)
    assert list(a.var_names) == ["TP53", "JCHAIN", "ENSG00000999999.1"]
    scl.pp.map_gene_ids(a, "ensembl", set_var_names=True)
    assert list(a.var_names) == ["ENSG00000141510.18", "ENSG00000132465.12", "ENSG00000999999.1"]
    assert list(a.var["ensembl_id_match"]) == ["restored"] * 3
    b = a.copy()
    scl.pp.map_gene_ids(b, "symbol", restore=False, key_added="sym")
    scl.pp.map_gene_ids(b, "ensembl", column="sym", restore=False, key_added="ens")
    # The table gives unversioned IDs; a gene with no symbol stays without an ID.
    assert list(b.var["ens"].iloc[:2]) == ["ENSG00000141510", "ENSG00000132465"] and pd.isna(
        b.var["ens"].iloc[2]
    )
    assert list(b.var["ens_match"]) == ["exact", "exact", "unmatched"]


def test_column_round_trip_keeps_var_names_and_restores_unconverted_genes():
    a = with_vars(["IGJ", "NOTAGENE1", "C7orf55", "CD3E"])
    scl.pp.map_gene_ids(a, "ensembl")
    assert list(a.var["ensembl_id_match"]) == ["alias", "unmatched", "ambiguous", "exact"]
    scl.pp.map_gene_ids(a, "symbol", column="ensembl_id")  # missing IDs: no error
    assert list(a.var["gene_symbol"]) == ["IGJ", "NOTAGENE1", "C7orf55", "CD3E"]
    assert list(a.var_names) == ["IGJ", "NOTAGENE1", "C7orf55", "CD3E"]
    scl.pp.map_gene_ids(a, "symbol", column="ensembl_id", restore=False, key_added="today")
    assert list(a.var["today"].iloc[[0, 3]]) == ["JCHAIN", "CD3E"] and a.var["today"].iloc[1:3].isna().all()
    assert list(a.var["today_match"]) == ["exact", "unmatched", "unmatched", "exact"]


def test_restore_by_key_and_bad_keys():
    a = with_vars(["IGJ", "TP53"])
    scl.pp.map_gene_ids(a, "ensembl", key_added="ens", set_var_names=True)
    b = a.copy()
    scl.pp.map_gene_ids(b, "symbol", restore="ens")
    assert list(b.var["gene_symbol"]) == ["IGJ", "TP53"] and b.uns["gene_symbol"]["restored_from"] == "ens"
    with pytest.raises(
        KeyError, match=r"restore='ensembl_id': no earlier map_gene_ids\(to='ensembl'.*Found: \['ens'\]"
    ):
        scl.pp.map_gene_ids(a.copy(), "symbol", restore="ensembl_id")
    # A record of the other species is not used: these are human IDs, converted with the human table.
    with pytest.raises(KeyError, match="Found: none"):
        scl.pp.map_gene_ids(a.copy(), "symbol", species="mouse", restore="ens")
    del a.var["ens_from"]  # a record whose columns are gone is ignored
    scl.pp.map_gene_ids(a, "symbol")
    assert list(a.var["gene_symbol"]) == ["JCHAIN", "TP53"] and a.uns["gene_symbol"]["restored_from"] == ""


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
    assert list(b.var["ens_from"]) == ["TP53", "tp53", "SEPT7", "ENSG00000083622", "NOTAGENE1"]
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


def test_mouse_symbols_aliases_and_wrong_species():
    m = with_vars(["Cd3e", "Xkr4", "Ptprc", "Sept7", "B220", "Slc67a2", "ENSMUSG00000047061"])
    with pytest.warns(UserWarning, match="reached from several genes.*'Ptprc; B220'"):
        scl.pp.map_gene_ids(m, "ensembl", species="mouse")
    assert list(m.var["ensembl_id"]) == [
        "ENSMUSG00000032093",
        "ENSMUSG00000051951",
        "ENSMUSG00000026395",
        "ENSMUSG00000001833",  # Sept7: MGI previous symbol of Septin7
        "ENSMUSG00000026395",  # B220: MGI synonym of Ptprc
        "ENSMUSG00000041945",  # Slc67a2: MGI symbol, GENCODE M37 still says Mfsd9
        "ENSMUSG00000047061",  # unnamed in GENCODE M37, listed under its ID (CELLxGENE style)
    ]
    assert list(m.var["ensembl_id_match"]) == [
        "exact",
        "exact",
        "exact",
        "alias",
        "alias",
        "official",
        "exact",
    ]
    assert m.uns["ensembl_id"]["table"]["official"].startswith("MGI 2026")
    back = convert_gene_ids(["ENSMUSG00000001833.3", "ENSMUSG00000047061"], "symbol", species="mouse")
    assert list(back.converted) == ["Septin7", "Gm58342"] and list(back.status) == ["version", "official"]
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
    assert a.uns["ensembl_id"]["params"] == {
        "to": "ensembl",
        "species": "human",
        "column": "var_names",
        "set_var_names": True,
        "restore": True,
    }
    b = with_vars(["TP53", "NOTAGENE1"], column="sym")
    scl.pp.map_gene_ids(b, "ensembl", column="sym", set_var_names=True)
    assert list(b.var_names) == ["ENSG00000141510", "g1"] and list(b.var["ensembl_id_from"]) == [
        "TP53",
        "NOTAGENE1",
    ]


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
