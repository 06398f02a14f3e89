"""How a chapter reads (issue 19): the conventions every notebook in the table of contents follows, checked
on the committed files (the browser test checks the same pages as rendered).

* **Code fits the column.** No line of a code cell or of a code block in the prose is longer than 88
  characters: ``_static/book.css``
  makes a 1280-px-wide window show about 90 characters in a code block.
* **Figures are numbered and captioned.** A code cell that shows a figure carries the cell metadata
  ``mystnb.figure`` with a ``caption`` and a ``name`` (``fig-NN-...``, NN the chapter, unique in the book);
  it shows exactly one image; the number ("Figure 8.2") comes from ``scripts/book_figure_numbers.py``.
  Prose refers to a figure with ``{numref}`fig-NN-...` ``, never with a typed "Figure 8.2" that would not
  follow a renumbering, and every ``{numref}`` target exists.
* **The prose leads.** A cell that draws a figure is collapsed (tag ``hide-input``; ``remove-input`` for
  the data-path banner): its plotting code is one click away, the experiment's code stays open.
* **Orientation.** A chapter opens with ``**What you will learn:**`` and ``**Assumes:**``, shows the data
  path with its part highlighted (``moe_lib.book.plot.data_path_figure``) before its first section, and closes
  with a ``Summary`` section right above ``## Exercises``.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from toc_notebooks import toc_notebooks  # noqa: E402

NOTEBOOKS = toc_notebooks()
MAX_LINE = 88
NAME = re.compile(r"^fig-(\d\d)-[a-z0-9-]+$")
NUMREF = re.compile(r"\{numref\}`(?:[^`<]*<)?([^`>]+)>?`")
TYPED_FIGURE = re.compile(r"(?<![`<])\bFig(?:ure|\.)\s+\d+\.\d+")
IMAGE_MIMES = ("image/png", "image/svg+xml", "image/jpeg")


def _read(path: Path):
    return nbformat.read(path, as_version=4)


def _images(cell) -> int:
    return sum(
        1 for out in cell.get("outputs", []) if any(m in out.get("data", {}) for m in IMAGE_MIMES)
    )


def _figure_names() -> dict[str, Path]:
    names: dict[str, Path] = {}
    for path in NOTEBOOKS:
        for cell in _read(path).cells:
            figure = cell.get("metadata", {}).get("mystnb", {}).get("figure")
            if figure and "name" in figure:
                names.setdefault(figure["name"], path)
    return names


def _ids(paths):
    return [p.stem for p in paths]


FENCED = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_code_lines_fit_the_column(path):
    """Code cells, and code blocks in the prose (the exercises' solutions), fit the column."""
    long = []
    for i, cell in enumerate(_read(path).cells):
        blocks = [cell.source] if cell.cell_type == "code" else FENCED.findall(cell.source)
        for block in blocks:
            long += [(i, len(line), line[:60]) for line in block.splitlines() if len(line) > MAX_LINE]
    assert not long, f"{len(long)} code lines longer than {MAX_LINE} characters (cell, length, start): {long[:10]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_figures_are_numbered_captioned_and_collapsed(path):
    chapter = path.name[:2]
    problems = []
    for i, cell in enumerate(_read(path).cells):
        if cell.cell_type != "code":
            continue
        figure = cell.metadata.get("mystnb", {}).get("figure")
        images = _images(cell)
        tags = set(cell.metadata.get("tags", []))
        if images and not figure:
            problems.append(f"cell {i} shows a figure without mystnb.figure metadata (caption, name)")
        if figure:
            name, caption = figure.get("name", ""), str(figure.get("caption", "")).strip()
            if not NAME.match(name) or NAME.match(name).group(1) != chapter:
                problems.append(f"cell {i}: figure name {name!r} is not fig-{chapter}-<words>")
            if len(caption) < 20:
                problems.append(f"cell {i}: figure {name!r} has no real caption ({caption!r})")
            if images != 1:
                problems.append(f"cell {i}: figure {name!r} shows {images} images (one figure per cell)")
            if not tags & {"hide-input", "remove-input"}:
                problems.append(f"cell {i}: figure {name!r} is not collapsed (tag hide-input)")
    assert not problems, "\n".join(problems)


def test_figure_names_are_unique_in_the_book():
    seen: dict[str, Path] = {}
    duplicates = []
    for path in NOTEBOOKS:
        for cell in _read(path).cells:
            name = cell.get("metadata", {}).get("mystnb", {}).get("figure", {}).get("name")
            if name:
                if name in seen:
                    duplicates.append((name, seen[name].name, path.name))
                seen[name] = path
    assert not duplicates, duplicates


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_prose_refers_to_figures_by_numref(path):
    names = _figure_names()
    problems = []
    for i, cell in enumerate(_read(path).cells):
        if cell.cell_type != "markdown":
            continue
        for match in TYPED_FIGURE.finditer(cell.source):
            problems.append(f"cell {i}: typed {match.group(0)!r} (use {{numref}}`fig-...`)")
        for target in NUMREF.findall(cell.source):
            if target not in names:
                problems.append(f"cell {i}: {{numref}} to {target!r}, which no figure is named")
        if re.search(r"^\*\*Figure \d", cell.source, re.M):
            problems.append(f"cell {i}: a caption typed in markdown (move it to the cell's mystnb.figure)")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_chapter_opens_with_its_goals_and_the_data_path_and_closes_with_a_summary(path):
    cells = _read(path).cells
    first_section = next(i for i, c in enumerate(cells) if c.cell_type == "markdown" and re.search(r"^## ", c.source, re.M))
    opening = "\n".join(c.source for c in cells[:first_section + 1] if c.cell_type == "markdown")
    assert "**What you will learn:**" in opening, "the opening names what the reader will learn"
    assert "**Assumes:**" in opening, "the opening names what the chapter assumes"
    banner = [
        c for c in cells[:first_section]
        if c.cell_type == "code" and "data_path_figure(" in c.source and "remove-input" in c.metadata.get("tags", [])
    ]
    assert banner, "the data-path figure (remove-input) comes before the first section"
    headings = [
        line for c in cells if c.cell_type == "markdown" for line in c.source.splitlines() if line.startswith("## ")
    ]
    assert headings[-1].strip() == "## Exercises", headings[-3:]
    assert re.match(r"^## (\d+\.\d+ )?Summary\b", headings[-2]), f"no Summary right above Exercises: {headings[-2]!r}"
