"""Geneformer inference from a model folder plus its token and gene-median dictionaries.

Geneformer is a BERT encoder over rank-value-encoded cells: each cell's counts are normalized
by its total, scaled to 10,000 and divided by each gene's median over the pretraining corpus;
genes are then sorted by that value (highest first) and truncated to the model's input size.
V1 models (2048 positions) use the genes alone; V2 models (4096 positions) add ``<cls>`` first
and ``<eos>`` last. The folder is a transformers ``BertForMaskedLM`` checkpoint (``config.json``
with ``model.safetensors`` or ``pytorch_model.bin``); only its ``BertModel`` part is loaded.
"""

from __future__ import annotations

import contextlib
import functools
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse

from sc_llm._store import names_digest
from sc_llm._utils import check_counts, format_examples, logger
from sc_llm.pp._cell_sentences import rank_csr_rows

from ._encoder import Tokens, reduced_copy
from ._runtime import file_digest, require_torch, resolve_device

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _numpy_scalar():
    try:  # numpy >= 2
        from numpy._core.multiarray import scalar
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar
    return scalar


#: The only globals a Geneformer dictionary pickle may name: plain containers and numbers, and
#: what pickle needs to rebuild numpy scalars (numpy 1.x and 2.x spell the module differently;
#: ``_codecs.encode`` turns the scalar's bytes back from text in protocol 0–2 pickles).
_PICKLE_GLOBALS = {
    ("builtins", "dict"): lambda: dict,
    ("builtins", "int"): lambda: int,
    ("builtins", "float"): lambda: float,
    ("builtins", "str"): lambda: str,
    ("collections", "OrderedDict"): lambda: __import__("collections").OrderedDict,
    ("numpy", "dtype"): lambda: np.dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("_codecs", "encode"): lambda: __import__("codecs").encode,
}

PICKLE_POLICY = (
    "Geneformer dictionaries are read with a restricted unpickler: only dict, str, int, float and numpy "
    "scalars can be rebuilt; a pickle naming any other callable (os.system, eval, a class) is refused "
    "before anything in it runs."
)


class UnsafePickleError(pickle.UnpicklingError):
    """A dictionary pickle names a global outside the allowed set (see ``PICKLE_POLICY``)."""


class _DictionaryUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        factory = _PICKLE_GLOBALS.get((module, name))
        if factory is None:
            raise UnsafePickleError(
                f"{self.source} asks to load {module}.{name}, which a Geneformer dictionary never needs; "
                "refusing to unpickle it (it could run code). Only dict, str, int, float and numpy scalars "
                "are allowed. Pass the dictionary as a Python dict if you built it yourself."
            )
        return factory()


def read_dictionary(value: str | Path | Mapping, what: str) -> dict:
    """A Geneformer dictionary given as a mapping or a pickle path (as shipped with Geneformer).

    Pickles are read with a restricted unpickler ({policy}). Keys must be strings and values
    numbers (Python or numpy), as in Geneformer's token and gene-median dictionaries.
    """
    if isinstance(value, Mapping):
        obj = value
    else:
        path = Path(value)
        if not path.exists():
            raise FileNotFoundError(f"{what} file {path} does not exist.")
        if path.stat().st_size == 0:
            raise ValueError(f"{what} file {path} is empty (0 bytes); the download or copy did not finish.")
        with open(path, "rb") as f:
            try:
                obj = _DictionaryUnpickler(f, f"{what} file {path}").load()
            except UnsafePickleError:
                raise
            except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
                raise ValueError(
                    f"{what} file {path} is not a readable pickle ({type(e).__name__}: {e})."
                ) from e
        if not isinstance(obj, Mapping):
            raise TypeError(f"{what} file {path} holds a {type(obj).__name__}, expected a dict.")
    _check_entries(obj, what)
    return dict(obj)


read_dictionary.__doc__ = read_dictionary.__doc__.replace("{policy}", PICKLE_POLICY.split(": ", 1)[1])


