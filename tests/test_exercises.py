"""The chapters' exercises: every chapter ends with an ``## Exercises`` section of 3-6 numbered exercises,
each with a worked solution behind a ``{dropdown}`` toggle, and every code solution still runs.

A code solution is a fenced ``python`` block inside its dropdown, right after the marker line
``<!-- exercise-solution: N.M -->``. Each one runs here in a fresh namespace (``torch.manual_seed(0)``,
working directory = the repository root) and must contain at least one ``assert`` that checks the answer it
claims, so that a change of the library that makes the answer wrong fails this test instead of leaving a
stale solution in the book. Solutions are sized to run in a few seconds on one CPU core.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import nbformat
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from toc_notebooks import toc_notebooks  # noqa: E402

NOTEBOOKS = toc_notebooks()
SECTION = re.compile(r"^## Exercises\s*$", re.M)
EXERCISE = re.compile(r"^\*\*Exercise (\d+)\.(\d+)\.?\*\*", re.M)
DROPDOWN = re.compile(r"^:::\{dropdown\} Solution (\d+)\.(\d+)\s*$(.*?)^:::\s*$", re.M | re.S)
MARKER = re.compile(r"<!-- exercise-solution: (\d+)\.(\d+) -->\n```python\n(.*?)^```", re.M | re.S)


def chapter_number(path: Path) -> int:
    return int(path.name.split("_", 1)[0])


def exercises_text(path: Path) -> str:
    """The markdown from the ``## Exercises`` heading to the end of the notebook ('' if there is none)."""
    nb = nbformat.read(path, as_version=4)
    text = "\n\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    match = SECTION.search(text)
    return text[match.start():] if match else ""


def code_solutions() -> list[tuple[str, str, str]]:
    """``(notebook name, "N.M", code)`` for every marked code solution of every chapter."""
    found = []
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "markdown":
                found += [(path.name, f"{n}.{m}", code) for n, m, code in MARKER.findall(cell.source)]
    return found


SOLUTIONS = code_solutions()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_chapter_has_exercises_with_solutions(path):
    text = exercises_text(path)
    assert text, f"{path.name}: no '## Exercises' section"
    chapter = chapter_number(path)
    numbers = [(int(n), int(m)) for n, m in EXERCISE.findall(text)]
    assert 3 <= len(numbers) <= 6, f"{path.name}: {len(numbers)} exercises, expected 3-6"
    assert all(n == chapter for n, _ in numbers), f"{path.name}: exercise numbers {numbers} not of chapter {chapter}"
    assert [m for _, m in numbers] == list(range(1, len(numbers) + 1)), f"{path.name}: numbering {numbers}"
    solved = [(int(n), int(m)) for n, m, _ in DROPDOWN.findall(text)]
    assert solved == numbers, f"{path.name}: exercises {numbers} but solution dropdowns {solved}"
    for n, m, body in DROPDOWN.findall(text):  # a marked code block belongs to its own exercise's dropdown
        for marked in re.findall(r"<!-- exercise-solution: (\d+\.\d+) -->", body):
            assert marked == f"{n}.{m}", f"{path.name}: solution {n}.{m} holds the code marked {marked}"
    # every marked block sits inside a dropdown
    inside = sum(len(re.findall(r"<!-- exercise-solution:", body)) for _, _, body in DROPDOWN.findall(text))
    assert inside == text.count("<!-- exercise-solution:"), f"{path.name}: a marked solution outside a dropdown"


def test_every_chapter_links_the_notation_page():
    missing = [p.name for p in NOTEBOOKS if "](../book/notation.md)" not in exercises_text(p)]
    assert not missing, f"no link to the notation page in: {missing}"
    assert (ROOT / "book" / "notation.md").is_file()


def test_there_are_code_solutions():
    chapters = {name for name, _, _ in SOLUTIONS}
    assert len(chapters) == len(NOTEBOOKS), f"chapters without a code solution: {sorted(set(p.name for p in NOTEBOOKS) - chapters)}"


@pytest.mark.parametrize("name,number,code", SOLUTIONS, ids=[f"{n.split('_')[0]}-{num}" for n, num, _ in SOLUTIONS])
def test_code_solution_runs_and_checks_its_answer(name, number, code, monkeypatch):
    tree = ast.parse(code, filename=f"{name} solution {number}")
    assert any(isinstance(node, ast.Assert) for node in ast.walk(tree)), \
        f"{name} solution {number} has no assert: it could not fail when the library changes"
    monkeypatch.chdir(ROOT)
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    # one core, as a reader's budget is stated; on the shared 2-core machine torch's spinning thread pool
    # otherwise makes these small ops 10x slower whenever another job holds the other core
    torch.set_num_threads(1)
    torch.manual_seed(0)
    namespace: dict = {"__name__": "__exercise__"}
    try:
        exec(compile(tree, f"{name} solution {number}", "exec"), namespace)  # noqa: S102 - the book's own code
    finally:
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)
