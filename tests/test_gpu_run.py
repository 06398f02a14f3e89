"""The prepared GPU run (benchmarks/run_h200.sh) on the CPU: its step time-outs fit one 600-s device call, it
stops before timing anything when the Triton preflight fails, the preflight's checks catch a wrong kernel
(in Triton's interpreter, at a tiny shape), the device check writes its JSON after every shape, and the
harness runs the headline cases first, the anchors' peers last, and never files a torch fallback under a
Triton name."""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import moe_lib  # noqa: F401  (sets TRITON_INTERPRET before triton is imported)
from moe_lib.bench import SHAPES, SMOKE_SHAPES, harness as H, shapes as S
from moe_lib.bench.cli import parse_args
from moe_lib.bench.shapes import Shape

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "run_h200.sh"
DEVICE_CALL_LIMIT_S = 600
#: What the step time-outs may add up to: the device call's limit less room for the machine's own overheads.
STEP_BOUND_S = 500
TINY = Shape("tiny", 32, 32, 8, 2)


# ------------------------------------------------------------------------------------- run_h200.sh
def step_timeouts(text: str) -> dict[str, int]:
    """The ``T_<STEP>=`` time-outs of the script, with its default ``BUDGET_S``."""
    budget = int(re.search(r'BUDGET_S="\$\{BUDGET_S:-(\d+)\}"', text).group(1))
    out = {}
    for name, value in re.findall(r"^(T_[A-Z]+)=(\$\(\([^)]*\)\)|\d+)", text, flags=re.M):
        if name == "T_TOTAL":
            continue
        m = re.fullmatch(r"\$\(\(BUDGET_S \+ (\d+)\)\)", value)
        out[name] = budget + int(m.group(1)) if m else int(value)
    return out


def test_step_timeouts_fit_one_device_call_and_the_readme_says_so():
    text = SCRIPT.read_text()
    steps = step_timeouts(text)
    assert set(steps) == {"T_VERSIONS", "T_PREFLIGHT", "T_WARMUP", "T_BENCH", "T_CHECK"}
    total = sum(steps.values())
    assert total <= STEP_BOUND_S < DEVICE_CALL_LIMIT_S, steps
    assert steps["T_PREFLIGHT"] <= 60
    # every command of the script runs under its step's time-out
    for command in ("moe_lib.kernels.preflight", "compile_check --warm", "-m moe_lib.bench ",
                    "moe_lib.kernels.gpu_check"):
        line = next(ln for ln in text.splitlines() if command in ln and "echo" not in ln)
        assert re.search(r'timeout "\$T_[A-Z]+"', line), line
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    assert f"add up to {total} s" in readme and f"add up to {total} s" in text
    for name, value in steps.items():  # the README's table of steps states each time-out
        assert re.search(rf"\| *{value} *s *\|", readme), (name, value)


def test_script_order_preflight_gates_and_no_smoke_pass():
    text = SCRIPT.read_text()
    order = [text.index(c) for c in ("-m moe_lib.kernels.preflight", "compile_check --warm",
                                     "-m moe_lib.bench --budget", "-m moe_lib.kernels.gpu_check")]
    assert order == sorted(order)
    assert "--smoke" not in text


def _shim(tmp_path: Path, fail_preflight: int) -> Path:
    """A stand-in for python that logs its arguments; the preflight exits with ``fail_preflight``."""
    log = tmp_path / "calls.log"
    shim = tmp_path / "python"
    shim.write_text(f"""#!/usr/bin/env bash
echo "$*" >> "{log}"
if [[ "$*" == *moe_lib.kernels.preflight* ]]; then
  echo "PREFLIGHT (shim)"; exit {int(fail_preflight)}
fi
exit 0
""")
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    return shim


def _run_script(tmp_path, fail_preflight):
    shim = _shim(tmp_path, fail_preflight)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(shim), "OUT": str(out), "MOE_LIB_GIT_COMMIT": "test"}
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    calls = (tmp_path / "calls.log").read_text().splitlines()
    return proc, calls, out


@pytest.mark.parametrize("exit_status", [1, 124])  # a failed check; killed by its time-out
def test_a_failed_preflight_stops_the_run_before_anything_is_timed(tmp_path, exit_status):
    proc, calls, out = _run_script(tmp_path, fail_preflight=exit_status)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert any("-m moe_lib.kernels.preflight" in c for c in calls)
    assert not any("moe_lib.bench" in c or "gpu_check" in c or "compile_check" in c for c in calls), calls
    assert "STOP" in proc.stdout and "STOP" in (out / "run_h200.log").read_text()
    # a preflight killed by its time-out printed no verdict: the script asks for the list of what runs without it
    assert any("without_triton()" in c for c in calls) == (exit_status == 124), calls


