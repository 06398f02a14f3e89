"""Portability of the stored outputs (``make test-portability``, after strict nbval in ``make test``).

Strict nbval proves that *this* machine reproduces the stored outputs. A contributor's laptop differs in
what the libraries pick: ATen's instruction-set level (AVX2 or AVX-512), MKL's code path (and vendor),
oneDNN's and NumPy's instruction sets, the number of cores, a shell that sets ``OMP_NUM_THREADS``. This
test plays such machines: it re-executes the book's most sensitive training chapters, one from each part,
with the environment and the CPU affinity another machine or shell would give them, and requires the
stored outputs, compared exactly as strict nbval compares them. It also asks the ``moe-book`` kernel,
started under each such environment, what it actually runs with.

What it cannot play: another vendor's CPU and a CPU without AVX-512 (the instruction sets are chosen by
environment variables here, not by the hardware). Another vendor's CPU is outside the contract, measured:
outputs computed on an Intel Xeon were not reproduced on an AMD EPYC; each notebook records the vendor
that computed its outputs, and on another vendor these tests skip, saying so.

Outside the reproducibility contract (not Linux x86-64 with AVX2) the stored outputs are not expected to
be reproduced and these tests skip, saying so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_lib.book.reproducibility import KERNEL_NAME, contract, outputs_vendor, profile_env

pytestmark = pytest.mark.portability

os.environ.setdefault("JUPYTER_PREFER_ENV_PATH", "1")  # this environment's kernels first

ROOT = Path(__file__).resolve().parent.parent
SANITIZE = ROOT / "tests" / "nbval_sanitize.cfg"
CONTRACT = contract()

# Other machines and shells, as the libraries see them. Each changes the instruction-set level of ATen,
# MKL's code path or dispatch, the thread count and the CPUs the process may use.
CONFIGS = {
    # An AVX-512 machine with one core, as torch picks its kernels with nothing set.
    "avx512-1core": {
        "env": {"ATEN_CPU_CAPABILITY": "avx512", "MKL_CBWR": "AUTO", "MKL_ENABLE_INSTRUCTIONS": "AVX512",
                "ONEDNN_MAX_CPU_ISA": "ALL", "NPY_DISABLE_CPU_FEATURES": "", "OPENBLAS_CORETYPE": "SkylakeX"},
        "unset": ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"),
        "cpus": 1,
    },
    # An AVX2-only Intel machine whose user asked for four threads.
    "avx2-4threads": {
        "env": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                "OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4", "MKL_DYNAMIC": "TRUE"},
        "unset": (),
        "cpus": None,
    },
    # ATen's portable (non-vectorised) kernels, MKL's SSE4.2 path, two threads, another hash seed.
    "default-isa-2threads": {
        "env": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "SSE4_2", "OMP_NUM_THREADS": "2",
                "PYTHONHASHSEED": "123", "OPENBLAS_NUM_THREADS": "2"},
        "unset": (),
        "cpus": None,
    },
}

# One training chapter from each part of the book, among those whose printed numbers move when a pin is
# released, each played on one of the machines above. Only one plays the one-core machine: two such
# chapters at a time would share that core.
CHAPTERS = {
    "notebooks/01_what_is_moe.ipynb": "avx2-4threads",
    "notebooks/06_load_balancing.ipynb": "default-isa-2threads",
    "notebooks/09_what_experts_learn.ipynb": "avx2-4threads",
    "notebooks/11_grouped_gemm.ipynb": "avx512-1core",
    "notebooks/16_upcycling_merging.ipynb": "default-isa-2threads",
}


def _require_contract(chapter: str | None = None):
    verdict = CONTRACT if chapter is None else contract(outputs_from=outputs_vendor([ROOT / chapter]))
    if not verdict:
        pytest.skip(f"outside the reproducibility contract ({verdict.reason}): stored outputs not compared")


def _environment(config: dict) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in config["unset"]}
    env.update(config["env"])
    return env


def _limit_cpus(config: dict):
    if config["cpus"] is None:
        return None
    cpus = sorted(os.sched_getaffinity(0))[: config["cpus"]]
    return lambda: os.sched_setaffinity(0, cpus)


def test_every_config_is_used_and_every_part_covered():
    import yaml

    assert set(CHAPTERS.values()) == set(CONFIGS), "each configuration must play at least one chapter"
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    for part in toc["parts"]:
        files = {f"{c['file']}.ipynb" for c in part["chapters"] if c["file"].startswith("notebooks/")}
        if files:
            assert files & set(CHAPTERS), f"no chapter of part {part['caption']!r} is played on another machine"
    for config in CONFIGS.values():  # each one really differs from the profile
        assert any(profile_env().get(k) != v for k, v in config["env"].items())


_PROBE = """
import json, os, torch
from moe_lib.book.reproducibility import profile_mismatches
print(json.dumps({"mismatches": profile_mismatches(), "capability": torch.backends.cpu.get_cpu_capability(),
                  "threads": torch.get_num_threads(), "cpus": len(os.sched_getaffinity(0))}))
"""


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_kernel_runs_under_the_profile_whatever_the_caller_sets(name):
    """The moe-book kernel, started by a caller with another machine's settings, runs under the profile."""
    _require_contract()
    from jupyter_client.manager import start_new_kernel

    config = CONFIGS[name]
    affinity = os.sched_getaffinity(0)
    limit = _limit_cpus(config)
    if limit is not None:
        limit()  # the kernel inherits this process's CPU set
    try:
        km, kc = start_new_kernel(kernel_name=KERNEL_NAME, startup_timeout=60, env=_environment(config))
    finally:
        os.sched_setaffinity(0, affinity)
    try:
        lines = []
        reply = kc.execute_interactive(
            _PROBE, timeout=120,
            output_hook=lambda msg: lines.append(msg["content"].get("text", "")) if msg["msg_type"] == "stream" else None,
        )
        assert reply["content"]["status"] == "ok", reply["content"]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    seen = json.loads("".join(lines))
    assert seen["mismatches"] == {}, f"{name}: the kernel does not run under the profile: {seen['mismatches']}"
    assert seen["capability"] == "AVX2" and seen["threads"] == 1
    assert seen["cpus"] == (config["cpus"] or len(affinity))


@pytest.mark.parametrize("chapter", sorted(CHAPTERS))
def test_stored_outputs_reproduce_on_another_machine(chapter):
    """Strict nbval of ``chapter`` under another machine's settings (see CHAPTERS for which)."""
    _require_contract(chapter)
    config = CONFIGS[CHAPTERS[chapter]]
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-q", "--nbval",
           "--nbval-kernel-name", KERNEL_NAME, "--nbval-cell-timeout=300", "--nbval-sanitize-with", str(SANITIZE),
           chapter]
    proc = subprocess.run(cmd, cwd=ROOT, env=_environment(config), preexec_fn=_limit_cpus(config),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"{chapter} under {CHAPTERS[chapter]} ({config['env']}, cpus={config['cpus']}) does not reproduce "
        f"its stored outputs:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    )
