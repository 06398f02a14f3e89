"""The package's shape (issue 16, item 4): ``import moe_lib`` loads the core data path only — router,
dispatch, backends, experts, layer, losses, metrics, training — and the chapter-support subpackages load on
first use, with the same names as before."""
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


def test_lazy_subpackages_and_unknown_names():
    from moe_lib import tasks

    assert moe_lib.tasks is tasks and moe_lib.distributed.__name__ == "moe_lib.distributed"
    for name in moe_lib._LAZY_MODULES:
        assert name in dir(moe_lib)
    with pytest.raises(AttributeError, match="module 'moe_lib' has no attribute 'no_such_part'"):
        moe_lib.no_such_part  # noqa: B018
