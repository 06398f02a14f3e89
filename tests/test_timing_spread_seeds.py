"""Spread of CPU timings (chapters 10 and 11): raw samples, median and quartiles, instead of one number."""
import math

import pytest
import torch

from moe_lib import grouping as G


def test_median_iqr_known_values():
    assert G.median_iqr([1.0, 2.0, 3.0, 4.0, 5.0]) == (3.0, 2.0, 4.0)
    assert G.median_iqr([4.0, 1.0, 3.0, 2.0]) == (2.5, 1.75, 3.25)      # order does not matter
    assert G.median_iqr([7.0]) == (7.0, 7.0, 7.0)
    with pytest.raises(ValueError, match="times"):
        G.median_iqr([])
    with pytest.raises(ValueError, match="times"):
        G.median_iqr([1.0, float("nan")])


def test_wall_times_counts_calls_and_agrees_with_wall_time_shape():
    calls = []
    times = G.wall_times(lambda: calls.append(1), repeats=4, warmup=2)
    assert len(times) == 4 and len(calls) == 6 and all(t >= 0 for t in times)
    with pytest.raises(ValueError, match="repeats"):
        G.wall_times(lambda: None, repeats=0)


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
