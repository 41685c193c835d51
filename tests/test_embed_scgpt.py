"""scl.tl.embed_scgpt against an independent per-cell reference on tiny released-format checkpoints."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import sparse

import sc_llm as scl
from sc_llm.testing import write_scgpt

N_CELLS = 24


@pytest.fixture
def cells(pbmc):
    """A few real pbmc68k cells (counts, CSR) with all their genes."""
    adata = pbmc[:N_CELLS].copy()
    adata.X = sparse.csr_matrix(adata.X)
    return adata


@pytest.fixture
def vocab_genes(pbmc):
    """Most but not all pbmc genes are in the vocabulary, plus genes the data lacks."""
    genes = list(pbmc.var_names)
    return genes[: int(0.8 * len(genes))] + ["NOTAGENE1", "NOTAGENE2"]


@pytest.fixture
def model_dir(tmp_path, vocab_genes):
    return write_scgpt(tmp_path / "scGPT_tiny", vocab_genes)


# -- independent reference: one cell at a time, plain numpy binning and plain torch ops ------------
def _load(model_dir):
    args = json.loads((model_dir / "args.json").read_text())
    vocab = json.loads((model_dir / "vocab.json").read_text())
    if "<eoc>" not in vocab:
        vocab["<eoc>"] = len(vocab)
    sd = torch.load(model_dir / "best_model.pt", weights_only=True)
    return args, vocab, {k: v.double() for k, v in sd.items()}


def _reference_tokens(adata, vocab, args, seed, max_length, symbols=None):
    X = adata.X.toarray() if sparse.issparse(adata.X) else np.asarray(adata.X)
    symbols = list(adata.var_names) if symbols is None else list(symbols)
    for i, name in enumerate(adata.obs_names):
        keep = [j for j, s in enumerate(symbols) if s in vocab and X[i, j] != 0]
        x = X[i, keep].astype(np.float64)
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        edges = np.quantile(x, np.linspace(0, 1, args["n_bins"] - 1)) if len(x) else np.zeros(0)
        hi = np.searchsorted(edges, x, side="right")
        lo = np.searchsorted(edges, x, side="left")
        bins = np.ceil(hi - rng.random(len(x)) * (hi - lo))
        toks = np.array([vocab[symbols[j]] for j in keep], dtype=np.int64)
        if len(keep) > max_length - 1:
            chosen = np.sort(rng.choice(len(keep), max_length - 1, replace=False))
            toks, bins = toks[chosen], bins[chosen]
        yield np.r_[vocab["<cls>"], toks], np.r_[args["pad_value"], bins]


def _reference_forward(sd, args, toks, vals):
    d, nh = args["embsize"], args["nheads"]

    def ln(x, p):
        return F.layer_norm(x, (d,), sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-5)

    def lin(x, p):
        return x @ sd[f"{p}.weight"].T + sd[f"{p}.bias"]

    x = ln(sd["encoder.embedding.weight"][torch.as_tensor(toks)], "encoder.enc_norm")
    v = torch.as_tensor(vals, dtype=torch.float64)[:, None].clamp(max=512)
    v = ln(lin(torch.relu(lin(v, "value_encoder.linear1")), "value_encoder.linear2"), "value_encoder.norm")
    x = x + v
    n = x.shape[0]
    for i in range(args["nlayers"]):
        p = f"transformer_encoder.layers.{i}"
        q, k, w = lin(x, f"{p}.self_attn.Wqkv").chunk(3, dim=-1)
        q, k, w = (t.reshape(n, nh, d // nh).transpose(0, 1) for t in (q, k, w))
        att = torch.softmax(q @ k.transpose(1, 2) / (d // nh) ** 0.5, dim=-1)
        o = lin((att @ w).transpose(0, 1).reshape(n, d), f"{p}.self_attn.out_proj")
        x = ln(x + o, f"{p}.norm1")
        x = ln(x + lin(torch.relu(lin(x, f"{p}.linear1")), f"{p}.linear2"), f"{p}.norm2")
    return F.normalize(x[0], dim=0).numpy()


def reference(adata, model_dir, seed=0, max_length=1200, symbols=None):
    args, vocab, sd = _load(model_dir)
    toks = _reference_tokens(adata, vocab, args, seed, max_length, symbols)
    return np.stack([_reference_forward(sd, args, t, v) for t, v in toks])


# -- behaviour ------------------------------------------------------------------------------------
def test_matches_independent_reference(cells, model_dir):
    scl.tl.embed_scgpt(cells, model_dir)
    emb = cells.obsm["X_scgpt"]
    assert emb.shape == (N_CELLS, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(emb, reference(cells, model_dir), atol=2e-5)
    info = cells.uns["X_scgpt"]
    n_matched = int(0.8 * cells.n_vars)
    assert info["n_genes_matched"] == n_matched
    assert info["fraction_genes_matched"] == pytest.approx(n_matched / cells.n_vars)
    assert info["params"]["model"]["ignored_keys"] == 13 and info["params"]["model"]["dim"] == 32
    assert info["n_cells_subsampled"] == 0 and info["params"]["precision"] == "fp32"
    assert cells.n_vars == 765  # the caller keeps all genes


def test_pytorch_attention_names_load_identically(cells, tmp_path, vocab_genes):
    flash = write_scgpt(tmp_path / "flash", vocab_genes, seed=3, flash=True)
    plain = write_scgpt(tmp_path / "plain", vocab_genes, seed=3, flash=False)
    a = scl.tl.embed_scgpt(cells, flash, copy=True).obsm["X_scgpt"]
    b = scl.tl.embed_scgpt(cells, plain, copy=True).obsm["X_scgpt"]
    np.testing.assert_array_equal(a, b)


def test_vocab_without_eoc_is_extended_like_upstream(cells, tmp_path, vocab_genes):
    path = write_scgpt(tmp_path / "no_eoc", vocab_genes, with_eoc=False)
    scl.tl.embed_scgpt(cells, path)
    np.testing.assert_allclose(cells.obsm["X_scgpt"], reference(cells, path), atol=2e-5)


def test_batching_and_padding_do_not_change_embeddings(cells, model_dir):
    ref = scl.tl.embed_scgpt(cells, model_dir, batch_size=1, copy=True).obsm["X_scgpt"]
    for bs in (5, 64):
        out = scl.tl.embed_scgpt(cells, model_dir, batch_size=bs, copy=True).obsm["X_scgpt"]
        np.testing.assert_allclose(out, ref, atol=1e-5)


def test_order_kept_and_cells_independent(cells, model_dir):
    full = scl.tl.embed_scgpt(cells, model_dir, copy=True).obsm["X_scgpt"]
    perm = np.random.default_rng(1).permutation(N_CELLS)
    shuffled = scl.tl.embed_scgpt(cells[perm].copy(), model_dir, copy=True).obsm["X_scgpt"]
    np.testing.assert_allclose(shuffled, full[perm], atol=1e-5)
    some = scl.tl.embed_scgpt(cells[5:9].copy(), model_dir, copy=True).obsm["X_scgpt"]
    np.testing.assert_allclose(some, full[5:9], atol=1e-5)


def test_subsampling_is_seeded_and_matches_reference(cells, model_dir):
    a = scl.tl.embed_scgpt(cells, model_dir, max_length=40, random_state=7, copy=True)
    b = scl.tl.embed_scgpt(cells, model_dir, max_length=40, random_state=7, copy=True)
    c = scl.tl.embed_scgpt(cells, model_dir, max_length=40, random_state=8, copy=True)
    np.testing.assert_array_equal(a.obsm["X_scgpt"], b.obsm["X_scgpt"])
    assert not np.allclose(a.obsm["X_scgpt"], c.obsm["X_scgpt"], atol=1e-4)
    ref = reference(cells, model_dir, seed=7, max_length=40)
    np.testing.assert_allclose(a.obsm["X_scgpt"], ref, atol=2e-5)
    assert a.uns["X_scgpt"]["n_cells_subsampled"] == N_CELLS  # every pbmc cell expresses > 39 genes
    assert a.uns["X_scgpt"]["genes_per_cell"]["max"] == 39


def test_gene_col_layer_and_dense_input(cells, model_dir):
    symbols = list(cells.var_names)
    cells.var["symbol"] = symbols
    cells.var_names = [f"gene{i}" for i in range(cells.n_vars)]
    cells.layers["counts"] = cells.X.toarray()
    X_before = cells.X.copy()
    scl.tl.embed_scgpt(cells, model_dir, gene_symbols="symbol", layer="counts")
    np.testing.assert_allclose(cells.obsm["X_scgpt"], reference(cells, model_dir, symbols=symbols), atol=2e-5)
    assert (cells.X != X_before).nnz == 0
    assert cells.uns["X_scgpt"]["params"]["gene_symbols"] == "symbol"


def test_cell_without_vocabulary_genes_gets_cls_only(cells, model_dir, caplog):
    X = cells.X.tolil()
    X[0, :] = 0
    cells.X = X.tocsr()
    scl.tl.embed_scgpt(cells, model_dir)
    assert cells.uns["X_scgpt"]["n_cells_without_genes"] == 1
    np.testing.assert_allclose(cells.obsm["X_scgpt"], reference(cells, model_dir), atol=2e-5)


def test_copy_and_overwrite_warning(cells, model_dir):
    out = scl.tl.embed_scgpt(cells, model_dir, copy=True)
    assert "X_scgpt" in out.obsm and "X_scgpt" not in cells.obsm
    cells.obsm["X_scgpt"] = np.zeros((N_CELLS, 2))
    with pytest.warns(UserWarning, match="X_scgpt"):
        scl.tl.embed_scgpt(cells, model_dir)
    assert cells.obsm["X_scgpt"].shape == (N_CELLS, 32)


def test_reduced_precision_agrees(cells, model_dir):
    fp32 = scl.tl.embed_scgpt(cells, model_dir, copy=True).obsm["X_scgpt"]
    low = scl.tl.embed_scgpt(cells, model_dir, precision="bf16", copy=True)
    cos = np.sum(fp32 * low.obsm["X_scgpt"], axis=1)
    assert cos.min() > 0.99
    assert low.uns["X_scgpt"]["params"]["precision"] in ("bf16", "fp32")  # fp32 where the CPU lacks bf16


def test_loaded_encoder_is_reused(cells, model_dir):
    enc = scl.models.load_scgpt(model_dir)
    assert scl.models.load_scgpt(model_dir) is enc
    scl.tl.embed_scgpt(cells, enc)
    assert cells.uns["X_scgpt"]["params"]["model"]["path"] == str(enc.path)


# -- errors ---------------------------------------------------------------------------------------
def test_missing_files_named(tmp_path, cells):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="best_model.pt"):
        scl.tl.embed_scgpt(cells, tmp_path / "empty")


def test_too_few_matched_genes_names_column_and_examples(cells, model_dir):
    cells.var["ensembl"] = [f"ENSG{i:011d}" for i in range(cells.n_vars)]
    with pytest.raises(ValueError, match=r"var\['ensembl'\].*ENSG00000000000"):
        scl.tl.embed_scgpt(cells, model_dir, gene_symbols="ensembl")
    with pytest.raises(KeyError, match="nope"):
        scl.tl.embed_scgpt(cells, model_dir, gene_symbols="nope")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda sd: sd.pop("transformer_encoder.layers.1.norm2.bias"), "missing keys.*layers.1.norm2.bias"),
        (lambda sd: sd.__setitem__("adapter.weight", torch.zeros(2)), "unexpected keys.*adapter.weight"),
    ],
)
def test_strict_loading_names_keys(model_dir, cells, edit, message):
    sd = torch.load(model_dir / "best_model.pt", weights_only=True)
    edit(sd)
    torch.save(sd, model_dir / "best_model.pt")
    with pytest.raises(ValueError, match=message):
        scl.tl.embed_scgpt(cells, model_dir)


def test_args_missing_key_and_bad_inputs(model_dir, cells):
    with pytest.raises(ValueError, match="max_length"):
        scl.tl.embed_scgpt(cells, model_dir, max_length=1)
    X = cells.X.toarray()
    X[0, 0] = -1.0  # gene 0 is in the vocabulary
    cells.X = sparse.csr_matrix(X)
    with pytest.raises(ValueError, match="negative values.*" + cells.obs_names[0]):
        scl.tl.embed_scgpt(cells, model_dir)
    args = json.loads((model_dir / "args.json").read_text())
    del args["nheads"]
    (model_dir / "args.json").write_text(json.dumps(args))
    with pytest.raises(KeyError, match="nheads"):
        scl.tl.embed_scgpt(cells, model_dir)


@pytest.mark.parametrize("values", [(np.nan, -1.0), (np.inf,), (np.nan,)])
def test_non_finite_values_are_refused_and_nan_does_not_hide_negatives(cells, model_dir, values):
    X = cells.X.toarray().astype(np.float32)
    for j, v in enumerate(values):  # genes 0 and 1 are in the vocabulary
        X[j, j] = v
    cells.X = sparse.csr_matrix(X)
    with pytest.raises(ValueError, match=f"adata.X contains .*'{cells.obs_names[0]}'.*scGPT needs finite counts"):
        scl.tl.embed_scgpt(cells, model_dir)


def test_ensembl_ids_are_converted_and_coverage_recorded(cells, model_dir):
    from sc_llm.tl._coverage import to_model_ids

    scl.tl.embed_scgpt(cells, model_dir, precision="fp32", key_added="symbols")
    info = cells.uns["symbols"]
    assert info["id_conversion"]["converted"] is False
    cov = info["coverage"]
    X = cells.X.toarray()
    matched = np.isin(cells.var_names, list(json.loads((model_dir / "vocab.json").read_text())))
    assert cov["n_genes_matched"] == matched.sum()
    assert cov["fraction_counts_covered"] == pytest.approx(X[:, matched].sum() / X.sum())
    assert cov["cell_fraction_counts_covered"]["min"] == pytest.approx((X[:, matched].sum(1) / X.sum(1)).min())

    ids, _ = to_model_ids(cells.var_names, "ensembl")
    ok = np.array([i is not None for i in ids])
    by_id = cells[:, ok].copy()
    by_id.var_names = [str(i) for i in ids[ok]]
    scl.tl.embed_scgpt(by_id, model_dir, precision="fp32")
    assert by_id.uns["X_scgpt"]["id_conversion"]["converted"] is True
    back, _ = to_model_ids(by_id.var_names, "symbol")  # what the function read after converting
    ref = by_id.copy()
    ref.var_names = [b if b is not None else f"none{i}" for i, b in enumerate(back)]
    scl.tl.embed_scgpt(ref, model_dir, precision="fp32", key_added="ref")
    np.testing.assert_array_equal(by_id.obsm["X_scgpt"], ref.obsm["ref"])


def test_low_coverage_warns_before_compute_with_the_fix(cells, tmp_path, vocab_genes):
    few = write_scgpt(tmp_path / "few", vocab_genes[:200])  # the vocabulary holds a quarter of the genes
    with pytest.warns(UserWarning, match=r"map_gene_ids\(adata, to='symbol'\)") as record:
        scl.tl.embed_scgpt(cells, few, precision="fp32")
    assert len([w for w in record if "map_gene_ids" in str(w.message)]) == 1
    assert cells.uns["X_scgpt"]["coverage"]["fraction_counts_covered"] < 0.5
