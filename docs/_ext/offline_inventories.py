"""Intersphinx inventories that a build without network can have: Debian's documentation packages.

No documentation site is reachable while the docs build here (nor in CI), but Debian's
``python3.11-doc``, ``python-pandas-doc``, ``python-scipy-doc`` and ``python-sklearn-doc`` ship the
``objects.inv`` of the documentation they contain. Each package is fetched with ``apt-get download``
(no installation, no root needed once the package lists exist), its inventory is extracted with
``dpkg-deb --fsys-tarfile`` into a cache (``SC_LLM_DOCS_CACHE``, default ``~/.cache/sc_llm_docs``) and
the ``.deb`` is deleted. Links point to the online pages of the version the inventory describes, so
every anchor exists. Where neither the cache nor apt can give an inventory (e.g. a contributor's Mac),
intersphinx fetches it from the site instead, and a build that cannot reach the site fails under
``-W`` rather than dropping the links silently.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

# name: (site of the inventory's version, Debian package, path of objects.inv inside the package)
DEBIAN_INVENTORIES = {
    "python": (
        "https://docs.python.org/3.11/",
        "python3.11-doc",
        "usr/share/doc/python3.11/html/objects.inv",
    ),
    "pandas": (
        "https://pandas.pydata.org/pandas-docs/version/1.5.3/",
        "python-pandas-doc",
        "usr/share/doc/python-pandas-doc/html/objects.inv",
    ),
    "scipy": (
        "https://docs.scipy.org/doc/scipy-1.10.1/",
        "python-scipy-doc",
        "usr/share/doc/python-scipy-doc/html/objects.inv",
    ),
    "sklearn": (
        "https://scikit-learn.org/1.2/",
        "python-sklearn-doc",
        "usr/share/doc/python-sklearn-doc/html/objects.inv",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("SC_LLM_DOCS_CACHE", Path.home() / ".cache" / "sc_llm_docs")) / "inventories"


def _download(package: str, folder: Path) -> Path | None:
    """The package's .deb in ``folder``, or ``None`` when apt cannot give it."""
    if shutil.which("apt-get") is None:
        return None
    download = ["apt-get", "download", package]
    subprocess.run(download, cwd=folder, capture_output=True)
    if not any(folder.glob("*.deb")) and hasattr(os, "geteuid") and os.geteuid() == 0:
        # A fresh machine may have no package lists yet; refreshing them needs root.
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
        subprocess.run(download, cwd=folder, capture_output=True)
    return next(folder.glob(f"{package}_*.deb"), None)


def _extract(deb: Path, member: str, target: Path) -> bool:
    """Copy ``member`` of the package's file tree to ``target``, streaming (the trees are large)."""
    # Reading stops at the member: dpkg-deb then dies of a broken pipe, which is expected, hence no stderr.
    tree = ["dpkg-deb", "--fsys-tarfile", str(deb)]
    with subprocess.Popen(tree, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as proc:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for entry in tar:
                if entry.name.lstrip("./") == member and entry.isfile():
                    target.write_bytes(tar.extractfile(entry).read())
                    break
        proc.stdout.close()
    return target.exists()


def inventory(name: str) -> str | None:
    """Path of ``name``'s cached inventory, fetched from Debian on first use; ``None`` if unobtainable."""
    _, package, member = DEBIAN_INVENTORIES[name]
    target = cache_dir() / f"{package}.inv"
    if target.exists():
        return str(target)
    if shutil.which("dpkg-deb") is None:
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        deb = _download(package, Path(tmp))
        if deb is None or not _extract(deb, member, target):
            return None
    return str(target)


def intersphinx_mapping() -> dict[str, tuple[str, str | None]]:
    """``intersphinx_mapping`` with the local inventory where there is one (else the site's)."""
    return {name: (url, inventory(name)) for name, (url, _, _) in DEBIAN_INVENTORIES.items()}
