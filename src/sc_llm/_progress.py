"""Progress bars that follow scanpy's verbosity (silent below 'info')."""

from __future__ import annotations

from tqdm.auto import tqdm


def progress(total: int | None = None, desc: str = "", unit: str = "it", disable: bool | None = None) -> tqdm:
    if disable is None:
        import scanpy as sc

        disable = int(sc.settings.verbosity) < 2
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, leave=False)
