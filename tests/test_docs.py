"""The examples readers copy must run: docstring examples and the Python blocks of the prose pages."""
import doctest
import re
from pathlib import Path

import pytest

import moe_lib
from moe_lib import layer

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "book" / "library.md"]


def test_docstring_examples():
    failures, tried = doctest.testmod(layer, globs={"torch": __import__("torch"), "MoELayer": moe_lib.MoELayer})
    assert tried > 0 and failures == 0


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_blocks_in_pages_run(page):
    blocks = python_blocks(page)
    assert blocks, f"{page} has no ```python block to check"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(page), "exec"), namespace)  # noqa: S102 - our own documentation
