"""moe_lib.book.reproducibility: the profile, the contract and the moe-book kernel spec."""
from __future__ import annotations

import json
import sys

import pytest

from moe_lib.book import reproducibility as repro

AVX2_FLAGS = {"sse2", "avx", "avx2", "fma"}


def test_profile_pins_every_library_on_x86():
    env = repro.profile_env("x86_64")
    assert env["ATEN_CPU_CAPABILITY"] == "avx2"
    assert env["MKL_CBWR"] == "COMPATIBLE"  # the vendor-independent branch, not AVX2 (Intel only)
    assert env["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert env["OPENBLAS_CORETYPE"] == "Haswell"
    for threads in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        assert env[threads] == "1"
    assert env["MKL_DYNAMIC"] == env["OMP_DYNAMIC"] == "FALSE"
    assert env["PYTHONHASHSEED"] == "0"
    disabled = env["NPY_DISABLE_CPU_FEATURES"].split()
    assert disabled and all(f == "X86_V4" or f.startswith("AVX512") for f in disabled)


def test_profile_names_no_x86_instruction_set_elsewhere():
    env = repro.profile_env("aarch64")
    assert env["OMP_NUM_THREADS"] == "1" and env["PYTHONHASHSEED"] == "0"
    for x86_only in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "NPY_DISABLE_CPU_FEATURES",
                     "OPENBLAS_CORETYPE"):
        assert x86_only not in env


@pytest.mark.parametrize(
    "system, machine, flags, mkl, holds, says",
    [
        ("Linux", "x86_64", AVX2_FLAGS, True, True, "AVX2"),
        ("Linux", "x86_64", AVX2_FLAGS | {"avx512f"}, True, True, "AVX2"),
        ("Darwin", "x86_64", AVX2_FLAGS, True, False, "Darwin"),
        ("Linux", "aarch64", set(), False, False, "aarch64"),
        ("Linux", "x86_64", {"sse2", "avx"}, True, False, "avx2, fma"),
        ("Linux", "x86_64", AVX2_FLAGS - {"fma"}, True, False, "fma"),
        ("Linux", "x86_64", AVX2_FLAGS, False, False, "MKL"),
    ],
)
def test_contract(system, machine, flags, mkl, holds, says):
    verdict = repro.contract(system=system, machine=machine, cpu_flags=flags, mkl=mkl)
    assert bool(verdict) is holds
    assert says in verdict.reason


@pytest.mark.parametrize("vendor, outputs_from, holds", [
    ("GenuineIntel", "GenuineIntel", True),
    ("AuthenticAMD", "AuthenticAMD", True),
    ("AuthenticAMD", "GenuineIntel", False),  # measured: Intel-computed outputs differ on an AMD EPYC
    ("GenuineIntel", "AuthenticAMD", False),
    ("GenuineIntel", None, True),  # no notebook named: the machine alone
])
def test_contract_compares_outputs_only_on_their_vendor(vendor, outputs_from, holds):
    verdict = repro.contract(system="Linux", machine="x86_64", cpu_flags=AVX2_FLAGS, mkl=True, vendor=vendor,
                             outputs_from=outputs_from)
    assert bool(verdict) is holds
    if not holds:
        assert outputs_from in verdict.reason and vendor in verdict.reason


def test_cpu_vendor_reads_cpuinfo():
    info = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n"
    assert repro.cpu_vendor(info) == "AuthenticAMD"
    assert repro.cpu_vendor("processor : 0\n") is None


def _notebook(path, vendor):
    meta = {} if vendor is None else {repro.OUTPUTS_METADATA_KEY: {"cpu_vendor": vendor, "cpu_model": "x"}}
    path.write_text(json.dumps({"cells": [], "metadata": meta, "nbformat": 4, "nbformat_minor": 5}))
    return path


def test_outputs_vendor(tmp_path):
    a = _notebook(tmp_path / "a.ipynb", "GenuineIntel")
    b = _notebook(tmp_path / "b.ipynb", "GenuineIntel")
    none = _notebook(tmp_path / "c.ipynb", None)
    assert repro.outputs_vendor([a, b, none]) == "GenuineIntel"
    assert repro.outputs_vendor([none]) is None
    amd = _notebook(tmp_path / "d.ipynb", "AuthenticAMD")
    with pytest.raises(ValueError, match="different vendors"):
        repro.outputs_vendor([a, amd])


