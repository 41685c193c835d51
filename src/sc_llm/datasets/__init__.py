"""Datasets reachable offline."""

from ._pbmc import pbmc68k

__all__ = ["pbmc68k"]
