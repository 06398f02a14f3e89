"""Spread of CPU timings (chapters 10 and 11): raw samples, median and quartiles, instead of one number."""
import math

import pytest
import torch

from moe_lib.bench import timing


def test_median_iqr_known_values():
    assert timing.median_iqr([1.0, 2.0, 3.0, 4.0, 5.0]) == (3.0, 2.0, 4.0)
    assert timing.median_iqr([4.0, 1.0, 3.0, 2.0]) == (2.5, 1.75, 3.25)      # order does not matter
    assert timing.median_iqr([7.0]) == (7.0, 7.0, 7.0)
    with pytest.raises(ValueError, match="times"):
        timing.median_iqr([])
    with pytest.raises(ValueError, match="times"):
        timing.median_iqr([1.0, float("nan")])


def test_wall_times_counts_calls_and_agrees_with_wall_time_shape():
    calls = []
    times = timing.wall_times(lambda: calls.append(1), repeats=4, warmup=2)
    assert len(times) == 4 and len(calls) == 6 and all(t >= 0 for t in times)
    with pytest.raises(ValueError, match="repeats"):
        timing.wall_times(lambda: None, repeats=0)



def test_wall_times_before_hook_and_time_budget():
    """``before`` runs untimed before each timed call (not before the warm-up); ``max_s`` stops the timed
    calls once the budget is spent, keeping at least one."""
    events = []
    times = timing.wall_times(lambda: events.append("fn"), repeats=3, warmup=1, before=lambda: events.append("b"))
    assert events == ["fn", "b", "fn", "b", "fn", "b", "fn"] and len(times) == 3
    slow = timing.wall_times(lambda: __import__("time").sleep(0.02), repeats=50, warmup=0, max_s=0.01)
    assert len(slow) == 1 and slow[0] >= 0.02
    with pytest.raises(ValueError, match="max_s"):
        timing.wall_times(lambda: None, max_s=0.0)
    with pytest.raises(TypeError, match="before"):
        timing.wall_times(lambda: None, before=1)


def test_harness_time_ms_cpu_path_uses_wall_times(monkeypatch):
    """The benchmark harness's CPU timer is :func:`wall_times` (one warm-up, the gradients cleared before
    each timed call, the budget handed on) and returns the middle sample in milliseconds."""
    from moe_lib.bench import harness

    seen = {}

    def fake_wall_times(fn, repeats, warmup, device, *, max_s, before):
        seen.update(repeats=repeats, warmup=warmup, max_s=max_s)
        before()
        return [0.004, 0.001, 0.003, 0.002]

    monkeypatch.setattr(harness, "wall_times", fake_wall_times)
    leaf = torch.zeros(2, requires_grad=True)
    leaf.grad = torch.ones(2)
    ms = harness.time_ms(lambda: None, torch.device("cpu"), [leaf], cpu_reps=4, cpu_max_s=0.25)
    assert ms == pytest.approx(3.0)                        # sorted [1, 2, 3, 4] ms, index 4 // 2
    assert seen == {"repeats": 4, "warmup": 1, "max_s": 0.25} and leaf.grad is None
    real = harness.time_ms(lambda: None, torch.device("cpu"), cpu_reps=3, cpu_max_s=1.0)
    assert 0 <= real < 1e3

def test_time_implementations_quartiles_are_optional_and_ordered():
    pytest.importorskip("transformers")
    from moe_lib.interop import random_block, time_implementations

    block = random_block("mixtral", seed=0)
    x = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(0))
    plain = time_implementations(block, x, hf_implementations=("eager",), repeats=3)
    assert all("q1_ms" not in row for row in plain)                      # the old rows, unchanged
    rows = time_implementations(block, x, hf_implementations=("eager", "no_such_kernel"), repeats=3, quartiles=True)
    for row in rows:
        if math.isnan(row["median_ms"]):
            assert math.isnan(row["q1_ms"]) and math.isnan(row["q3_ms"])
        else:
            assert row["q1_ms"] <= row["median_ms"] <= row["q3_ms"]
    assert any(not math.isnan(row["median_ms"]) for row in rows)


def test_iqr_trend_counts_a_difference_only_beyond_the_scatter():
    base = (1.0, 0.9, 1.1)
    assert timing.iqr_trend(base, (1.5, 1.2, 1.6)) == "slower (1.50×)"
    assert timing.iqr_trend(base, (0.5, 0.4, 0.6)) == "faster (0.50×)"
    assert timing.iqr_trend(base, (1.15, 1.1, 1.2)) == "within the scatter (1.15×)"  # touching ranges overlap
    assert timing.iqr_trend(base, (0.85, 0.8, 0.9)) == "within the scatter (0.85×)"
    with pytest.raises(ValueError, match=r"other must be a \(median, q1, q3\) triple"):
        timing.iqr_trend(base, (1.0, 1.2, 1.1))
    with pytest.raises(ValueError, match="base must be"):
        timing.iqr_trend((0.0, 0.0, 0.0), base)
