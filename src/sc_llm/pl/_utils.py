"""What every plotting function shares: the Axes it draws into, the result it reads, saving and showing.

Each plotting function takes ``ax`` (one panel) or ``axes`` (one per panel), ``save`` and ``show``
(documented once in :mod:`sc_llm._docs`) and handles them here, the way scanpy's plotting functions do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd


def panels(
    ax: Any, n: int = 1, *, figsize: tuple[float, float], ncols: int = 1
) -> tuple[Any, list[Any], bool]:
    """The Axes to draw ``n`` panels into, with their Figure and whether it was made here.

    Parameters
    ----------
    ax
        The caller's Axes (one, or a sequence of ``n``); ``None`` makes a new figure with a grid of
        ``ncols`` columns (cells beyond ``n`` are hidden).
    n
        Number of panels.
    figsize
        Size of a new figure.
    ncols
        Columns of a new figure's grid.

    Returns
    -------
    ``(figure, list of n Axes, own)``; ``own`` is ``True`` when the figure was made here.
    """
    import matplotlib.pyplot as plt
    from matplotlib.axes import Axes

    if ax is None:
        ncols = max(1, min(ncols, n))
        fig, grid = plt.subplots(
            math.ceil(n / ncols), ncols, figsize=figsize, squeeze=False, constrained_layout=True
        )
        flat = list(grid.ravel())
        for extra in flat[n:]:
            extra.set_visible(False)
        return fig, flat[:n], True
    given = [ax] if isinstance(ax, Axes) else list(ax)
    if len(given) != n or not all(isinstance(a, Axes) for a in given):
        raise ValueError(f"This plot draws {n} panel(s): pass {n} matplotlib Axes, got {ax!r}.")
    return given[0].figure, given, False


def finish(fig, save: str | Path | None, show: bool | None, own_figure: bool = True) -> None:
    """Save ``fig`` to ``save`` if given, then show it when asked.

    By default (``show=None``) a figure made here is shown unless it was saved; a caller who passed
    their own Axes decides when to show.
    """
    import matplotlib.pyplot as plt

    if save is not None:
        fig.savefig(save, dpi=120, bbox_inches="tight")
    if show or (show is None and save is None and own_figure):
        plt.show()


def uns_table(data: Any, key: str, field: str, tool: str, columns: Sequence[str] = ()) -> pd.DataFrame:
    """A result table: ``data`` itself when it is a DataFrame, else ``data.uns[key][field]``.

    Parameters
    ----------
    data
        The table, or an AnnData/MuData that holds it.
    key, field
        Where the table is in ``uns``.
    tool
        The function that writes it (named in the error when it is missing).
    columns
        Columns the plot needs.

    Returns
    -------
    The table (never empty).
    """
    if isinstance(data, pd.DataFrame):
        table = data
    else:
        entry = data.uns.get(key)
        if not hasattr(entry, "get") or field not in entry:
            raise KeyError(f"uns[{key!r}][{field!r}] not found; run sc_llm.tl.{tool} first.")
        table = entry[field]
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise KeyError(f"The {tool} table lacks columns {missing}; columns: {list(table.columns)}.")
    if table.empty:
        raise ValueError(f"The {tool} table is empty.")
    return table
