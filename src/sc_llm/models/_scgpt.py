"""scGPT inference from a released checkpoint folder, without the ``scgpt`` package.

A released folder (e.g. ``scGPT_human/``) holds ``args.json`` (architecture), ``vocab.json``
(gene symbol → token id) and ``best_model.pt`` (a state dict). The model used for cell embeddings
is a standard post-norm transformer encoder over ``gene embedding + value embedding`` tokens;
the ``<cls>`` output is the cell embedding. Modules here carry the upstream attribute names so the
released state dict loads by name, and every key is accounted for: loaded, renamed (flash-attention
``Wqkv`` → PyTorch ``in_proj``), ignored because it belongs to a training head, or reported.
"""

from __future__ import annotations

import functools
import json
import pickle
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse

from sc_llm._store import names_digest
from sc_llm._utils import check_values, format_examples, logger

from ._encoder import Tokens, reduced_copy
from ._runtime import file_digest, require_torch, resolve_device

torch = require_torch()
nn = torch.nn

#: Parameter prefixes of heads that training uses and cell embedding never runs.
IGNORED_PREFIXES = (
    "decoder.",
    "mvc_decoder.",
    "cls_decoder.",
    "grad_reverse_discriminator.",
    "batch_encoder.",
    "flag_encoder.",
    "sim.",
    "creterion_cce.",
)
SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")
#: Bins used by upstream's cell-embedding collator whatever args.json says (its DataCollator default).
UPSTREAM_N_BINS = 51
#: Which value-encoder parameter each ``input_emb_style`` needs in the weights.
_STYLE_KEYS = {"continuous": "value_encoder.linear1.weight", "category": "value_encoder.embedding.weight"}
_FLASH_QKV = ".self_attn.Wqkv."


class _TokenEncoder(nn.Module):
    """Embedding + LayerNorm (upstream ``GeneEncoder`` / ``CategoryValueEncoder`` parameter layout)."""

    def __init__(self, n_tokens: int, dim: int, padding_idx: int | None):
        super().__init__()
        self.embedding = nn.Embedding(n_tokens, dim, padding_idx=padding_idx)
        self.enc_norm = nn.LayerNorm(dim)

    def forward(self, ids):
        return self.enc_norm(self.embedding(ids.long()))


class _ContinuousValueEncoder(nn.Module):
    """Scalar value → vector: Linear(1, d), ReLU, Linear(d, d), LayerNorm; values clipped at 512 as upstream."""

    max_value = 512.0

    def __init__(self, dim: int):
        super().__init__()
        self.linear1 = nn.Linear(1, dim)
        self.linear2 = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, values):
        x = values.unsqueeze(-1).clamp(max=self.max_value)
        return self.norm(self.linear2(torch.relu(self.linear1(x))))


