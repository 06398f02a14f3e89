"""Bit-for-bit reproducible CPU runs: the numeric profile every notebook of the book executes under.

Why it is needed. PyTorch picks its CPU kernels by machine: ATen's vectorised kernels by instruction set
(AVX2 or AVX-512; a softmax gives other last bits on each), MKL's GEMM by code path (and by CPU vendor),
oneDNN and NumPy's SIMD loops by instruction set, OpenBLAS by core type, and a reduction split over
threads adds in another order. One last bit is enough: training amplifies it, and a loss printed with three
digits comes out different on another laptop. (Measured: the book's stored outputs, written on one
x86-64 machine, failed strict nbval in 12 of 18 notebooks on another.)

What the profile does. :func:`profile_env` pins every one of those choices with the libraries' own
environment variables:

- ``ATEN_CPU_CAPABILITY=avx2``: ATen's kernels are its AVX2 build on AVX2 and AVX-512 machines alike.
- ``MKL_CBWR=COMPATIBLE``: oneMKL's conditional numerical reproducibility, on the branch its guide names
  for Intel *and* non-Intel CPUs (its ``AVX2`` branch holds on Intel CPUs only); with
  ``MKL_DYNAMIC=FALSE`` and ``OMP_DYNAMIC=FALSE`` no thread count changes at run time.
- ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, ``OPENBLAS_NUM_THREADS`` ``=1``: one thread, so reductions
  add in one order whatever the number of cores.
- ``ONEDNN_MAX_CPU_ISA=AVX2``: oneDNN's JIT kernels (the book meets them in GELU; also bfloat16 matmuls,
  convolutions).
- ``NPY_DISABLE_CPU_FEATURES``: NumPy's AVX-512 targets (read from the installed NumPy), so its SIMD
  loops (``exp``, ``log``, ``sin``, …) run their AVX2 versions.
- ``OPENBLAS_CORETYPE=Haswell``: the AVX2 kernels of the OpenBLAS that NumPy and SciPy bring.
- ``PYTHONHASHSEED=0``: the iteration order of sets of strings.

They must be set before the process starts (ATen, MKL and NumPy read them once), so the profile lives in
a Jupyter kernel, ``moe-book``, whose ``kernel.json`` carries them: ``make install`` writes it into the
virtual environment (:func:`install_kernel`), every notebook names it in its metadata, and every path
that executes a notebook (nbval, papermill, ``make book``, ``make notebooks``) starts it. A kernel's own
environment wins over the caller's, so a shell that sets ``OMP_NUM_THREADS=8`` or
``ATEN_CPU_CAPABILITY=avx512`` does not reach the notebook.

The contract (:func:`contract`). The stored outputs are reproduced bit for bit on Linux x86-64 machines
with AVX2 and FMA whose CPU comes from the same vendor as the machine that computed them (any core count,
any instruction-set level above AVX2), in the pinned environment of ``requirements/constraints.txt``.
Each notebook records that vendor in its metadata (:func:`generated_on`). The vendor condition was
measured: outputs computed on an Intel Xeon were not reproduced on an AMD EPYC, although MKL's guide
describes the COMPATIBLE branch as shared by Intel and non-Intel CPUs. Elsewhere (another vendor, ARM,
macOS, an x86-64 CPU without AVX2) ``make test`` still executes every notebook but does not compare its
outputs, and says why.

Use it for your own runs::

    python -m moe_lib.book.reproducibility status          # is this machine inside the contract? is the profile on?
    eval "$(python -m moe_lib.book.reproducibility env)"   # this shell under the profile
    python -m moe_lib.book.reproducibility install-kernel  # the ``moe-book`` kernel, into sys.prefix

The cost: one thread, MKL's slowest GEMM branch and AVX2 instead of AVX-512. Large fp32 GEMMs run about
six times slower than MKL's native AVX-512 path, so the chapters that train Transformers take about twice
as long; the README gives the measured times.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

KERNEL_NAME = "moe-book"
KERNEL_DISPLAY_NAME = "MoE Book (reproducible CPU)"

#: ATen's instruction-set level under the profile, as ``torch.backends.cpu.get_cpu_capability()`` says it.
ATEN_CAPABILITY = "AVX2"
#: CPU flags (``/proc/cpuinfo``) a machine needs for ATen's AVX2 kernels: the contract's hardware condition.
REQUIRED_CPU_FLAGS = ("avx2", "fma")

_THREADS = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_DYNAMIC": "FALSE",
    "OMP_DYNAMIC": "FALSE",
    "PYTHONHASHSEED": "0",
}
_X86 = {
    "ATEN_CPU_CAPABILITY": ATEN_CAPABILITY.lower(),
    "MKL_CBWR": "COMPATIBLE",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "OPENBLAS_CORETYPE": "Haswell",
}


def _is_x86_64(machine: str | None = None) -> bool:
    return (machine or platform.machine()).lower() in ("x86_64", "amd64")


def _numpy_cpu():
    """NumPy's module that lists its CPU dispatch targets and which of them are enabled."""
    try:
        from numpy._core import _multiarray_umath
    except ImportError:  # NumPy 1.x
        from numpy.core import _multiarray_umath
    return _multiarray_umath


