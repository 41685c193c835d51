"""Shared fixtures: the real pbmc68k data and the real packaged MiniLM encoder.

The text embedding of all 700 cells is computed once per session. Developers can set
``SC_LLM_TEST_CACHE=/some/dir`` to keep it between runs; CI leaves it unset and recomputes.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import sc_llm as scl
from sc_llm.testing import pbmc68k_embedded

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def text_encoder():
    from sc_llm.models import load_text_encoder

    return load_text_encoder()


@pytest.fixture(scope="session")
def _pbmc_embedded_session(text_encoder):
    # bf16 where the CPU has native support (falls back to fp32 elsewhere): same embedding up to cos > 0.9999.
    return pbmc68k_embedded(text_encoder, precision="bf16")


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