class _PackedSelfAttention(nn.Module):
    """Multi-head self-attention with PyTorch's packed ``in_proj`` parameter names (q, k, v rows)."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"embsize {dim} is not divisible by nheads {n_heads}.")
        self.n_heads = n_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, keep):
        b, n, d = x.shape
        qkv = nn.functional.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class _EncoderLayer(nn.Module):
    """Post-norm transformer layer (ReLU feed-forward, LayerNorm eps 1e-5), as scGPT's released models.

    Written out rather than taken from ``nn.TransformerEncoderLayer``: its inference fast path
    (nested tensors) was 3x slower here on CPU, and plain ops let bf16 use native matmuls.
    """

    def __init__(self, dim: int, n_heads: int, d_hid: int):
        super().__init__()
        self.self_attn = _PackedSelfAttention(dim, n_heads)
        self.linear1 = nn.Linear(dim, d_hid)
        self.linear2 = nn.Linear(d_hid, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x, keep):
        x = self.norm1(x + self.self_attn(x, keep))
        return self.norm2(x + self.linear2(torch.relu(self.linear1(x))))


class _Encoder(nn.Module):
    def __init__(self, dim: int, n_heads: int, d_hid: int, n_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(_EncoderLayer(dim, n_heads, d_hid) for _ in range(n_layers))

    def forward(self, x, padding_mask):
        keep = ~padding_mask[:, None, None, :]  # (batch, 1, 1, keys): True where attention may look
        for layer in self.layers:
            x = layer(x, keep)
        return x


class ScGPTModel(nn.Module):
    """The embedding path of scGPT's ``TransformerModel``: token + value embeddings, post-norm encoder.

    Parameters
    ----------
    n_tokens
        Vocabulary size (rows of ``encoder.embedding``).
    dim
        Model width (``embsize``).
    n_heads
        Attention heads (``nheads``).
    d_hid
        Feed-forward width (``d_hid``).
    n_layers
        Encoder layers (``nlayers``).
    pad_id
        Token id of ``<pad>``.
    input_emb_style
        ``"continuous"`` (released models), ``"category"`` or ``"scaling"``.
    n_value_tokens
        Rows of the value embedding table when ``input_emb_style="category"``.
    pad_value
        Value given to padding (the padding row of a category value table).
    """

    def __init__(
        self,
        n_tokens: int,
        dim: int,
        n_heads: int,
        d_hid: int,
        n_layers: int,
        pad_id: int,
        input_emb_style: str = "continuous",
        n_value_tokens: int | None = None,
        pad_value: int = 0,
    ):
        super().__init__()
        self.input_emb_style = input_emb_style
        self.encoder = _TokenEncoder(n_tokens, dim, pad_id)
        if input_emb_style == "continuous":
            self.value_encoder = _ContinuousValueEncoder(dim)
        elif input_emb_style == "category":
            if not n_value_tokens:
                raise ValueError("input_emb_style='category' needs the number of value tokens.")
            self.value_encoder = _TokenEncoder(n_value_tokens, dim, pad_value)
        elif input_emb_style == "scaling":
            self.value_encoder = nn.Identity()
        else:
            raise ValueError(
                f"input_emb_style must be continuous, category or scaling, got {input_emb_style!r}."
            )
        # No dropout: this module only runs inference.
        self.transformer_encoder = _Encoder(dim, n_heads, d_hid, n_layers)
        self.dim = dim

    def forward(self, genes, values, padding_mask):
        """``<cls>`` output for token ids ``genes``, binned ``values`` and a True-at-padding mask."""
        tokens = self.encoder(genes)
        if self.input_emb_style == "scaling":
            x = tokens * values.unsqueeze(-1).to(tokens.dtype)
        else:
            x = tokens + self.value_encoder(values.to(tokens.dtype) if values.is_floating_point() else values)
        return self.transformer_encoder(x, padding_mask)[:, 0, :]


def convert_state_dict(state: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Rename released keys to this module's names; return ``(kept, ignored_keys)``.

    Flash-attention checkpoints store the packed query/key/value projection as
    ``self_attn.Wqkv.{weight,bias}`` in the same q, k, v row order that PyTorch's
    ``self_attn.in_proj_{weight,bias}`` uses, so renaming is exact. A ``module.`` prefix
    (DistributedDataParallel) is dropped.
    """
    kept, ignored = {}, []
    for key, value in state.items():
        name = key[len("module.") :] if key.startswith("module.") else key
        if name.startswith(IGNORED_PREFIXES):
            ignored.append(key)
            continue
        if _FLASH_QKV in name:
            head, tail = name.split(_FLASH_QKV)
            name = f"{head}.self_attn.in_proj_{tail}"
        kept[name] = value
    return kept, ignored


def read_vocab(path: Path) -> dict[str, int]:
    """``vocab.json`` (token → id) with scGPT's special tokens appended when missing, as upstream does."""
    with open(path) as f:
        vocab = {str(k): int(v) for k, v in json.load(f).items()}
    for token in SPECIAL_TOKENS:
        if token not in vocab:
            vocab[token] = len(vocab)
    return vocab


