"""The package's shape (issue 16, item 4): ``import moe_lib`` loads the core data path only — router,
dispatch, backends, experts, layer, losses, metrics, training — and the library subpackages load on first
use. What the chapters use to teach lives in :mod:`moe_lib.book` (lazy too), under one name each: the old
top-level modules are gone, with no alias."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import moe_lib

CORE = {"moe_lib", "moe_lib._validate", "moe_lib.backends", "moe_lib.dispatch", "moe_lib.experts", "moe_lib.layer",
        "moe_lib.losses", "moe_lib.metrics", "moe_lib.routers", "moe_lib.stats", "moe_lib.training", "moe_lib.utils"}


def test_import_loads_the_core_only():
    code = ("import sys, json, torch; before = {m for m in sys.modules if m.startswith('torch.distributed')}; "
            "import moe_lib; print(json.dumps([sorted(m for m in sys.modules if m.startswith('moe_lib')), "
            "sorted({m for m in sys.modules if m.startswith('torch.distributed')} - before)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded, distributed_added = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(loaded) == CORE
    assert distributed_added == []  # moe_lib itself starts nothing of torch.distributed


@pytest.mark.parametrize("name, module", [("ExpertParallelMoE", "moe_lib.distributed.layer"),
                                          ("from_transformers", "moe_lib.interop.hf"),
                                          ("patch_transformers", "moe_lib.interop.patch")])
def test_lazy_names_resolve_to_their_subpackage(name, module):
    assert getattr(moe_lib, name).__module__ == module
    assert name in dir(moe_lib) and name in moe_lib.__all__


#: The chapter-support modules that were top-level before issue 16 and now live in moe_lib.book.
BOOK_MODULES = ("business", "corpus", "data", "full_scale", "grouping", "plot", "reproducibility", "serving", "tasks")


def test_lazy_subpackages_and_unknown_names():
    from moe_lib.book import tasks

    assert moe_lib.book.tasks is tasks and moe_lib.distributed.__name__ == "moe_lib.distributed"
    for name in moe_lib._LAZY_MODULES:
        assert name in dir(moe_lib)
    with pytest.raises(AttributeError, match="module 'moe_lib' has no attribute 'no_such_part'"):
        moe_lib.no_such_part  # noqa: B018


def test_chapter_support_lives_in_book_only():
    """Each of the nine chapter-support modules has one name, ``moe_lib.book.<name>``: none is left at the
    top level (not as a file, a lazy name, an attribute or an entry of ``__all__``), and ``import
    moe_lib.book`` imports none of them (its ``__init__`` only describes them)."""
    import importlib
    import importlib.util

    for name in BOOK_MODULES:
        assert importlib.util.find_spec(f"moe_lib.book.{name}") is not None, name
        assert importlib.util.find_spec(f"moe_lib.{name}") is None, f"moe_lib.{name} still exists"
        assert name not in moe_lib._LAZY_MODULES and name not in moe_lib.__all__ and name not in dir(moe_lib)
        with pytest.raises(AttributeError, match=f"module 'moe_lib' has no attribute '{name}'"):
            getattr(moe_lib, name)
    assert "book" in moe_lib._LAZY_MODULES and "book" in moe_lib.__all__
    code = ("import sys, json, moe_lib; core = set(sys.modules); import moe_lib.book; "
            "print(json.dumps(sorted(m for m in set(sys.modules) - core if m.startswith('moe_lib'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["moe_lib.book"]


@pytest.mark.parametrize("module, names", [("moe_lib.dispatch", ("max_tiles", "tile_schedule")),
                                           ("moe_lib.routers", ("zipf_popularity", "synthetic_routing")),
                                           ("moe_lib.bench.timing", ("wall_time", "wall_times", "median_iqr"))])
def test_library_primitives_are_defined_in_the_library(module, names):
    """The primitives chapter 11's cost models used to hold are defined once, in the library; the cost
    models (moe_lib.book.grouping) keep no copy and no alias of them (it imports only max_tiles, to use)."""
    import importlib

    grouping = importlib.import_module("moe_lib.book.grouping")
    for name in names:
        assert getattr(importlib.import_module(module), name).__module__ == module
        assert name not in grouping.__dict__ or name == "max_tiles"


#: The library's imports of moe_lib.book, each with why it is there; anything else is a layering error.
BOOK_IMPORTS_ALLOWED = {
    ("moe_lib/bench/roofline.py", "grouping"): "the roofline plots chapter 11's tile statistics",
    ("moe_lib/bench/roofline.py", "serving"): "the decode roofline uses chapter 14's experts-touched formula",
    ("moe_lib/classic/em.py", "data"): "chapter 3's experiment loads its robot-arm data set",
    ("moe_lib/models/analysis.py", "plot"): "chapter 9's routed-text figure uses the book's expert colours",
    ("moe_lib/practice/merge.py", "tasks"): "merging task models merges the multi-domain task's models",
}


def test_the_library_imports_the_book_only_where_listed():
    """The core and the library subpackages do not depend on ``moe_lib.book`` except in the listed places (the
    core: nowhere); a new dependency on the book's support code has to be added here with its reason."""
    import re
    from pathlib import Path

    root = Path(moe_lib.__file__).parent
    pattern = re.compile(r"^\s*from\s+(?:moe_lib|\.\.?)\.?book\.(\w+)\s+import|^\s*from\s+(?:moe_lib|\.\.?)\.?book\s+"
                         r"import\s+(\w+)|^\s*import\s+moe_lib\.book\.(\w+)", re.M)
    found = set()
    for path in root.rglob("*.py"):
        rel = path.relative_to(root.parent).as_posix()
        if rel.startswith("moe_lib/book/"):
            continue
        for match in pattern.finditer(path.read_text()):
            found.add((rel, next(g for g in match.groups() if g)))
    assert found == set(BOOK_IMPORTS_ALLOWED), (sorted(found - set(BOOK_IMPORTS_ALLOWED)),
                                                sorted(set(BOOK_IMPORTS_ALLOWED) - found))
    core = {m.removeprefix("moe_lib.").replace(".", "/") + ".py" for m in CORE if m != "moe_lib"}
    assert not any(rel.removeprefix("moe_lib/") in core for rel, _ in found)
