"""Repeated-run helpers of the systems chapters (13 expert parallelism, 14 serving, 18 business)."""
import math

import pytest

from moe_lib.distributed import traffic_summary
from moe_lib.distributed.cost import a2a_bytes


def _rows(values_by_seed, tokens=64, top_k=2, ranks=4):
    # every rank of a seed sends the same bytes, so the per-seed mean over ranks is that value
    return [{"rank": r, "tokens": tokens, "top_k": top_k, "seed": s, "sent_remote_bytes": v}
            for s, v in enumerate(values_by_seed) for r in range(ranks)]


def test_traffic_summary_known_mean_and_spread():
    model = a2a_bytes(64, 2, 16, 4, 4)
    vals = [model * 0.98, model * 1.00, model * 1.02]
    out = traffic_summary(_rows(vals), d_model=16, world_size=4, bytes_per_elem=4)
    row = out.iloc[0]
    assert row["seeds"] == 3
    assert row["measured / model"] == pytest.approx(1.0)
    assert row["std ratio"] == pytest.approx(0.02)
    assert row["± ratio"] == pytest.approx(4.3027 * 0.02 / math.sqrt(3), rel=1e-4)
    assert row["model_KB"] == pytest.approx(model / 1e3)
    assert bool(row["model in CI"])


def test_traffic_summary_flags_a_model_outside_the_interval():
    model = a2a_bytes(64, 2, 16, 4, 4)
    out = traffic_summary(_rows([model * 1.10, model * 1.11, model * 1.12]), d_model=16, world_size=4)
    assert not bool(out.iloc[0]["model in CI"])


def test_traffic_summary_needs_seeds():
    rows = _rows([1000.0])
    with pytest.raises(ValueError, match="at least 2"):
        traffic_summary(rows, d_model=16, world_size=4)
    with pytest.raises(ValueError, match="--seeds"):
        traffic_summary([{k: v for k, v in r.items() if k != "seed"} for r in rows], d_model=16, world_size=4)


def _tiny_lm_config():
    from moe_lib.models import LMConfig

    return LMConfig(vocab_size=32, seq_len=8, d_model=16, n_layers=1, n_heads=2, ffn="moe", d_ff=16,
                    num_experts=4, top_k=2)


def test_random_trace_shape_and_counts():
    import torch

    from moe_lib.book.serving import random_trace

    tr = random_trace(8, 2, 3, 10, torch.Generator().manual_seed(0))
    assert len(tr) == 10
    assert all(2 <= len(s) <= 6 and s == sorted(set(s)) and all(0 <= e < 8 for e in s) for s in tr)
    assert random_trace(8, 8, 1, 2) == [list(range(8))] * 2
    with pytest.raises(ValueError):
        random_trace(8, 9, 1, 1)


def test_time_decode_spread_keys():
    from moe_lib import MoELayer
    from moe_lib.book.serving import time_decode

    layer = MoELayer(d_model=8, d_ff=8, num_experts=4, top_k=1).eval()
    plain = time_decode(layer, 8, [2], repeats=3)
    assert set(plain[0]) == {"batch", "ms", "tokens_per_s"}  # unchanged without spread
    row = time_decode(layer, 8, [2], repeats=5, spread=True)[0]
    assert row["ms_p25"] <= row["ms"] <= row["ms_p75"]


def test_time_decode_median_of_an_even_number_of_repeats(monkeypatch):
    """With two repeats the median is the mean of the two times, inside its quartiles (it was the larger
    one, above the interpolated upper quartile, and chapter 14's error bars went negative)."""
    from moe_lib import MoELayer
    from moe_lib.bench import timing
    from moe_lib.book.serving import time_decode

    monkeypatch.setattr(timing, "wall_times", lambda fn, repeats, warmup, device: [0.002, 0.004][:repeats])
    layer = MoELayer(d_model=8, d_ff=8, num_experts=4, top_k=1).eval()
    row = time_decode(layer, 8, [2], repeats=2, spread=True)[0]
    assert row["ms"] == pytest.approx(3.0) and row["tokens_per_s"] == pytest.approx(2 / 0.003)
    assert row["ms_p25"] == pytest.approx(2.5) and row["ms_p75"] == pytest.approx(3.5)