def test_cli_contract_with_notebooks_of_another_vendor(tmp_path, capsys):
    here = repro.cpu_vendor()
    other = _notebook(tmp_path / "x.ipynb", "SomeOtherVendor")
    status = repro.main(["contract", str(other)])
    out = capsys.readouterr().out
    if repro.contract():  # inside on its own: the vendor makes the difference
        assert status == 1 and "SomeOtherVendor" in out and str(here) in out
    mine = _notebook(tmp_path / "y.ipynb", here)
    assert repro.main(["contract", str(mine)]) == (0 if repro.contract() else 1)


def test_install_kernel_writes_the_profile(tmp_path):
    folder = repro.install_kernel(tmp_path)
    assert folder == repro.kernel_dir(tmp_path)
    spec = json.loads((folder / "kernel.json").read_text())
    assert spec["env"] == repro.profile_env()
    assert spec["argv"][0] == sys.executable
    assert spec["display_name"] == repro.KERNEL_DISPLAY_NAME


def test_mismatches_name_what_is_off(monkeypatch):
    monkeypatch.setenv("MKL_CBWR", "AUTO")
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    off = repro.profile_mismatches()
    assert off["MKL_CBWR"] == ("COMPATIBLE", "AUTO")
    assert off["OPENBLAS_NUM_THREADS"] == ("1", "<unset>")


def test_cli_contract_exit_status(capsys):
    status = repro.main(["contract"])
    out = capsys.readouterr().out
    assert status == (0 if repro.contract() else 1)
    assert ("inside" if status == 0 else "outside") in out


def test_cli_env_prints_exports(capsys):
    assert repro.main(["env"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"export {k}='{v}'" for k, v in repro.profile_env().items()]


# --- rank_by: choices that follow the printed digits -------------------------------------------------


def test_rank_by_breaks_printed_ties_by_the_given_order():
    from moe_lib.utils import rank_by

    # 0.30004 and 0.29996 both print as 0.300: the first listed wins, whatever their last bits.
    assert rank_by({"a": 0.30004, "b": 0.29996, "c": 0.5}, decimals=3) == ["a", "b", "c"]
    assert rank_by({"b": 0.29996, "a": 0.30004, "c": 0.5}, decimals=3) == ["b", "a", "c"]
    # Printed differently: ranked by value.
    assert rank_by({"a": 0.3006, "b": 0.2994}, decimals=3) == ["b", "a"]


def test_rank_by_a_last_bit_does_not_change_the_choice():
    import numpy as np

    from moe_lib.utils import rank_by

    base = {"switch": 2.46251, "top-2": 2.46249, "dense": 2.4255}
    nudged = {k: float(np.nextafter(v, np.inf if k == "top-2" else -np.inf)) for k, v in base.items()}
    assert rank_by(base, 4, descending=True) == rank_by(nudged, 4, descending=True)


def test_rank_by_descending_and_series():
    import pandas as pd

    from moe_lib.utils import rank_by

    assert rank_by(pd.Series({"x": 1.0, "y": 3.0, "z": 2.0}), 2, descending=True) == ["y", "z", "x"]
    with pytest.raises(TypeError, match="decimals"):
        rank_by({"x": 1.0}, decimals=2.5)


def test_git_state_is_the_checkout_moe_lib_runs_from(monkeypatch, tmp_path):
    """``moe_lib.utils.git_state`` finds the repository from the package's own location (a wrong parent
    would silently report another folder, or nothing); the environment variable stands in outside git."""
    import subprocess
    from pathlib import Path

    import moe_lib
    from moe_lib.utils import git_state

    root = Path(moe_lib.__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("moe_lib is not running from a git checkout")
    monkeypatch.delenv("MOE_LIB_GIT_COMMIT", raising=False)
    monkeypatch.chdir(tmp_path)  # found from the package, not from the working directory
    state = git_state(paths=("moe_lib",))
    assert state["git_commit"] == head.stdout.strip() and isinstance(state["git_dirty"], bool)
    monkeypatch.setenv("MOE_LIB_GIT_COMMIT", "abc123")
    assert git_state() == {"git_commit": "abc123", "git_dirty": None}