def _check_entries(obj: Mapping, what: str) -> None:
    bad_keys = [k for k in obj if not isinstance(k, str)]
    if bad_keys:
        raise TypeError(
            f"{what} keys must be strings (gene IDs or special tokens), got {format_examples(bad_keys)}."
        )
    bad = [
        k
        for k, v in obj.items()
        if isinstance(v, bool) or not isinstance(v, int | float | np.integer | np.floating)
    ]
    if bad:
        raise TypeError(
            f"{what} values must be numbers, got e.g. {type(obj[bad[0]]).__name__} for {format_examples(bad)}."
        )


def check_dictionary(tokens_of: Mapping[str, int], vocab_size: int) -> None:
    """Check that a token dictionary belongs to a model that embeds ``vocab_size`` tokens.

    Geneformer's token dictionary lists every row of the model's embedding table exactly once, so
    the dictionary must have ``vocab_size`` entries with distinct integer ids ``0 … vocab_size - 1``.
    Ids that merely fit are not enough: a smaller dictionary of another version would run and
    give wrong embeddings, since V1 and V2 models number their genes differently.
    """
    ids = np.fromiter(tokens_of.values(), dtype=np.float64, count=len(tokens_of))
    n = len(tokens_of)
    hint = (
        "the dictionary belongs to another model (Geneformer V1 and V2 dictionaries differ); "
        "use the one shipped with this model."
    )
    if n and (ids != np.round(ids)).any():
        raise ValueError(f"token_dictionary ids must be integers; got e.g. {ids[ids != np.round(ids)][0]}.")
    if n != vocab_size:
        raise ValueError(
            f"token_dictionary has {n} tokens but the model embeds {vocab_size} (ids 0 to {vocab_size - 1}): {hint}"
        )
    if n and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(
            f"token_dictionary ids run from {int(ids.min())} to {int(ids.max())}, outside the model's "
            f"0 to {vocab_size - 1}: {hint}"
        )
    uniq, counts = np.unique(ids.astype(np.int64), return_counts=True)
    if (counts > 1).any():
        shared = set(uniq[counts > 1].tolist())
        tokens = [t for t, i in tokens_of.items() if int(i) in shared]
        raise ValueError(f"token_dictionary gives the same id to several tokens: {format_examples(tokens)}.")


def check_medians(medians: Mapping[str, float]) -> None:
    """Raise for gene medians that cannot divide expression: zero, negative, NaN or infinite.

    Rank value encoding divides each gene's normalized count by its median, so such a median
    would give infinite, negative or NaN ranks (upstream divides without checking).
    """
    values = np.fromiter((float(v) for v in medians.values()), dtype=np.float64, count=len(medians))
    bad = ~np.isfinite(values) | (values <= 0)
    if bad.any():
        genes = [g for g, b in zip(medians, bad, strict=True) if b]
        raise ValueError(
            f"gene_median_dictionary has {len(genes)} medians that are zero, negative or not finite "
            f"(e.g. {genes[0]!r}: {values[bad][0]!r}; genes {format_examples(genes)}). Medians must be positive; "
            "use the median dictionary shipped with the model."
        )