def test_a_passing_preflight_runs_every_step_in_order(tmp_path):
    proc, calls, _ = _run_script(tmp_path, fail_preflight=0)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = [c for c in calls if c.startswith("-m ")]
    assert [c.split()[1] for c in steps] == ["moe_lib.kernels.preflight", "moe_lib.kernels.compile_check",
                                            "moe_lib.bench", "moe_lib.kernels.gpu_check"]
    assert "--budget-s 190" in steps[2]


# ---------------------------------------------------------------------------------------- preflight
def test_preflight_passes_on_the_interpreted_kernels():
    from moe_lib.kernels import preflight

    result = preflight.run(TINY, ffn_tokens=8, metadata_tokens=2050, log=lambda s: None)  # T·k = 4100 > 4096
    assert result["ok"] and result["failed"] is None, result
    c = result["checks"]
    assert c["metadata_N16"] == c["metadata_N4100"] == "equal"  # both metadata paths
    assert c["deterministic"] and all(c[f"relerr_{n}"] < 1e-4 for n in ("y", "dx", "dweights", "dw_gate", "dw_down"))


@pytest.mark.parametrize("broken", ["route", "permute_metadata", "expert_ffn"])
def test_preflight_catches_a_wrong_kernel(broken, monkeypatch):
    import moe_lib.kernels as K
    from moe_lib.kernels import preflight

    original = getattr(K, broken)

    def wrong(*args, **kwargs):
        out = original(*args, **kwargs)
        if kwargs.get("impl", "triton") != "triton":
            return out
        if broken == "route":
            return out[0], (out[1] + 1) % TINY.E
        if broken == "permute_metadata":
            out.row_assignment = out.row_assignment.flip(0)
            return out
        return out * 1.1

    monkeypatch.setattr(K, broken, wrong)
    result = preflight.run(TINY, ffn_tokens=8, metadata_tokens=8, log=lambda s: None)
    assert not result["ok"]
    step = {"route": "route", "permute_metadata": "metadata", "expert_ffn": "expert_ffn"}[broken]
    assert result["failed"].startswith(step + ":"), result["failed"]


def test_preflight_names_a_missing_triton_feature_and_what_can_run_without_triton(monkeypatch):
    from moe_lib.kernels import features, preflight

    monkeypatch.setattr(features, "feature_error", lambda: "the installed triton 3.1 lacks tl.histogram(mask=)")
    result = preflight.run(TINY, ffn_tokens=8, metadata_tokens=8, log=lambda s: None)
    assert not result["ok"] and result["failed"] == "environment: the installed triton 3.1 lacks tl.histogram(mask=)"
    hint = preflight.without_triton()
    registry = H.impl_registry()
    for name, impl in registry.items():
        assert (name in hint) != impl.uses_triton, name
    assert "--impls" in hint


# ---------------------------------------------------------------------------------------- gpu_check
def test_gpu_check_writes_its_json_after_every_shape(tmp_path):
    from moe_lib.kernels import gpu_check

    out = tmp_path / "check.json"
    seen = []

    def fake(name, d, f, E, k, T, dtype, device):
        if seen:  # the shapes before this one are on disk already
            on_disk = json.loads(out.read_text())
            assert [r["shape"] for r in on_disk["rows"]] == seen and on_disk["complete"] is False
        seen.append(name)
        if name == "smoke-fine":
            raise RuntimeError("boom")
        return {"shape": name, "ok": True, "relerr_y": 0.0}

    assert gpu_check.main(["--smoke", "--out", str(out)], check=fake) == 1  # one shape failed
    final = json.loads(out.read_text())
    assert final["complete"] is True and [r["shape"] for r in final["rows"]] == list(SMOKE_SHAPES)
    assert final["rows"][1]["error"] == "RuntimeError: boom"


# ------------------------------------------------------------------------------------------ harness
def test_case_order_prefill_fwd_then_fwdbwd_then_decode_64_then_the_rest():
    cases = H.make_cases(list(SHAPES.values()), S.PHASES, S.MODES, S.ROUTINGS, S.PREFILL_T, S.DECODE_T)
    n = len(SHAPES) * len(S.PREFILL_T)
    head = [(c.phase, c.mode, c.routing) for c in cases[:2 * n]]
    assert head == [("prefill", "fwd", "router")] * n + [("prefill", "fwdbwd", "router")] * n
    decode64 = cases[2 * n:3 * n]
    assert all(c.phase == "decode" and c.T == 64 and c.routing == "router" for c in decode64)
    assert [c.shape.name for c in decode64] == list(SHAPES)
    ranks = [H.case_priority(c, "router") for c in cases]
    assert ranks == sorted(ranks) and ranks[-1] == 4 and len({c.key for c in cases}) == len(cases)


