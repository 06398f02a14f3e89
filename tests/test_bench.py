"""moe_lib.bench: the harness (smoke run on the CPU, JSON schema, CLI errors), its arithmetic (ratios,
FLOPs, routing statistics, the fp32 reference), the roofline model, and the report helpers on the
committed H200 anchors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import moe_lib  # noqa: F401  (sets TRITON_INTERPRET before triton is imported)
from moe_lib.bench import SHAPES, SMOKE_SHAPES, harness as H, report as R, roofline as RL, shapes as S
from moe_lib.bench.cli import main, output_path, parse_args

RESULT_KEYS = {"ms", "tflops", "ratio_to_dense", "relerr", "relerr_dx", "relerr_dw", "correct", "peak_mem_gb",
               "workspace_gb", "TBps", "bw_share", "routing_mismatch", "impl_used", "note", "error", "skipped"}
CASE_KEYS = {"shape", "phase", "mode", "routing", "T", "d", "f", "E", "k", "fine_grained", "gflop", "experts_touched",
             "empty_experts", "max_load", "mean_load", "imbalance", "weight_bytes_touched", "grad_experts_checked",
             "results"}
META_KEYS = {"date", "device", "gpu", "dtype", "smoke", "torch", "triton", "transformers", "moe_lib", "git_commit",
             "timer", "kernels_available"}


# ------------------------------------------------------------------------------------------ shapes
def test_the_five_shapes_of_the_issue():
    got = {n: (s.d, s.f, s.E, s.k) for n, s in SHAPES.items()}
    assert got == {"mixtral-8x7b": (4096, 14336, 8, 2), "qwen3-30b-a3b": (2048, 768, 128, 8),
                   "deepseek-v3": (7168, 2048, 256, 8), "olmoe-1b-7b": (2048, 1024, 64, 8),
                   "gpt-oss-120b": (2880, 2880, 128, 4)}
    assert [n for n, s in SHAPES.items() if s.fine_grained] == ["qwen3-30b-a3b", "deepseek-v3", "olmoe-1b-7b",
                                                                  "gpt-oss-120b"]
    assert S.DECODE_T == (1, 16, 64, 128) and max(S.PREFILL_T) >= 16384
    assert all(s.d <= 64 and s.E <= 8 for s in SMOKE_SHAPES.values()) and max(S.SMOKE_PREFILL_T) <= 128
    mix = SHAPES["mixtral-8x7b"]
    assert mix.flops(16384) == 6 * 16384 * 2 * 4096 * 14336 == pytest.approx(11544.872091648e9)  # anchor GFLOP
    assert mix.flops(10, backward=True) == 3 * mix.flops(10)
    with pytest.raises(ValueError, match="accepted"):
        S.get_shape("mixtral")


def test_cases_put_the_headline_numbers_first():
    shapes = [SHAPES["mixtral-8x7b"], SHAPES["olmoe-1b-7b"]]
    cases = H.make_cases(shapes, S.PHASES, S.MODES, S.ROUTINGS, [4096], [1, 64])
    keys = [c.key for c in cases]
    assert len(cases) == 2 * 3 * (2 + 2) and len(set(keys)) == len(keys)
    assert [c.mode for c in cases[:2]] == ["fwd", "fwd"] and {c.routing for c in cases[:8]} == {"router"}
    assert [c.mode for c in cases[2:4]] == ["fwdbwd", "fwdbwd"]  # training before decode (issue 15)
    assert [(c.phase, c.T) for c in cases[4:8]] == [("decode", 64), ("decode", 64), ("decode", 1), ("decode", 1)]
    assert all(c.mode == "fwd" for c in cases if c.phase == "decode")  # decode has no backward
    smoke = H.make_cases(shapes, S.PHASES, S.MODES, S.ROUTINGS, [64], [1], full=False)
    assert {(c.phase, c.mode) for c in smoke if c.routing != "router"} == {("prefill", "fwd")}


# ------------------------------------------------------------------------------------------ arithmetic
def test_ratio_arithmetic():
    assert H.ratio(19.466, 20.865) == pytest.approx(0.9329, abs=1e-4)  # anchors: mixtral torch _grouped_mm
    assert H.ratio(2.0, 1.0) == 2.0
    for bad in [(None, 1.0), (1.0, None), (0.0, 1.0), (1.0, 0.0), (-1.0, 1.0)]:
        assert H.ratio(*bad) is None


@pytest.mark.parametrize("kind", S.ROUTINGS)
def test_routings_are_valid(kind):
    shape = S.Shape("t", 16, 8, 8, 3)
    x, wr = torch.randn(40, 16), torch.randn(8, 16)
    w, idx = H.make_routing(kind, x, shape, seed=1, router_weight=wr)
    assert w.shape == idx.shape == (40, 3) and w.dtype == torch.float32 and idx.dtype == torch.int64
    assert torch.allclose(w.sum(-1), torch.ones(40)) and (w > 0).all()
    assert all(len(set(r)) == 3 for r in idx.tolist()) and idx.min() >= 0 and idx.max() < 8
    w2, idx2 = H.make_routing(kind, x, shape, seed=1, router_weight=wr)
    assert torch.equal(idx, idx2) and torch.equal(w, w2)  # seeded
    stats = H.assignment_stats(idx, 8)
    assert stats["experts_touched"] + stats["empty_experts"] == 8 and stats["mean_load"] == 15.0
    if kind == "balanced":
        assert stats["max_load"] == 15 and stats["imbalance"] == 1.0


def test_zipf_is_skewed_and_router_needs_weights():
    shape = S.Shape("t", 8, 8, 64, 2)
    x = torch.randn(256, 8)
    _, zipf = H.make_routing("zipf", x, shape, seed=0, zipf_s=1.2)
    _, bal = H.make_routing("balanced", x, shape, seed=0)
    assert H.assignment_stats(zipf, 64)["imbalance"] > 3 > H.assignment_stats(bal, 64)["imbalance"]
    assert H.assignment_stats(zipf, 64)["empty_experts"] > 0
    with pytest.raises(ValueError, match="router_weight"):
        H.make_routing("router", x, shape, seed=0)
    with pytest.raises(ValueError, match="accepted"):
        H.make_routing("random", x, shape, seed=0)


def test_reference_matches_autograd_of_the_layer():
    torch.manual_seed(0)
    T, d, f, E, k = 24, 8, 6, 5, 2
    x = torch.randn(T, d, dtype=torch.float64)
    wr = torch.randn(E, d, dtype=torch.float64)
    wg, wu = torch.randn(E, d, f, dtype=torch.float64), torch.randn(E, d, f, dtype=torch.float64)
    wd = torch.randn(E, f, d, dtype=torch.float64)
    idx = torch.topk(x @ wr.t(), k, -1).indices
    idx[:, 0] = torch.where(idx[:, 0] == 4, idx[:, 1], idx[:, 0])  # leave expert 4 mostly empty
    idx[:, 1] = torch.where(idx[:, 1] == 4, (idx[:, 0] + 1) % 4, idx[:, 1])

    def layer(x, wg, wu, wd, with_router):
        if with_router:
            p = torch.softmax(x @ wr.t(), -1).gather(1, idx)
            w = p / p.sum(-1, keepdim=True)
        else:
            w = w_fixed
        h = torch.nn.functional.silu(torch.einsum("td,tkdf->tkf", x, wg[idx])) * torch.einsum("td,tkdf->tkf", x, wu[idx])
        return (torch.einsum("tkf,tkfo->tko", h, wd[idx]) * w[..., None]).sum(1)

    p = torch.softmax(x @ wr.t(), -1).gather(1, idx)
    w_fixed = (p / p.sum(-1, keepdim=True)).detach()
    gy = torch.randn(T, d, dtype=torch.float64)
    for with_router in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, wg, wu, wd)]
        layer(*leaves, with_router).backward(gy)
        ref = H.reference(x, w_fixed, idx, wg, wu, wd, grad_out=gy, experts=[0, 4],
                          router_weight=wr if with_router else None)
        assert torch.allclose(ref["y"].double(), layer(x, wg, wu, wd, with_router), rtol=1e-5, atol=1e-5)
        assert torch.allclose(ref["dx"].double(), leaves[0].grad, rtol=1e-4, atol=1e-4)
        for e in (0, 4):
            for got, full in zip(ref["dw"][e], leaves[1:]):
                assert torch.allclose(got.double(), full.grad[e], rtol=1e-4, atol=1e-4)
        assert H.grad_error([t.grad for t in leaves[1:]], ref["dw"]) < 1e-5


def test_relative_norm_error_and_check_experts():
    a = torch.tensor([3.0, 4.0])
    assert H.relative_norm_error(a, a) == 0.0
    assert H.relative_norm_error(torch.zeros(2), a) == 1.0
    assert H.relative_norm_error(a, torch.zeros(2)) == 5.0  # absolute when the reference is zero
    assert math.isnan(H.relative_norm_error(torch.tensor([float("nan"), 0.0]), a))
    assert H.check_experts(torch.zeros(4, 2, dtype=torch.long), 8) == list(range(8))
    idx = torch.randint(0, 256, (100, 8))
    chosen = H.check_experts(idx, 256)
    assert len(chosen) == 16 == len(set(chosen))
    assert int(torch.bincount(idx.reshape(-1), minlength=256).argmax()) in chosen


# ----------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("argv,flag,accepted", [
    (["--shapes", "mixtral"], "--shapes", "mixtral-8x7b"),
    (["--smoke", "--shapes", "mixtral-8x7b"], "--shapes", "smoke-fine"),
    (["--phases", "train"], "--phases", "prefill, decode"),
    (["--modes", "bwd"], "--modes", "fwd, fwdbwd"),
    (["--routings", "random"], "--routings", "router, balanced, zipf"),
    (["--impls", "megablocks"], "--impls", "torch_grouped_mm"),
    (["--impls", ","], "--impls", "dense_equal_flops"),
    (["--dtype", "int8"], "--dtype", "bfloat16, float16, float32"),
    (["--device", "tpu"], "--device", "cpu, cuda"),
    (["--device", "cpu", "--shapes", "mixtral-8x7b"], "--device", "cpu-d128-e8"),  # production shapes need a GPU
    (["--prefill-T", "16k"], "--prefill-T", "positive integers"),
    (["--decode-T", "0,1"], "--decode-T", "positive integers"),
    (["--budget-s", "0"], "--budget-s", "> 0"),
    (["--threads", "0"], "--threads", "positive"),
])
def test_bad_cli_input_names_the_argument_and_accepted_values(argv, flag, accepted, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and accepted in err


def test_cli_defaults_and_output_names(tmp_path):
    a = parse_args(["--smoke"])
    assert a.device == "cpu" and a.dtype == "float32" and a.threads == 1
    assert [s.name for s in a.shape_list] == list(SMOKE_SHAPES) and a.prefill == list(S.SMOKE_PREFILL_T)
    a = parse_args(["--shapes", "qwen3-30b-a3b,olmoe-1b-7b", "--impls", "dense_equal_flops,moe_lib_triton",
                    "--prefill-T", "4096,32768", "--list"])
    assert [s.name for s in a.shape_list] == ["qwen3-30b-a3b", "olmoe-1b-7b"] and a.prefill == [4096, 32768]
    assert [i.name for i in a.impl_list] == ["dense_equal_flops", "moe_lib_triton"]
    cpu = torch.device("cpu")
    assert output_path(str(tmp_path / "x.json"), cpu, False, "2026-01-02") == tmp_path / "x.json"
    assert output_path(str(tmp_path), cpu, True, "2026-01-02") == tmp_path / "cpu_smoke_2026-01-02.json"
    assert main(["--list"]) == 0


def test_result_fields_are_the_documented_schema():
    assert set(H.RESULT_FIELDS) == RESULT_KEYS
    assert H.empty_result(skipped="x") == {**dict.fromkeys(RESULT_KEYS), "skipped": "x"}


def test_registry_has_every_implementation_of_the_issue():
    names = list(H.impl_registry())
    for required in ("dense_equal_flops", "moe_lib_triton", "moe_lib_fused", "moe_lib_torch", "torch_grouped_mm",
                     "hf_grouped_mm", "hf_eager", "naive_loop"):
        assert required in names
    assert names[0] == "dense_equal_flops"


# ----------------------------------------------------------------------------------------- smoke run
def test_smoke_run(tmp_path, capsys):
    """The whole ``--smoke`` run once (about 15-25 s on two cores), then its schema, its correctness
    checks, its arithmetic and its tables (one test, so that pytest-xdist runs it once)."""
    out = tmp_path / "smoke.json"
    threads = torch.get_num_threads()
    try:
        assert main(["--smoke", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "ratio to dense" in printed and f"wrote {out}" in printed
    smoke = json.loads(out.read_text())
    _check_schema(smoke)
    _check_correctness_and_ratios(smoke)
    _check_tables_and_frame(smoke)


def _check_schema(smoke):
    assert smoke["schema"] == H.SCHEMA and smoke["complete"] is True
    assert META_KEYS <= set(smoke["meta"]) and smoke["meta"]["device"] == "cpu" and smoke["meta"]["dtype"] == "float32"
    assert smoke["meta"]["gpu"] is None and smoke["meta"]["torch"] == torch.__version__
    assert {"dense_tflops", "copy_TBps"} <= set(smoke["ceilings"]) and smoke["ceilings"]["copy_TBps"] > 0
    impls = smoke["config"]["impls"]
    assert impls == list(H.impl_registry())
    assert {(c["phase"], c["mode"]) for c in smoke["cases"]} == {("prefill", "fwd"), ("prefill", "fwdbwd"), ("decode", "fwd")}
    assert {c["routing"] for c in smoke["cases"]} == set(S.ROUTINGS)
    for case in smoke["cases"]:
        assert CASE_KEYS <= set(case), case.keys()
        assert list(case["results"]) == impls
        for name, r in case["results"].items():
            assert set(r) == RESULT_KEYS, name
            assert r["error"] is None, (case["shape"], name, r["error"])
            assert r["peak_mem_gb"] is None  # CPU: no peak memory counter


def _not_applicable(name, case):
    """The reason an implementation does not apply to a smoke case (the harness's documented rules), or None:
    fused_moe routes with its own router; batched_mm is for decode sizes only. (The loop implementations'
    E > 64 fwd+bwd rule and the dense 8 GiB rule never apply to the smoke shapes.)"""
    if name == "moe_lib_fused" and case["routing"] != "router":
        return "fused_moe routes with its own router"
    if name == "hf_batched_mm" and case["T"] * case["k"] > 512:
        return "batched_mm gathers one weight copy per (token, expert) pair"
    return None


def _check_correctness_and_ratios(smoke):
    for case in smoke["cases"]:
        res = case["results"]
        dense = res["dense_equal_flops"]["ms"]
        assert dense > 0 and res["dense_equal_flops"]["ratio_to_dense"] == 1.0
        for name, r in res.items():
            if name == "dense_equal_flops":
                continue  # the baseline: timed above, nothing to check
            reason = _not_applicable(name, case)
            if reason is not None:  # skipped for exactly the documented reason, and not run at all
                assert r["skipped"] is not None and r["skipped"].startswith(reason), (case["shape"], name, r)
                assert r["correct"] is None and r["ms"] is None, (case["shape"], name, r)
                continue
            # every other implementation must have run and been checked on the CPU: a skip is a failure
            assert r["correct"] is True and r["relerr"] < 1e-4, (case["shape"], name, r)
            if case["mode"] == "fwdbwd":
                assert r["relerr_dx"] < 1e-4 and r["relerr_dw"] < 1e-4, (name, r)
            if r["ms"] is not None:
                assert r["ratio_to_dense"] == pytest.approx(dense / r["ms"])
                assert r["tflops"] == pytest.approx(case["gflop"] / r["ms"])
                if case["phase"] == "decode":
                    bw = case["weight_bytes_touched"] / r["ms"] / 1e9
                    assert r["TBps"] == pytest.approx(bw)
                    assert r["bw_share"] == pytest.approx(bw / smoke["ceilings"]["copy_TBps"])
            else:  # Triton kernels in the interpreter are checked, never timed
                assert "interpreter" in r["skipped"]
        assert res["moe_lib_triton"]["correct"] is True and res["moe_lib_triton"]["impl_used"] == "triton"


def _check_tables_and_frame(smoke):
    text = R.format_summary(smoke)
    assert "ratio to dense" in text and "share of measured copy bandwidth" in text and "untimed" in text
    assert R.format_case(smoke["cases"][0]).startswith("smoke-coarse prefill T=64 fwd routing=router")
    df = R.results_frame(smoke, "smoke")
    assert list(df.columns) == R.COLUMNS
    assert len(df) == sum(len(c["results"]) for c in smoke["cases"])
    assert set(df.family) == {"baseline", "moe_lib", "peer"}


def test_budget_cuts_cases_and_says_so(tmp_path):
    case = H.Case(SMOKE_SHAPES["smoke-fine"], "prefill", 8, "fwd", "balanced")
    impls = [H.impl_registry()["dense_equal_flops"]]
    result = H.run([case, case], impls, device=torch.device("cpu"), dtype=torch.float32, smoke=True, budget_s=1e-9,
                   out=tmp_path / "r.json", ceilings=False, log=lambda s: None)
    assert result["complete"] is False and len(result["skipped_cases"]) == 2
    assert json.loads((tmp_path / "r.json").read_text())["complete"] is False
    row = H.run_case(case, impls, {"device": torch.device("cpu"), "dtype": torch.float32}, None, deadline=0.0)
    assert row["results"]["dense_equal_flops"] == H.empty_result(skipped="time budget spent")


def test_a_failing_implementation_is_recorded_not_raised(tmp_path):
    def broken(p, grad):
        raise RuntimeError("kernel exploded")

    impls = [H.impl_registry()["dense_equal_flops"], H.Impl("broken", "peer", "always fails", broken)]
    case = H.Case(SMOKE_SHAPES["smoke-fine"], "prefill", 8, "fwd", "router")
    result = H.run([case], impls, device=torch.device("cpu"), dtype=torch.float32, smoke=True, budget_s=60,
                   out=None, ceilings=False, log=lambda s: None)
    r = result["cases"][0]["results"]
    assert r["broken"]["error"] == "build: RuntimeError: kernel exploded" and r["broken"]["ms"] is None
    assert r["dense_equal_flops"]["ms"] > 0


# -------------------------------------------------------------------------------------------- roofline
def test_roofline_arithmetic():
    s = SHAPES["olmoe-1b-7b"]
    # one token, k distinct experts: 6kdf FLOPs over k·3df weights (+ 2d activations) in bf16 -> about 1
    assert RL.arithmetic_intensity(s, 1) == pytest.approx(6 * 8 * 2048 * 1024 / (2 * (8 * 3 * 2048 * 1024 + 2 * 2048)))
    assert RL.experts_touched(s, 1) == pytest.approx(8) and RL.experts_touched(s, 10 ** 6) == pytest.approx(64)
    assert RL.moe_bytes(s, 4096, traffic="unfused") > RL.moe_bytes(s, 4096)
    with pytest.raises(ValueError, match="traffic"):
        RL.moe_bytes(s, 1, traffic="fused")
    assert RL.ridge_point(722.6, 4.248) == pytest.approx(170.1, abs=0.1)
    assert list(RL.roofline_tflops([10.0, 1000.0], 700.0, 4.0)) == [40.0, 700.0]
    assert RL.roofline_time_ms(s, 1, 700.0, 4.0) == pytest.approx(float(RL.moe_bytes(s, 1)) / 4e9)
    assert RL.tile_efficiency([128, 1], 128) == pytest.approx(129 / 256) and RL.tile_efficiency([]) == 1.0
    assert RL.wave_efficiency(133, 132) == pytest.approx(133 / 264) and RL.wave_efficiency(0) == 0.0
    assert RL.uniform_counts(s, 100).sum() == 800


def test_permutation_overhead_and_ridge_tokens():
    peak, bw = 722.6, 4.248
    for s in SHAPES.values():
        m = RL.grouped_gemm_model(s, 4096, peak, bw)
        assert RL.permutation_overhead(s, peak, bw) == pytest.approx(m["permutation_ms"] / m["gemm_ms"])
        T = RL.ridge_tokens(s, peak, bw)
        ridge = RL.ridge_point(peak, bw)
        assert RL.arithmetic_intensity(s, T) >= ridge > RL.arithmetic_intensity(s, T - 1)
    assert RL.permutation_overhead(SHAPES["qwen3-30b-a3b"], peak, bw) > 10 * RL.permutation_overhead(SHAPES["mixtral-8x7b"], peak, bw)
    assert RL.ridge_tokens(SHAPES["deepseek-v3"], peak, bw) > 4096  # the anchors' training T: bandwidth-bound
    assert RL.ridge_tokens(SHAPES["mixtral-8x7b"], peak, bw, T_max=16) is None


def test_grouped_gemm_model_is_a_bound_on_dense():
    for s in SHAPES.values():
        m = RL.grouped_gemm_model(s, 16384, 722.6, 4.248)
        assert 0 < m["ratio_bound"] <= 1 and m["dense_ms"] >= m["gemm_ms"]
    coarse = RL.grouped_gemm_model(SHAPES["mixtral-8x7b"], 16384, 722.6, 4.248)["ratio_bound"]
    fine = RL.grouped_gemm_model(SHAPES["qwen3-30b-a3b"], 16384, 722.6, 4.248)["ratio_bound"]
    assert fine < coarse


# ------------------------------------------------------------------------------- report on the anchors
@pytest.fixture(scope="module")
def anchors():
    return R.load_all()


def test_anchor_frame_reproduces_the_anchor_readme(anchors):
    df, sources = anchors
    assert sources[0]["kind"] == "anchor" and sources[0]["ceilings"]["dense_tflops"] == pytest.approx(722.6, abs=0.1)
    assert list(df.columns) == R.COLUMNS
    fwd = R.pivot(R.select(df, "prefill", "fwd"), "ratio_to_dense", R.PEERS).round(2)
    assert fwd.loc["qwen3-30b-a3b", "torch _grouped_mm"] == 0.41 and fwd.loc["deepseek-v3", "T"] == 8192
    assert fwd.loc["gpt-oss-120b", "torch _grouped_mm"] == 0.61  # from the train file's forward row
    dec = R.pivot(R.select(df, "decode", "fwd", T=64), "bw_share", R.PEERS).round(2)
    assert dec.loc["mixtral-8x7b", "torch _grouped_mm"] == 0.54 and dec.loc["olmoe-1b-7b", "HF eager"] == 0.01
    train = R.pivot(R.select(df, "prefill", "fwdbwd"), "ratio_to_dense", R.PEERS).round(2)
    assert train.loc["deepseek-v3", "torch _grouped_mm"] == 0.25 and train.loc["mixtral-8x7b", "T"] == 8192


def test_targets_table_reads_pending_without_results(anchors):
    df, _ = anchors
    t = R.targets_table(df)
    assert len(t) == 5 + 2 + 4  # every prefill shape, the two decode shapes, the fine-grained fwd+bwd shapes
    assert set(t["moe_lib (Triton)"]) == {"pending"}
    fb = t[t.target.str.startswith("fwd+bwd")]
    assert set(fb["torch _grouped_mm"]) == {1.0} and "mixtral-8x7b" not in set(fb.shape)


def test_targets_table_fills_moe_lib_from_a_result(anchors):
    import pandas as pd

    df, _ = anchors
    run = df.copy()  # a synthetic newer run: the peers again, plus a moe_lib row as fast as torch _grouped_mm
    run["source"], run["date"] = "synthetic", "2099-01-01"
    mine = run[run.impl == "torch_grouped_mm"].copy()
    mine["impl"], mine["family"], mine["impl_used"] = "moe_lib_triton", "moe_lib", "triton"
    t = R.targets_table(pd.concat([df, run, mine], ignore_index=True))
    assert "pending" not in set(t["moe_lib (Triton)"]) and set(t["measured in"]) == {"synthetic"}
    fb = t[t.target.str.startswith("fwd+bwd")]
    assert list(fb["moe_lib (Triton)"]) == [1.0] * 4
    mine["impl_used"] = "torch"  # a fallback run does not count as the Triton path
    assert set(R.targets_table(pd.concat([df, run, mine], ignore_index=True))["moe_lib (Triton)"]) == {"pending"}


def test_plots_draw(anchors):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df, sources = anchors
    c = sources[0]["ceilings"]
    fig, ax = plt.subplots(1, 5)
    R.plot_ratio_to_dense(df, ax[0], "fwd", goal=0.8)
    R.plot_ratio_to_dense(df, ax[1], "fwdbwd")
    R.plot_decode_bandwidth(df, ax[2])
    R.plot_intensity(ax[3], list(SHAPES.values()), c["dense_tflops"], c["copy_TBps"])
    R.plot_roofline(ax[4], list(SHAPES.values()), c["dense_tflops"], c["copy_TBps"],
                    measured=[("qwen3-30b-a3b", 16384, 211.2)])
    assert len(ax[0].patches) > 0 and len(ax[3].lines) > 5
    plt.close(fig)


def test_cpu_runs_take_the_cpu_shapes_by_default():
    """Issue 16, item 6: on the CPU, python -m moe_lib.bench --shapes cpu-... measures the book's three CPU shapes
    side by side (moe_lib's loop, its default backend, the peers), at T = CPU_PREFILL_T; a bare run on the CPU
    still refuses the production shapes (and names the CPU ones)."""
    a = parse_args(["--device", "cpu", "--shapes", ",".join(S.CPU_SHAPES)])
    assert [s.name for s in a.shape_list] == list(S.CPU_SHAPES) and a.prefill == list(S.CPU_PREFILL_T)
    assert {"moe_lib_loop", "moe_lib_torch", "naive_loop", "hf_grouped_mm"} <= {i.name for i in a.impl_list}
    assert [s.name for s in parse_args(["--device", "cpu", "--shapes", "cpu-d512-e8"]).shape_list] == ["cpu-d512-e8"]