def numpy_features_above_avx2() -> list[str]:
    """NumPy's dispatch targets above AVX2 (``X86_V4``, ``AVX512_*``; the names differ between NumPy
    versions, so they are read from the installed NumPy). Disabling them leaves NumPy's AVX2 loops."""
    return [f for f in _numpy_cpu().__cpu_dispatch__ if f == "X86_V4" or f.startswith("AVX512")]


def profile_env(machine: str | None = None) -> dict[str, str]:
    """The environment variables of the profile for ``machine`` (default: this one).

    On x86-64 every choice in the module's table is pinned; elsewhere only the thread counts and the hash
    seed (the instruction-set variables name x86 instruction sets)."""
    env = dict(_THREADS)
    if _is_x86_64(machine):
        env.update(_X86)
        features = numpy_features_above_avx2()
        if features:
            env["NPY_DISABLE_CPU_FEATURES"] = " ".join(features)
    return dict(sorted(env.items()))


@dataclass(frozen=True)
class Contract:
    """Whether this machine is one the stored outputs are reproduced on, and why (not)."""

    holds: bool
    reason: str

    def __bool__(self) -> bool:
        return self.holds


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


#: Where a notebook records the machine its stored outputs were computed on (``scripts/execute_notebooks.py``).
OUTPUTS_METADATA_KEY = "moe_book"


def _cpuinfo_field(name: str, cpuinfo: str | None = None) -> str | None:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def cpu_vendor(cpuinfo: str | None = None) -> str | None:
    """This CPU's vendor as Linux reports it (``vendor_id`` of /proc/cpuinfo: ``GenuineIntel``,
    ``AuthenticAMD``), or None where there is no such file."""
    return _cpuinfo_field("vendor_id", cpuinfo)


def generated_on() -> dict[str, str | None]:
    """What a notebook records about the machine that computed its stored outputs: the CPU vendor (the
    contract compares it) and model name (for a reader)."""
    return {"cpu_vendor": cpu_vendor(), "cpu_model": _cpuinfo_field("model name")}


def outputs_vendor(notebooks) -> str | None:
    """The CPU vendor that computed the stored outputs of ``notebooks`` (paths), as they record it; None if
    none records one. Notebooks computed on different vendors cannot be compared on one machine: ValueError."""
    import json

    vendors = {}
    for path in notebooks:
        meta = json.loads(Path(path).read_text()).get("metadata", {}).get(OUTPUTS_METADATA_KEY, {})
        if meta.get("cpu_vendor"):
            vendors[str(path)] = meta["cpu_vendor"]
    found = set(vendors.values())
    if len(found) > 1:
        raise ValueError(f"the notebooks' stored outputs come from CPUs of different vendors ({vendors}); "
                         "re-execute them on one machine (make notebooks)")
    return found.pop() if found else None


