import numpy as np
import pytest

import sc_llm as scl
from sc_llm.models import TextEncoder, load_text_encoder
from sc_llm.models._runtime import cpu_has_bf16

PREFIX = "A cell with genes ranked by expression: "


def cosine(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def test_pbmc_embedding_shape_norm_and_record(pbmc_embedded):
    emb = pbmc_embedded.obsm["X_text"]
    assert emb.shape == (700, 384)
    assert emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    info = pbmc_embedded.uns["X_text"]
    assert info["dim"] == 384 and info["max_tokens"] == 256
    assert info["params"]["model"]["name"].startswith("sentence-transformers/all-MiniLM-L6-v2")
    assert len(info["params"]["model"]["weights_sha256"]) == 16
    genes = info["genes_in_context"]
    assert 50 < genes["min"] <= genes["mean"] <= genes["max"] < 256
    assert genes["max"] < min(len(s.split()) for s in pbmc_embedded.obs["cell_sentence"])


@pytest.mark.parametrize("prefix", [None, PREFIX])
def test_fit_counts_tokens_exactly(text_encoder, pbmc_embedded, prefix):
    sentences = list(pbmc_embedded.obs["cell_sentence"][:120])
    ids, n_fit = text_encoder.fit(sentences, prefix)
    tok = text_encoder.tokenizer
    for s, row, k in zip(sentences, ids, n_fit, strict=True):
        words = s.split()
        assert row == tok((prefix or "") + " ".join(words[:k]))["input_ids"]
        assert len(row) <= 256
        assert (
            len(tok((prefix or "") + " ".join(words[: k + 1]))["input_ids"]) > 256
        )  # one more gene would not fit


def test_short_sentences_are_kept_whole(text_encoder):
    ids, n_fit = text_encoder.fit(["CD3E LYZ", "", "MS4A1"])
    assert list(n_fit) == [2, 0, 1]
    assert ids[1] == text_encoder.tokenizer("")["input_ids"]


def test_fp32_matches_sentence_transformers_reference(text_encoder, pbmc_embedded):
    sub = pbmc_embedded[:12].copy()
    scl.tl.embed_text(sub, text_encoder, precision="fp32", key_added="X_fp32")
    _, n_fit = text_encoder.fit(list(sub.obs["cell_sentence"]))
    truncated = [" ".join(s.split()[:k]) for s, k in zip(sub.obs["cell_sentence"], n_fit, strict=True)]
    ref = text_encoder.model.encode(truncated, normalize_embeddings=True, convert_to_numpy=True)
    assert cosine(sub.obsm["X_fp32"], ref).min() > 0.99999
    if cpu_has_bf16():
        assert sub.uns["X_fp32"]["params"]["precision"] == "fp32"
        assert cosine(sub.obsm["X_fp32"], pbmc_embedded.obsm["X_text"][:12]).min() > 0.999


def test_on_the_fly_equals_stored_sentences_and_stores_on_request(text_encoder, pbmc):
    sub = pbmc[:10].copy()
    scl.tl.embed_text(sub, text_encoder, precision="fp32", key_added="X_fly")
    assert "cell_sentence" not in sub.obs
    assert sub.uns["X_fly"]["params"]["sentences"] == "built from the matrix (not stored)"
    scl.tl.embed_text(sub, text_encoder, precision="fp32", store_sentences=True, key_added="X_obs")
    assert sub.obs["cell_sentence"].str.len().min() > 0
    np.testing.assert_allclose(sub.obsm["X_fly"], sub.obsm["X_obs"], atol=1e-6)
    assert sub.uns["X_fly"]["genes_in_context"] == sub.uns["X_obs"]["genes_in_context"]


def test_prefix_costs_context_and_is_recorded(text_encoder, pbmc_embedded):
    sub = pbmc_embedded[:6].copy()
    scl.tl.embed_text(sub, text_encoder, prefix=PREFIX, key_added="X_prefixed", batch_size=4)
    info = sub.uns["X_prefixed"]
    assert info["params"]["prefix"] == PREFIX
    assert info["genes_in_context"]["mean"] < pbmc_embedded.uns["X_text"]["genes_in_context"]["max"]


def test_batching_and_determinism(text_encoder, pbmc_embedded):
    sub = pbmc_embedded[:9].copy()
    scl.tl.embed_text(sub, text_encoder, precision="fp32", batch_size=2, key_added="a")
    scl.tl.embed_text(sub, text_encoder, precision="fp32", batch_size=9, key_added="b")
    np.testing.assert_allclose(sub.obsm["a"], sub.obsm["b"], atol=2e-6)
    scl.tl.embed_text(sub, text_encoder, precision="fp32", batch_size=2, key_added="c")
    np.testing.assert_array_equal(sub.obsm["a"], sub.obsm["c"])


def test_unnormalized_and_instance_and_copy(text_encoder, pbmc_embedded):
    sub = pbmc_embedded[:3].copy()
    with pytest.warns(UserWarning, match="obsm\\['X_text'\\] already exists"):
        out = scl.tl.embed_text(sub, text_encoder.model, normalize=False, precision="fp32", copy=True)
    assert "X_text" in out.obsm and out is not sub
    # MiniLM's own pipeline ends in a Normalize module, so vectors are unit length either way.
    np.testing.assert_allclose(np.linalg.norm(out.obsm["X_text"], axis=1), 1.0, atol=1e-5)
    assert out.uns["X_text"]["params"]["normalize"] is False


def test_errors(text_encoder, pbmc_embedded):
    sub = pbmc_embedded[:4].copy()
    sub.obs.loc[sub.obs_names[1], "cell_sentence"] = np.nan
    with pytest.raises(ValueError, match=f"missing for 1 cells: '{sub.obs_names[1]}'"):
        scl.tl.embed_text(sub, text_encoder)
    with pytest.raises(ValueError, match="prefix alone uses"):
        text_encoder.fit(["CD3E"], prefix="word " * 300)
    with pytest.raises(ValueError, match="precision must be one of"):
        scl.tl.embed_text(pbmc_embedded[:2].copy(), text_encoder, precision="int8")
    with pytest.raises(ValueError, match="fp16 is not supported on CPU"):
        scl.tl.embed_text(pbmc_embedded[:2].copy(), text_encoder, precision="fp16", device="cpu")


def test_loader_caches_and_accepts_encoders(text_encoder):
    assert load_text_encoder() is text_encoder
    assert load_text_encoder(text_encoder) is text_encoder
    assert isinstance(text_encoder, TextEncoder)


def test_local_path_loads_the_same_model(text_encoder, pbmc_embedded):
    from sc_llm.models import default_model_path

    by_path = load_text_encoder(str(default_model_path()))
    assert by_path is not text_encoder
    assert by_path.identity()["weights_sha256"] == text_encoder.identity()["weights_sha256"]
    assert by_path.identity()["name"] == str(default_model_path())
    sentences = list(pbmc_embedded.obs["cell_sentence"][:3])
    np.testing.assert_allclose(
        by_path.encode(sentences, precision="fp32"),
        text_encoder.encode(sentences, precision="fp32"),
        atol=1e-6,
    )


# -- genes tokenized once: embed_text through tokenizers of other families, and the fallback -------
def _sentence_transformer(tokenizer, folder):
    """A 1-layer random BERT behind ``tokenizer``, loaded as a SentenceTransformer from disk."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Pooling, Transformer
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return SentenceTransformer(modules=[Transformer(str(folder), max_seq_length=48), Pooling(16, "mean")])


@pytest.mark.parametrize("family", ["byte_level_bpe", "unigram", "bpe_across_spaces"])
def test_other_tokenizer_families_equal_tokenizing_each_fitted_sentence(pbmc, tmp_path, caplog, family):
    import _tokenizers

    genes = list(pbmc.var_names)
    model = _sentence_transformer(getattr(_tokenizers, family)(genes[::2]), tmp_path / family)
    enc = TextEncoder(model)
    sub = pbmc[:24].copy()
    with caplog.at_level("INFO", logger="sc_llm"):
        scl.tl.embed_text(sub, enc, precision="fp32", prefix=PREFIX, batch_size=5)
    assert ("tokenizing whole sentences instead" in caplog.text) == (family == "bpe_across_spaces")
    scl.pp.cell_sentences(sub)
    ids, n_fit = enc.fit(list(sub.obs["cell_sentence"]), PREFIX)
    if (
        family != "bpe_across_spaces"
    ):  # across spaces even fit's offset cut is approximate: the fallback is fit
        for s, row, k in zip(sub.obs["cell_sentence"], ids, n_fit, strict=True):
            assert row == enc.tokenizer(PREFIX + " ".join(s.split()[:k]))["input_ids"]
    np.testing.assert_allclose(sub.obsm["X_text"], enc.encode_ids(ids, precision="fp32"), atol=1e-6)
    assert sub.uns["X_text"]["genes_in_context"]["mean"] == pytest.approx(n_fit.mean())


@pytest.mark.parametrize("bad", ["CD3E\tLYZ", "CD3E\nLYZ"])
def test_sentences_with_tabs_or_newlines_are_refused(text_encoder, pbmc_embedded, bad):
    sub = pbmc_embedded[:3].copy()
    sub.obs["cell_sentence"] = sub.obs["cell_sentence"].astype(str)
    sub.obs.loc[sub.obs_names[1], "cell_sentence"] = bad
    with pytest.raises(ValueError, match="tabs or line breaks.*sentence 1"):
        scl.tl.embed_text(sub, text_encoder)


def test_model_objects_are_identified_by_their_weights(text_encoder):
    import copy

    import torch

    other = copy.deepcopy(text_encoder.model)
    a = TextEncoder(text_encoder.model).identity()["weights_sha256"]
    assert a == TextEncoder(text_encoder.model).identity()["weights_sha256"]
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    assert TextEncoder(other).identity()["weights_sha256"] != a


def test_reduced_copy_is_made_once_and_remade_after_an_in_place_edit(text_encoder):
    import copy

    import torch

    model = copy.deepcopy(text_encoder.model)
    enc = TextEncoder(model)
    first = enc.model_in("bf16")
    assert TextEncoder(model).model_in("bf16") is first  # another wrapper of the same model reuses it
    assert next(first.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        next(model.parameters()).mul_(2)
    assert enc.model_in("bf16") is not first
