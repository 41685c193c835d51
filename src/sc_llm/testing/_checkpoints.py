"""Tiny random checkpoints written in exactly the upstream on-disk formats.

scGPT: a folder with ``args.json`` (released key names), ``vocab.json`` (token → id) and
``best_model.pt`` (a state dict with flash-attention ``self_attn.Wqkv.*`` names and the training
heads a released model carries). Geneformer: ``BertForMaskedLM(...).save_pretrained(dir)`` plus
pickled ``token_dictionary`` and ``gene_median_dictionary``. Weights are drawn with plain torch
calls, never with sc_llm's model classes, so tests can compare against independent references.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import torch


def scgpt_args(dim: int = 32, n_heads: int = 4, d_hid: int = 48, n_layers: int = 2, n_bins: int = 51) -> dict:
    """``args.json`` content in the released layout (values of scGPT_human, sizes shrunk).

    Returns
    -------
    args : dict
        The content of ``args.json``.
    """
    return {
        "data_source": "/scratch/cellxgene/human",
        "save_dir": "./save/scGPT_human",
        "load_model": None,
        "n_hvg": None,
        "valid_size_or_ratio": 0.003,
        "grad_accu_steps": 1,
        "pad_token": "<pad>",
        "input_style": "binned",
        "input_emb_style": "continuous",
        "n_bins": n_bins,
        "max_seq_len": 1200,
        "training_tasks": "both",
        "mask_ratio": [0.25, 0.5, 0.75],
        "trunc_by_sample": True,
        "batch_size": 32,
        "epochs": 6,
        "lr": 0.0001,
        "no_cls": False,
        "no_cce": True,
        "fp16": True,
        "fast_transformer": True,
        "nlayers": n_layers,
        "nheads": n_heads,
        "embsize": dim,
        "d_hid": d_hid,
        "dropout": 0.2,
        "n_layers_cls": 3,
        "mask_value": -1,
        "pad_value": -2,
        "USE_CLS": True,
        "USE_MVC": True,
    }


def scgpt_state_dict(n_tokens: int, args: dict, seed: int = 0, flash: bool = True) -> dict[str, torch.Tensor]:
    """Random weights with the key names and shapes of a released scGPT ``best_model.pt``.

    Returns
    -------
    state_dict : dict
        Parameter name to :class:`torch.Tensor`, as ``torch.load`` gives it.
    """
    g = torch.Generator().manual_seed(seed)
    d, h = args["embsize"], args["d_hid"]

    def w(*shape, scale=None):
        return torch.randn(*shape, generator=g) * (scale if scale is not None else shape[-1] ** -0.5)

    def norm(prefix):
        return {
            f"{prefix}.weight": 1 + 0.1 * torch.randn(d, generator=g),
            f"{prefix}.bias": 0.1 * torch.randn(d, generator=g),
        }

    sd = {"encoder.embedding.weight": w(n_tokens, d, scale=1.0)}
    sd.update(norm("encoder.enc_norm"))
    sd.update({
        "value_encoder.linear1.weight": w(d, 1, scale=0.3), "value_encoder.linear1.bias": w(d, scale=0.1),
        "value_encoder.linear2.weight": w(d, d), "value_encoder.linear2.bias": w(d, scale=0.1),
    })  # fmt: skip
    sd.update(norm("value_encoder.norm"))
    qkv = "self_attn.Wqkv" if flash else "self_attn.in_proj"
    sep = "." if flash else "_"
    for i in range(args["nlayers"]):
        p = f"transformer_encoder.layers.{i}"
        sd[f"{p}.{qkv}{sep}weight"] = w(3 * d, d)
        sd[f"{p}.{qkv}{sep}bias"] = w(3 * d, scale=0.1)
        sd[f"{p}.self_attn.out_proj.weight"] = w(d, d)
        sd[f"{p}.self_attn.out_proj.bias"] = w(d, scale=0.1)
        sd[f"{p}.linear1.weight"] = w(h, d)
        sd[f"{p}.linear1.bias"] = w(h, scale=0.1)
        sd[f"{p}.linear2.weight"] = w(d, h)
        sd[f"{p}.linear2.bias"] = w(d, scale=0.1)
        sd.update(norm(f"{p}.norm1"))
        sd.update(norm(f"{p}.norm2"))
    # Training heads present in released checkpoints; cell embedding never uses them.
    sd.update({
        "decoder.fc.0.weight": w(d, d), "decoder.fc.0.bias": w(d), "decoder.fc.2.weight": w(d, d),
        "decoder.fc.2.bias": w(d), "decoder.fc.4.weight": w(1, d), "decoder.fc.4.bias": w(1),
        "cls_decoder._decoder.0.weight": w(d, d), "cls_decoder._decoder.0.bias": w(d),
        "cls_decoder.out_layer.weight": w(1, d), "cls_decoder.out_layer.bias": w(1),
        "mvc_decoder.gene2query.weight": w(d, d), "mvc_decoder.gene2query.bias": w(d),
        "mvc_decoder.W.weight": w(d, d),
    })  # fmt: skip
    return sd


def write_scgpt(
    path: Path,
    genes: list[str],
    *,
    dim: int = 32,
    n_heads: int = 4,
    d_hid: int = 48,
    n_layers: int = 2,
    n_bins: int = 51,
    seed: int = 0,
    flash: bool = True,
    with_eoc: bool = True,
) -> Path:
    """Write an scGPT folder whose vocabulary is ``genes`` (shuffled ids) plus special tokens.

    ``with_eoc=False`` leaves ``<eoc>`` out of ``vocab.json`` (upstream appends it at load time;
    the checkpoint still embeds it as the last row).

    Returns
    -------
    model_dir : pathlib.Path
        The scGPT folder (``path``).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tokens = ["<pad>", "<cls>", "<eoc>", *genes] if with_eoc else ["<pad>", "<cls>", *genes]
    ids = rng.permutation(len(tokens))
    vocab = {t: int(i) for t, i in zip(tokens, ids, strict=True)}
    args = scgpt_args(dim, n_heads, d_hid, n_layers, n_bins)
    (path / "args.json").write_text(json.dumps(args, indent=2))
    (path / "vocab.json").write_text(json.dumps(vocab))
    n_tokens = len(tokens) + (0 if with_eoc else 1)
    torch.save(scgpt_state_dict(n_tokens, args, seed, flash), path / "best_model.pt")
    return path


