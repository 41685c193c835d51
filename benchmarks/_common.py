"""Helpers shared by the benchmark scripts (not part of the package)."""

from __future__ import annotations

import time

import numpy as np


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

