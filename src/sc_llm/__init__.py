"""sc_llm: large language models for single-cell analysis, in the scanpy way.

``import sc_llm as scl`` is cheap: the namespaces load their heavy back ends (torch,
sentence-transformers, transformers) only when a function that needs them is called.
"""

from importlib.metadata import PackageNotFoundError, version

from . import datasets, llm, pl, pp, tl
from ._execution import Execution

try:
    __version__ = version("sc-llm")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = ["Execution", "datasets", "llm", "pl", "pp", "tl", "__version__"]
