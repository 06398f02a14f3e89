"""The one wall-clock timer of moe_lib: raw samples (:func:`wall_times`), one number (:func:`wall_time`) and
their spread (:func:`median_iqr`).

Every CPU time the book and the benchmark harness report comes from :func:`wall_times`: chapters 10, 11 and
14 through these functions, ``python -m moe_lib.bench`` through :func:`moe_lib.bench.harness.time_ms`
(whose CUDA path is ``triton.testing.do_bench`` instead). With a CUDA ``device`` the clock starts and stops
on a synchronised device, so that a GPU time is not the launch time of asynchronous kernels.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from .._validate import check_choice, check_int, check_positive_float


def wall_times(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, device=None, *,
               max_s: float | None = None, before: Callable[[], object] | None = None) -> list[float]:
    """Wall-clock seconds of each of ``repeats`` calls of ``fn()`` after ``warmup`` untimed calls — the raw
    samples behind :func:`wall_time`, for reporting a spread (:func:`median_iqr`) instead of one number.
    With a CUDA ``device`` the clock starts and stops on a synchronised device.

    ``before``: called (untimed) before each timed call, e.g. to clear gradients. ``max_s``: a time budget —
    no timed call starts once ``max_s`` seconds have passed since the first one started (at least one call is
    always timed), so fewer than ``repeats`` samples may come back."""
    repeats = check_int("repeats", repeats, minimum=1)
    warmup = check_int("warmup", warmup, minimum=0)
    max_s = check_positive_float("max_s", max_s, allow_none=True)
    if before is not None and not callable(before):
        raise TypeError(f"before must be a callable or None, got {before!r} of type {type(before).__name__}")
    cuda = device is not None and torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    times = []
    budget_start = time.perf_counter()
    for _ in range(repeats):
        if before is not None:
            before()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if max_s is not None and time.perf_counter() - budget_start > max_s:
            break
    return times


def wall_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, device=None,
              statistic: str = "min") -> float:
    """Wall-clock seconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed calls: the fastest
    call (``statistic="min"``, the least disturbed run on a shared machine) or the ``"median"``. With a
    CUDA ``device`` the clock starts and stops on a synchronised device (chapter 12 uses CUDA events)."""
    statistic = check_choice("statistic", statistic, ("min", "median"))
    times = wall_times(fn, repeats=repeats, warmup=warmup, device=device)
    return min(times) if statistic == "min" else statistics.median(times)


def median_iqr(times) -> tuple[float, float, float]:
    """``(median, q1, q3)`` of timing samples: the median and the first and third quartiles (linear
    interpolation between order statistics, NumPy's default), the spread the book shows beside a CPU time."""
    import numpy as np

    values = np.asarray(list(times), dtype=float)
    if values.size == 0 or not np.isfinite(values).all():
        raise ValueError(f"times must be a non-empty sequence of finite numbers, got {values.tolist()}")
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return float(median), float(q1), float(q3)


def iqr_trend(base: tuple[float, float, float], other: tuple[float, float, float]) -> str:
    """How ``other`` compares with ``base``, two :func:`median_iqr` triples ``(median, q1, q3)``: ``"slower"``
    or ``"faster"`` only when the interquartile ranges do not overlap, else ``"within the scatter"`` —
    followed by the ratio of medians, e.g. ``"slower (1.31×)"``. The rule the book applies to a CPU time:
    a difference counts once it clears the scatter between the calls of one run."""
    for name, triple in (("base", base), ("other", other)):
        if len(triple) != 3 or not all(isinstance(v, (int, float)) and v > 0 for v in triple) or \
                not triple[1] <= triple[0] <= triple[2]:
            raise ValueError(f"{name} must be a (median, q1, q3) triple of positive times with q1 <= median <= q3, "
                             f"got {triple!r}")
    ratio = f"({other[0] / base[0]:.2f}×)"
    if other[1] > base[2]:
        return f"slower {ratio}"
    if other[2] < base[1]:
        return f"faster {ratio}"
    return f"within the scatter {ratio}"
