"""Helpers shared by the benchmark scripts (not part of the package)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import anndata as ad
import numpy as np

import sc_llm as scl


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two equally shaped matrices."""
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


class ForwardTimer:
    """Adds up the time spent inside ``module.forward`` (to split model time from overhead)."""

    def __init__(self, module):
        self.module, self.inner, self.seconds = module, module.forward, 0.0

    def __enter__(self):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = self.inner(*args, **kwargs)
            self.seconds += time.perf_counter() - t0
            return out

        self.module.forward = timed
        return self

    def __exit__(self, *exc):
        self.module.forward = self.inner


def pbmc_embedded(precision: str = "auto") -> ad.AnnData:
    """pbmc68k with sentences, the tests' 80/20 split and the MiniLM embedding (read from
    ``SC_LLM_TEST_CACHE`` when the tests left it there)."""
    cache = os.environ.get("SC_LLM_TEST_CACHE")
    path = Path(cache) / "pbmc68k_text.h5ad" if cache else None
    if path is not None and path.exists():
        return ad.read_h5ad(path)
    adata = scl.datasets.pbmc68k()
    scl.pp.cell_sentences(adata)
    scl.pp.train_test_split(adata, "cell_type", test_size=0.2, random_state=0)
    scl.tl.embed_text(adata, precision=precision)
    return adata