class GeneformerEncoder:
    """A loaded Geneformer folder, ready to embed rank-value-encoded cells.

    Use :func:`load_geneformer`. Attributes: ``model`` (transformers ``BertModel``, eval mode),
    ``n_layers``, ``dim``, ``input_size`` (``max_position_embeddings``), ``pad_id``, ``device``.
    """

    def __init__(self, model_dir: str | Path, device: Any = None):
        torch = require_torch()
        from transformers import BertModel

        self.path = Path(model_dir)
        if not (self.path / "config.json").exists():
            raise FileNotFoundError(f"{self.path} is not a Geneformer model folder: no config.json.")
        self.weights = next((self.path / f for f in _WEIGHT_FILES if (self.path / f).exists()), None)
        if self.weights is None:
            raise FileNotFoundError(f"{self.path} has no weights ({' or '.join(_WEIGHT_FILES)}).")
        self.device = resolve_device(device)
        with _quiet_transformers():
            # Masked-LM head keys (cls.predictions.*) are expected extras; missing encoder keys are checked below.
            model, info = BertModel.from_pretrained(
                str(self.path), add_pooling_layer=False, output_loading_info=True
            )
        missing = [k for k in info.get("missing_keys", []) if not k.startswith("pooler.")]
        if missing:
            raise ValueError(
                f"{self.weights} lacks BERT encoder weights: {format_examples(sorted(missing), 8)}. "
                "Expected a Geneformer (BertForMaskedLM or BertModel) checkpoint."
            )
        self.model = model.float().to(self.device).eval()
        cfg = model.config
        self.n_layers = int(cfg.num_hidden_layers)
        self.dim = int(cfg.hidden_size)
        self.input_size = int(cfg.max_position_embeddings)
        self.pad_id = int(cfg.pad_token_id or 0)
        self.vocab_size = int(cfg.vocab_size)
        self._torch = torch

    def identity(self) -> dict[str, Any]:
        """Where the weights came from and what they are, for ``uns``."""
        return {
            "path": str(self.path),
            "weights_sha256": file_digest(str(self.weights)),
            "dim": self.dim,
            "n_layers": self.n_layers,
            "input_size": self.input_size,
        }

    # -- the encoder protocol ------------------------------------------------------------------
    pad_value = 0.0

    @property
    def max_tokens(self) -> int:
        return self.input_size

    def model_in(self, precision: str):
        """The model with weights in ``precision`` (a reduced copy made once per model, device, precision)."""
        return reduced_copy(self.model, precision)

    def hidden_index(self, emb_layer: int) -> int:
        """Index into ``hidden_states`` for Geneformer's ``emb_layer`` (0: last layer, -1: second to last)."""
        if not -self.n_layers <= emb_layer <= 0:
            raise ValueError(
                f"emb_layer must be in [-{self.n_layers}, 0] for this {self.n_layers}-layer model "
                f"(0 = last layer, -1 = second to last, -{self.n_layers} = input embeddings), got {emb_layer}."
            )
        return self.n_layers + emb_layer

    def forward(self, model, ids, mask, values=None, *, emb_layer: int = -1, special_tokens: bool = False,
                emb_mode: str = "mean"):  # fmt: skip
        """Cell embeddings of a padded batch of rank-value-encoded cells (device side).

        ``emb_mode="mean"`` averages the chosen layer over gene tokens (``<cls>``/``<eos>`` and
        padding excluded, as Geneformer's extractor does); ``"cls"`` takes the ``<cls>`` output.
        """
        torch = self._torch
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        hidden = out.hidden_states[self.hidden_index(emb_layer)].float()
        if emb_mode == "cls":
            return hidden[:, 0, :]
        skip = 1 if special_tokens else 0
        lengths = mask.sum(1) - 2 * skip
        pos = torch.arange(hidden.shape[1], device=hidden.device)[None, :]
        genes = ((pos >= skip) & (pos < lengths[:, None] + skip)).to(hidden.dtype)
        return (hidden * genes[..., None]).sum(1) / lengths[:, None].to(hidden.dtype)

    def tokenizer_for(self, ids: np.ndarray, tokens_of: Mapping, medians: Mapping, *, special_tokens: bool,
                      where: str = "var_names", where_counts: str = "adata.X") -> GeneformerTokenizer:  # fmt: skip
        """The host tokenizer for one call over an AnnData with these Ensembl IDs."""
        return GeneformerTokenizer(self, ids, tokens_of, medians, special_tokens=special_tokens, where=where,
                                   where_counts=where_counts)  # fmt: skip


TARGET_SUM = 10_000


