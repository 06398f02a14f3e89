"""A minimal, deterministic training loop for the book's small experiments."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ._validate import check_int, check_positive_float
from .layer import MoELayer


def aux_loss_of(model: nn.Module) -> Tensor:
    """Sum of ``last_info.aux_loss`` over every :class:`MoELayer` inside ``model`` (0 if none ran).

    Each layer contributes its own loss computed on its own routing — never pooled across layers.
    """
    total = torch.zeros(())
    for module in model.modules():
        if isinstance(module, MoELayer) and module.last_info is not None:
            total = total + module.last_info.aux_loss
    return total


@dataclass
class History:
    """Loss per step (task loss without the auxiliary loss) and, when evaluated, the final metrics."""

    train_loss: list[float] = field(default_factory=list)
    aux_loss: list[float] = field(default_factory=list)


def fit_regression(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    steps: int = 1000,
    lr: float = 1e-2,
    batch_size: int | None = None,
    seed: int = 0,
) -> History:
    """Minimise mean squared error + the MoE auxiliary losses with Adam; full batch by default.

    Deterministic for a given ``seed`` (mini-batches are drawn from their own generator).
    """
    steps = check_int("steps", steps, minimum=0)
    lr = check_positive_float("lr", lr)
    if batch_size is not None:
        batch_size = check_int("batch_size", batch_size, minimum=1)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    history = History()
    model.train()
    for _ in range(steps):
        if batch_size is None or batch_size >= x.shape[0]:
            xb, yb = x, y
        else:
            idx = torch.randint(0, x.shape[0], (batch_size,), generator=g)
            xb, yb = x[idx], y[idx]
        loss = nn.functional.mse_loss(model(xb), yb)
        aux = aux_loss_of(model)
        opt.zero_grad()
        (loss + aux).backward()
        opt.step()
        history.train_loss.append(loss.item())
        history.aux_loss.append(aux.item())
    model.eval()
    return history


@torch.no_grad()
def mse(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Mean squared error of ``model`` on ``(x, y)``."""
    return float(nn.functional.mse_loss(model(x), y))
