"""Chapter 8's repeated-runs helpers: spread_windows, loss_on_windows, train_over_seeds, speedups."""
import math

import pytest
import torch

from moe_lib.models.windows import fixed_windows, spread_windows
from moe_lib.models import LMConfig, LMHistory, TransformerLM, evaluate_lm, lm_variants
from moe_lib.models.comparison import SeedRun, loss_on_windows, speedups, train_over_seeds


def test_spread_windows_cover_the_whole_split():
    data = torch.arange(1001) % 256
    x_all, y_all = fixed_windows(data, 10)  # 100 windows
    x, y = spread_windows(data, 10, 5)
    assert x.shape == (5, 10) and y.shape == (5, 10)
    # evenly spaced, first and last window included
    assert x[:, 0].tolist() == [x_all[i, 0].item() for i in (0, 25, 50, 74, 99)]
    assert torch.equal(y[:, :-1], x[:, 1:])  # targets are the inputs shifted by one
    for count in (None, 100, 500):
        xa, ya = spread_windows(data, 10, count)
        assert torch.equal(xa, x_all) and torch.equal(ya, y_all)
    assert spread_windows(data, 10, 1)[0].shape == (1, 10)
    with pytest.raises(ValueError):
        spread_windows(data, 10, 0)


def test_loss_on_windows_matches_evaluate():
    torch.manual_seed(0)
    model = TransformerLM(LMConfig(seq_len=8, d_model=16, n_heads=2, d_ff=16, n_layers=1))
    data = torch.randint(0, 256, (200,))
    x, y = fixed_windows(data, 8)
    got = loss_on_windows(model, x, y, batch_size=7)
    assert got == pytest.approx(evaluate_lm(model, data, max_windows=None)["loss"], rel=1e-6)


def _tiny_configs():
    return lm_variants(d_model=16, n_layers=1, n_heads=2, seq_len=8, d_ff=8, num_experts=2, granularity=2,
                       backend="loop")


def test_train_over_seeds_pairs_runs_and_reproduces():
    data = (torch.arange(3000) * 7 % 97).long()
    configs = {k: v for k, v in _tiny_configs().items() if k in ("dense", "switch")}
    kwargs = dict(seeds=[0, 1], steps=6, batch_size=4, eval_every=3, eval_windows=5)
    runs = train_over_seeds(configs, data[:2500], data[2500:], **kwargs)
    assert list(runs) == ["dense", "switch"]
    for seed_runs in runs.values():
        assert [r.seed for r in seed_runs] == [0, 1]
        for r in seed_runs:
            assert r.history.eval_step == [3, 6]  # no step-0 point; the last point is the final loss
            assert r.final_loss == r.history.val_loss[-1]
            assert r.train_seconds >= 0
    assert runs["dense"][0].final_loss != runs["dense"][1].final_loss  # seeds differ
    again = train_over_seeds(configs, data[:2500], data[2500:], **kwargs)
    assert [r.final_loss for r in again["switch"]] == [r.final_loss for r in runs["switch"]]


def test_train_over_seeds_rejects_mixed_context_lengths():
    cfgs = {"a": LMConfig(seq_len=8, d_model=16, n_heads=2), "b": LMConfig(seq_len=16, d_model=16, n_heads=2)}
    with pytest.raises(ValueError, match="seq_len"):
        train_over_seeds(cfgs, torch.zeros(100, dtype=torch.long), torch.zeros(100, dtype=torch.long),
                         seeds=[0], steps=1)


def _run(name, seed, losses, every=10):
    h = LMHistory(eval_step=[every * (i + 1) for i in range(len(losses))], val_loss=list(losses))
    return SeedRun(name, seed, h, losses[-1], 0.0)


def test_speedups_step_basis():
    runs = {
        "dense": [_run("dense", 0, [3.0, 2.0]), _run("dense", 1, [3.0, 2.5, 2.0])],
        "fast": [_run("fast", 0, [2.0, 1.5]), _run("fast", 1, [2.6, 2.2, 2.1])],
    }
    out = speedups(runs)
    assert out["dense"] == [1.0, 1.0]
    assert out["fast"][0] == pytest.approx(20 / 10)  # reaches 2.0 at its first evaluation
    assert math.isnan(out["fast"][1])  # never reaches 2.0
    with pytest.raises(ValueError):
        speedups(runs, reference="nope")
    with pytest.raises(ValueError, match="pair"):
        speedups({"dense": runs["dense"], "fast": runs["fast"][:1]})