def test_timers_synchronise_on_the_device_of_what_they_time(monkeypatch):
    """time_decode and time_implementations hand the layer's (the input's) device to wall_times, which
    synchronises CUDA around each call: without it a GPU time is the launch time of asynchronous kernels.
    A layer on the meta device stands in for a GPU here; the tokens go to the layer's device."""
    import torch

    from moe_lib import MoELayer
    from moe_lib.bench import timing
    from moe_lib.interop import random_block, time_implementations
    from moe_lib.book.serving import time_decode

    seen = []

    def fake_wall_times(fn, repeats, warmup, device):
        seen.append(torch.device(device))
        return [0.001] * repeats

    monkeypatch.setattr(timing, "wall_times", fake_wall_times)
    layer = MoELayer(d_model=8, d_ff=8, num_experts=4, top_k=1).to("meta")
    time_decode(layer, 8, [2], repeats=2)
    assert seen == [torch.device("meta")]
    pytest.importorskip("transformers")
    block = random_block("mixtral", seed=0)
    x = torch.randn(1, 8, 32)
    time_implementations(block, x, backends=(), hf_implementations=("eager",), repeats=2)
    assert seen[1:] == [torch.device("cpu")] and len(seen) == 2


def test_touched_and_cache_experiments_are_seeded():
    import torch

    from moe_lib.book.serving import cache_experiment, touched_experiment

    cfg = _tiny_lm_config()
    a = touched_experiment(0, [1, 4], cfg, trials=5, big=(8, 2), tokens=64)
    assert a == touched_experiment(0, [1, 4], cfg, trials=5, big=(8, 2), tokens=64)
    assert a[("E=8,k=2", 1)] == 2 and a[("LM E=4,k=2", 1)] == 2  # one token touches exactly k experts
    prompt = torch.randint(0, 32, (2, 4), generator=torch.Generator().manual_seed(0))
    b = cache_experiment(1, cfg, prompt, steps=3, capacities=[0, 4])
    assert b == cache_experiment(1, cfg, prompt, steps=3, capacities=[0, 4])
    assert b[("LM", 0)] == 0.0 and b[("random", 0)] == 0.0
    assert 2 <= b[("LM", "distinct per step")] <= 4


def test_headline_numbers_from_the_committed_anchors():
    from pathlib import Path

    from moe_lib.bench import report as R

    frame, sources = R.load_all(Path(__file__).resolve().parents[1])
    anchor = next(s for s in sources if s["kind"] == "anchor")
    hl = R.headline_numbers(frame, anchor["ceilings"]["dense_tflops"])
    lo, hi = hl["coarse_fwd"]
    assert 0 < lo <= hi
    assert hl["coarse_fwd_extra_time"] == pytest.approx(1 / lo - 1)
    # a ratio of 0.794 is 26 % more time, not "at most a fifth slower"
    assert hl["coarse_fwd_slowest"] == "hf_grouped_mm" and hl["coarse_fwd_extra_time"] > 0.2
    for key in ("fine_fwd_torch_grouped_mm", "fine_fwd_loops", "fine_fwd_best_share_of_peak", "fwdbwd_mem_hf_over_grouped"):
        assert hl[key][0] <= hl[key][1]
    assert hl["fine_fwd_loops"][1] < hl["fine_fwd_torch_grouped_mm"][0]


def test_model_shape_from_the_mixtral_architecture_table():
    from moe_lib.book.business import ModelShape

    arch = dict(d_model=4096, n_layers=32, d_ff=14336, n_heads=32, n_kv_heads=8, head_dim=128, vocab_size=32000)
    mixtral = ModelShape.from_architecture("Mixtral", num_experts=8, top_k=2, **arch)
    assert mixtral.total_params == 46_702_792_704   # "46.7B" at release, "47B" in the paper
    assert mixtral.active_params == 12_879_925_248  # "12.9B" / "13B"
    mistral = ModelShape.from_architecture("Mistral 7B", **arch)
    assert mistral.total_params == 7_241_732_096 and mistral.num_experts == 1
    with pytest.raises(ValueError):
        ModelShape.from_architecture("bad", num_experts=2, top_k=3, **arch)


def test_breakeven_batch_rounds_ties():
    from moe_lib.book.business import Hardware, ModelShape, breakeven_batch

    hw = Hardware("gpu", memory_GB=1000, bandwidth_TBps=4.0, peak_tflops=700.0, price_per_hour=1.0)
    moe = ModelShape.moe("moe", 46.7e9, 12.9e9, num_experts=8, top_k=2)
    # at batch 1 the MoE reads its active weights, as much as the same-active dense model: equal costs
    same_active = ModelShape("dense", moe.active_params * (1 + 1e-15))
    assert breakeven_batch(moe, same_active, hw, decimals=3) is None
    assert breakeven_batch(moe, ModelShape("dense total", 46.7e9), hw, decimals=3) == 1
