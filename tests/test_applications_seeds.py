"""Chapter 17's repeated-run helpers: one multi-task run, one anomaly run, the vision learning-rate sweep."""
import math

import pytest
import torch

from moe_lib.applications import (MMoE, SharedBottom, VisionMoE, anomaly_aucs, lr_sweep, num_parameters, pick_lr,
                                  relative_error_run, routing_purity, split_validation)


def test_relative_error_run_is_deterministic_and_paired():
    a = relative_error_run(lambda: SharedBottom(100, 8, 4), 0.5, 3, n_train=200, n_test=200, steps=5)
    b = relative_error_run(lambda: SharedBottom(100, 8, 4), 0.5, 3, n_train=200, n_test=200, steps=5)
    assert a == b and math.isfinite(a) and a > 0
    assert relative_error_run(lambda: SharedBottom(100, 8, 4), 0.5, 4, n_train=200, n_test=200, steps=5) != a
    with pytest.raises(ValueError, match="task_seed"):
        relative_error_run(lambda: SharedBottom(100, 8, 4), 0.5, -1)


def test_chapter_17_models_have_matched_parameter_counts():
    from moe_lib.applications import OMoE

    counts = [num_parameters(m) for m in (SharedBottom(100, 22, 8), OMoE(100, 4, 5, 4, 8), MMoE(100, 4, 4, 4, 8))]
    assert max(counts) / min(counts) < 1.01
    dense = VisionMoE(num_experts=1, top_k=1, d_ff=263)
    moe = VisionMoE(num_experts=8, top_k=2, d_ff=32)
    assert abs(num_parameters(dense) - num_parameters(moe)) / num_parameters(moe) < 0.001


def test_anomaly_aucs_keys_and_separation():
    out = anomaly_aucs(0, 1000, epochs=10)
    assert list(out) == ["mixture", "single model"]
    assert all(0.0 <= v <= 1.0 for v in out.values())
    assert out["mixture"] > out["single model"]
    assert anomaly_aucs(0, 1000, epochs=10) == out


def test_split_validation_is_a_disjoint_partition():
    x = torch.arange(50, dtype=torch.float32).reshape(50, 1, 1)
    y = torch.arange(50)
    xf, yf, xv, yv = split_validation(x, y, 0.2, seed=1)
    assert len(yv) == 10 and len(yf) == 40
    assert sorted(torch.cat([yf, yv]).tolist()) == list(range(50))
    assert torch.equal(xf.reshape(-1).long(), yf)
    with pytest.raises(ValueError, match="fraction"):
        split_validation(x, y, 1.0)


def test_pick_lr_ranks_on_rounded_means_first_rate_wins_ties():
    sweep = {1e-3: {"val": [0.90, 0.91]}, 1e-2: {"val": [0.9050001, 0.9050001]}, 1e-1: {"val": [0.2, 0.3]}}
    assert pick_lr(sweep) == 1e-3                     # 0.905 vs 0.905 printed: the first listed wins
    sweep[1e-2]["val"] = [0.95, 0.95]
    assert pick_lr(sweep) == 1e-2


def test_lr_sweep_shapes_and_routing_purity():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(40, 8, 8, generator=g), torch.arange(40) % 10
    sweep = lr_sweep(lambda: VisionMoE(d_model=8, d_ff=4, num_experts=4, top_k=2), [1e-3, 1e-2], [0, 1],
                     x[:24], y[:24], x[24:32], y[24:32], x[32:], y[32:], epochs=1, batch_size=8, keep_models=True)
    assert list(sweep) == [1e-3, 1e-2]
    assert all(len(r["val"]) == len(r["test"]) == len(r["models"]) == 2 for r in sweep.values())
    again = lr_sweep(lambda: VisionMoE(d_model=8, d_ff=4, num_experts=4, top_k=2), [1e-3], [0, 1],
                     x[:24], y[:24], x[24:32], y[24:32], x[32:], y[32:], epochs=1, batch_size=8)
    assert again[1e-3]["val"] == sweep[1e-3]["val"] and "models" not in again[1e-3]
    pur = routing_purity(sweep[1e-2]["models"][0], x, y)
    assert 0.25 <= pur["by position"] <= 1.0 and 0.25 <= pur["by class"] <= 1.0
    assert int(pur["class counts"].sum()) == int(pur["position counts"].sum()) == 40 * 16
