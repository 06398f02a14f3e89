"""Chapters run from any working directory and on the device a reader names (or stop at once saying why).

* A static check over every chapter's code: no path relative to the working directory (``"../..."``,
  ``"benchmarks/..."``, ``Path.cwd()``, ``open("file")``...) — committed files are found through
  ``moe_lib.utils.book_file`` / ``book_root`` — and no model or tensor moved to ``device`` except through
  ``moe_lib.to_device``; the cell after ``parameters`` resolves the device first.
* The check itself is tested on the code it must reject (chapter 13's anchor path before the fix).
* ``device="cuda"`` on a machine without CUDA (``"cuda:99"`` on one with CUDA) stops every chapter in the
  cell after ``parameters`` with :class:`moe_lib.utils.DeviceUnavailableError`.
* ``book_root`` / ``book_file`` themselves: found from anywhere, overridable, errors that name the file.

The papermill runs from the repository root and from elsewhere are in ``test_papermill.py``.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch

from moe_lib.utils import (BOOK_ROOT_ENV, DeviceUnavailableError, book_file, book_root, resolve_device,
                           to_device)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from toc_notebooks import toc_notebooks  # noqa: E402

NOTEBOOKS = toc_notebooks()
TOP_LEVEL = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith("."))
READERS = {"open", "Path", "PurePath", "load", "loadtxt", "genfromtxt", "read_csv", "read_json", "read_parquet",
           "read_pickle", "imread", "fromfile"}
CWD_CALLS = {("Path", "cwd"), ("os", "getcwd"), ("os", "chdir"), ("pathlib.Path", "cwd")}
RESOLVE_LINE = "device = resolve_device(device)"


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def cwd_relative_paths(source: str) -> list[str]:
    """What in ``source`` (one cell's Python) depends on the working directory; empty when nothing does."""
    code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
    problems = []
    tree = ast.parse(code)
    # pieces of f-strings: only their beginning can make a path (f"{a}..{b}" is text, f"../{x}" a path)
    inner = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values[1:]}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in inner:
            s = node.value
            if s == ".." or s.startswith(("../", "./")) or "/../" in s:
                problems.append(f"relative path {s!r}")
            elif any(s.startswith(f"{d}/") for d in TOP_LEVEL):
                problems.append(f"path from the repository root {s!r} (use moe_lib.utils.book_file)")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            head, _, attr = name.rpartition(".")
            if (head, attr) in CWD_CALLS or (head.endswith("Path") and attr == "cwd"):
                problems.append(f"{name}()")
            elif (attr or name) in READERS and node.args:
                first = node.args[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str) and not first.value.startswith("/"):
                    problems.append(f"{name}({first.value!r}) reads from the working directory")
    return problems


def device_moves(source: str) -> list[str]:
    """``x.to(device...)`` or ``.cuda()`` in ``source``: moves that bypass ``to_device``."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "cuda":
                problems.append(".cuda()")
            elif node.func.attr == "to" and any(isinstance(a, ast.Name) and a.id == "device"
                                                 for a in [*node.args, *(k.value for k in node.keywords)]):
                problems.append(f"{_dotted(node.func.value) or '...'}.to(device)")
    return problems


def _code_cells(path: Path) -> list:
    """The chapter's code cells, without the data-path banner (a ``remove-input`` cell drawing
    ``data_path_figure`` at the top of the page: it reads no parameter and touches no device)."""
    return [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code" and not (
        "data_path_figure(" in c.source and "remove-input" in c.metadata.get("tags", []))]


def _ids(paths):
    return [p.stem for p in paths]


# ------------------------------------------------------------------------------------ the static check
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_no_working_directory_paths_and_one_way_to_move_to_device(path):
    found = [f"cell {i}: {p}" for i, c in enumerate(_code_cells(path))
             for p in cwd_relative_paths(c.source) + device_moves(c.source)]
    assert not found, f"{path.name}: " + "; ".join(found)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_device_is_resolved_right_after_the_parameters(path):
    cells = _code_cells(path)
    assert "parameters" in cells[0].metadata.get("tags", []), f"{path.name}: the first code cell is not `parameters`"
    assert RESOLVE_LINE in cells[1].source, f"{path.name}: the cell after `parameters` must run `{RESOLVE_LINE}`"


@pytest.mark.parametrize("snippet, expected", [
    ('anchor_path = os.path.join("..", "benchmarks", "anchors", "h200.json")\nwith open(anchor_path) as f:\n  x = 1',
     "relative path '..'"),
    ('frame = R.load_all(Path.cwd())', "Path.cwd()"),
    ('data = json.loads(open("results.json").read())', "open('results.json')"),
    ('df = pd.read_csv("../benchmarks/x.csv")', "relative path"),
    ('p = "benchmarks/anchors/h200.json"', "path from the repository root"),
    ('os.chdir(somewhere)', "os.chdir()"),
    ('p = Path(f"../benchmarks/{name}")', "relative path"),
])
def test_the_static_check_rejects_working_directory_paths(snippet, expected):
    assert any(expected in p for p in cwd_relative_paths(snippet)), cwd_relative_paths(snippet)


@pytest.mark.parametrize("snippet", [
    'out = os.path.join(tempfile.mkdtemp(), "ep_result.json")',
    'anchor = load_anchor("h200_2026-11-28.json")',
    'path = book_file("benchmarks", "anchors", "h200_2026-11-28.json")',
    'live = json.loads(out.read_text())',
    'print("a/b ratio", 3)',
    'label = f"{a}..{b - 1}"',
])
def test_the_static_check_accepts_what_does_not_depend_on_the_working_directory(snippet):
    assert cwd_relative_paths(snippet) == []


@pytest.mark.parametrize("snippet, expected", [
    ("model = make().to(device)", "....to(device)"),
    ("x = x.to(device, dtype)", "x.to(device)"),
    ("y = y.to(dtype=torch.float16, device=device)", "y.to(device)"),
    ("m = model.cuda()", ".cuda()"),
])
def test_the_static_check_rejects_device_moves_outside_to_device(snippet, expected):
    assert any(expected in p for p in device_moves(snippet)), device_moves(snippet)


def test_the_static_check_accepts_to_device_and_dtype_casts():
    assert device_moves("model = to_device(make(), device)\nx = x.to(torch.float64)") == []


# --------------------------------------------------------------------- -p device cuda without CUDA
_STOP_PROBE = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
from moe_lib.utils import DeviceUnavailableError
cases = json.load(sys.stdin)
report = {}
for name, (params, override, setup) in cases.items():
    ns = {}
    exec(compile(params, name + ":parameters", "exec"), ns)
    exec(compile(override, name + ":injected-parameters", "exec"), ns)
    try:
        exec(compile(setup, name + ":setup", "exec"), ns)
        report[name] = "ran"
    except DeviceUnavailableError as exc:
        report[name] = "stopped: " + str(exc)
    except Exception as exc:
        report[name] = f"other error: {type(exc).__name__}: {exc}"
print(json.dumps(report))
"""


