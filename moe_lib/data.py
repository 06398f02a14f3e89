"""Data sets generated in code (no downloads): every chapter's data is reproducible from a seed."""
from __future__ import annotations

import torch
from torch import Tensor

from ._validate import check_int, check_nonnegative_float

#: Regimes of :func:`piecewise_regression`: ``(left edge, slope, intercept)`` of each linear piece on
#: ``[-2, 2]``. Neighbouring pieces jump, so one smooth function fits them badly and one linear expert per
#: piece fits them exactly.
PIECES: tuple[tuple[float, float, float], ...] = (
    (-2.0, 1.5, 3.5),   # x in [-2, -1): rising towards 2
    (-1.0, -2.0, -1.5),  # x in [-1, 0): falling from 0.5 to -1.5
    (0.0, 2.5, -0.5),   # x in [0, 1): rising from -0.5 to 2
    (1.0, -1.0, 0.0),   # x in [1, 2]: falling from -1 to -2
)


def piecewise_target(x: Tensor) -> Tensor:
    """The noise-free target of :func:`piecewise_regression` at ``x`` (any shape)."""
    y = torch.zeros_like(x)
    for left, slope, intercept in PIECES:
        y = torch.where(x >= left, slope * x + intercept, y)
    return y


def piecewise_region(x: Tensor) -> Tensor:
    """Index (0–3) of the piece each ``x`` falls in."""
    edges = torch.tensor([p[0] for p in PIECES[1:]], dtype=x.dtype)
    return torch.bucketize(x, edges, right=True)


def piecewise_regression(n: int, *, noise: float = 0.1, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` points ``x ~ U(-2, 2)``, ``y = piece(x) + N(0, noise²)``; returns ``x, y`` of shape ``[n, 1]``.

    Four linear regimes with jumps between them (:data:`PIECES`): the toy problem on which experts
    visibly take regions (chapter 1).
    """
    n = check_int("n", n, minimum=1)
    noise = check_nonnegative_float("noise", noise)
    g = torch.Generator().manual_seed(check_int("seed", seed))
    x = torch.rand(n, 1, generator=g) * 4 - 2
    y = piecewise_target(x) + noise * torch.randn(n, 1, generator=g)
    return x, y
