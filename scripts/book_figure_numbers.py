"""Sphinx extension of the book: figures and tables numbered by chapter ("Figure 8.2").

The book's table of contents is not numbered (every chapter writes its own section numbers, "8.4 Paper /
ours / what differs"), so Sphinx would number the figures of the whole book in one run (Figure 1 ... 97)
or not at all. After Sphinx has assigned its numbers, this extension renumbers every numbered element of
a chapter page ``notebooks/NN_*`` as ``(NN, i)``, i counting from 1 in the page's order, so a caption
reads "Figure 8.2" and a ``{numref}`` to it anywhere in the book prints the same and links to it. Pages
outside ``notebooks/`` keep Sphinx's numbers.

A figure gets its number and caption from the code cell that draws it (cell metadata ``mystnb.figure``:
``caption`` and ``name``, see the README "Writing a chapter"). Loaded through ``sphinx.local_extensions``
of ``_config.yml`` and listed in its ``extensions``.
"""
from __future__ import annotations

import re

CHAPTER = re.compile(r"^notebooks/(\d+)_")


def _number_by_chapter(app, env) -> list[str]:
    changed = []
    for docname, by_type in env.toc_fignumbers.items():
        match = CHAPTER.match(docname)
        if not match:
            continue
        chapter = int(match.group(1))
        for figtype, numbers in by_type.items():
            order = sorted(numbers, key=lambda node_id: numbers[node_id])
            renumbered = {node_id: (chapter, i) for i, node_id in enumerate(order, start=1)}
            if renumbered != numbers:
                by_type[figtype] = renumbered
                changed.append(docname)
    return sorted(set(changed))


def setup(app):
    # After Sphinx's own TocTreeCollector (priority 500) has assigned env.toc_fignumbers.
    app.connect("env-get-updated", _number_by_chapter, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True, "version": "1"}