def test_a_missing_device_stops_every_chapter_in_its_setup_cell():
    # The parameters cell, papermill's injected `device = ...`, then the setup cell, for every chapter in
    # one process: each must stop at `resolve_device` (before any experiment), with the reason.
    missing = "cuda:99" if torch.cuda.is_available() else "cuda"
    cases = {}
    for path in NOTEBOOKS:
        cells = _code_cells(path)
        setup = cells[1].source.split(RESOLVE_LINE)[0] + RESOLVE_LINE  # stop after the check: no experiment
        cases[path.stem] = (cells[0].source, f"device = {missing!r}", setup)
    proc = subprocess.run([sys.executable, "-c", _STOP_PROBE], input=json.dumps(cases), capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    wrong = {k: v for k, v in report.items() if not v.startswith("stopped: ")}
    assert not wrong, wrong
    assert all(f"device={missing!r}" in v for v in report.values())


# ---------------------------------------------------------------------------- the helpers themselves
def test_resolve_device_accepts_cpu_and_names_the_accepted_values():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device(torch.device("cpu")) == "cpu"
    for bad in ("gpu", "cuda:x", "cpu:0", ""):
        with pytest.raises(ValueError, match=r"unknown device .*accepted values: 'cpu', 'cuda', 'cuda:<index>'"):
            resolve_device(bad)
    with pytest.raises(TypeError, match="device must be"):
        resolve_device(0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_resolve_device_without_cuda_says_what_to_pass_instead():
    with pytest.raises(DeviceUnavailableError, match=r"no usable CUDA GPU.*-p device cpu"):
        resolve_device("cuda")


def test_to_device_moves_containers_and_casts_only_floating_tensors():
    from dataclasses import dataclass
    from typing import NamedTuple

    @dataclass
    class Split:
        train: torch.Tensor
        n: int

    class Pair(NamedTuple):
        a: torch.Tensor
        b: torch.Tensor

    tokens, x = torch.arange(3), torch.ones(2, dtype=torch.float32)
    moved = to_device({"split": Split(tokens, 3), "pair": Pair(x, tokens), "list": [x]}, "cpu", torch.float64)
    assert moved["split"].train.dtype == torch.int64 and moved["split"].n == 3
    assert isinstance(moved["pair"], Pair) and moved["pair"].a.dtype == torch.float64
    assert moved["pair"].b.dtype == torch.int64 and moved["list"][0].dtype == torch.float64
    layer = torch.nn.Linear(2, 2)
    assert to_device(layer, "cpu", torch.float64) is layer and layer.weight.dtype == torch.float64
    with pytest.raises(TypeError, match="dtype must be a floating-point"):
        to_device(x, "cpu", torch.int64)
    with pytest.raises(ValueError, match="unknown device"):
        to_device(x, "gpu")


def test_book_root_is_found_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv(BOOK_ROOT_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert book_root() == ROOT
    assert book_file("benchmarks", "anchors", "h200_2026-11-28.json").is_file()


def test_book_root_override_and_errors_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv(BOOK_ROOT_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"{BOOK_ROOT_ENV}=.* is not a checkout"):
        book_root()
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "_toc.yml").write_text("root: x\n")
    assert book_root() == tmp_path
    with pytest.raises(FileNotFoundError, match="benchmarks/anchors/missing.json is not in the book's checkout"):
        book_file("benchmarks", "anchors", "missing.json")
    for bad in (("..", "etc"), ("/etc/passwd",), ()):
        with pytest.raises(ValueError, match="parts must"):
            book_file(*bad)


def test_load_anchor_reads_the_same_file_from_anywhere(tmp_path, monkeypatch):
    from moe_lib.book.serving import load_anchor

    monkeypatch.delenv(BOOK_ROOT_ENV, raising=False)
    expected = json.loads((ROOT / "benchmarks" / "anchors" / "h200_2026-11-28.json").read_text())
    for where in (ROOT, ROOT / "notebooks", tmp_path):
        monkeypatch.chdir(where)
        assert load_anchor("h200_2026-11-28.json") == expected
    assert os.environ.get(BOOK_ROOT_ENV) is None