def test_cli_defers_the_anchor_peers_on_the_gpu_only():
    assert parse_args(["--smoke"]).defer_list == []
    assert parse_args(["--smoke", "--defer-impls", "naive_loop"]).defer_list == ["naive_loop"]
    assert set(H.DEFERRED_IMPLS) == {"naive_loop", "hf_eager"}
    with pytest.raises(SystemExit):
        parse_args(["--smoke", "--defer-impls", "naive"])


def _timed_impls(calls, on_dense=lambda: None):
    registry = H.impl_registry()

    def wrap(impl):
        def build(p, grad):
            calls.append((impl.name, p.case.T))
            if impl.name == "dense_equal_flops":
                on_dense()
            return impl.build(p, grad)
        return H.Impl(impl.name, impl.family, impl.description, build, impl.skip, impl.uses_triton)

    return [wrap(registry[n]) for n in ("dense_equal_flops", "torch_grouped_mm", "naive_loop")]


def test_deferred_peers_run_after_every_case_while_time_remains(tmp_path):
    calls = []
    cases = [H.Case(SMOKE_SHAPES["smoke-fine"], "prefill", T, "fwd", "router") for T in (8, 12)]
    result = H.run(cases, _timed_impls(calls), device=torch.device("cpu"), dtype=torch.float32, smoke=True,
                   budget_s=60, out=tmp_path / "r.json", ceilings=False, deferred=["naive_loop"], log=lambda s: None)
    assert calls == [("dense_equal_flops", 8), ("torch_grouped_mm", 8), ("dense_equal_flops", 12),
                     ("torch_grouped_mm", 12), ("naive_loop", 8), ("naive_loop", 12)]
    assert result["complete"] and result["config"]["deferred_impls"] == ["naive_loop"]
    for row in json.loads((tmp_path / "r.json").read_text())["cases"]:
        assert list(row["results"]) == ["dense_equal_flops", "torch_grouped_mm", "naive_loop"]
        r = row["results"]["naive_loop"]
        dense = row["results"]["dense_equal_flops"]["ms"]
        assert r["correct"] and r["ratio_to_dense"] == pytest.approx(dense / r["ms"])


def test_deferred_peers_give_way_to_the_budget(monkeypatch):
    clock = [0.0]  # the harness's clock: the first implementation takes "an hour"
    monkeypatch.setattr(H, "time", SimpleNamespace(monotonic=lambda: clock[0], perf_counter=time.perf_counter))

    def slow():
        clock[0] += 3600

    calls = []
    cases = [H.Case(SMOKE_SHAPES["smoke-fine"], "prefill", 8, "fwd", "router")]
    result = H.run(cases, _timed_impls(calls, slow), device=torch.device("cpu"), dtype=torch.float32,
                   smoke=True, budget_s=60, out=None, ceilings=False, deferred=["naive_loop"], log=lambda s: None)
    assert [c[0] for c in calls] == ["dense_equal_flops"]  # the budget ended during the first implementation
    r = result["cases"][0]["results"]
    assert r["torch_grouped_mm"]["skipped"] == "time budget spent"
    assert r["naive_loop"]["skipped"].startswith("time budget spent") and result["complete"] is False


def test_a_triton_failure_is_an_error_never_a_torch_time(monkeypatch):
    import moe_lib.kernels as K

    original = K.expert_ffn

    def broken(*args, impl="triton", **kwargs):
        if impl == "triton":
            raise RuntimeError("no kernel today")
        return original(*args, impl=impl, **kwargs)

    monkeypatch.setattr(K, "expert_ffn", broken)
    case = H.Case(SMOKE_SHAPES["smoke-fine"], "prefill", 8, "fwd", "router")
    p = H.make_problem(case, torch.float32, torch.device("cpu"))
    x, w, idx, gy = p.inputs["check"]
    ref = H.reference(x, w, idx, *p.weights)
    res = H.run_impl(H.impl_registry()["moe_lib_triton"], p, ref, {"timing": {}}, None)
    assert res["error"] == "check: RuntimeError: no kernel today" and res["ms"] is None and res["relerr"] is None
    assert res["impl_used"] == "triton" and res["note"] is None
