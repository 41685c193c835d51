"""Old parameter names kept for one release: renamed parameters and parameters moved into a config.

0.2.0 unified names across the package (see the changelog). A call with a 0.1 name still works, with
a :class:`FutureWarning` that names the new spelling; both spellings at once are refused.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import warnings
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

REMOVED_IN = "0.3.0"

_SHIMS: set = set()  # code objects of alias wrappers defined elsewhere (see shim)


def shim(wrapper: F) -> F:
    """Mark a wrapper that accepts old spellings, so :func:`warn_deprecated` skips its frame."""
    _SHIMS.add(wrapper.__code__)
    return wrapper


def warn_deprecated(fn: Callable, old: str, instead: str) -> None:
    """The FutureWarning for an old spelling, pointing at the user's line however many shims are stacked."""
    level, frame = 1, sys._getframe()
    while frame is not None and (frame.f_code.co_filename == __file__ or frame.f_code in _SHIMS):
        frame, level = frame.f_back, level + 1
    warnings.warn(
        f"{fn.__name__}(): `{old}` is deprecated, use {instead}; the old name is removed in {REMOVED_IN}.",
        FutureWarning,
        stacklevel=level,
    )


def renamed_params(**renames: str) -> Callable[[F], F]:
    """Accept ``old=...`` for each ``old="new"`` pair, warning once per call and passing it on as ``new``."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise TypeError(
                        f"{fn.__name__}() got both `{old}` (deprecated) and `{new}`; pass only `{new}`."
                    )
                warn_deprecated(fn, old, f"`{new}`")
                kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def moved_to_config(into: str, config: type, names: Iterable[str]) -> Callable[[F], F]:
    """Accept the fields ``names`` of the dataclass ``config`` as keyword arguments, as in 0.1.

    They are folded into the ``into`` argument (a new ``config(...)``, or a copy of the one passed
    with those fields replaced) with a warning naming the config spelling.
    """
    names = tuple(names)
    fields = {f.name for f in dataclasses.fields(config)}
    if unknown := set(names) - fields:
        raise ValueError(f"{config.__name__} has no fields {sorted(unknown)}.")

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            moved = {name: kwargs.pop(name) for name in names if name in kwargs}
            if moved:
                spelled = ", ".join(f"{k}=…" for k in moved)
                warn_deprecated(fn, "/".join(moved), f"`{into}={config.__name__}({spelled})`")
                base = kwargs.get(into)
                kwargs[into] = config(**moved) if base is None else dataclasses.replace(base, **moved)
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
