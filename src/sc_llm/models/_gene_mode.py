"""GenePT-w gene mode as an encoder: each gene's text embedded once, a cell is the weighted mean.

The "model" of this encoder is the gene embedding matrix; a cell's tokens are its genes (ids) and
their weights (values), so stores, schedulers and batching come from the same runner as every other
encoder.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import sparse

from sc_llm._store import names_digest
from sc_llm.pp._cell_sentences import check_values, rank_csr_rows

from ._encoder import Tokens, array_digest
from ._runtime import require_torch

WEIGHTINGS = ("expression", "rank")


class GeneModeEncoder:
    """Cells as weighted means of gene embeddings (``genes``: genes × dim, L2-normalized rows)."""

    pad_id = 0
    pad_value = 0.0

    def __init__(self, genes: np.ndarray, text_identity: dict[str, Any], device):
        torch = require_torch()
        self.device = device
        self.genes = torch.from_numpy(np.ascontiguousarray(genes, dtype=np.float32)).to(device)
        self.dim = int(genes.shape[1])
        self.max_tokens = int(genes.shape[0])
        self._identity = {**text_identity, "mode": "gene", "gene_embedding": array_digest(genes)}

    def identity(self) -> dict[str, Any]:
        return dict(self._identity)

    def model_in(self, precision: str):
        # A weighted mean is one small matmul: always in fp32.
        return self.genes

    def forward(self, model, ids, mask, values, *, normalize: bool = True):
        """Weighted means of gene embeddings for a padded batch, as one sparse × dense product.

        Gathering ``model[ids]`` would hold cells × genes × dim numbers at once.
        """
        torch = require_torch()
        keep = mask.bool()
        rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)[keep]
        weights = torch.sparse_coo_tensor(
            torch.stack((rows, ids[keep])), values[keep], (ids.shape[0], model.shape[0])
        )
        summed = torch.sparse.mm(weights, model)
        total = (values * mask).sum(1, keepdim=True)
        mean = torch.where(total > 0, summed / total.clamp_min(torch.finfo(total.dtype).tiny), torch.zeros_like(summed))
        return torch.nn.functional.normalize(mean, dim=-1) if normalize else mean


class GeneModeTokenizer:
    """Cells → (gene ids, weights) on the host: expression values, or ``1 / (rank + 1)``."""

    def __init__(self, gene_names: np.ndarray, weighting: str, n_genes: int | None):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}.")
        if n_genes is not None and n_genes < 1:
            raise ValueError(f"n_genes must be positive, got {n_genes}.")
        self.gene_names, self.weighting, self.n_genes = gene_names, weighting, n_genes
        self.max_tokens = len(gene_names) if n_genes is None else min(n_genes, len(gene_names))

    def describe(self) -> dict[str, Any]:
        return {"genes": names_digest(self.gene_names), "weighting": self.weighting, "n_genes": self.n_genes}

    def tokenize(self, chunk) -> Tokens:
        check_values(chunk.rows, chunk.obs_names)
        weights = cell_weights(chunk.rows, self.weighting, self.n_genes)
        return Tokens(
            weights.indices.astype(np.int64), weights.indptr.astype(np.int64), weights.data.astype(np.float32)
        )


def cell_weights(block: sparse.csr_matrix, weighting: str, n_genes: int | None) -> sparse.csr_matrix:
    """Per-cell gene weights as CSR (same shape as ``block``)."""
    if weighting == "expression" and n_genes is None:
        block = block.copy()
        block.eliminate_zeros()
        return block.astype(np.float32)
    cols, indptr = rank_csr_rows(block, n_genes)
    if weighting == "rank":
        rank = np.arange(cols.size) - np.repeat(indptr[:-1], np.diff(indptr))
        data = (1.0 / (rank + 1)).astype(np.float32)
    else:
        rows = np.repeat(np.arange(block.shape[0]), np.diff(indptr))
        data = np.asarray(block[rows, cols]).ravel().astype(np.float32)
    return sparse.csr_matrix((data, cols, indptr), shape=block.shape)
