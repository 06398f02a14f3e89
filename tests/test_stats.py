"""moe_lib.stats: repeated runs, their spread, and verdicts that say "within noise"."""
import doctest
import math
import random

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moe_lib import stats
from moe_lib.stats import compare, over_seeds, summarize, t_quantile

scipy_stats = pytest.importorskip("scipy.stats")


def test_doctests():
    assert doctest.testmod(stats).failed == 0


@pytest.mark.parametrize("df", list(range(1, 31)) + [31, 40, 60, 100, 1000])
def test_t_quantile_matches_scipy(df):
    assert t_quantile(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=2e-4)


def test_t_quantile_fractional_df_is_conservative():
    assert t_quantile(2.9) == t_quantile(2) > scipy_stats.t.ppf(0.975, 2.9)


def test_summary_known_values():
    s = summarize([1.0, 2.0, 3.0, 4.0, 5.0])
    assert s.n == 5 and s.mean == 3.0
    assert s.std == pytest.approx(math.sqrt(2.5))
    assert s.sem == pytest.approx(math.sqrt(2.5) / math.sqrt(5))
    lo, hi = scipy_stats.t.interval(0.95, 4, loc=3.0, scale=s.sem)
    assert (s.low, s.high) == pytest.approx((lo, hi), abs=1e-4)
    assert s.format(2) == "3.00 ± 1.96 (n=5)"
    assert s.format(1, n=False) == "3.0 ± 2.0"


def test_identical_values_have_zero_spread():
    s = summarize([0.25] * 4)
    assert s.mean == 0.25 and s.std == 0.0 and s.half_width == 0.0


def test_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    trials, covered = 4000, 0
    for _ in range(trials):
        s = summarize(rng.normal(1.0, 0.3, size=3))
        covered += s.low <= 1.0 <= s.high
    assert 0.93 < covered / trials < 0.97


def test_clearly_separated_methods_get_a_winner():
    rng = random.Random(0)
    a = [0.50 + rng.gauss(0, 0.01) for _ in range(5)]
    b = [0.60 + rng.gauss(0, 0.01) for _ in range(5)]
    v = compare(a, b, names=("moe", "dense"))
    assert v.winner == "moe" and v.significant and v.short() == "moe better"
    assert str(v).startswith("moe beats dense: -0.1")
    # higher-is-better flips the winner
    assert compare(a, b, names=("moe", "dense"), lower_is_better=False).winner == "dense"
    assert compare(a, b, names=("moe", "dense"), paired=False).winner == "moe"


def test_identical_distributions_are_within_noise():
    v = compare([0.5, 0.52, 0.51], [0.51, 0.50, 0.52], names=("x", "y"))
    assert v.winner is None and not v.significant and v.short() == "within noise"
    assert "within noise" in str(v)
    same = compare([0.3, 0.3, 0.3], [0.3, 0.3, 0.3])
    assert same.winner is None and same.diff.mean == 0.0


def test_same_distribution_rarely_declared_different():
    rng = np.random.default_rng(1)
    trials = 2000
    false_wins = sum(compare(rng.normal(0, 1, 3), rng.normal(0, 1, 3)).significant for _ in range(trials))
    assert false_wins / trials < 0.07  # the 95 % interval: about 5 % false verdicts


def test_pairing_removes_shared_seed_noise():
    # a seed effect much larger than the method effect: only the paired comparison sees the method
    seed_effect = [0.0, 0.3, -0.2, 0.5, -0.4]
    a = [0.50 + e for e in seed_effect]
    b = [0.52 + e + d for e, d in zip(seed_effect, [0.001, -0.001, 0.002, 0.0, -0.002])]
    assert compare(a, b).winner == "A"
    assert compare(a, b, paired=False).winner is None


def test_welch_interval_matches_scipy():
    a, b = [1.0, 1.2, 0.9, 1.1], [1.5, 1.9, 1.4, 2.2, 1.6]
    v = compare(a, b, paired=False)
    res = scipy_stats.ttest_ind(a, b, equal_var=False)
    ci = res.confidence_interval(0.95)
    # our df is floored (conservative): the interval contains scipy's
    assert v.diff.low <= ci.low + 1e-12 and v.diff.high >= ci.high - 1e-12
    assert v.diff.mean == pytest.approx(np.mean(a) - np.mean(b))