def ensembl_ids(n: int, offset: int = 0) -> list[str]:
    """Made-up but well-formed Ensembl gene IDs.

    Returns
    -------
    ids : list of str
        ``n`` IDs ``ENSG…``, numbered from ``offset``.
    """
    return [f"ENSG{offset + i + 100000:011d}" for i in range(n)]


def write_geneformer(
    path: Path,
    genes: list[str],
    *,
    v2: bool = False,
    input_size: int = 64,
    dim: int = 32,
    n_layers: int = 3,
    n_heads: int = 4,
    seed: int = 0,
    safetensors: bool = True,
) -> tuple[Path, Path, Path]:
    """Write a Geneformer-style model folder and its two dictionaries; returns the three paths.

    ``genes`` are Ensembl IDs; ids follow Geneformer's layout (``<pad>`` 0, ``<mask>`` 1, then
    ``<cls>``/``<eos>`` for V2, then genes). Medians are random positive floats.

    Returns
    -------
    model_dir : pathlib.Path
        The model folder.
    token_dictionary : pathlib.Path
        The gene → token id pickle.
    gene_median_dictionary : pathlib.Path
        The gene → median expression pickle.
    """
    from transformers import BertConfig, BertForMaskedLM

    path = Path(path)
    model_dir = path / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "<mask>", "<cls>", "<eos>"] if v2 else ["<pad>", "<mask>"]
    genes = list(dict.fromkeys(genes))
    token_dictionary = {t: i for i, t in enumerate([*specials, *genes])}
    rng = np.random.default_rng(seed)
    medians = {g: float(m) for g, m in zip(genes, rng.uniform(0.5, 5.0, len(genes)), strict=True)}
    config = BertConfig(
        vocab_size=len(token_dictionary),
        hidden_size=dim,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        intermediate_size=2 * dim,
        max_position_embeddings=input_size,
        hidden_act="relu",
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    BertForMaskedLM(config).save_pretrained(model_dir)
    if not safetensors:
        # Geneformer V1 ships pytorch_model.bin; recent transformers only write safetensors, so convert.
        from safetensors.torch import load_file

        weights = model_dir / "model.safetensors"
        torch.save(load_file(weights), model_dir / "pytorch_model.bin")
        weights.unlink()
    tok_path, med_path = path / "token_dictionary.pkl", path / "gene_median_dictionary.pkl"
    with open(tok_path, "wb") as f:
        pickle.dump(token_dictionary, f)
    with open(med_path, "wb") as f:
        pickle.dump(medians, f)
    return model_dir, tok_path, med_path
