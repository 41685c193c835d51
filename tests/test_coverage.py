import numpy as np
import pytest
from scipy import sparse

import sc_llm as scl
from sc_llm.pp._gene_ids import convert_gene_ids
from sc_llm.testing import write_geneformer, write_scgpt
from sc_llm.tl._coverage import CoverageCounter, coverage_summary, warn_low_coverage


def dense_reference(X, matched):
    """Independent: densify, sum."""
    D = np.asarray(X.todense()) if sparse.issparse(X) else np.asarray(X)
    per_cell = D[:, matched].sum(1) / D.sum(1)
    return D[:, matched].sum() / D.sum(), np.median(per_cell)


def test_coverage_summary_matches_dense_computation(pbmc):
    rng = np.random.default_rng(0)
    matched = rng.random(pbmc.n_vars) < 0.3
    s = coverage_summary(pbmc.X, matched, chunk_size=97)
    frac, med = dense_reference(pbmc.X, matched)
    assert s["fraction_counts_covered"] == pytest.approx(frac)
    assert s["cell_fraction_counts_covered"]["median"] == pytest.approx(med)
    assert s["n_genes_matched"] == matched.sum() and s["n_genes"] == pbmc.n_vars
    assert s["n_expressed_genes"] == int((np.asarray(pbmc.X.sum(0)).ravel() > 0).sum())
    counter = CoverageCounter(matched, pbmc.n_obs)
    for start in (600, 0, 300):  # chunks in any order, as an engine's workers finish them
        counter.add(start, pbmc.X[start : start + 300])
    assert counter.summary() == s
    with pytest.raises(ValueError, match="one flag per gene"):
        coverage_summary(pbmc.X, matched[:-1])
    with pytest.warns(
        UserWarning, match=r"covers \d+ of 765 genes, holding only .*map_gene_ids\(adata, to='symbol'\)"
    ):
        assert warn_low_coverage(s, "embed_scgpt: the scGPT vocabulary", "symbol")
    assert not warn_low_coverage(coverage_summary(pbmc.X, np.ones(pbmc.n_vars, bool)), "x", "symbol")


def test_scgpt_vocabulary(pbmc, tmp_path):
    genes = list(pbmc.var_names[::3])
    folder = write_scgpt(tmp_path / "scgpt", genes)
    table = scl.tl.vocab_coverage(pbmc, folder)
    row = table.loc["scgpt"]
    assert row["ids"] == "symbol" and row["n_genes_matched"] == len(genes) == row["n_genes_matched_as_is"]
    frac, _ = dense_reference(pbmc.X, np.isin(pbmc.var_names, genes))
    assert row["fraction_counts_covered"] == pytest.approx(frac)
    # Ensembl IDs in var: nothing matches as is, the conversion recovers the genes.
    conv = convert_gene_ids(pbmc.var_names, "ensembl")
    ens = pbmc[:, conv.matched].copy()
    ens.var_names = conv.converted[conv.matched].astype(str)
    t2 = scl.tl.vocab_coverage(ens, str(folder))
    assert t2.loc["scgpt", "n_genes_matched_as_is"] == 0
    assert (
        t2.loc["scgpt", "n_genes_matched"]
        == t2.loc["scgpt", "n_genes_matched_converted"]
        >= 0.9 * len(genes) * ens.n_vars / pbmc.n_vars
    )
    none = scl.tl.vocab_coverage(ens, folder, convert=False)
    assert none.loc["scgpt", "n_genes_matched"] == 0 and none.loc["scgpt", "fraction_counts_covered"] == 0


def test_geneformer_dictionary_from_symbols(pbmc, tmp_path):
    conv = convert_gene_ids(pbmc.var_names, "ensembl")
    ids = list(conv.converted[conv.matched][:200])
    _, tok_path, _ = write_geneformer(tmp_path / "gf", ids)
    row = scl.tl.vocab_coverage(pbmc, tok_path).loc["geneformer"]
    assert row["ids"] == "ensembl" and row["n_genes_matched_as_is"] == 0 and row["n_genes_matched"] == 200
    frac, _ = dense_reference(pbmc.X, np.isin(conv.converted.astype(str), ids))
    assert row["fraction_counts_covered"] == pytest.approx(frac)
    with pytest.raises(ValueError, match="Geneformer model folder: pass its token dictionary"):
        scl.tl.vocab_coverage(pbmc, tok_path.parent / "model")


def test_text_tokenizer_stats(pbmc, text_encoder):
    row = scl.tl.vocab_coverage(pbmc, text_encoder).loc["text"]
    tok = text_encoder.tokenizer
    lengths = [len(tok(g, add_special_tokens=False)["input_ids"]) for g in pbmc.var_names]
    assert row["tokens_per_gene"] == pytest.approx(np.mean(lengths))
    assert row["fraction_single_token"] == pytest.approx(np.mean(np.array(lengths) == 1))
    assert 0 <= row["unk_token_rate"] < 0.01 and row["fraction_counts_covered"] == 1


def test_to_model_ids():
    names, rep = scl.tl.to_model_ids(["TP53", "CD3E", "NOTAGENE1"], "ensembl")
    assert list(names) == ["ENSG00000141510", "ENSG00000198851", None]
    assert rep == {
        "from": "symbol",
        "to": "ensembl",
        "n_genes": 3,
        "converted": True,
        "n_converted": 2,
        "n_ambiguous": 0,
        "n_unmatched": 1,
    }
    names, rep = scl.tl.to_model_ids(["ENSG00000141510.18", "ENSG00000167286"], "ensembl")
    assert list(names) == ["ENSG00000141510", "ENSG00000167286"] and rep["converted"] is False
    names, rep = scl.tl.to_model_ids(["Cd3e"], "ensembl", species="mouse")
    assert list(names) == ["ENSMUSG00000032093"]
