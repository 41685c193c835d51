"""Reliability guarantees (issue 14): value checks, key checks, safe dictionary pickles, loader and CLI errors.

Each test reproduces a reported fault: it failed (or the fault went silent) before the fix.
"""

from __future__ import annotations

import os
import pickle
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse

import sc_llm as scl
from sc_llm._utils import as_csr, check_counts, check_key, check_unique_obs_names, check_values
from sc_llm.cli import main
from sc_llm.models._geneformer import UnsafePickleError, check_dictionary, check_medians, read_dictionary
from sc_llm.models._scgpt import ScGPTEncoder
from sc_llm.testing import write_scgpt

NAMES = np.array(["c0", "c1", "c2"])


def _block(bad_value, cell: int = 1, *, dense: bool = False):
    X = np.array([[1.0, 0.0, 2.0], [0.0, 3.0, 1.0], [4.0, 0.0, 0.0]])
    X[cell, 2] = bad_value
    return as_csr(X) if dense else sparse.csr_matrix(X)


@pytest.fixture
def small(pbmc):
    adata = pbmc[:40].copy()
    scl.pp.cell_sentences(adata)
    return adata


@pytest.fixture
def tissue():
    """Six cells in a row with counts, coordinates and sentences."""
    counts = np.array([[5, 1, 0], [0, 6, 1], [1, 0, 7], [4, 2, 0], [0, 3, 3], [2, 0, 5]], dtype=np.float32)
    adata = ad.AnnData(
        sparse.csr_matrix(counts),
        obs=pd.DataFrame({"cell_type": list("ABCABC")}, index=[f"cell{i}" for i in range(6)]),
        var=pd.DataFrame(index=["CD3D", "MS4A1", "LYZ"]),
    )
    adata.obsm["spatial"] = np.c_[2.0 ** np.arange(6), np.zeros(6)]
    scl.pp.cell_sentences(adata)
    return adata


# -- value checks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize(
    ("value", "kind"), [(np.nan, "NaN"), (np.inf, r"\+inf"), (-np.inf, "-inf"), (-1.0, "negative")]
)
def test_check_values_refuses_nan_inf_negative_naming_the_cell(value, kind, dense):
    with pytest.raises(ValueError, match=f"{kind} values \\(first in cell 'c1'\\)"):
        check_values(_block(value, dense=dense), NAMES)


def test_nan_does_not_hide_a_negative_value():
    # data.min() is NaN here, so a `min() < 0` test would pass this block.
    X = sparse.csr_matrix(np.array([[np.nan, 1.0], [-2.0, 1.0]]))
    assert not (X.data.min() < 0)
    with pytest.raises(ValueError, match="2 bad entries"):
        check_values(X, NAMES[:2])


def test_old_import_path_is_the_shared_check():
    from sc_llm.pp._cell_sentences import check_values as old

    assert old is check_values


def test_cell_sentences_refuse_infinite_values(pbmc):
    adata = pbmc[:5].copy()
    adata.X = sparse.csr_matrix(adata.X, dtype=np.float32)
    adata.X.data[adata.X.indptr[3]] = np.inf
    with pytest.raises(ValueError, match=f"\\+inf values \\(first in cell '{adata.obs_names[3]}'\\)"):
        scl.pp.cell_sentences(adata)
    assert "cell_sentence" not in adata.obs


def test_check_counts_accepts_integers_and_flags_log_normalized(pbmc):
    counts = as_csr(pbmc.X[:20])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_counts(counts, pbmc.obs_names[:20]) is True
    logged = counts.copy()
    logged.data = np.log1p(logged.data)
    first = pbmc.obs_names[int(np.flatnonzero(np.diff(counts.indptr))[0])]
    with pytest.warns(UserWarning, match=f"non-integer values .* in cell '{first}'.*look log-normalized"):
        assert check_counts(logged, pbmc.obs_names[:20], "adata.layers['x']") is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_counts(logged, pbmc.obs_names[:20], warn=False) is False
    with pytest.raises(ValueError, match="adata.X contains negative values .* raw counts"):
        check_counts(_block(-3.0), NAMES)


