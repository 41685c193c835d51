"""Figures in the pages: kernels that draw as in a user's Jupyter, and a build that fails without them.

The notebook kernels inherit the build's environment. An ``MPLBACKEND`` such as the ``Agg`` that
``dev.sh`` exports for the tests replaces Jupyter's inline backend, and then no figure reaches a page;
so it is cleared when this extension loads (``plt.show()`` and a figure left open at the end of a cell
then both display it, as in Jupyter).

A figure can also vanish without any error: a kernel that inherits ``MPLBACKEND=Agg`` draws nothing into
the page, a plotting call in a static code block shows its code and no picture, a figure pasted
from another page can point at an image file that was never written (``write_glued_images`` writes
those from the glued data). Each of these is reported as a
Sphinx warning (so ``-W`` fails the build), with the page and line:

- an executed cell whose code calls a plotting function (``figure_check_pattern``) and has no image
  among its outputs;
- a page whose static code blocks call a plotting function and that shows no image at all (a
  figure drawn by an executed page can be pasted under it with myst-nb's ``glue``);
- an executed cell with an error output, unless it is tagged ``raises-exception``;
- a page listed in ``figure_check_pages`` (the first page) without an image;
- an ``<img>`` in the written HTML whose file does not exist.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from binascii import a2b_base64
from pathlib import Path

from docutils import nodes
from sphinx.util import logging

logger = logging.getLogger(__name__)

# Calls of scanpy-style ``*.pl.<name>(`` and of pyplot functions that draw; not pyplot's
# housekeeping (close, style, rc settings, interactive mode).
DEFAULT_PATTERN = r"\bpl\.\w+\s*\(|\bplt\.(?!close\b|rc\w*\b|style\b|ion\b|ioff\b|switch_backend\b)\w+\s*\("


def _warn(message: str, location) -> None:
    logger.warning(message, type="figure_check", subtype="missing", location=location)


def _is_code_cell(node: nodes.Node) -> bool:
    return isinstance(node, nodes.container) and node.get("nb_element") == "cell_code"


def _part(cell: nodes.Element, element: str) -> nodes.Element | None:
    return next((c for c in cell.children if c.get("nb_element") == element), None)


def _has_image(node: nodes.Node) -> bool:
    return any(True for _ in node.findall(nodes.image))


def check_doctree(app, doctree: nodes.document, docname: str) -> None:
    pattern = re.compile(app.config.figure_check_pattern)
    cells = list(doctree.findall(_is_code_cell))
    in_cells = {id(block) for cell in cells for block in cell.findall(nodes.literal_block)}
    for cell in cells:
        source = _part(cell, "cell_code_source")
        output = _part(cell, "cell_code_output")
        code = source.astext() if source is not None else ""
        if pattern.search(code) and (output is None or not _has_image(output)):
            _warn(
                f"this cell calls a plotting function but shows no figure: {code.strip()[:120]!r} (outputs "
                "cached by a build whose kernels could not draw are reused: delete the build's .jupyter_cache folder)",
                cell,
            )
        tags = (cell.get("cell_metadata") or {}).get("tags", [])
        if output is not None and "raises-exception" not in tags:
            for block in output.findall(nodes.literal_block):
                if "traceback" in block["classes"]:
                    _warn(f"this cell raised an error: {block.astext().strip().splitlines()[-1][:200]}", cell)
    page_has_image = _has_image(doctree)
    for block in doctree.findall(nodes.literal_block):
        if id(block) in in_cells or block.get("language", "python") not in ("python", "ipython", "default"):
            continue
        if pattern.search(block.astext()) and not page_has_image:
            _warn("this code draws a figure but the page shows none (paste one with glue)", block)
            break
    if docname in app.config.figure_check_pages and not page_has_image:
        _warn(f"page {docname!r} must show a figure (figure_check_pages) but has no image", doctree)


def write_glued_images(app, exception) -> None:
    """Write the image files of figures glued with ``display=False`` into ``_images``.

    myst-nb pastes a figure from another page as a link to ``_images/<sha256 of its PNG>``, a file that
    exists only when the source page displayed byte-identical PNG data; a figure drawn a second time
    (constrained layout) can differ by a byte, and the link would be broken. The glued data is in the
    build's ``<page>.glue.json``, so the file is written from it.
    """
    if exception is not None or app.builder.format != "html":
        return
    folder = Path(app.env.mystnb_config.output_folder)
    images = Path(app.outdir) / app.builder.imagedir
    for glued in folder.rglob("*.glue.json"):
        for output in json.loads(glued.read_text()).values():
            for mime, extension in (("image/png", ".png"), ("image/jpeg", ".jpeg")):
                if mime in output.get("data", {}):
                    data = a2b_base64(output["data"][mime])
                    target = images / f"{hashlib.sha256(data).hexdigest()}{extension}"
                    if not target.exists():
                        images.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(data)


def check_html(app, exception) -> None:
    """Every image an HTML page shows exists in the output folder."""
    if exception is not None or app.builder.format != "html":
        return
    out = Path(app.outdir)
    for page in sorted(out.rglob("*.html")):
        for src in re.findall(r'<img\b[^>]*\bsrc="([^"]+)"', page.read_text(encoding="utf-8")):
            if re.match(r"^(?:[a-z]+:|//)", src):
                continue
            if not (page.parent / src.split("#")[0].split("?")[0]).is_file():
                logger.warning(
                    f"{page.relative_to(out)} shows an image that was not written: {src}",
                    type="figure_check",
                    subtype="broken",
                )


def setup(app):
    os.environ.pop("MPLBACKEND", None)
    app.add_config_value("figure_check_pattern", DEFAULT_PATTERN, "env")
    app.add_config_value("figure_check_pages", [], "env")
    app.connect("doctree-resolved", check_doctree)
    app.connect("build-finished", write_glued_images, priority=400)  # before check_html (500)
    app.connect("build-finished", check_html)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