class ScGPTEncoder:
    """A loaded scGPT checkpoint folder, ready to embed tokenized cells.

    Use :func:`load_scgpt`. Attributes: ``model`` (:class:`ScGPTModel`, eval mode), ``vocab``,
    ``config`` (``args.json``), ``pad_id``, ``cls_id``, ``pad_value``, ``n_bins``, ``dim``,
    ``device``, ``ignored_keys`` (training-head keys of the checkpoint that were not loaded).
    """

    def __init__(self, model_dir: str | Path, device: Any = None):
        self.path = Path(model_dir)
        files = {name: self.path / name for name in ("args.json", "vocab.json", "best_model.pt")}
        missing = [name for name, f in files.items() if not f.exists()]
        if missing:
            raise FileNotFoundError(
                f"{self.path} is not an scGPT model folder: missing {missing} "
                "(expected args.json, vocab.json and best_model.pt as released, e.g. scGPT_human/)."
            )
        with open(files["args.json"]) as f:
            self.config = json.load(f)
        self.vocab = read_vocab(files["vocab.json"])
        self.pad_token = self.config.get("pad_token", "<pad>")
        self.pad_id = self.vocab[self.pad_token]
        self.cls_id = self.vocab["<cls>"]
        self.pad_value = self.config.get("pad_value", -2)
        self.n_bins = self._n_bins()
        self.device = resolve_device(device)
        state = self._read_weights(files["best_model.pt"])
        self.model, self.ignored_keys = self._build(state)
        self.model.to(self.device).eval()
        self.dim = self.model.dim

    def _n_bins(self) -> int:
        """Bins of args.json: the binning the model was trained with.

        Upstream's ``embed_data`` always bins into 51 (its collator's default) whatever args.json says;
        released models use 51, so both agree there. For a checkpoint trained with other bins sc_llm
        keeps the trained value and warns that upstream's ``embed_data`` would differ.
        """
        n_bins = int(self.config.get("n_bins") or UPSTREAM_N_BINS)
        if n_bins < 2:
            raise ValueError(f"{self.path / 'args.json'} has n_bins={n_bins}; binning needs at least 2 bins.")
        if n_bins != UPSTREAM_N_BINS:
            warnings.warn(
                f"{self.path / 'args.json'} has n_bins={n_bins}: values are binned into {n_bins} bins, as the "
                f"model was trained. Upstream scGPT's embed_data always bins into {UPSTREAM_N_BINS}, so its "
                "embeddings of this checkpoint differ from these.",
                UserWarning,
                stacklevel=4,
            )
        return n_bins

    def _read_weights(self, path: Path) -> dict[str, Any]:
        if path.stat().st_size == 0:
            raise ValueError(
                f"{path} is empty (0 bytes): the download or copy did not finish; fetch it again."
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, ValueError) as e:
            raise ValueError(
                f"{path} could not be read as a PyTorch state dict ({type(e).__name__}: {str(e).strip()[:300]}). "
                "It may be truncated or not a checkpoint; fetch it again."
            ) from e
        if isinstance(state, dict) and "model_state_dict" in state:
            state = state["model_state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(
                f"{path} does not hold a state dict (parameter name → tensor), got {type(state).__name__}."
            )
        return state

    def _check_style(self, style: Any, kept: dict[str, Any]) -> str:
        """``input_emb_style`` of args.json, checked against the value encoder the weights carry."""
        args = self.path / "args.json"
        if style not in ("continuous", "category", "scaling"):
            raise ValueError(
                f"{args} has input_emb_style={style!r}; scGPT models use 'continuous' (released models), "
                "'category' or 'scaling'."
            )
        found = next((s for s, key in _STYLE_KEYS.items() if key in kept), "scaling")
        if found != style:
            raise ValueError(
                f"{args} says input_emb_style={style!r} but the value encoder in best_model.pt is "
                f"{found!r}-style (it {'has' if found != 'scaling' else 'lacks'} "
                f"{_STYLE_KEYS.get(found, ' or '.join(_STYLE_KEYS.values()))}): args.json and the weights come "
                "from different models."
            )
        if style == "category":
            rows = int(kept[_STYLE_KEYS["category"]].shape[0])
            if not 0 <= int(self.pad_value) < rows or rows < self.n_bins:
                raise ValueError(
                    f"{args}: a category-style model needs n_bins ({self.n_bins}) value rows and a pad_value "
                    f"row in its {rows}-row value table, but pad_value is {self.pad_value} (upstream uses "
                    "pad_value = n_bins for category models)."
                )
        return style

    def _check_shapes(self, model: nn.Module, kept: dict[str, Any]) -> None:
        """Name the args.json entry behind a shape mismatch, instead of torch's raw 'size mismatch'."""
        want = model.state_dict()
        wrong = [k for k, v in kept.items() if k in want and tuple(v.shape) != tuple(want[k].shape)]
        if wrong:
            cfg = self.config
            sizes = f"embsize={cfg['embsize']}, d_hid={cfg['d_hid']}, nlayers={cfg['nlayers']}"
            shown = "; ".join(
                f"{k}: {tuple(kept[k].shape)} in the weights, {tuple(want[k].shape)} from args.json"
                for k in wrong[:3]
            )
            raise ValueError(
                f"{self.path / 'best_model.pt'} does not match args.json ({sizes}): {shown}"
                + (f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else "")
                + ". args.json and best_model.pt come from different models."
            )

    def _build(self, state: dict[str, Any]):
        cfg = self.config
        for key in ("embsize", "nheads", "d_hid", "nlayers"):
            if key not in cfg:
                raise KeyError(f"{self.path / 'args.json'} has no {key!r}; found {sorted(cfg)}.")
        if cfg.get("pre_norm"):
            raise ValueError(
                "pre_norm=True scGPT checkpoints are not supported (released models are post-norm)."
            )
        kept, ignored = convert_state_dict(state)
        n_tokens = _rows(kept, "encoder.embedding.weight", len(self.vocab))
        if n_tokens < len(self.vocab):
            raise ValueError(
                f"vocab.json has {len(self.vocab)} tokens (with specials) but the checkpoint embeds {n_tokens}."
            )
        style = self._check_style(cfg.get("input_emb_style", "continuous"), kept)
        model = ScGPTModel(
            n_tokens,
            int(cfg["embsize"]),
            int(cfg["nheads"]),
            int(cfg["d_hid"]),
            int(cfg["nlayers"]),
            self.pad_id,
            input_emb_style=style,
            n_value_tokens=_rows(kept, "value_encoder.embedding.weight", None)
            if style == "category"
            else None,
            pad_value=int(self.pad_value),
        )
        self._check_shapes(model, kept)
        result = model.load_state_dict({k: v.float() for k, v in kept.items()}, strict=False)
        if result.missing_keys or result.unexpected_keys:
            parts = []
            if result.missing_keys:
                parts.append(f"missing keys: {format_examples(result.missing_keys, 8)}")
            if result.unexpected_keys:
                parts.append(f"unexpected keys: {format_examples(result.unexpected_keys, 8)}")
            raise ValueError(
                f"{self.path / 'best_model.pt'} does not match args.json: " + "; ".join(parts) + "."
            )
        if ignored:
            logger.info("scGPT: %d training-head keys not needed for embeddings were skipped.", len(ignored))
        return model, ignored

    def identity(self) -> dict[str, Any]:
        """Where the weights came from and what they are, for ``uns``."""
        return {
            "path": str(self.path),
            "weights_sha256": file_digest(str(self.path / "best_model.pt")),
            "dim": self.dim,
            "n_layers": int(self.config["nlayers"]),
            "n_bins": self.n_bins,
            "input_emb_style": self.model.input_emb_style,
            "vocab_size": len(self.vocab),
            "ignored_keys": len(self.ignored_keys),
        }

    # -- the encoder protocol ------------------------------------------------------------------
    max_tokens = 1200  # upstream's default max_length; a call's tokenizer sets its own

    def model_in(self, precision: str):
        """The model with weights in ``precision`` (a reduced copy made once per model, device, precision)."""
        return reduced_copy(self.model, precision)

    def forward(self, model, ids, mask, values):
        """L2-normalized ``<cls>`` embeddings of a padded batch (genes, binned values, mask)."""
        emb = model(ids, values.to(torch.float32), mask == 0).float()
        return torch.nn.functional.normalize(emb, dim=-1)

    def tokenizer_for(
        self, gene_names: np.ndarray, *, max_length: int = 1200, random_state: int = 0, min_gene_fraction: float = 0.1,
        where: str = "var_names", shown_names=None, where_values: str = "adata.X",
    ) -> ScGPTTokenizer:  # fmt: skip
        """The host tokenizer for one call over an AnnData with these gene symbols.

        ``shown_names`` are the names as the user has them, for messages, when they were converted.
        """
        return ScGPTTokenizer(self, gene_names, max_length=max_length, random_state=random_state,
                              min_gene_fraction=min_gene_fraction, where=where, shown_names=shown_names,
                              where_values=where_values)  # fmt: skip


