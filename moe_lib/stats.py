"""Repeated runs and their noise: run an experiment over seeds, summarise it, and compare two methods with a
verdict that says "within noise" when the difference does not clear it.

A single training run is one draw from a distribution: another seed moves its loss by more than many of the
differences a chapter would like to explain. Every comparison in the book therefore goes through this module:

>>> from moe_lib.stats import summarize, compare
>>> a = summarize([0.50, 0.52, 0.51])
>>> print(a)
0.510 ± 0.025 (n=3)
>>> print(compare([0.50, 0.52, 0.51], [0.60, 0.61, 0.62], names=("top-2", "top-1")))
top-2 beats top-1: -0.100 ± 0.025 (95% CI of top-2 − top-1, paired over 3 seeds)
>>> print(compare([0.50, 0.52, 0.51], [0.51, 0.50, 0.52], names=("top-2", "top-1")))
top-2 vs top-1: within noise (+0.000 ± 0.043, 95% CI of top-2 − top-1, paired over 3 seeds)

The spread is a Student-t confidence interval for the mean (Student 1908; any statistics text): with ``n``
values of mean ``m`` and sample standard deviation ``s``, ``m ± t_{n-1}(0.975) · s / √n`` covers the true
mean in 95 % of repeated experiments when the values are roughly normal. With 3 seeds ``t_2(0.975) = 4.30``,
so the interval is wide: that is the honest price of 3 seeds, and why cheap experiments use 5.

Two methods run on the same seeds (same data, same initialisation stream) are compared *paired*: the
interval is that of the per-seed differences, which removes the noise both methods share. Otherwise Welch's
interval (unequal variances, Welch 1947) is used. The verdict names a winner only when the interval of the
difference excludes zero.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Summary", "Verdict", "t_quantile", "summarize", "summarize_curves", "over_seeds", "compare", "table"]

# Two-sided 95 % quantiles t_df(0.975) of Student's t distribution, df = 1..30 (standard tables; checked
# against scipy.stats.t.ppf in tests/test_stats.py). Larger df use the Cornish-Fisher expansion below.
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
_Z975 = 1.959964


def t_quantile(df: float, confidence: float = 0.95) -> float:
    """``t_df((1 + confidence) / 2)``: the half-width multiplier of a two-sided Student-t interval.

    Only ``confidence = 0.95`` is tabulated (the book's one convention). A fractional ``df`` (Welch) is
    rounded *down*, which widens the interval slightly (conservative).
    """
    if confidence != 0.95:
        raise ValueError(f"confidence must be 0.95 (the book's one convention), got {confidence!r}")
    if not df >= 1:
        raise ValueError(f"df must be >= 1 (at least 2 values per summary), got {df!r}")
    d = int(math.floor(df))
    if d <= len(_T975):
        return _T975[d - 1]
    z = _Z975  # Cornish-Fisher expansion of t around the normal quantile (error < 1e-4 for df > 30)
    return z + (z**3 + z) / (4 * d) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * d**2)


def _as_values(values: Iterable[float], name: str) -> tuple[float, ...]:
    if isinstance(values, Summary):
        return values.values
    try:
        out = tuple(float(v) for v in values)
    except TypeError as err:
        raise TypeError(f"{name} must be an iterable of numbers (one per seed), got {type(values).__name__}") from err
    if len(out) < 2:
        raise ValueError(f"{name} needs at least 2 values (one per seed) to show a spread, got {len(out)}")
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} holds a non-finite value: {out}")
    return out


@dataclass(frozen=True)
class Summary:
    """Mean and spread of one quantity over ``n`` seeds.

    ``half_width`` is the 95 % Student-t half-width of the mean, ``low``/``high`` the interval's ends;
    ``std`` the sample standard deviation (``ddof=1``), ``sem = std / √n``.
    """

    values: tuple[float, ...]
    mean: float
    std: float
    sem: float
    half_width: float

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def format(self, decimals: int = 3, n: bool = True) -> str:
        """``"mean ± half_width (n=…)"`` with ``decimals`` digits after the point."""
        text = f"{self.mean:.{decimals}f} ± {self.half_width:.{decimals}f}"
        return f"{text} (n={self.n})" if n else text

    def __str__(self) -> str:
        return self.format()


def summarize(values: Iterable[float], confidence: float = 0.95) -> Summary:
    """Mean, standard deviation, standard error and 95 % t-interval half-width of ``values`` (≥ 2)."""
    vals = _as_values(values, "values")
    n = len(vals)
    mean = math.fsum(vals) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1))
    sem = std / math.sqrt(n)
    return Summary(vals, mean, std, sem, t_quantile(n - 1, confidence) * sem)


def summarize_curves(curves) -> tuple:
    """Pointwise mean and 95 % t half-width of ``curves`` (``[n_seeds, n_points]``, ``n_seeds`` ≥ 2): the line
    and the band of a training curve over seeds (see :func:`moe_lib.book.plot.mean_band`). Returns NumPy arrays."""
    import numpy as np

    arr = np.asarray(curves, dtype=float)
    if arr.ndim != 2 or arr.shape[0] < 2:
        raise ValueError(f"curves must be [n_seeds >= 2, n_points], got shape {arr.shape}")
    mean = arr.mean(axis=0)
    sem = arr.std(axis=0, ddof=1) / math.sqrt(arr.shape[0])
    return mean, t_quantile(arr.shape[0] - 1) * sem


def over_seeds(fn: Callable[[int], float | Mapping[str, float]], seeds: Sequence[int] | int = 3):
    """Run ``fn(seed)`` for each seed and summarise what it returns.

    ``seeds`` is a sequence of ints or a count ``n`` (seeds ``0..n-1``). ``fn`` returns a number (the result
    is a :class:`Summary`) or a mapping of names to numbers, the same names every seed (the result is a
    ``dict`` name → :class:`Summary`, in ``fn``'s order). Each summary keeps its per-seed ``values`` in seed
    order, so two methods run over the same seeds can be compared paired.
    """
    if isinstance(seeds, bool) or not isinstance(seeds, (int, Sequence)):
        raise TypeError(f"seeds must be a count or a sequence of ints, got {seeds!r}")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if len(seed_list) < 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in seed_list):
        raise ValueError(f"seeds must give at least 2 integer seeds (a spread needs 2 runs), got {seeds!r}")
    if len(set(seed_list)) != len(seed_list):
        raise ValueError(f"seeds must be distinct, got {seed_list}")
    results = [fn(s) for s in seed_list]
    if all(isinstance(r, Mapping) for r in results):
        keys = list(results[0])
        for s, r in zip(seed_list, results):
            if list(r) != keys:
                raise ValueError(f"fn returned keys {list(r)} for seed {s} but {keys} for seed {seed_list[0]}")
        return {k: summarize([r[k] for r in results]) for k in keys}
    if any(isinstance(r, Mapping) for r in results):
        raise TypeError("fn must return a number for every seed, or a mapping for every seed")
    return summarize(results)


@dataclass(frozen=True)
class Verdict:
    """The difference ``a − b`` over seeds, and who wins if the 95 % interval of the difference excludes 0.

    ``winner`` is one of ``names`` or ``None`` ("within noise"); ``diff`` summarises the paired per-seed
    differences (``paired=True``) or holds Welch's interval (``paired=False``: ``diff.values`` is empty).
    """

    names: tuple[str, str]
    diff: Summary
    paired: bool
    lower_is_better: bool

    @property
    def winner(self) -> str | None:
        if self.diff.low > 0:
            return self.names[1] if self.lower_is_better else self.names[0]
        if self.diff.high < 0:
            return self.names[0] if self.lower_is_better else self.names[1]
        return None

    @property
    def significant(self) -> bool:
        return self.winner is not None

    @property
    def outcome(self) -> str:
        """The verdict from the first method's side: ``"better"``, ``"worse"`` or ``"within noise"`` (the cell
        of a comparison table's "vs reference" column)."""
        if self.winner is None:
            return "within noise"
        return "better" if self.winner == self.names[0] else "worse"

    def short(self) -> str:
        """``"A better"``, ``"B better"`` or ``"within noise"``: a table cell."""
        return "within noise" if self.winner is None else f"{self.winner} better"

    def format(self, decimals: int = 3) -> str:
        a, b = self.names
        how = f"paired over {self.diff.n} seeds" if self.paired else "Welch, unpaired"
        interval = f"{self.diff.mean:+.{decimals}f} ± {self.diff.half_width:.{decimals}f}"
        if self.winner is None:
            return f"{a} vs {b}: within noise ({interval}, 95% CI of {a} − {b}, {how})"
        loser = b if self.winner == a else a
        return f"{self.winner} beats {loser}: {interval} (95% CI of {a} − {b}, {how})"

    def __str__(self) -> str:
        return self.format()


def compare(a, b, *, names: tuple[str, str] = ("A", "B"), lower_is_better: bool = True,
            paired: bool = True) -> Verdict:
    """Compare method ``a`` with method ``b`` (per-seed values, or :class:`Summary` objects) and give a verdict.

    ``paired=True`` (the default) requires the same number of values, seed ``i`` of ``a`` matched with
    seed ``i`` of ``b``; the interval is the 95 % t-interval of the differences. ``paired=False`` uses
    Welch's interval. ``lower_is_better`` says which direction wins (losses, errors: True; accuracies: False).
    """
    va, vb = _as_values(a, "a"), _as_values(b, "b")
    if not (isinstance(names, tuple) and len(names) == 2 and all(isinstance(x, str) for x in names)):
        raise TypeError(f"names must be a tuple of two strings, got {names!r}")
    if paired:
        if len(va) != len(vb):
            raise ValueError(f"paired=True needs as many values in a as in b (one per shared seed), "
                             f"got {len(va)} and {len(vb)}; pass paired=False for unpaired runs")
        diff = summarize([x - y for x, y in zip(va, vb)])
    else:
        sa, sb = summarize(va), summarize(vb)
        var_a, var_b = sa.sem**2, sb.sem**2
        se = math.sqrt(var_a + var_b)
        if se == 0:
            df = float(len(va) + len(vb) - 2)
        else:
            df = (var_a + var_b) ** 2 / (var_a**2 / (sa.n - 1) + var_b**2 / (sb.n - 1))
        diff = Summary((), sa.mean - sb.mean, float("nan"), se, t_quantile(df) * se)
    return Verdict(names, diff, paired, lower_is_better)


def table(results: Mapping[str, Iterable[float] | Summary], *, decimals: int = 3,
          reference: str | None = None, lower_is_better: bool = True, paired: bool = True):
    """A pandas table of several methods over seeds: ``mean``, ``± 95% CI``, ``std``, ``n``, and with
    ``reference`` (a key of ``results``) a ``vs <reference>`` column holding each method's verdict against
    it ("better", "worse", "within noise"). Numbers are rounded to ``decimals``.
    """
    import pandas as pd

    if not isinstance(results, Mapping) or not results:
        raise ValueError("results must be a non-empty mapping of method name -> per-seed values")
    if reference is not None and reference not in results:
        raise ValueError(f"reference must be one of {list(results)}, got {reference!r}")
    sums = {k: v if isinstance(v, Summary) else summarize(v) for k, v in results.items()}
    rows = {}
    for name, s in sums.items():
        row = {"mean": round(s.mean, decimals), "± 95% CI": round(s.half_width, decimals),
               "std": round(s.std, decimals), "n": s.n}
        if reference is not None:
            if name == reference:
                row[f"vs {reference}"] = "reference"
            else:
                row[f"vs {reference}"] = compare(s, sums[reference], names=(name, reference),
                                                 lower_is_better=lower_is_better, paired=paired).outcome
        rows[name] = row
    return pd.DataFrame.from_dict(rows, orient="index")