def test_over_seeds_scalar_and_mapping():
    s = over_seeds(lambda seed: float(seed), seeds=4)
    assert s.values == (0.0, 1.0, 2.0, 3.0) and s.mean == 1.5
    d = over_seeds(lambda seed: {"loss": seed * 2.0, "acc": 1.0 - seed / 10}, seeds=[3, 5])
    assert list(d) == ["loss", "acc"] and d["loss"].values == (6.0, 10.0)


@pytest.mark.parametrize("seeds, err", [(1, ValueError), ([0], ValueError), ([0, 0], ValueError),
                                        (True, TypeError), ("01", ValueError), ([0, 1.5], ValueError)])
def test_over_seeds_bad_seeds(seeds, err):
    with pytest.raises(err, match="seeds"):
        over_seeds(lambda s: 1.0, seeds=seeds)


def test_over_seeds_inconsistent_keys():
    with pytest.raises(ValueError, match="keys"):
        over_seeds(lambda s: {"a": 1.0} if s == 0 else {"b": 1.0}, seeds=2)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="values needs at least 2"):
        summarize([1.0])
    with pytest.raises(ValueError, match="non-finite"):
        summarize([1.0, float("nan")])
    with pytest.raises(ValueError, match="paired=True needs as many values"):
        compare([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="names must be a tuple"):
        compare([1.0, 2.0], [1.0, 2.0], names="ab")
    with pytest.raises(ValueError, match="confidence must be 0.95"):
        t_quantile(3, confidence=0.9)
    with pytest.raises(ValueError, match="reference must be one of"):
        stats.table({"a": [1.0, 2.0]}, reference="b")


def test_table_columns_and_verdicts():
    pytest.importorskip("pandas")
    t = stats.table({"dense": [0.60, 0.61, 0.62], "moe": [0.50, 0.51, 0.52], "moe2": [0.61, 0.60, 0.62]},
                    reference="dense")
    assert list(t.columns) == ["mean", "± 95% CI", "std", "n", "vs dense"]
    assert list(t["vs dense"]) == ["reference", "better", "within noise"]
    assert t.loc["moe", "mean"] == 0.51 and t.loc["moe", "n"] == 3


@given(st.lists(st.floats(-1e3, 1e3), min_size=2, max_size=8), st.floats(-10, 10))
def test_shift_invariance_and_symmetry(values, shift):
    s, t = summarize(values), summarize([v + shift for v in values])
    assert t.mean == pytest.approx(s.mean + shift, abs=1e-6)
    assert t.half_width == pytest.approx(s.half_width, rel=1e-6, abs=1e-6)
    other = [v + 1.0 for v in values]
    ab, ba = compare(values, other, names=("x", "y")), compare(other, values, names=("y", "x"))
    assert ab.diff.mean == pytest.approx(-ba.diff.mean) and ab.winner == ba.winner


def test_summarize_curves_and_band():
    curves = [[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]
    mean, half = stats.summarize_curves(curves)
    assert list(mean) == [2.0, 2.0, 2.0] and half[1] == 0.0
    assert half[0] == pytest.approx(t_quantile(1) * math.sqrt(2) / math.sqrt(2))
    with pytest.raises(ValueError, match="curves must be"):
        stats.summarize_curves([[1.0, 2.0]])
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moe_lib.book.plot import mean_band
    fig, ax = plt.subplots()
    line = mean_band(ax, [0, 1, 2], curves, label="moe")
    assert line.get_label() == "moe (n=2)" and len(ax.collections) == 1
    plt.close(fig)


def test_outcome_reads_from_the_first_methods_side():
    low, high = [0.50, 0.51, 0.52], [0.60, 0.61, 0.62]
    assert compare(low, high, names=("a", "b")).outcome == "better"
    assert compare(high, low, names=("b", "a")).outcome == "worse"
    assert compare(low, high, names=("a", "b"), lower_is_better=False).outcome == "worse"
    assert compare(low, [0.51, 0.50, 0.52], names=("a", "b")).outcome == "within noise"