def contract(
    system: str | None = None, machine: str | None = None, cpu_flags: set[str] | None = None,
    mkl: bool | None = None, vendor: str | None = None, outputs_from: str | None = None,
) -> Contract:
    """Is this machine inside the reproducibility contract: Linux, x86-64, AVX2 and FMA, torch with MKL,
    and — when ``outputs_from`` names the CPU vendor that computed the stored outputs — the same vendor?

    The vendor condition is measured, not designed: on 2026-12-01 outputs computed under the profile on an
    Intel Xeon were not reproduced on an AMD EPYC (Zen 5), in the last digits of trained numbers of
    chapters 1, 9, 15 and 16 and in a forward pass's 1e-6-level differences, although both ran the same
    binaries on the same instruction sets and MKL's ``COMPATIBLE`` branch. Across vendors the notebooks are
    executed, not compared. The arguments default to this machine (they exist so the decision can be
    tested)."""
    system = system or platform.system()
    machine = machine or platform.machine()
    if system != "Linux":
        return Contract(False, f"the operating system is {system}, the contract covers Linux")
    if not _is_x86_64(machine):
        return Contract(False, f"the CPU is {machine}, the contract covers x86-64")
    flags = _cpu_flags() if cpu_flags is None else cpu_flags
    missing = [f for f in REQUIRED_CPU_FLAGS if f not in flags]
    if missing:
        return Contract(False, f"the CPU lacks {', '.join(missing)}: ATen's AVX2 kernels cannot run")
    if mkl is None:
        import torch

        mkl = torch.backends.mkl.is_available()
    if not mkl:
        return Contract(False, "this torch build has no MKL (the contract's GEMMs are MKL's COMPATIBLE branch)")
    here = f"Linux x86-64 with {' and '.join(f.upper() for f in REQUIRED_CPU_FLAGS)}"
    if outputs_from is not None:
        vendor = vendor or cpu_vendor()
        if vendor != outputs_from:
            return Contract(False, f"the stored outputs were computed on a {outputs_from} CPU and this one is "
                                   f"{vendor}: across CPU vendors the last bits differ (measured), so trained "
                                   "numbers do too")
        here += f", and a CPU of the stored outputs' vendor ({vendor})"
    return Contract(True, here)


def profile_mismatches() -> dict[str, tuple[str, str]]:
    """What in *this* process differs from the profile: ``{name: (expected, actual)}``; empty when on.

    Checks the environment variables and what the libraries made of them (ATen's capability, torch's
    thread count, NumPy's enabled features)."""
    expected = profile_env()
    found = {k: (v, os.environ.get(k, "<unset>")) for k, v in expected.items() if os.environ.get(k) != v}
    import torch

    if _is_x86_64():
        cap = torch.backends.cpu.get_cpu_capability()
        if cap != ATEN_CAPABILITY:
            found["torch.backends.cpu.get_cpu_capability()"] = (ATEN_CAPABILITY, cap)
        enabled = _numpy_cpu().__cpu_features__
        on = sorted(f for f in numpy_features_above_avx2() if enabled.get(f))
        if on:
            found["numpy features above AVX2"] = ("none", " ".join(on))
    if torch.get_num_threads() != 1:
        found["torch.get_num_threads()"] = ("1", str(torch.get_num_threads()))
    return found


def kernel_dir(prefix: str | os.PathLike | None = None) -> Path:
    """Where :func:`install_kernel` puts the kernel spec (``<prefix>/share/jupyter/kernels/moe-book``)."""
    return Path(prefix or sys.prefix) / "share" / "jupyter" / "kernels" / KERNEL_NAME


def install_kernel(prefix: str | os.PathLike | None = None) -> Path:
    """Write the ``moe-book`` Jupyter kernel (this Python, with :func:`profile_env`) under ``prefix``
    (default ``sys.prefix``, the virtual environment) and return its folder."""
    from ipykernel.kernelspec import install

    return Path(install(kernel_name=KERNEL_NAME, display_name=KERNEL_DISPLAY_NAME,
                        prefix=str(prefix or sys.prefix), env=profile_env()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_lib.book.reproducibility", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    inst = sub.add_parser("install-kernel", help="write the moe-book Jupyter kernel into a prefix")
    inst.add_argument("--prefix", default=sys.prefix, help="install prefix (default: %(default)s)")
    sub.add_parser("env", help="print the profile as shell `export` lines")
    con = sub.add_parser("contract", help="exit 0 if this machine is inside the reproducibility contract, 1 if not")
    con.add_argument("notebooks", nargs="*", help="notebooks whose stored outputs are to be compared: their "
                     "recorded CPU vendor must be this machine's")
    sub.add_parser("status", help="the contract, and whether this process runs under the profile")
    args = parser.parse_args(argv)

    if args.command == "install-kernel":
        print(f"installed the {KERNEL_NAME!r} kernel in {install_kernel(args.prefix)}")
        return 0
    if args.command == "env":
        for k, v in profile_env().items():
            print(f"export {k}='{v}'")
        return 0
    notebooks = getattr(args, "notebooks", None) or []
    verdict = contract(outputs_from=outputs_vendor(notebooks)) if notebooks else contract()
    if args.command == "contract":
        print(f"{'inside' if verdict else 'outside'} the reproducibility contract: {verdict.reason}")
        return 0 if verdict else 1
    print(f"machine: {'inside' if verdict else 'outside'} the reproducibility contract ({verdict.reason})")
    print(f"cpu: {generated_on()}")
    off = profile_mismatches()
    if not off:
        print("this process runs under the profile")
    for k, (want, got) in off.items():
        print(f"  {k}: {got} (the profile: {want})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