class ScGPTTokenizer:
    """Cells → scGPT tokens on the host, as upstream ``scgpt.tasks.embed_data`` builds them.

    Genes are matched by exact symbol to the vocabulary; per cell only expressed matched genes are
    used, in ``var`` order; values are binned per cell into ``n_bins`` by quantiles of that cell's
    non-zero values (bin 0 is reserved for zero; a value on several equal edges gets a uniformly random
    bin among them); ``<cls>`` comes first with the pad value; a cell with more than ``max_length - 1``
    expressed genes keeps a random subset. Each cell draws from its own generator seeded by
    ``(random_state, crc32(obs_name))``, first the tie-breaks, then the subset, so a cell's tokens do
    not depend on the other cells, their order or the chunking.
    """

    def __init__(self, encoder: ScGPTEncoder, gene_names: np.ndarray, *, max_length: int, random_state: int,
                 min_gene_fraction: float, where: str, shown_names=None, where_values: str = "adata.X"):  # fmt: skip
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (<cls> and one gene), got {max_length}.")
        self.cols, self.token_ids = match_vocab(gene_names, encoder.vocab, min_gene_fraction, where, shown_names)
        self.gene_names = np.asarray(gene_names)[self.cols]
        self.matched = np.zeros(len(gene_names), dtype=bool)
        self.matched[self.cols] = True
        self.n_bins, self.cls_id, self.pad_value = encoder.n_bins, encoder.cls_id, float(encoder.pad_value)
        self.max_tokens, self.random_state, self.where_values = max_length, random_state, where_values

    def describe(self) -> dict[str, Any]:
        return {"genes": names_digest(self.gene_names), "max_length": self.max_tokens,
                "random_state": self.random_state, "n_bins": self.n_bins}  # fmt: skip

    def tokenize(self, chunk) -> Tokens:
        """Tokens and binned values of a chunk, with ``per_cell["n_genes"]`` (expressed matched genes)."""
        csr = sparse.csr_matrix(chunk.rows[:, self.cols])
        csr.eliminate_zeros()
        csr.sort_indices()  # var order, so the seeded tie-breaks and subsets do not depend on storage order
        needs = "scGPT needs finite counts or log-normalized expression, not scaled data"
        check_values(csr, chunk.obs_names, self.where_values, needs)
        edges = bin_edges(csr, self.n_bins)
        n_expr = np.diff(csr.indptr)
        keep = self.max_tokens - 1
        genes, values = [], []
        for i, name in enumerate(chunk.obs_names):
            lo, hi = csr.indptr[i], csr.indptr[i + 1]
            x = csr.data[lo:hi]
            # A value lying on several equal edges gets a uniformly random bin among them, as upstream.
            left = np.searchsorted(edges[i], x, side="right")
            right = np.searchsorted(edges[i], x, side="left")
            rng = np.random.default_rng([self.random_state, zlib.crc32(str(name).encode())])
            binned = np.ceil(rng.random(hi - lo) * (right - left) + left)
            tok = self.token_ids[csr.indices[lo:hi]]
            if hi - lo > keep:
                chosen = np.sort(rng.choice(hi - lo, size=keep, replace=False))
                tok, binned = tok[chosen], binned[chosen]
            genes.append(tok)
            values.append(binned)
        from sc_llm.tl._coverage import cell_counts

        return _with_cls(genes, values, self.cls_id, self.pad_value, n_genes=n_expr,
                         **cell_counts(chunk.rows, self.matched))  # fmt: skip


