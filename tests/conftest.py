"""Shared fixtures: the real pbmc68k data and the real packaged MiniLM encoder.

The text embedding of all 700 cells is computed once per session. Developers can set
``SC_LLM_TEST_CACHE=/some/dir`` to keep it between runs; CI leaves it unset and recomputes.
"""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

import sc_llm as scl

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def text_encoder():
    from sc_llm.models import load_text_encoder

    return load_text_encoder()


@pytest.fixture(scope="session")
def _pbmc_embedded_session(text_encoder):
    cache = os.environ.get("SC_LLM_TEST_CACHE")
    path = Path(cache) / "pbmc68k_text.h5ad" if cache else None
    if path is not None and path.exists():
        return ad.read_h5ad(path)
    adata = scl.datasets.pbmc68k()
    scl.pp.cell_sentences(adata)
    scl.pp.train_test_split(adata, "cell_type", test_size=0.2, random_state=0)
    # bf16 where the CPU has native support (falls back to fp32 elsewhere): same embedding up to cos > 0.9999.
    scl.tl.embed_text(adata, text_encoder, precision="bf16")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        adata.write_h5ad(path)
    return adata


@pytest.fixture
def pbmc_embedded(_pbmc_embedded_session):
    """pbmc68k with ``obs['cell_sentence']``, ``obs['split']`` and ``obsm['X_text']`` (a fresh copy per test)."""
    return _pbmc_embedded_session.copy()


@pytest.fixture
def pbmc():
    """pbmc68k as :func:`sc_llm.datasets.pbmc68k` returns it (counts in X, labels in obs['cell_type'])."""
    return scl.datasets.pbmc68k()


@pytest.fixture
def rng():
    return np.random.default_rng(0)
