"""The docs build's figure check (docs/_ext/figure_check.py) on a small Sphinx project.

One build of pages that each break one rule (and pages that keep them), executed by myst-nb in a
real Jupyter kernel under ``MPLBACKEND=Agg``, as ``dev.sh docs`` runs it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("myst_nb")
pytest.importorskip("ipykernel")

EXT = Path(__file__).resolve().parents[1] / "docs" / "_ext"
HEADER = "---\nfile_format: mystnb\nkernelspec:\n  name: python3\n  display_name: Python 3\n---\n\n"

PAGES = {
    "index.md": "# Home\n\nNo figure here.\n\n```{toctree}\n:glob:\n\n*\n```\n",
    # plt.show() under the inherited Agg backend: the figure must still reach the page.
    "shown.md": HEADER + "# Shown\n\n```{code-cell} ipython3\nimport matplotlib.pyplot as plt\n"
    "plt.plot([1, 2, 3])\nplt.show()\n```\n",
    "closed.md": HEADER + "# Closed\n\n```{code-cell} ipython3\nimport matplotlib.pyplot as plt\n"
    "plt.plot([1, 2]); plt.close()\n```\n",
    "errors.md": HEADER + "# Errors\n\n```{code-cell} ipython3\n1 / 0\n```\n\n"
    "```{code-cell} ipython3\n:tags: [raises-exception]\n\nint('x')\n```\n",
    "static.md": "# Static\n\n```python\nscl.pl.annotation_embedding(adata, 'cell_type')\n```\n",
    "static_text.md": "# Static, no plot\n\n```python\nscl.tl.embed_text(adata)\n```\n",
    "broken.md": '# Broken\n\n<img src="missing.png" alt="gone">\n',
}

CONF = f"""
import sys
sys.path.insert(0, {str(EXT)!r})
extensions = ["myst_nb", "figure_check"]
source_suffix = {{".md": "myst-nb"}}
myst_enable_extensions = ["html_image"]
nb_execution_mode = "force"
nb_execution_raise_on_error = False
nb_execution_allow_errors = True
nb_execution_timeout = 120
figure_check_pages = ["index"]
exclude_patterns = ["_build"]
"""


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> tuple[str, Path]:
    src = tmp_path_factory.mktemp("docs")
    (src / "conf.py").write_text(textwrap.dedent(CONF))
    for name, text in PAGES.items():
        (src / name).write_text(text)
    env = {**os.environ, "MPLBACKEND": "Agg"}
    done = subprocess.run(
        [sys.executable, "-m", "sphinx", "-E", "-q", "-b", "html", str(src), str(src / "_build")],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stderr, src / "_build"


def warnings_of(log: str, page: str) -> list[str]:
    return [
        line
        for line in log.splitlines()
        if re.search(rf"{page}(\.md|\.html)?[:\s]", line) and "WARNING" in line
    ]


def test_inherited_agg_backend_still_puts_the_figure_in_the_page(build):
    log, out = build
    assert warnings_of(log, "shown") == []
    html = (out / "shown.html").read_text()
    (src,) = re.findall(r'<img[^>]*src="([^"]+)"', html)
    assert (out / src).read_bytes().startswith(b"\x89PNG")


def test_plotting_cell_without_image_fails(build):
    (warning,) = warnings_of(build[0], "closed")
    assert "calls a plotting function but shows no figure" in warning and "plt.plot" in warning


def test_cell_error_fails_unless_tagged_raises_exception(build):
    (warning,) = warnings_of(build[0], "errors")
    assert "this cell raised an error" in warning and "ZeroDivisionError" in warning


def test_static_plotting_code_needs_an_image_on_its_page(build):
    log = build[0]
    (warning,) = warnings_of(log, "static")
    assert "draws a figure but the page shows none" in warning
    assert warnings_of(log, "static_text") == []


def test_listed_page_without_image_fails(build):
    assert any("page 'index' must show a figure" in w for w in build[0].splitlines())


def test_image_that_was_not_written_fails(build):
    assert any(
        "broken.html shows an image that was not written: missing.png" in w for w in build[0].splitlines()
    )