def _with_cls(genes, values, cls_id: int, pad_value: float, **per_cell) -> Tokens:
    lengths = np.fromiter((len(g) + 1 for g in genes), dtype=np.int64, count=len(genes))
    ptr = np.zeros(len(genes) + 1, dtype=np.int64)
    np.cumsum(lengths, out=ptr[1:])
    ids = np.full(ptr[-1], cls_id, dtype=np.int64)
    vals = np.full(ptr[-1], pad_value, dtype=np.float32)
    body = np.ones(ptr[-1], dtype=bool)
    body[ptr[:-1]] = False
    if len(genes):
        ids[body] = np.concatenate(genes)
        vals[body] = np.concatenate(values)
    return Tokens(ids, ptr, vals, per_cell)


def match_vocab(names: np.ndarray, vocab: dict[str, int], min_fraction: float, where: str, shown=None):
    """Columns of genes found in the vocabulary (var order) and their token ids.

    ``shown`` are the names as the user has them (before any identifier conversion), for messages.
    """
    names = np.asarray(names)
    shown = names if shown is None else np.asarray(shown)
    ids = np.fromiter((vocab.get(g, -1) if g is not None else -1 for g in names), dtype=np.int64, count=len(names))
    cols = np.flatnonzero(ids >= 0)
    fraction = len(cols) / max(len(names), 1)
    if len(cols) == 0 or fraction < min_fraction:
        raise ValueError(
            f"Only {len(cols)} of {len(names)} genes in {where} are in the scGPT vocabulary "
            f"(fraction {fraction:.3f} < min_gene_fraction={min_fraction}). Unmatched names: "
            f"{format_examples(shown[ids < 0])}. scGPT matches exact gene symbols (e.g. 'CD3E'; Ensembl IDs are "
            "converted to symbols first where the shipped gene table allows); pass gene_symbols= with the column "
            "that holds symbols, or convert them with sc_llm.pp.map_gene_ids."
        )
    if fraction < 0.5:
        logger.warning("embed_scgpt: only %d of %d genes match the vocabulary.", len(cols), len(names))
    return cols, ids[cols]


