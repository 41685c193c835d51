"""Preprocessing: cell sentences and data splits."""

from ._cell_sentences import cell_sentences
from ._spatial import spatial_sentences
from ._split import train_test_split

__all__ = ["cell_sentences", "train_test_split"]
__all__ += ["spatial_sentences"]
from ._gene_ids import map_gene_ids  # noqa: E402

__all__ += ["map_gene_ids"]
