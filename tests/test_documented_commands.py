"""Every command the README and the book's introduction show is executed here, as typed, from the root.

The commands are read from the pages themselves (fenced ``bash``/``python`` blocks and inline code that
starts with ``make``, ``python``, ``papermill``, ``pip`` or ``.venv/bin/``), so a command added to a page
without a way to check it fails :func:`test_every_documented_command_is_checked`. How each kind is run:

* ``make install`` / bare ``make``: run (a no-op once installed). Targets that rebuild or test everything,
  or delete things (``book``, ``test``, ``test-*``, ``notebooks``, ``clean``, ``distclean``,
  ``constraints``, ``mutation``, ``pdf``, ``dist``), run as ``make -n`` — the target exists and its recipe expands with the variables shown
  (``make book`` and ``make test`` themselves are what CI runs).
* ``python -m ...``: run; ``python -m moe_lib.bench`` on a CPU must refuse the production shapes with its
  message, ``--smoke`` is covered by ``tests/test_bench.py``; ``python -m moe_lib.book.full_scale chNN`` runs
  with ``--quick --out <a temporary folder>`` (a real run takes up to an hour and writes a committed file).
* ``papermill notebooks/01... -p quick False -p device cuda``: run as typed; without CUDA it must stop in
  the chapter's setup cell, saying why, in seconds.
* ``pip install``: ``--dry-run`` (resolved against the index this machine installs from, nothing changed).
* ``jupyter lab <notebook>``: the notebook exists and the kernel it names is installed (JupyterLab itself is
  the reader's install).
* Python blocks: run in a fresh interpreter from the root.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md", "book/intro.md"]
VENV_BIN = Path(sys.executable).parent
DRY_RUN_TARGETS = {"book", "test", "notebooks", "clean", "distclean", "constraints", "mutation", "pdf", "dist"}
INLINE_PREFIXES = ("make", "python -m", "python3 -m", "papermill", "pip ", ".venv/bin/")


def documented() -> list[tuple[str, str, str]]:
    """``(page, kind, text)`` for every command shown: kind ``"shell"`` (one line) or ``"python"`` (a block)."""
    found = []
    for page in PAGES:
        text = (ROOT / page).read_text()
        for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
            if lang == "python":
                found.append((page, "python", body))
            elif lang in ("bash", "sh", "shell"):
                for line in body.splitlines():
                    line = line.split("#")[0].strip()
                    if line:
                        found.append((page, "shell", line))
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        for span in re.findall(r"`([^`\n]+)`", prose):
            if span.startswith(INLINE_PREFIXES) and span not in ("make", "python3"):
                found.append((page, "shell", span))
    unique = []
    for item in found:
        if item not in unique:
            unique.append(item)
    return unique


COMMANDS = documented()


def _run(cmd: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kw)


def _venv(words: list[str]) -> list[str]:
    # `.venv/bin/x` and a bare `python`, `pip` or `papermill` mean the environment `make` installs
    head = words[0].removeprefix(".venv/bin/")
    if head in ("python", "python3"):
        return [sys.executable, *words[1:]]
    return [str(VENV_BIN / head), *words[1:]]


def check_make(words: list[str]) -> str:
    targets = [w for w in words[1:] if "=" not in w]
    if not targets or targets == ["install"]:
        proc = _run(words, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return "ran"
    assert all(t in DRY_RUN_TARGETS or t.startswith("test-") or t == "test" for t in targets), targets
    proc = _run(["make", "-n", *words[1:]])
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-2000:]
    return "dry-run"


def check_papermill(words: list[str], tmp_path: Path) -> str:
    if torch.cuda.is_available() and "cuda" in words:
        pytest.skip("the full-scale CUDA run is the GPU session's job, not a unit test's")
    out = words[2]
    assert not (ROOT / out).exists(), f"{out} exists at the root: the command as typed would overwrite it"
    try:
        proc = _run(_venv(words), timeout=300)
    finally:
        (ROOT / out).unlink(missing_ok=True)
    if "cuda" in words:
        assert proc.returncode != 0, "-p device cuda ran on a machine without CUDA"
        assert "DeviceUnavailableError" in proc.stderr and "no usable CUDA GPU" in proc.stderr, proc.stderr[-3000:]
        return "stopped in the setup cell, saying why"
    assert proc.returncode == 0, proc.stderr[-3000:]
    return "ran"


def check_python_module(words: list[str], tmp_path: Path) -> str:
    module = words[words.index("-m") + 1]
    if module == "moe_lib.book.full_scale" and "--list" not in words:
        # A full-scale run takes up to an hour and writes into the committed full_scale/: here the same
        # command runs the experiment at its quick size into a temporary folder, and must write one file.
        proc = _run(_venv([*words, "--quick", "--out", str(tmp_path)]), timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert len(list(tmp_path.glob("*.json"))) == 1, list(tmp_path.iterdir())
        return "ran at its quick size into a temporary folder"
    if module == "moe_lib.bench" and len(words) == 3 and not torch.cuda.is_available():
        proc = _run(_venv(words))
        assert proc.returncode == 2 and "on the CPU use --smoke" in proc.stderr, proc.stderr[-2000:]
        return "refused the GPU shapes on a CPU, naming --smoke"
    proc = _run(_venv(words), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return "ran"


def check_pip(words: list[str]) -> str:
    i = words.index("install")
    proc = _run(_venv(["python", "-m", "pip", *words[i:i + 1], "--dry-run", *words[i + 1:]]), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Would install" in proc.stdout or "already satisfied" in proc.stdout, proc.stdout[-2000:]
    return "pip --dry-run"


def check_jupyter_lab(words: list[str]) -> str:
    notebook = ROOT / words[2]
    kernel = nbformat.read(notebook, as_version=4).metadata["kernelspec"]["name"]
    proc = _run([str(VENV_BIN / "jupyter"), "kernelspec", "list"], env={"JUPYTER_PREFER_ENV_PATH": "1",
                                                                       "PATH": str(VENV_BIN)})
    assert proc.returncode == 0 and kernel in proc.stdout.split(), proc.stdout
    return f"notebook found; its kernel {kernel!r} is installed"


def check_shell(line: str, tmp_path: Path) -> str:
    words = shlex.split(line)
    head = words[0].removeprefix(".venv/bin/")
    if head == "make":
        return check_make(words)
    if head == "papermill":
        return check_papermill(words, tmp_path)
    if head in ("python", "python3") and "-m" in words:
        module = words[words.index("-m") + 1]
        if module == "pip":
            return check_pip(words)
        return check_python_module(words, tmp_path)
    if head == "pip":
        return check_pip(words)
    if head == "jupyter" and words[1:2] == ["lab"]:
        return check_jupyter_lab(words)
    raise AssertionError(f"no check for the documented command {line!r}: add one to {Path(__file__).name}")


def test_every_documented_command_is_checked():
    assert len(COMMANDS) >= 10, COMMANDS  # the pages hold at least this many: the extraction works
    kinds = {shlex.split(text)[0].removeprefix(".venv/bin/") for _, kind, text in COMMANDS if kind == "shell"}
    assert kinds <= {"make", "papermill", "python", "python3", "pip", "jupyter"}, kinds
    assert any(kind == "python" for _, kind, _ in COMMANDS), "the README's library example was not found"


@pytest.mark.parametrize("page, kind, text", COMMANDS, ids=[f"{p}: {t.splitlines()[0][:60]}" for p, _, t in COMMANDS])
def test_documented_command_runs_as_typed(page, kind, text, tmp_path):
    if kind == "python":
        proc = _run([sys.executable, "-c", text])
        assert proc.returncode == 0, f"{page}'s example failed:\n{proc.stderr[-3000:]}"
    else:
        check_shell(text, tmp_path)