def test_spatial_genes_mode_validates_expression(tissue):
    tissue.X = tissue.X.copy()
    tissue.X.data[tissue.X.indptr[2]] = -1.0
    with pytest.raises(ValueError, match="adata.X contains negative values \\(first in cell 'cell2'\\)"):
        scl.pp.spatial_sentences(tissue, mode="genes", neighbors=2)
    tissue.layers["bad"] = tissue.X.copy()
    tissue.layers["bad"].data[:] = np.nan
    with pytest.raises(ValueError, match="adata.layers\\['bad'\\] contains NaN"):
        scl.pp.spatial_sentences(tissue, mode="genes", neighbors=2, layer="bad")
    assert "cell_sentence_spatial" not in tissue.obs


def test_float16_dense_matrix_is_ranked_like_float32(pbmc):
    adata = pbmc[:30].copy()
    dense = np.asarray(adata.X.todense(), dtype=np.float16)
    half = ad.AnnData(dense, obs=adata.obs.copy(), var=adata.var.copy())
    full = ad.AnnData(dense.astype(np.float32), obs=adata.obs.copy(), var=adata.var.copy())
    scl.pp.cell_sentences(half)
    scl.pp.cell_sentences(full)
    assert (half.obs["cell_sentence"] == full.obs["cell_sentence"]).all()
    assert half.obs["cell_sentence"].str.len().min() > 0
    assert half.X.dtype == np.float16  # the caller's matrix is left as it was


# -- keys that h5ad can store ---------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["a/b", ""])
def test_check_key(key):
    with pytest.raises(ValueError, match="key_added"):
        check_key(key)
    assert check_key("X_text") == "X_text"


@pytest.mark.parametrize("key", ["a/b", ""])
def test_public_functions_refuse_unsavable_keys(small, tissue, key):
    before = set(small.obs.columns)
    with pytest.raises(ValueError, match="h5ad"):
        scl.pp.cell_sentences(small, key_added=key)
    with pytest.raises(ValueError, match="h5ad"):
        scl.pp.train_test_split(small, "cell_type", key_added=key)
    with pytest.raises(ValueError, match="h5ad"):
        scl.tl.ablate(small, "gene_hash", key_added=key)
    with pytest.raises(ValueError, match="h5ad"):
        scl.pp.spatial_sentences(tissue, labels_key="cell_type", neighbors=2, key_added=key)
    assert set(small.obs.columns) == before


def test_embed_text_refuses_slash_key_before_writing(small, text_encoder, tmp_path):
    adata = small[:4].copy()
    with pytest.raises(ValueError, match="'a/b' contains '/'"):
        scl.tl.embed_text(adata, text_encoder, key_added="a/b", precision="fp32")
    assert "a/b" not in adata.obsm and "a/b" not in adata.uns
    adata.write_h5ad(tmp_path / "ok.h5ad")  # still savable and readable
    assert ad.read_h5ad(tmp_path / "ok.h5ad").n_obs == 4


# -- the command line ----------------------------------------------------------------------------------


def _not_h5ad(tmp_path):
    src = tmp_path / "broken.h5ad"
    src.write_bytes(b"not an h5ad file")  # reading it would fail: the checks must come first
    return src


def test_cli_refuses_slash_key_before_reading_input(tmp_path, capsys):
    dst = tmp_path / "out.h5ad"
    with pytest.raises(SystemExit) as exit_info:
        main(["embed", str(_not_h5ad(tmp_path)), str(dst), "--key-added", "a/b"])
    assert exit_info.value.code == 2
    assert "--key-added 'a/b' contains '/'" in capsys.readouterr().err
    assert not dst.exists()