class GeneformerTokenizer:
    """Cells → Geneformer rank value encodings on the host, vectorized per chunk.

    A cell's counts of the genes in both dictionaries are divided by its total count (over all
    genes, Geneformer's ``n_counts``), scaled to 10,000 and divided by each gene's median; genes are
    sorted by that value, highest first (ties keep ``var`` order, where upstream's order is
    arbitrary), and cut to the model's input size (``<cls>``/``<eos>`` around them for V2 models).
    IDs are matched without version suffix and case, as upstream upper-cases them; duplicate IDs are
    summed first.
    """

    def __init__(self, encoder: GeneformerEncoder, ids: np.ndarray, tokens_of: Mapping, medians: Mapping, *,
                 special_tokens: bool, where: str, where_counts: str = "adata.X"):  # fmt: skip
        check_dictionary(tokens_of, encoder.vocab_size)
        check_medians(medians)
        self.cols, self.collapse, self.token_ids, self.inv_median, self.genes = match_dictionaries(
            ids, tokens_of, medians, where
        )
        self.matched = np.zeros(len(ids), dtype=bool)
        self.matched[self.cols] = True
        self.wrap = (int(tokens_of["<cls>"]), int(tokens_of["<eos>"])) if special_tokens else None
        self.max_tokens = encoder.input_size
        self.n_keep = encoder.input_size - (2 if special_tokens else 0)
        self.where, self._warned = where_counts, False

    def describe(self) -> dict[str, Any]:
        return {"genes": names_digest(self.genes), "tokens": names_digest(self.token_ids),
                "medians": names_digest(self.inv_median), "wrap": self.wrap}  # fmt: skip

    def tokenize(self, chunk) -> Tokens:
        """Token ids of a chunk, with ``per_cell["n_genes"]`` (expressed matched genes before the cut)."""
        counts = sparse.csr_matrix(chunk.rows)
        if not check_counts(counts, chunk.obs_names, self.where, warn=not self._warned):
            self._warned = True  # warn about non-integer counts once per call
        totals = np.asarray(counts.sum(axis=1)).ravel().astype(np.float64)
        scale = np.divide(TARGET_SUM, totals, out=np.zeros_like(totals), where=totals > 0)
        norm = sparse.csr_matrix(
            sparse.diags(scale) @ (counts[:, self.cols] @ self.collapse) @ sparse.diags(self.inv_median)
        )
        norm.eliminate_zeros()
        from sc_llm.tl._coverage import cell_counts

        per_cell = {"n_genes": np.diff(norm.indptr), **cell_counts(counts, self.matched)}
        n_genes = per_cell["n_genes"]
        order, indptr = rank_csr_rows(norm, self.n_keep)
        genes = self.token_ids[order]
        if self.wrap is None:
            return Tokens(genes, indptr, None, per_cell)
        n_cells = len(indptr) - 1
        ptr = indptr + 2 * np.arange(n_cells + 1)
        ids = np.full(ptr[-1], self.wrap[1], dtype=np.int64)
        ids[ptr[:-1]] = self.wrap[0]
        inner = np.ones(ptr[-1], dtype=bool)
        inner[ptr[:-1]] = False
        inner[ptr[1:] - 1] = False
        ids[inner] = genes
        # A cell without genes gets no tokens at all, so the runner writes NaN for it, as for V1 models.
        empty = n_genes == 0
        if empty.any():
            return _drop_cells(Tokens(ids, ptr, None, per_cell), empty)
        return Tokens(ids, ptr, None, per_cell)


def _drop_cells(tokens: Tokens, empty: np.ndarray) -> Tokens:
    lengths = np.where(empty, 0, tokens.lengths)
    keep = np.repeat(~empty, tokens.lengths)
    ptr = np.zeros_like(tokens.ptr)
    np.cumsum(lengths, out=ptr[1:])
    return Tokens(tokens.ids[keep], ptr, None, tokens.per_cell)


