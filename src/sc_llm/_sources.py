"""Where a chunk of cells comes from: expression rows or sentences, read one chunk at a time.

Shared by :func:`sc_llm.pp.cell_sentences` and every ``embed_*`` function. A chunk's digest is what a
resumable store records, so a store is never resumed over changed data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from anndata import AnnData

from ._utils import as_csr, get_matrix, obs_sentences
from .models._encoder import array_digest


@dataclass
class Chunk:
    """The input of one chunk of cells: expression rows (CSR, all genes) or sentences."""

    start: int
    stop: int
    obs_names: np.ndarray
    rows: Any = None
    sentences: np.ndarray | None = None

    def digest(self) -> str:
        if self.rows is not None:
            rows = self.rows.copy()
            rows.sort_indices()
            return array_digest(rows.data, rows.indices, rows.indptr)
        return array_digest(self.sentences)


class MatrixSource:
    """Expression rows of ``X``, a layer or ``raw``, read one chunk at a time (backed and dask work)."""

    def __init__(self, adata: AnnData, *, layer: str | None = None, use_raw: bool = False):
        self.X, self.var = get_matrix(adata, layer=layer, use_raw=use_raw)
        self.obs_names = np.asarray(adata.obs_names.astype(str))
        self.params = {"layer": layer, "use_raw": use_raw}

    def chunk(self, start: int, stop: int) -> Chunk:
        return Chunk(start, stop, self.obs_names[start:stop], rows=as_csr(self.X[start:stop]))

    def describe(self) -> dict[str, Any]:
        return {"matrix": self.params}


class SentenceSource:
    """Sentences from an ``obs`` column, validated once (missing values are refused, not embedded as "nan")."""

    def __init__(self, adata: AnnData, key: str):
        self.key = key
        self.values = np.asarray(obs_sentences(adata, key), dtype=object)
        self.obs_names = np.asarray(adata.obs_names.astype(str))

    def chunk(self, start: int, stop: int) -> Chunk:
        return Chunk(start, stop, self.obs_names[start:stop], sentences=self.values[start:stop])

    def describe(self) -> dict[str, Any]:
        return {"obs": self.key}
