"""Symbol → Ensembl → symbol round trip on pbmc68k (765 genes) and a wide real matrix (47,192 genes).

The wide matrix is Bioconductor's HSMMSingleCell (Trapnell et al. 2014, human skeletal muscle
myoblasts, 271 cells × 47,192 GENCODE v17 genes), from Debian's ``r-bioc-hsmmsinglecell``; its
``gene_short_name`` column is read with the pure-Python ``rdata`` package (a benchmark-only need:
``pip install rdata``). Pass ``--hsmm-deb`` with a downloaded .deb, or the script runs
``apt-get download`` itself.

Printed per dataset: how the symbols matched, and the share of matched genes whose round trip
returns the original symbol, overall and for exactly matched symbols (an outdated symbol found as an
alias comes back as its current name by design, e.g. IGJ → JCHAIN).
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

import sc_llm as scl
from sc_llm.pp._gene_ids import convert_gene_ids


def hsmm_symbols(deb: Path | None) -> np.ndarray:
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
    return ann["gene_short_name"].astype(str).to_numpy()


def round_trip(name: str, symbols: np.ndarray) -> None:
    symbols = np.asarray(list(dict.fromkeys(symbols)), dtype=object)  # one row per distinct symbol
    t0 = time.perf_counter()
    fwd = convert_gene_ids(symbols, "ensembl")
    back = convert_gene_ids(fwd.converted[fwd.matched], "symbol")
    secs = time.perf_counter() - t0
    same = back.converted == symbols[fwd.matched]
    exact = fwd.status[fwd.matched] == "exact"
    counts = {k: v for k, v in fwd.counts().items() if v}
    print(f"\n== {name}: {len(symbols)} distinct symbols, converted both ways in {secs:.1f} s")
    print(f"matched {fwd.matched.sum()} ({fwd.matched.mean():.1%}); by kind: {counts}")
    print(
        f"round trip returns the original symbol: {same.mean():.2%} of matched, {same[exact].mean():.2%} of exact matches"
    )
    changed = [(s, b) for s, b in zip(symbols[fwd.matched][~same], back.converted[~same], strict=True)][:8]
    print(f"examples of renamed symbols: {changed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hsmm-deb", type=Path, default=None)
    args = parser.parse_args()
    round_trip("pbmc68k", scl.datasets.pbmc68k().var_names.to_numpy())
    round_trip("HSMMSingleCell (wide)", hsmm_symbols(args.hsmm_deb))


if __name__ == "__main__":
    main()
