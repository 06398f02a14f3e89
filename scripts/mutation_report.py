#!/usr/bin/env python3
"""Summarise a mutmut run (``make mutation``) per module: the mutation score and the mutants left.

Reads ``mutmut results --all true`` (run from the repository root, after ``mutmut run``) and
``tests/mutation_equivalent.txt`` (one mutant name per line, then ``#`` and why it cannot change what the
library does: such mutants are left out of the score). Writes ``_build/mutation/report.md``: per module,
mutants generated, killed (a test failed, or the mutant hung past mutmut's timeout), survived (every
selected test passed), with no test (no selected test calls the function), equivalent, not checked; and
the score = killed / (generated - equivalent - not checked). The survivors and the untested are listed.
"""
from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT = ROOT / "tests" / "mutation_equivalent.txt"
OUT = ROOT / "_build" / "mutation" / "report.md"
KILLED = {"killed", "timeout"}


def module_of(mutant: str) -> str:
    # moe_lib.routers.xǁTopKRouterǁforward__mutmut_3 -> moe_lib.routers; moe_lib.dispatch.x_make_plan__mutmut_1 -> ...
    return re.split(r"\.x(?:ǁ|_)", mutant, maxsplit=1)[0]


def equivalents() -> dict[str, str]:
    found = {}
    if EQUIVALENT.exists():
        for line in EQUIVALENT.read_text().splitlines():
            name, _, reason = line.partition("#")
            if name.strip():
                found[name.strip()] = reason.strip()
    return found


def main() -> int:
    mutmut = Path(sys.executable).parent / "mutmut"
    proc = subprocess.run([str(mutmut), "results", "--all", "true"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        print(proc.stderr, file=sys.stderr)
        return proc.returncode
    status = {}
    for line in proc.stdout.splitlines():
        name, _, state = line.strip().rpartition(": ")
        if name:
            status[name] = state
    eq = equivalents()
    unknown = sorted(set(eq) - set(status))
    per = defaultdict(Counter)
    for name, state in status.items():
        per[module_of(name)]["equivalent" if name in eq and state not in KILLED else state] += 1
    rows = ["| module | mutants | killed | survived | no test | equivalent | not checked | score |",
            "|---|---|---|---|---|---|---|---|"]
    total = Counter()
    for module in sorted(per):
        c = per[module]
        total.update(c)
        rows.append(_row(module, c))
    rows.append(_row("**all**", total))
    left = [f"- `{n}`: {s}" for n, s in sorted(status.items()) if s in ("survived", "no tests") and n not in eq]
    text = ("# Mutation testing of the core data path\n\n" + "\n".join(rows) +
            "\n\nScore = killed / (mutants - equivalent - not checked); a timeout counts as killed.\n\n"
            f"## Equivalent ({len(eq)})\n\n" + "\n".join(f"- `{n}`: {r}" for n, r in sorted(eq.items())) +
            f"\n\n## Left: survived or no test ({len(left)})\n\n" + "\n".join(left) + "\n")
    if unknown:
        text += "\n## Listed as equivalent but not generated (stale entries)\n\n" + "\n".join(unknown) + "\n"
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print("\n".join(rows))
    print(f"\n{len(left)} left (survived or no test); report: {OUT.relative_to(ROOT)}")
    return 0


def _row(module: str, c: Counter) -> str:
    killed = sum(c[k] for k in KILLED)
    n = sum(c.values())
    decided = n - c["equivalent"] - c["not checked"]
    score = f"{100 * killed / decided:.1f} %" if decided else "–"
    return (f"| {module} | {n} | {killed} | {c['survived']} | {c['no tests']} | {c['equivalent']} | "
            f"{c['not checked']} | {score} |")


if __name__ == "__main__":
    sys.exit(main())
