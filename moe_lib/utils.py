"""Small helpers shared by notebooks and tests: seeding and counted FLOPs."""
from __future__ import annotations

import os
import random

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


def count_flops(module: torch.nn.Module, *inputs, **kwargs) -> int:
    """FLOPs of one forward call, counted by ``torch.utils.flop_counter`` (matmuls, 2 per multiply-add)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs, **kwargs)
    return int(counter.get_total_flops())
