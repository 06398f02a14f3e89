"""Papermill smoke tests of the book's notebooks (``make test-papermill``, step (c) of ``make test``).

Every chapter can be re-run with other parameters, which is how it scales to a GPU::

    papermill notebooks/01_what_is_moe.ipynb out.ipynb -p quick False -p device cuda

so every notebook listed in ``_toc.yml`` must have exactly one code cell tagged ``parameters`` that
defines at least ``quick``, ``device`` and ``seed``, papermill must be able to inject new values after
it, and chapter 1 must run end to end with non-default values.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
import pytest

from moe_lib.book.reproducibility import KERNEL_NAME, OUTPUTS_METADATA_KEY, outputs_vendor

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from toc_notebooks import toc_notebooks  # noqa: E402

pytestmark = pytest.mark.notebooks

# papermill launches the kernel by name: take this environment's python3 kernelspec.
os.environ.setdefault("JUPYTER_PREFER_ENV_PATH", "1")

NOTEBOOKS = toc_notebooks()
CHAPTER_1 = ROOT / "notebooks" / "01_what_is_moe.ipynb"
REQUIRED_PARAMETERS = ("quick", "device", "seed")
KERNEL = KERNEL_NAME  # the reproducible CPU profile (moe_lib.book.reproducibility), as every other executor
TIMEOUT_S = 300


def _ids(paths):
    return [p.relative_to(ROOT).as_posix() for p in paths]


def _tagged(nb, tag):
    return [c for c in nb.cells if c.cell_type == "code" and tag in c.get("metadata", {}).get("tags", [])]


def test_toc_lists_chapter_1():
    assert CHAPTER_1 in NOTEBOOKS, "_toc.yml must list notebooks/01_what_is_moe"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_exactly_one_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    cells = _tagged(nb, "parameters")
    assert len(cells) == 1, f"{path.name}: {len(cells)} code cells tagged `parameters`, expected exactly 1"
    assert not _tagged(nb, "injected-parameters"), f"{path.name}: committed with a papermill-injected cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_runs_in_the_reproducible_kernel(path):
    # Jupyter (a reader's JupyterLab, myst-nb) starts the kernel a notebook names: it must be the profile's.
    nb = nbformat.read(path, as_version=4)
    name = nb.metadata.get("kernelspec", {}).get("name")
    assert name == KERNEL_NAME, f"{path.name}: kernelspec {name!r}, expected {KERNEL_NAME!r} (run `make notebooks`)"


def test_stored_outputs_come_from_one_cpu_vendor():
    # strict nbval compares the outputs only on a CPU of the vendor that computed them: every notebook
    # records it (scripts/execute_notebooks.py), and one vendor computed them all
    missing = [p.name for p in NOTEBOOKS
               if not nbformat.read(p, as_version=4).metadata.get(OUTPUTS_METADATA_KEY, {}).get("cpu_vendor")]
    assert not missing, f"{missing}: no recorded CPU vendor (run `make notebooks`)"
    assert outputs_vendor(NOTEBOOKS) is not None  # raises if the vendors differ


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_papermill_injects_parameters(path, tmp_path):
    import papermill

    declared = papermill.inspect_notebook(str(path))
    missing = [name for name in REQUIRED_PARAMETERS if name not in declared]
    assert not missing, f"{path.name}: the `parameters` cell does not define {missing}"

    out = tmp_path / path.name
    papermill.execute_notebook(
        str(path),
        str(out),
        parameters={"quick": True, "device": "cpu", "seed": 12345},
        prepare_only=True,
        kernel_name=KERNEL,
        progress_bar=False,
    )
    nb = nbformat.read(out, as_version=4)
    injected = _tagged(nb, "injected-parameters")
    assert len(injected) == 1, f"{path.name}: papermill injected {len(injected)} cells"
    index = nb.cells.index(injected[0])
    assert "parameters" in nb.cells[index - 1].metadata.get("tags", []), "injected cell must follow `parameters`"
    assert "seed = 12345" in injected[0].source


def test_chapter_1_runs_with_other_parameters(tmp_path):
    import papermill

    parameters = {"seed": 1, "steps": 300, "n_train": 256}
    declared = papermill.inspect_notebook(str(CHAPTER_1))
    assert set(parameters) <= set(declared), f"chapter 1 does not declare {set(parameters) - set(declared)}"

    out = tmp_path / CHAPTER_1.name
    papermill.execute_notebook(
        str(CHAPTER_1),
        str(out),
        parameters=parameters,
        cwd=str(CHAPTER_1.parent),
        kernel_name=KERNEL,
        execution_timeout=TIMEOUT_S,
        progress_bar=False,
    )
    nb = nbformat.read(out, as_version=4)
    injected = _tagged(nb, "injected-parameters")
    assert len(injected) == 1
    for name, value in parameters.items():
        assert f"{name} = {value!r}" in injected[0].source
    errors = [
        (i, o.get("ename"), o.get("evalue"))
        for i, c in enumerate(nb.cells)
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors, f"error outputs: {errors}"
    unexecuted = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.source.strip()
                  and c.get("execution_count") is None]
    assert not unexecuted, f"cells not executed: {unexecuted}"


# ------------------------------------------------------------------ from the repository root, as typed
# the library's readers of committed files, and any direct read (a broad net: a false hit costs one run)
FILE_READERS = ("load_anchor(", "load_all(", "book_file(", "book_root(", "open(", "json.load(", "read_text(",
                "read_csv(", "np.load(", "torch.load(")


def _reads_committed_files(path: Path) -> bool:
    return any(r in c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"
               for r in FILE_READERS)


READING = [p for p in NOTEBOOKS if _reads_committed_files(p)]


def test_chapters_that_read_committed_files_are_found():
    # the H200 chapters read benchmarks/; if this list empties, the detection above is broken
    names = {p.stem[:2] for p in READING}
    assert {"12", "13", "14", "18"} <= names, names


def _run_as_typed(path: Path, cwd: Path, out: Path, parameters: dict | None = None) -> None:
    # papermill's command line, in `cwd`, the notebook named by a path relative to it when it can be
    import subprocess

    try:
        src = os.path.relpath(path, cwd)
    except ValueError:
        src = str(path)
    cmd = [str(Path(sys.executable).parent / "papermill"), src, str(out), "--no-progress-bar"]
    for name, value in (parameters or {}).items():
        cmd += ["-p", name, str(value)]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{' '.join(cmd)} (in {cwd}) failed:\n{proc.stderr[-4000:]}"


@pytest.mark.parametrize("path", READING, ids=_ids(READING))
def test_runs_from_the_repository_root(path, tmp_path):
    # the README's command, typed at the root: `papermill notebooks/NN.ipynb out.ipynb`; the chapter finds
    # benchmarks/ through moe_lib.utils.book_file, not through its working directory
    _run_as_typed(path, ROOT, tmp_path / "out.ipynb")


def test_runs_from_any_other_folder(tmp_path):
    # nothing about the working directory matters: chapter 18 (the cost calculator: it reads the H200
    # anchor) run from an empty folder outside the checkout
    path = next(p for p in READING if p.stem.startswith("18"))
    _run_as_typed(path, tmp_path, tmp_path / "out.ipynb")
