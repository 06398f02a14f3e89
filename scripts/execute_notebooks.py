#!/usr/bin/env python3
"""Re-execute notebooks IN PLACE so that their stored outputs are fresh (``make notebooks``).

The book is built from the outputs stored in the notebooks, and ``make test`` (nbval) compares a fresh
run against them, so authors run this after changing a notebook or ``moe_lib``. Each notebook runs
top to bottom with nbclient in its own folder (the working directory is the notebook's folder), on the
``moe-book`` kernel (the reproducible CPU profile of ``moe_lib/book/reproducibility.py``, installed into
``.venv`` by ``make install``; the notebook's kernelspec metadata is set to it), with a timeout of 300 s
per cell. Cell metadata (tags such as ``parameters`` or ``nbval-ignore-output``) is
kept; the notebook's metadata records the CPU the outputs were computed on (``moe_book.cpu_vendor``: strict
nbval compares them only on a CPU of that vendor). A notebook whose execution fails is left untouched on
disk and the script exits non-zero.

Usage::

    python scripts/execute_notebooks.py                 # every notebook listed in _toc.yml
    python scripts/execute_notebooks.py notebooks/01_what_is_moe.ipynb [...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# Prefer the kernelspec of this environment (.venv) over one in the user's ~/.local/share/jupyter.
os.environ.setdefault("JUPYTER_PREFER_ENV_PATH", "1")

import nbformat  # noqa: E402
from nbclient import NotebookClient  # noqa: E402
from nbclient.exceptions import CellExecutionError  # noqa: E402

from moe_lib.book.reproducibility import (  # noqa: E402
    KERNEL_DISPLAY_NAME,
    KERNEL_NAME,
    OUTPUTS_METADATA_KEY,
    generated_on,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toc_notebooks import TocError, toc_notebooks  # noqa: E402

TIMEOUT_S = 300
KERNEL = KERNEL_NAME


def execute_in_place(path: Path, timeout: int = TIMEOUT_S, kernel_name: str = KERNEL) -> float:
    """Execute the notebook at ``path`` and overwrite it with the outputs; return the wall time in s."""
    nb = nbformat.read(path, as_version=4)
    nb.metadata["kernelspec"] = {"name": kernel_name, "display_name": KERNEL_DISPLAY_NAME, "language": "python"}
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name=kernel_name,
        allow_errors=False,
        record_timing=False,  # no per-cell timestamps in the committed file
        resources={"metadata": {"path": str(path.parent)}},  # cwd = the notebook's folder
    )
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    # The CPU vendor that computed these outputs: the reproducibility contract compares them only on a
    # machine of the same vendor (moe_lib.book.reproducibility.contract).
    nb.metadata[OUTPUTS_METADATA_KEY] = generated_on()
    nbformat.validate(nb)
    nbformat.write(nb, path)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", help="notebooks to execute (default: every notebook in _toc.yml)")
    parser.add_argument("--timeout", type=int, default=TIMEOUT_S, help="seconds per cell (default: %(default)s)")
    args = parser.parse_args(argv)

    try:
        paths = [Path(p).resolve() for p in args.notebooks] or toc_notebooks()
    except TocError as e:
        print(f"execute_notebooks: error: {e}", file=sys.stderr)
        return 1
    missing = [p for p in paths if not p.is_file()]
    if missing:
        print(f"execute_notebooks: error: no such notebook: {', '.join(map(str, missing))}", file=sys.stderr)
        return 1

    failed = []
    for path in paths:
        name = os.path.relpath(path)
        print(f"executing {name} ...", flush=True)
        try:
            elapsed = execute_in_place(path, timeout=args.timeout)
        except CellExecutionError as e:
            print(f"FAILED {name} (left unchanged on disk):\n{e}", file=sys.stderr, flush=True)
            failed.append(name)
            continue
        except Exception as e:  # noqa: BLE001  (timeouts, dead kernels: report them all, then fail)
            print(f"FAILED {name} (left unchanged on disk): {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            failed.append(name)
            continue
        print(f"  wrote {name} in {elapsed:.1f} s", flush=True)

    if failed:
        print(f"execute_notebooks: {len(failed)} notebook(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"execute_notebooks: {len(paths)} notebook(s) executed in place")
    return 0


if __name__ == "__main__":
    sys.exit(main())
