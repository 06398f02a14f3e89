"""Chapters 5-6 over seeds: moe_lib.book.tasks.train_over_seeds and summary_table."""
import numpy as np
import pytest

from moe_lib.stats import Summary, summarize
from moe_lib.book.tasks import SeedRuns, multi_domain_task, summary_table, train_and_evaluate, train_over_seeds

SMALL = dict(steps=4, batch_size=64, num_experts=4, top_k=2, d_model=8, d_ff=8, expert="mlp")


@pytest.fixture(scope="module")
def data():
    return multi_domain_task(256, seed=0), multi_domain_task(128, seed=1)


def test_train_over_seeds_matches_single_runs(data):
    train, test = data
    runs = train_over_seeds(train, test, seeds=[3, 5], **SMALL)
    assert runs.seeds == (3, 5) and len(runs.histories) == 2 and len(runs.models) == 2
    for i, seed in enumerate((3, 5)):
        _, history, metrics = train_and_evaluate(train, test, seed=seed, **SMALL)
        for key, value in metrics.items():
            assert runs[key].values[i] == value  # same seed, same run: bit for bit
        assert runs.histories[i].max_violation == history.max_violation
    assert runs.curves("max_violation").shape == (2, SMALL["steps"])
    assert runs["accuracy"].mean == pytest.approx(np.mean(runs["accuracy"].values))


def test_train_over_seeds_count_and_options(data):
    train, test = data
    runs = train_over_seeds(train, test, seeds=2, keep_models=False, **SMALL)
    assert runs.seeds == (0, 1) and runs.models == [] and isinstance(runs["loss"], Summary)
    with pytest.raises(TypeError, match="seeds="):
        train_over_seeds(train, test, seeds=2, seed=0, **SMALL)
    with pytest.raises(ValueError):
        train_over_seeds(train, test, seeds=1, **SMALL)  # one seed shows no spread


def _fake(**values):
    return {k: summarize(v) for k, v in values.items()}


def test_summary_table_cells_and_verdicts():
    results = {
        "base": _fake(loss=[1.00, 1.01, 0.99], acc=[0.80, 0.81, 0.79]),
        "clearly better": _fake(loss=[0.50, 0.51, 0.49], acc=[0.90, 0.91, 0.89]),
        "same": _fake(loss=[1.01, 0.99, 1.00], acc=[0.81, 0.79, 0.80]),
    }
    table = summary_table(results, {"loss": "loss", "acc": "accuracy"}, reference="base",
                          verdicts={"loss": True, "acc": False}, decimals={"acc": 2})
    assert list(table.columns) == ["loss", "accuracy", "n", "loss vs base", "accuracy vs base"]
    assert table.loc["base", "loss"] == "1.000 ± 0.025" and table.loc["base", "accuracy"] == "0.80 ± 0.02"
    assert table.loc["base", "loss vs base"] == "reference"
    assert table.loc["clearly better", "loss vs base"] == "better"
    assert table.loc["clearly better", "accuracy vs base"] == "better"  # higher accuracy wins
    assert table.loc["same", "loss vs base"] == "within noise"
    assert table.loc["same", "accuracy vs base"] == "within noise"
    assert (table["n"] == 3).all()
    worse = summary_table({"a": results["clearly better"], "b": results["base"]}, ["loss"], reference="a",
                          verdicts={"loss": True})
    assert worse.loc["b", "loss vs a"] == "worse"


def test_summary_table_accepts_seed_runs_and_checks_reference():
    runs = SeedRuns((0, 1), _fake(loss=[1.0, 2.0]), [], [])
    table = summary_table({"x": runs}, ["loss"])
    assert table.loc["x", "loss"] == "1.500 ± 6.353" and list(table.columns) == ["loss", "n"]
    with pytest.raises(ValueError, match="reference"):
        summary_table({"x": runs}, ["loss"], reference="y")
    with pytest.raises(ValueError, match="reference"):
        summary_table({"x": runs}, ["loss"], verdicts={"loss": True})