def _normalized_id(g: str) -> str:
    """Ensembl ID without version suffix, upper case (``ensg00000167286.12`` → ``ENSG00000167286``)."""
    if g is None:
        return ""
    g = str(g).strip().upper()
    return g.split(".", 1)[0] if g.startswith("ENS") else g


def match_dictionaries(ids: np.ndarray, tokens_of: Mapping, medians: Mapping, where: str):
    """Matched columns, a column → unique-gene map summing duplicates, token ids, 1/median and the genes."""
    tokens_of = {_normalized_id(k): v for k, v in tokens_of.items() if not str(k).startswith("<")}
    medians = {_normalized_id(k): v for k, v in medians.items()}
    ids = np.array([_normalized_id(g) for g in ids], dtype=object)
    in_tokens = np.fromiter((g in tokens_of for g in ids), dtype=bool, count=len(ids))
    ok = in_tokens & np.fromiter((g in medians for g in ids), dtype=bool, count=len(ids))
    cols = np.flatnonzero(ok)
    if len(cols) == 0:
        raise ValueError(
            f"None of the {len(ids)} genes in {where} are in both Geneformer dictionaries; examples: "
            f"{format_examples(ids)}. Geneformer needs Ensembl gene IDs (e.g. 'ENSG00000167286'): pass "
            "gene_ids= with the column that holds them."
        )
    no_median = int((in_tokens & ~ok).sum())
    if no_median:
        logger.warning(
            "embed_geneformer: %d genes of %s are in the token dictionary but not the median dictionary; "
            "they are left out (e.g. %s).", no_median, where, format_examples(ids[in_tokens & ~ok], 3),
        )  # fmt: skip
    unique, first, inverse = np.unique(ids[cols], return_index=True, return_inverse=True)
    # Keep genes in var order (first occurrence) so equal values rank by var position.
    in_var_order = np.argsort(first)
    rank = np.empty_like(in_var_order)
    rank[in_var_order] = np.arange(len(in_var_order))
    unique, inverse = unique[in_var_order], rank[inverse]
    if len(unique) < len(cols):
        logger.info("embed_geneformer: %d duplicate Ensembl IDs summed.", len(cols) - len(unique))
    collapse = sparse.csr_matrix(
        (np.ones(len(cols)), (np.arange(len(cols)), inverse)), shape=(len(cols), len(unique))
    )
    token_ids = np.array([tokens_of[g] for g in unique], dtype=np.int64)
    inv_median = np.array([1.0 / float(medians[g]) for g in unique])
    if len(unique) / len(ids) < 0.5:
        logger.warning("embed_geneformer: only %d of %d genes are in the dictionaries.", len(unique), len(ids))
    return cols, collapse, token_ids, inv_median, unique.astype(str)


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


@functools.lru_cache(maxsize=2)
def _cached(path: str, mtime_ns: int, device: str | None) -> GeneformerEncoder:
    return GeneformerEncoder(path, device)


def load_geneformer(model_dir: str | Path | GeneformerEncoder, device: Any = None) -> GeneformerEncoder:
    """Load a Geneformer model folder (cached per folder, file time and device).

    Parameters
    ----------
    model_dir
        A transformers BERT folder (``config.json`` + ``model.safetensors`` or
        ``pytorch_model.bin``), e.g. Geneformer's ``gf-12L-95M-i4096/`` or the V1 root folder;
        or an already loaded :class:`GeneformerEncoder` (returned as is).
    device
        Torch device; ``None`` picks CUDA, then MPS, then CPU.

    Returns
    -------
    encoder : sc_llm.models.GeneformerEncoder
        The loaded model, ready for :func:`sc_llm.tl.embed_geneformer`.
    """
    if isinstance(model_dir, GeneformerEncoder):
        return model_dir
    path = Path(model_dir)
    mtimes = [(path / f).stat().st_mtime_ns for f in _WEIGHT_FILES if (path / f).exists()]
    return _cached(str(path.resolve()), max(mtimes, default=0), None if device is None else str(device))
