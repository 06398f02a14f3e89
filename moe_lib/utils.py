"""Small helpers shared by notebooks and tests: seeding, counted FLOPs, and rankings that follow the
printed digits."""
from __future__ import annotations

import os
import random
from collections.abc import Hashable, Mapping

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖out − ref‖ / ‖ref‖`` in float64 (``‖out − ref‖`` when the reference is zero; NaN anywhere gives NaN):
    how the library's equivalence checks (Hugging Face interop, the benchmark, the kernels' GPU check)
    compare an implementation with its reference."""
    ref64, out64 = ref.double(), out.double()
    denom = ref64.norm()
    diff = (out64 - ref64).norm()
    return float(diff / denom) if denom > 0 else float(diff)


def seed_everything(seed: int = 0, threads: int | None = None) -> torch.Generator:
    """Seed Python, NumPy and torch; optionally fix torch's CPU threads. Returns a seeded generator.

    Every notebook calls this once, so re-running a chapter gives the same numbers.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.Generator().manual_seed(seed)


def rank_by(scores: Mapping[Hashable, float], decimals: int, descending: bool = False) -> list:
    """The keys of ``scores`` ordered by their score rounded to ``decimals``, the digits a table prints;
    equal rounded scores keep the order of ``scores`` (a documented tie-break, not a coin flip).

    A choice made on full-precision floats ("the best restart", "the best method") flips on a near tie
    when a last bit changes (another CPU, another library version) even though every printed number
    stays the same. Ranked on the printed digits, the choice changes only when a printed number does.
    ``scores`` is any mapping with ``.items()``, e.g. a dict or a pandas Series; ``scores[0]`` is the lowest
    (``descending=True``: the highest).

    >>> rank_by({"a": 0.30004, "b": 0.29996, "c": 0.1}, decimals=3)
    ['c', 'a', 'b']
    """
    if not isinstance(decimals, int) or isinstance(decimals, bool):
        raise TypeError(f"decimals must be an int (digits after the point), got {decimals!r}")
    sign = -1.0 if descending else 1.0
    rounded = {key: sign * round(float(value), decimals) for key, value in scores.items()}
    return sorted(rounded, key=rounded.__getitem__)


def count_flops(module: torch.nn.Module, *inputs, **kwargs) -> int:
    """FLOPs of one forward call, counted by ``torch.utils.flop_counter`` (matmuls, 2 per multiply-add)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs, **kwargs)
    return int(counter.get_total_flops())
