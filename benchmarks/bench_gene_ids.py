"""Gene ID round trips and agreement with a dataset's own IDs: pbmc68k (765 genes) and a wide real matrix.

The wide matrix is Bioconductor's HSMMSingleCell (Trapnell et al. 2014, human skeletal muscle
myoblasts, 271 cells × 47,192 GENCODE v17 genes), from Debian's ``r-bioc-hsmmsinglecell``; its gene
annotation (GENCODE v17 Ensembl IDs and ``gene_short_name``) is read with the pure-Python ``rdata``
package (a benchmark-only need: ``pip install rdata``). Pass ``--hsmm-deb`` with a downloaded .deb, or
the script runs ``apt-get download`` itself.

Printed per dataset, for the distinct symbols (each number says what it measures):

- matched: symbols that ``map_gene_ids(to="ensembl")`` converts, by match kind;
- table round trip (``restore=False``): share of matched symbols that come back unchanged from the
  table alone. Outdated symbols found as aliases come back under today's name (IGJ → JCHAIN) by design;
- restoring round trip (the default): ``map_gene_ids`` to Ensembl into ``var["ensembl_id"]``, then
  that column back to symbols; share of matched symbols that come back unchanged.
  This holds by construction (the first call records the names), so it checks the bookkeeping, not the table;
- agreement with the data's own IDs (HSMM only, the independent check of the table): share of
  matched symbols whose Ensembl ID is one the dataset gives that symbol (version suffix dropped).
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

import sc_llm as scl
from sc_llm.pp._gene_ids import convert_gene_ids, id_kind, load_gene_table


def hsmm_annotation(deb: Path | None) -> pd.DataFrame:
    """HSMM's genes: ``ensembl_id`` (unversioned) and ``symbol``, one row per gene."""
    import rdata

    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        if deb is None:
            subprocess.run(["apt-get", "download", "r-bioc-hsmmsinglecell"], cwd=tmp, check=True)
            deb = next(tmp.glob("*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / "x")], check=True)
        data = next((tmp / "x").rglob("HSMM_gene_annotation.rda"))
        ann = rdata.read_rda(str(data))["HSMM_gene_annotation"]
    print(f"HSMMSingleCell gene annotation: {len(ann)} genes (IDs like {ann.index[0]})")
    return pd.DataFrame(
        {"ensembl_id": id_kind(ann.index), "symbol": ann["gene_short_name"].astype(str).to_numpy()}
    )


def genes_only(symbols: np.ndarray) -> ad.AnnData:
    """An empty one-cell AnnData with ``symbols`` as var_names (only the genes matter here)."""
    return ad.AnnData(
        X=sparse.csr_matrix((1, len(symbols)), dtype=np.float32), var=pd.DataFrame(index=symbols)
    )


def round_trip(name: str, symbols: np.ndarray, own_ids: pd.DataFrame | None = None) -> None:
    """Print the numbers of the module docstring for one dataset's symbols."""
    symbols = np.asarray(list(dict.fromkeys(symbols)), dtype=object)  # one row per distinct symbol
    t0 = time.perf_counter()
    fwd = convert_gene_ids(symbols, "ensembl")
    back = convert_gene_ids(fwd.converted[fwd.matched], "symbol")
    secs = time.perf_counter() - t0
    m = fwd.matched
    same = back.converted == symbols[m]
    exact = fwd.status[m] == "exact"
    counts = {k: v for k, v in fwd.counts().items() if v}
    print(f"\n== {name}: {len(symbols)} distinct symbols, table converted both ways in {secs:.1f} s")
    print(f"matched {m.sum()} ({m.mean():.1%}); by kind: {counts}")
    print(
        f"table round trip (restore=False) returns the original symbol: {same.mean():.2%} of matched "
        f"({same.sum()}/{m.sum()}), {same[exact].mean():.2%} of exact matches"
    )
    changed = list(zip(symbols[m][~same], back.converted[~same], strict=True))[:8]
    print(f"  renamed by the table, e.g. {changed}")

    # What a user does: convert into a var column, later convert that column back (missing IDs allowed).
    # (set_var_names=True both ways gives the same on pbmc68k; on HSMM it is refused: 122 IDs are
    # reached from several symbols and would duplicate var names.)
    adata = genes_only(symbols)
    t0 = time.perf_counter()
    scl.pp.map_gene_ids(adata, "ensembl")
    scl.pp.map_gene_ids(adata, "symbol", column="ensembl_id")
    secs = time.perf_counter() - t0
    same_r = (adata.var["gene_symbol"].to_numpy() == symbols)[m]
    print(
        f"restoring round trip (default) returns the original symbol: {same_r.mean():.2%} of matched "
        f"({same_r.sum()}/{m.sum()}); {adata.uns['gene_symbol']['n_restored']} of {len(symbols)} genes "
        f"restored (unconverted ones keep their names), in {secs:.1f} s"
    )
    if own_ids is None:
        return
    ids_of = own_ids.groupby("symbol")["ensembl_id"].agg(set)
    agree = np.array([c in ids_of.get(s, set()) for s, c in zip(symbols[m], fwd.converted[m], strict=True)])
    kinds = fwd.status[m]
    by_kind = {
        k: f"{agree[kinds == k].mean():.1%} of {int((kinds == k).sum())}" for k in dict.fromkeys(kinds)
    }
    print(
        f"agreement with the data's own Ensembl IDs: {agree.mean():.2%} of matched ({agree.sum()}/{m.sum()}); "
        f"by kind: {by_kind}"
    )
    # A disagreement is either an ID retired since GENCODE v17 (GRCh38 gave e.g. CCL3 a new ID) or a
    # live gene of GENCODE 48 other than ours: only the second kind can be a mistake of the table.
    primary = load_gene_table("human").primary
    kind_of = dict(zip(symbols[m], kinds, strict=True))
    bad = [
        (s, c, sorted(ids_of[s]))
        for s, c, a in zip(symbols[m], fwd.converted[m], agree, strict=True)
        if not a
    ]
    live = [b for b in bad if any(i in primary for i in b[2])]
    retired = [(s, c, i[0]) for s, c, i in bad if (s, c, i) not in live]
    print(
        f"  of the {len(bad)} disagreements, {len(retired)} have only IDs retired since GENCODE v17 "
        f"(e.g. {retired[:3]}); {len(live)} name a gene GENCODE 48 still has "
        f"(e.g. {[(s, c, i[0]) for s, c, i in live][:4]})"
    )
    print(
        f"  those {len(live)} by match kind: {pd.Series([kind_of[b[0]] for b in live]).value_counts().to_dict()}"
    )
    ids = own_ids.dropna(subset=["ensembl_id"])
    sym = convert_gene_ids(ids["ensembl_id"].to_numpy(), "symbol")
    got = sym.matched
    print(
        f"data's own IDs → today's symbols: {got.mean():.1%} named; equal to the data's 2013 symbol for "
        f"{(sym.converted[got] == ids['symbol'].to_numpy()[got]).mean():.2%} of them"
    )


def main() -> None:
    """Run pbmc68k, then HSMMSingleCell."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hsmm-deb", type=Path, default=None)
    args = parser.parse_args()
    round_trip("pbmc68k", scl.datasets.pbmc68k().var_names.to_numpy())
    hsmm = hsmm_annotation(args.hsmm_deb)
    round_trip("HSMMSingleCell (wide)", hsmm["symbol"].to_numpy(), own_ids=hsmm)


if __name__ == "__main__":
    main()
