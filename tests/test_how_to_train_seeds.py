"""Chapter 4 over seeds: the per-seed view of a table of runs, the summary table with paired verdicts, and
the ratio verdict for errors that span orders of magnitude."""
import pandas as pd
import pytest

from moe_lib.classic import per_seed, ratio_verdict, recipe_summary


def _runs():
    rows = []
    for seed in range(4):
        for n in (10, 20):
            for method, value in (("dense", 1.0), ("good", 0.5), ("same", 1.0)):
                noise = 0.01 * (seed - 1.5)
                rows.append({"seed": seed, "n_train": n, "method": method, "test MSE": value + noise
                             + (0.02 * seed if method == "same" and seed % 2 else 0.0)})
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0)  # shuffled: per_seed must sort by seed


def test_per_seed_orders_by_seed_and_checks_pairing():
    values = per_seed(_runs(), "test MSE", 10)
    assert set(values) == {"dense", "good", "same"}
    assert values["dense"] == pytest.approx([0.985, 0.995, 1.005, 1.015])
    broken = _runs()
    broken = broken[~((broken.method == "good") & (broken.seed == 2))]
    with pytest.raises(ValueError, match="same seeds"):
        per_seed(broken, "test MSE", 10)


def test_recipe_summary_gives_mean_interval_and_paired_verdicts():
    table = recipe_summary(_runs(), "test MSE", (10, 20), reference="dense")
    assert list(table.columns) == ["n=10", "vs reference, n=10", "n=20", "vs reference, n=20"]
    assert table.loc["dense", "vs reference, n=10"] == "reference"
    assert table.loc["good", "vs reference, n=20"] == "better"       # 0.5 vs 1.0, same noise: clear
    assert table.loc["same", "vs reference, n=10"] == "within noise"  # equal means up to a jitter
    assert table.loc["good", "n=10"] == "0.500 ± 0.021"
    with pytest.raises(ValueError, match="reference"):
        recipe_summary(_runs(), "test MSE", (10,), reference="nope")


def test_ratio_verdict_on_errors_spanning_orders_of_magnitude():
    blend = [0.05, 0.09, 0.06, 0.05, 0.05]
    alone = [6.7, 0.63, 66.0, 2.6, 17.0]          # every seed far worse, one by 1000x
    text, v = ratio_verdict(alone, blend, names=("alone", "blend"))
    assert v.winner == "blend" and text.startswith("×")
    same, v2 = ratio_verdict([1.0, 2.0, 4.0], [1.1, 1.8, 4.2], names=("a", "b"))
    assert v2.winner is None and "95% CI" in same
    with pytest.raises(ValueError, match="positive"):
        ratio_verdict([0.0, 1.0], [1.0, 1.0])
