"""scl.tl.embed_geneformer against a per-cell reference: numpy rank value encoding + transformers' own BERT."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from scipy import sparse

import sc_llm as scl
from sc_llm.testing import ensembl_ids, write_geneformer

N_CELLS = 16


@pytest.fixture
def cells(pbmc):
    """Real pbmc68k counts with made-up Ensembl IDs in var['ensembl_id'] (symbols stay var_names)."""
    adata = pbmc[:N_CELLS].copy()
    adata.X = sparse.csr_matrix(adata.X)
    adata.var["ensembl_id"] = ensembl_ids(adata.n_vars)
    return adata


def _write(tmp_path, cells, name="gf", n_known=700, **kwargs):
    """Dictionaries know the first ``n_known`` genes (the rest are absent from the model)."""
    return write_geneformer(tmp_path / name, list(cells.var["ensembl_id"][:n_known]), **kwargs)


# -- independent reference: one cell at a time, dense numpy, transformers' BertForMaskedLM --------
def _reference_tokens(adata, tok_path, med_path, input_size, ids=None):
    tokens = pickle.loads(tok_path.read_bytes())
    medians = pickle.loads(med_path.read_bytes())
    special = "<cls>" in tokens
    ids = list(adata.var["ensembl_id"]) if ids is None else list(ids)
    X = adata.X.toarray()
    known = sorted({g for g in ids if g in tokens and g in medians}, key=ids.index)
    for row in X:
        summed = dict.fromkeys(known, 0.0)
        for g, c in zip(ids, row, strict=True):
            if g in summed:
                summed[g] += c
        norm = np.array([summed[g] / row.sum() * 10_000 / medians[g] for g in known])
        order = [known[j] for j in np.argsort(-norm, kind="stable") if norm[j] > 0]
        seq = [tokens[g] for g in order][: input_size - (2 if special else 0)]
        yield [tokens["<cls>"], *seq, tokens["<eos>"]] if special else seq


def reference(adata, paths, emb_layer=-1, mode="mean", ids=None):
    from transformers import BertForMaskedLM

    model_dir, tok, med = paths
    model = BertForMaskedLM.from_pretrained(model_dir).eval()
    n_layers, size = model.config.num_hidden_layers, model.config.max_position_embeddings
    out = []
    with torch.no_grad():
        for seq in _reference_tokens(adata, tok, med, size, ids):
            hidden = model(torch.tensor([seq]), output_hidden_states=True).hidden_states[
                n_layers + emb_layer
            ][0]
            special = "<cls>" in pickle.loads(tok.read_bytes())
            if mode == "cls":
                out.append(hidden[0].numpy())
            else:
                out.append((hidden[1:-1] if special else hidden).mean(0).numpy())
    return np.stack(out)


def _embed(adata, paths, **kwargs):
    model_dir, tok, med = paths
    return scl.tl.embed_geneformer(
        adata, model_dir, token_dictionary=tok, gene_median_dictionary=med, **kwargs
    )


# -- behaviour ------------------------------------------------------------------------------------
@pytest.mark.parametrize("emb_layer", [-1, 0, -3])
def test_v1_matches_reference(cells, tmp_path, emb_layer):
    paths = _write(tmp_path, cells, input_size=64)
    _embed(cells, paths, emb_layer=emb_layer)
    emb = cells.obsm["X_geneformer"]
    assert emb.shape == (N_CELLS, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, reference(cells, paths, emb_layer), atol=1e-5)
    info = cells.uns["X_geneformer"]
    assert info["params"]["special_tokens"] is False and info["params"]["emb_layer"] == emb_layer
    assert info["n_genes_matched"] == 700 and info["params"]["model"]["input_size"] == 64
    assert info["n_cells_truncated"] == N_CELLS and info["genes_per_cell"]["max"] == 64


@pytest.mark.parametrize("mode", ["mean", "cls"])
def test_v2_bin_checkpoint_with_special_tokens(cells, tmp_path, mode):
    paths = _write(tmp_path, cells, v2=True, input_size=200, safetensors=False)
    assert (paths[0] / "pytorch_model.bin").exists()
    _embed(cells, paths, emb_mode=mode)
    np.testing.assert_allclose(cells.obsm["X_geneformer"], reference(cells, paths, mode=mode), atol=1e-5)
    info = cells.uns["X_geneformer"]
    assert info["params"]["special_tokens"] is True
    # 198 gene slots: some pbmc cells fit whole, others are cut.
    assert 0 < info["n_cells_truncated"] < N_CELLS and info["genes_per_cell"]["max"] == 198


def test_batching_order_and_cell_independence(cells, tmp_path):
    paths = _write(tmp_path, cells, input_size=256)
    one = _embed(cells, paths, batch_size=1, copy=True).obsm["X_geneformer"]
    many = _embed(cells, paths, batch_size=6, copy=True).obsm["X_geneformer"]
    np.testing.assert_allclose(many, one, atol=1e-5)
    perm = np.random.default_rng(0).permutation(N_CELLS)
    shuffled = _embed(cells[perm].copy(), paths, copy=True).obsm["X_geneformer"]
    np.testing.assert_allclose(shuffled, one[perm], atol=1e-5)


def test_duplicate_ids_are_summed_and_var_names_and_dicts_work(cells, tmp_path):
    ids = list(cells.var["ensembl_id"])
    ids[5] = ids[0]  # two columns for one gene
    cells.var["ensembl_id"] = ids
    paths = _write(tmp_path, cells, input_size=512)
    ref = reference(cells, paths, ids=ids)
    cells.var_names = ids  # duplicated IDs happen in real data
    model_dir, tok, med = paths
    scl.tl.embed_geneformer(
        cells,
        model_dir,
        token_dictionary=pickle.loads(tok.read_bytes()),
        gene_median_dictionary=pickle.loads(med.read_bytes()),
        gene_ids=None,
    )
    np.testing.assert_allclose(cells.obsm["X_geneformer"], ref, atol=1e-5)
    assert cells.uns["X_geneformer"]["n_genes_matched"] == 699


def test_counts_layer_and_x_untouched(cells, tmp_path):
    paths = _write(tmp_path, cells, input_size=128)
    expected = reference(cells, paths)
    cells.layers["counts"] = cells.X.copy()
    cells.X = sparse.csr_matrix(cells.X.shape, dtype=np.float32)
    _embed(cells, paths, layer="counts")
    np.testing.assert_allclose(cells.obsm["X_geneformer"], expected, atol=1e-5)
    assert cells.X.nnz == 0


def test_reduced_precision_agrees(cells, tmp_path):
    paths = _write(tmp_path, cells, input_size=128)
    fp32 = _embed(cells, paths, copy=True).obsm["X_geneformer"]
    low = _embed(cells, paths, precision="bf16", copy=True).obsm["X_geneformer"]
    cos = np.sum(fp32 * low, 1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(low, axis=1)
    assert cos.min() > 0.99


# -- errors ---------------------------------------------------------------------------------------
def test_symbols_that_do_not_reach_the_dictionary_warn_with_the_fix(cells, tmp_path):
    paths = _write(tmp_path, cells)  # made-up IDs: converted real symbols rarely hit them
    with pytest.warns(UserWarning, match=r"not Ensembl IDs.*map_gene_ids\(adata, to='ensembl'\)"):
        _embed(cells, paths, gene_ids=None)
    assert cells.uns["X_geneformer"]["id_conversion"]["from"] == "symbol"
    with pytest.raises(KeyError, match="gene_ids"):
        _embed(cells, paths, gene_ids="gene_ids")


def test_layer_and_mode_errors(cells, tmp_path):
    paths = _write(tmp_path, cells)
    with pytest.raises(ValueError, match=r"emb_layer must be in \[-3, 0\]"):
        _embed(cells, paths, emb_layer=1)
    with pytest.raises(ValueError, match="V2 model"):
        _embed(cells, paths, emb_mode="cls")
    with pytest.raises(KeyError, match="<cls>"):
        _embed(cells, paths, special_tokens=True)
    model_dir, tok, med = paths
    shifted = {g: i + 10_000 for g, i in pickle.loads(tok.read_bytes()).items()}
    with pytest.raises(ValueError, match="belongs to another model"):
        scl.tl.embed_geneformer(cells, model_dir, token_dictionary=shifted, gene_median_dictionary=med)


@pytest.mark.parametrize("v2", [False, True])
def test_cell_without_genes_gets_nan_and_a_named_warning(cells, tmp_path, caplog, v2):
    paths = _write(tmp_path, cells, v2=v2, input_size=200)
    _embed(cells, paths, precision="fp32", key_added="full")
    X = cells.X.toarray()
    X[2] = 0
    cells.X = sparse.csr_matrix(X)
    with caplog.at_level("WARNING", logger="sc_llm"):
        _embed(cells, paths, precision="fp32")
    assert cells.obs_names[2] in caplog.text and "NaN" in caplog.text
    emb = cells.obsm["X_geneformer"]
    assert np.isnan(emb[2]).all() and np.isfinite(np.delete(emb, 2, axis=0)).all()
    np.testing.assert_allclose(np.delete(emb, 2, axis=0), np.delete(cells.obsm["full"], 2, axis=0), atol=1e-5)
    assert cells.uns["X_geneformer"]["n_cells_without_genes"] == 1


def test_ids_match_without_version_suffix_or_case(cells, tmp_path):
    paths = _write(tmp_path, cells)
    _embed(cells, paths, precision="fp32", key_added="plain")
    cells.var["ensembl_id"] = [f"{g.lower()}.{i % 7 + 1}" for i, g in enumerate(cells.var["ensembl_id"])]
    _embed(cells, paths, precision="fp32", key_added="versioned")
    np.testing.assert_array_equal(cells.obsm["versioned"], cells.obsm["plain"])


def test_gene_without_median_is_reported(cells, tmp_path, caplog):
    model_dir, tok, med = _write(tmp_path, cells)
    medians = pickle.loads(med.read_bytes())
    dropped = cells.var["ensembl_id"].iloc[0]
    del medians[dropped]
    with caplog.at_level("WARNING", logger="sc_llm"):
        scl.tl.embed_geneformer(cells, model_dir, token_dictionary=tok, gene_median_dictionary=medians)
    assert "not the median dictionary" in caplog.text and dropped in caplog.text


@pytest.mark.parametrize("bad", [np.nan, np.inf, -1.0])
def test_invalid_counts_are_refused(cells, tmp_path, bad):
    paths = _write(tmp_path, cells)
    cells.X = cells.X.astype(np.float32)
    cells.X.data[5] = bad
    with pytest.raises(ValueError, match=f"adata.X contains .*first in cell '{cells.obs_names[0]}'.*raw counts"):
        _embed(cells, paths)


def test_log_normalized_input_warns(cells, tmp_path):
    paths = _write(tmp_path, cells)
    with pytest.warns(UserWarning, match="non-integer values"):
        _embed(cells, paths, layer="log1p")


def test_missing_files(cells, tmp_path):
    model_dir, tok, med = _write(tmp_path, cells)
    with pytest.raises(FileNotFoundError, match="config.json"):
        scl.tl.embed_geneformer(cells, tmp_path, token_dictionary=tok, gene_median_dictionary=med)
    with pytest.raises(FileNotFoundError, match="nothere.pkl"):
        scl.tl.embed_geneformer(
            cells, model_dir, token_dictionary=tmp_path / "nothere.pkl", gene_median_dictionary=med
        )


def test_checkpoint_without_encoder_weights_is_rejected(cells, tmp_path):
    from safetensors.torch import load_file, save_file

    model_dir, tok, med = _write(tmp_path, cells)
    weights = load_file(model_dir / "model.safetensors")
    dropped = [k for k in weights if "layer.1.output.dense" in k]
    save_file({k: v for k, v in weights.items() if k not in dropped}, model_dir / "model.safetensors")
    with pytest.raises(ValueError, match=r"layer\.1\.output\.dense"):
        scl.tl.embed_geneformer(cells, model_dir, token_dictionary=tok, gene_median_dictionary=med)


def test_symbols_are_converted_when_no_ensembl_column(pbmc, tmp_path):
    from sc_llm.tl._coverage import to_model_ids

    cells = pbmc[:N_CELLS].copy()
    ids, _ = to_model_ids(cells.var_names, "ensembl")
    known = [str(i) for i in ids if i is not None]
    paths = write_geneformer(tmp_path / "gf", known[:600])
    with_ids = cells[:, [i is not None for i in ids]].copy()
    with_ids.var["ensembl_id"] = [str(i) for i in ids if i is not None]
    _embed(with_ids, paths, precision="fp32")
    _embed(cells, paths, precision="fp32")  # no ensembl_id column: var_names are symbols, converted
    assert cells.uns["X_geneformer"]["id_conversion"]["converted"] is True
    assert cells.uns["X_geneformer"]["params"]["gene_ids"] == "var_names"
    np.testing.assert_allclose(cells.obsm["X_geneformer"], with_ids.obsm["X_geneformer"], atol=1e-6)
    cov = cells.uns["X_geneformer"]["coverage"]
    assert cov["n_genes"] == cells.n_vars and 0 < cov["fraction_counts_covered"] < 1
