"""A minimal, deterministic training loop for the book's small experiments."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ._validate import check_int, check_positive_float
from .layer import MoELayer
from .metrics import max_violation


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


@dataclass
class ClassifierHistory(History):
    """Per step: task loss (cross-entropy), auxiliary loss, the largest router logit (|max|) and the
    MaxVio of the training batch's load (first MoE layer; Wang et al. 2024)."""

    max_logit: list[float] = field(default_factory=list)
    max_violation: list[float] = field(default_factory=list)


def fit_classifier(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    token_ids: Tensor | None = None,
    steps: int = 300,
    lr: float = 3e-3,
    batch_size: int = 256,
    seed: int = 0,
    aux: bool = True,
    progress: bool = False,
    description: str | None = None,
) -> ClassifierHistory:
    """Minimise cross-entropy (+ the MoE auxiliary losses when ``aux``) with Adam on mini-batches.

    ``model(x_batch, token_ids=ids_batch)`` is called when ``token_ids`` is given, ``model(x_batch)``
    otherwise. Mini-batches are drawn from their own generator seeded by ``seed``, so a run is
    deterministic. Routers that balance by a bias (``auxfree``) update it in each training forward pass
    themselves. ``progress`` shows a tqdm bar (on stderr).
    """
    from tqdm import tqdm

    steps = check_int("steps", steps, minimum=0)
    lr = check_positive_float("lr", lr)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    history = ClassifierHistory()
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    model.train()
    for _ in tqdm(range(steps), desc=description, disable=not progress, mininterval=1.0, leave=True):
        idx = torch.randint(0, x.shape[0], (min(batch_size, x.shape[0]),), generator=g)
        out = model(x[idx]) if token_ids is None else model(x[idx], token_ids=token_ids[idx])
        loss = nn.functional.cross_entropy(out, y[idx])
        aux_loss = aux_loss_of(model)
        opt.zero_grad()
        (loss + aux_loss if aux else loss).backward()
        opt.step()
        history.train_loss.append(loss.item())
        history.aux_loss.append(float(aux_loss.detach()))
        history.max_logit.append(max((float(m.last_info.routing.logits.detach().abs().max())
                                      for m in layers if m.last_info is not None), default=0.0))
        if layers and layers[0].last_info is not None:
            history.max_violation.append(max_violation(layers[0].last_info.plan.requested))
    model.eval()
    return history
