"""What every plotting function does last: save and/or show, the way scanpy's ``save``/``show`` do."""

from __future__ import annotations

from pathlib import Path


def finish(fig, save: str | Path | None, show: bool | None, own_figure: bool = True) -> None:
    """Save ``fig`` to ``save`` if given; show it when asked, or by default when the figure is ours
    and was not saved (a caller who passed their own Axes decides when to show)."""
    import matplotlib.pyplot as plt

    if save is not None:
        fig.savefig(save, dpi=120, bbox_inches="tight")
    if show or (show is None and save is None and own_figure):
        plt.show()