def bin_edges(csr: sparse.csr_matrix, n_bins: int) -> np.ndarray:
    """Per cell, the ``n_bins - 1`` evenly spaced quantiles of its non-zero values (cells × edges).

    Computed by ``np.quantile`` itself in float64 (float32 edges would move values across edges),
    for all cells with the same number of values at once. Rows of cells without values are zero.
    """
    counts = np.diff(csr.indptr)
    qs = np.linspace(0, 1, n_bins - 1)
    edges = np.zeros((csr.shape[0], len(qs)), dtype=np.float64)
    for n in np.unique(counts[counts > 0]):
        rows = np.flatnonzero(counts == n)
        x = csr.data[csr.indptr[rows][:, None] + np.arange(n)].astype(np.float64)
        edges[rows] = np.quantile(x, qs, axis=1).T
    return edges


def _rows(state: dict[str, Any], key: str, default: int | None) -> int | None:
    return int(state[key].shape[0]) if key in state else default


@functools.lru_cache(maxsize=2)
def _cached(path: str, mtime_ns: int, device: str | None) -> ScGPTEncoder:
    return ScGPTEncoder(path, device)


def load_scgpt(model_dir: str | Path | ScGPTEncoder, device: Any = None) -> ScGPTEncoder:
    """Load an scGPT checkpoint folder (cached per folder, file time and device).

    Parameters
    ----------
    model_dir
        Folder with ``args.json``, ``vocab.json`` and ``best_model.pt`` (e.g. ``scGPT_human/``),
        or an already loaded :class:`ScGPTEncoder` (returned as is).
    device
        Torch device; ``None`` picks CUDA, then MPS, then CPU.

    Returns
    -------
    encoder : sc_llm.models.ScGPTEncoder
        The loaded model, ready for :func:`sc_llm.tl.embed_scgpt`.
    """
    if isinstance(model_dir, ScGPTEncoder):
        return model_dir
    files = [Path(model_dir) / f for f in ("args.json", "vocab.json", "best_model.pt")]
    mtime = max((f.stat().st_mtime_ns for f in files if f.exists()), default=0)
    return _cached(str(Path(model_dir).resolve()), mtime, None if device is None else str(device))
