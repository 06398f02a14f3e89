#!/usr/bin/env python3
"""Run chapters at full scale (``quick = False``) exactly as the README tells a reader to, and log the time.

Each notebook is executed with papermill **from the repository root** (the working directory a reader
has when they type ``papermill notebooks/NN.ipynb out.ipynb -p quick False``), in the kernel the notebook
names (``moe-book``: one thread, the reproducible profile), with a wall-clock limit per chapter. The
executed copies go to ``_build/full_scale/`` (the committed notebooks are not touched); one JSON line per
run is appended to ``_build/full_scale/runs.jsonl`` with the chapter, the parameters, the outcome
(``ok`` / ``failed`` / ``timeout``), the wall time, the machine and the git commit. The README's table
"Full scale on a CPU" is written from that log.

Usage::

    python scripts/full_scale.py notebooks/01_what_is_moe.ipynb [...] [--timeout 1800] [-p name value ...]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "_build" / "full_scale"


def _commit() -> str | None:
    run = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return run.stdout.strip() or None


def run_one(notebook: Path, timeout: float, parameters: list[tuple[str, str]]) -> dict:
    from moe_lib.book.reproducibility import generated_on

    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / notebook.name
    params = [("quick", "False"), *parameters]
    cmd = [str(Path(sys.executable).parent / "papermill"), str(notebook.relative_to(ROOT)), str(out),
           "--no-progress-bar"]
    for name, value in params:
        cmd += ["-p", name, value]
    log = OUT / (notebook.stem + ".log")
    start = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            status = "ok" if proc.wait(timeout=timeout) == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # papermill and its kernel
            proc.wait()
            status = "timeout"
    record = {
        "notebook": notebook.relative_to(ROOT).as_posix(),
        "parameters": dict(params),
        "status": status,
        "wall_s": round(time.perf_counter() - start, 1),
        "timeout_s": timeout,
        "command": " ".join(cmd[1:]),
        "cwd": "repository root",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _commit(),
        "machine": {**generated_on(), "cores": os.cpu_count()},
    }
    with open(OUT / "runs.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per chapter (default %(default)s)")
    parser.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a further papermill parameter (quick is always False)")
    args = parser.parse_args(argv)
    failed = 0
    for nb in args.notebooks:
        record = run_one(nb.resolve(), args.timeout, [tuple(p) for p in args.p])
        print(f"{record['notebook']}: {record['status']} in {record['wall_s']:.0f} s", flush=True)
        failed += record["status"] != "ok"
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