@pytest.mark.parametrize("where", ["missing_folder", "folder"])
def test_cli_checks_output_before_reading_input(tmp_path, capsys, where):
    dst = tmp_path / "no" / "out.h5ad" if where == "missing_folder" else tmp_path
    with pytest.raises(SystemExit) as exit_info:
        main(["embed", str(_not_h5ad(tmp_path)), str(dst)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert ("does not exist" in err) if where == "missing_folder" else ("is a folder" in err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to any folder")
def test_cli_unwritable_output_folder(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(SystemExit):
            main(["embed", str(_not_h5ad(tmp_path)), str(folder / "out.h5ad")])
        assert "not writable" in capsys.readouterr().err
    finally:
        folder.chmod(0o755)


# -- guards ------------------------------------------------------------------------------------------


def test_unique_obs_names_check_names_the_duplicates(small):
    check_unique_obs_names(small, "cells are explained by name")
    small.obs_names = ["dup"] * 3 + list(small.obs_names[3:])
    with pytest.raises(ValueError, match="'dup' repeat.*cells are explained by name.*obs_names_make_unique"):
        check_unique_obs_names(small, "cells are explained by name")


def test_ablate_refuses_to_overwrite_its_input(small):
    before = small.obs["cell_sentence"].copy()
    with pytest.raises(ValueError, match="key_added must differ from sentence_key"):
        scl.tl.ablate(small, "gene_hash", key_added="cell_sentence")
    pd.testing.assert_series_equal(small.obs["cell_sentence"], before)


def test_shuffle_top_named_alike_by_ablate_and_ablation_study(small, text_encoder):
    scl.pp.train_test_split(small, "cell_type", test_size=0.3)
    scl.tl.ablate(small, "shuffle_top", model=text_encoder)
    assert "cell_sentence_shuffle_top_0.1" in small.obs
    table = scl.tl.ablation_study(
        small, "cell_type", model=text_encoder, kinds=["shuffle_top", ("truncate", 0.1)]
    )
    assert list(table.columns) == ["baseline", "shuffle_top_0.1", "truncate_0.1"]
    from sc_llm.tl._ablate import column_label

    assert (
        column_label("shuffle_top_0.1", small.uns["ablation_study"]["kinds"])
        == "Order ablation (top 10% in context)"
    )


def test_spatial_sentences_refuse_missing_sentences(tissue):
    tissue.obs.loc["cell3", "cell_sentence"] = np.nan
    with pytest.raises(ValueError, match="obs\\['cell_sentence'\\] is missing for 1 cells: 'cell3'"):
        scl.pp.spatial_sentences(tissue, labels_key="cell_type", neighbors=2)
    assert "cell_sentence_spatial" not in tissue.obs


def test_squidpy_import_error_is_reported_when_installed(tissue, monkeypatch):
    import importlib.util

    real_import = importlib.import_module

    def broken(name, *args, **kwargs):
        if name == "squidpy":
            raise ModuleNotFoundError("No module named 'pkg_resources'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", broken)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "squidpy" else None)
    with pytest.raises(ImportError, match="installed but failed to import.*pkg_resources") as info:
        scl.pp.spatial_sentences(tissue, labels_key="cell_type", neighbors=2)
    assert "needs the optional" not in str(info.value)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match=r"spatial_sentences needs the optional dependency 'squidpy': pip install 'sc-llm\[spatial\]'"):
        scl.pp.spatial_sentences(tissue, labels_key="cell_type", neighbors=2)


@pytest.mark.parametrize(
    ("labels", "test_size", "match"),
    [
        ([np.nan] * 6, 0.2, "missing for all 6 cells"),
        (list("abcdef"), 0.2, "single cell"),
        (list("aabbccdd"), 0.2, "2 test and 6 train cells, fewer than the 4 labels"),
    ],
)
def test_split_explains_why_no_split_exists(labels, test_size, match):
    adata = ad.AnnData(obs=pd.DataFrame({"y": labels}, index=[f"c{i}" for i in range(len(labels))]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the singleton warning
        with pytest.raises(ValueError, match=match):
            scl.pp.train_test_split(adata, "y", test_size=test_size)
    assert "split" not in adata.obs


# -- Geneformer dictionaries: restricted unpickling --------------------------------------------------


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_crafted_dictionary_pickle_is_refused_before_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "token_dictionary.pkl"
    path.write_bytes(pickle.dumps({"ENSG1": _Exploit(marker)}))
    with pytest.raises(
        UnsafePickleError, match="token_dictionary file .* asks to load (posix|os|nt)\\.system"
    ):
        read_dictionary(path, "token_dictionary")
    assert not marker.exists()
    # A class of any kind is refused too, not only known-dangerous functions.
    path.write_bytes(pickle.dumps({"ENSG1": pd.Timestamp(0)}))
    with pytest.raises(UnsafePickleError, match="pandas"):
        read_dictionary(path, "token_dictionary")


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_real_dictionary_formats_still_load(tmp_path, protocol):
    tokens = {"<pad>": 0, "<mask>": 1, "ENSG00000000003": np.int64(2), "ENSG00000000005": 3}
    medians = {"ENSG00000000003": np.float32(1.5), "ENSG00000000005": np.float64(0.25), "ENSG7": 2.0}
    from collections import OrderedDict

    for name, obj in [("t", tokens), ("m", medians), ("o", OrderedDict(tokens))]:
        path = tmp_path / f"{name}.pkl"
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
        assert read_dictionary(path, name) == dict(obj)


def test_dictionary_file_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.pkl is empty"):
        read_dictionary(empty, "gene_median_dictionary")
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(pickle.dumps({f"g{i}": float(i) for i in range(100)})[:50])
    with pytest.raises(ValueError, match="cut.pkl is not a readable pickle"):
        read_dictionary(cut, "gene_median_dictionary")
    wrong = tmp_path / "list.pkl"
    wrong.write_bytes(pickle.dumps(["ENSG1"]))
    with pytest.raises(TypeError, match="holds a list, expected a dict"):
        read_dictionary(wrong, "token_dictionary")
    with pytest.raises(TypeError, match="values must be numbers"):
        read_dictionary({"ENSG1": "3"}, "token_dictionary")


def test_check_dictionary_compares_sizes_both_ways():
    tokens = {"<pad>": 0, "<mask>": 1, **{f"ENSG{i}": i + 2 for i in range(350)}}  # 352 tokens
    check_dictionary(tokens, 352)
    # Fewer tokens than the model: every id fits, yet the dictionary is another model's.
    with pytest.raises(ValueError, match="has 352 tokens but the model embeds 400 \\(ids 0 to 399\\)"):
        check_dictionary(tokens, 400)
    with pytest.raises(ValueError, match="has 352 tokens but the model embeds 300"):
        check_dictionary(tokens, 300)
    shifted = {t: i + 1 for t, i in tokens.items()}
    with pytest.raises(ValueError, match="ids run from 1 to 352, outside the model's 0 to 351"):
        check_dictionary(shifted, 352)
    clash = dict(tokens, ENSG0=5)
    with pytest.raises(ValueError, match="same id to several tokens: 'ENSG0', 'ENSG3'"):
        check_dictionary(clash, 352)


@pytest.mark.parametrize("bad", [0.0, -1.0, np.nan, np.inf])
def test_check_medians_refuses_unusable_medians(bad):
    check_medians({"ENSG1": 1.0, "ENSG2": np.float32(0.5)})
    with pytest.raises(ValueError, match="zero, negative or not finite \\(e.g. 'ENSG2'"):
        check_medians({"ENSG1": 1.0, "ENSG2": bad})


# -- scGPT loader edges ----------------------------------------------------------------------------------


@pytest.fixture
def scgpt_dir(tmp_path):
    return write_scgpt(tmp_path / "scgpt", [f"G{i}" for i in range(20)])


def test_empty_or_truncated_weights_are_named(scgpt_dir):
    weights = scgpt_dir / "best_model.pt"
    good = weights.read_bytes()
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match="best_model.pt is empty \\(0 bytes\\)"):
        ScGPTEncoder(scgpt_dir)
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="best_model.pt could not be read as a PyTorch state dict"):
        ScGPTEncoder(scgpt_dir)


def test_args_json_n_bins_other_than_upstream_warns(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ScGPTEncoder(write_scgpt(tmp_path / "a", ["G1", "G2"])).n_bins == 51
    with pytest.warns(UserWarning, match="n_bins=31.*always bins into 51"):
        assert ScGPTEncoder(write_scgpt(tmp_path / "b", ["G1", "G2"], n_bins=31)).n_bins == 31


def _edit_args(folder, **changes):
    import json

    args = json.loads((folder / "args.json").read_text())
    args.update(changes)
    (folder / "args.json").write_text(json.dumps(args))


@pytest.mark.parametrize(
    ("style", "match"),
    [
        (
            "category",
            "input_emb_style='category' but the value encoder in best_model.pt is 'continuous'-style",
        ),
        ("scaling", "input_emb_style='scaling' but the value encoder in best_model.pt is 'continuous'-style"),
        ("binned", "args.json has input_emb_style='binned'"),
    ],
)
def test_input_emb_style_checked_against_weights(scgpt_dir, style, match):
    _edit_args(scgpt_dir, input_emb_style=style)
    with pytest.raises(ValueError, match=match):
        ScGPTEncoder(scgpt_dir)


def test_category_style_checkpoint_loads_and_checks_pad_value(tmp_path):
    folder = write_scgpt(tmp_path / "cat", ["G1", "G2"])
    state = torch.load(folder / "best_model.pt", weights_only=True)
    for key in [k for k in state if k.startswith("value_encoder.")]:
        del state[key]
    dim = state["encoder.embedding.weight"].shape[1]
    state["value_encoder.embedding.weight"] = torch.randn(53, dim)
    state["value_encoder.enc_norm.weight"] = torch.ones(dim)
    state["value_encoder.enc_norm.bias"] = torch.zeros(dim)
    torch.save(state, folder / "best_model.pt")
    _edit_args(folder, input_emb_style="category")  # released args keep pad_value=-2
    with pytest.raises(ValueError, match="pad_value is -2 \\(upstream uses pad_value = n_bins"):
        ScGPTEncoder(folder)
    _edit_args(folder, pad_value=51)
    assert ScGPTEncoder(folder).model.input_emb_style == "category"


def test_args_and_weights_size_mismatch_named(scgpt_dir, tmp_path):
    _edit_args(scgpt_dir, embsize=16, d_hid=48)
    with pytest.raises(
        ValueError, match="does not match args.json \\(embsize=16.*encoder.embedding.weight"
    ) as info:
        ScGPTEncoder(scgpt_dir)
    assert "size mismatch" not in str(info.value)


# -- the cluster extra -----------------------------------------------------------------------------------


def test_leiden_clusters_the_text_embedding(pbmc, text_encoder):
    """The docs suggest sc.tl.leiden on X_text: the `cluster` extra must make that work."""
    pytest.importorskip("leidenalg")
    import scanpy as sc

    adata = pbmc[:200].copy()
    scl.pp.cell_sentences(adata)
    scl.tl.embed_text(adata, text_encoder, precision="fp32")
    sc.pp.neighbors(adata, use_rep="X_text", random_state=0)
    sc.tl.leiden(adata, flavor="igraph", n_iterations=2, random_state=0)
    n_clusters = adata.obs["leiden"].nunique()
    assert 2 <= n_clusters < 50
    from sklearn.metrics import adjusted_rand_score

    # Clusters of the text embedding follow the cell types far better than chance (ARI 0).
    assert adjusted_rand_score(adata.obs["cell_type"], adata.obs["leiden"]) > 0.1
