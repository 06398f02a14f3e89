"""Multi-task learning with a multi-gate mixture of experts (Ma et al. 2018).

Three models share one interface — ``forward(x) -> [N, num_tasks]`` predictions, one tower per task:

- :class:`SharedBottom`: one MLP bottom ``f(x)`` shared by every task, ``y_k = h_k(f(x))``.
- :class:`MMoE`: a bank of experts ``f_i`` shared by every task and *one softmax gate per task*,
  ``f^k(x) = Σ_i g^k(x)_i f_i(x)``, ``g^k(x) = softmax(W_{gk} x)``, ``y_k = h^k(f^k(x))`` (eq. 5–7).
- :class:`OMoE`: the same experts with a *single* gate shared by all tasks (the paper's one-gate baseline).

The experts are one :class:`moe_lib.MLPExperts` bank and the gates :class:`moe_lib.routers.DenseRouter` s —
the dense softmax mixture of the 1991 chapter, evaluated for every expert on every example.

:func:`synthetic_tasks` builds the paper's two regression tasks whose correlation is controlled by the
cosine ``p`` of their weight vectors (§3.2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._validate import check_int, check_positive_float
from ..experts import MLPExperts
from ..routers import DenseRouter

__all__ = ["MultiTaskData", "synthetic_tasks", "SharedBottom", "MMoE", "OMoE", "fit_multitask",
           "task_mse", "num_parameters", "relative_error_run"]


@dataclass
class MultiTaskData:
    """``x [N, d]``, labels ``y [N, 2]``, the task weight vectors ``w [2, d]`` and the cosine ``p`` used."""

    x: Tensor
    y: Tensor
    w: Tensor
    correlation: float

    def __len__(self) -> int:
        return self.x.shape[0]

    def label_correlation(self) -> float:
        """Pearson correlation between the two tasks' labels."""
        return float(torch.corrcoef(self.y.T)[0, 1])


def synthetic_tasks(n: int, correlation: float, *, d: int = 100, c: float = 1.0, m: int = 10,
                    noise: float = 0.1, alpha_scale: float = 0.5, seed: int = 0,
                    data_seed: int | None = None) -> MultiTaskData:
    """Two regression tasks with a controllable correlation — Ma et al. (2018), §3.2.

    1. Two orthonormal vectors ``u_1, u_2 ∈ R^d``.
    2. ``w_1 = c·u_1``, ``w_2 = c·(p·u_1 + sqrt(1 − p²)·u_2)``, so ``‖w_k‖ = c`` and ``cos(w_1, w_2) = p``.
    3. ``x ~ N(0, I_d)``.
    4. ``y_k = w_kᵀx + Σ_{i=1}^m sin(α_i w_kᵀx + β_i) + ε_k``, ``ε_k ~ N(0, noise²)``.

    The task definition (``u``, ``α``, ``β``) depends on ``seed``; the sample ``x, ε`` on ``data_seed``
    (``seed`` when ``None``), so a train and a test set of the *same* tasks share ``seed`` and differ in
    ``data_seed``. ``α_i, β_i ~ N(0, alpha_scale²)`` (the paper calls them given parameters without values; small ``α``
    keeps the tasks learnable from a few thousand examples).
    """
    n = check_int("n", n, minimum=1)
    d = check_int("d", d, minimum=2)
    m = check_int("m", m, minimum=0)
    c = check_positive_float("c", c)
    if isinstance(correlation, bool) or not isinstance(correlation, (int, float)):
        raise TypeError(f"correlation must be a number in [-1, 1], got {correlation!r}")
    if not -1.0 <= float(correlation) <= 1.0:
        raise ValueError(f"correlation must be in [-1, 1], got {correlation}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or noise < 0:
        raise ValueError(f"noise must be a number >= 0, got {noise!r}")
    p = float(correlation)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=torch.float64))
    u1, u2 = q[:, 0], q[:, 1]
    w = torch.stack([c * u1, c * (p * u1 + math.sqrt(max(0.0, 1.0 - p * p)) * u2)])
    alpha_scale = check_positive_float("alpha_scale", alpha_scale)
    alpha = alpha_scale * torch.randn(m, generator=g, dtype=torch.float64)
    beta = alpha_scale * torch.randn(m, generator=g, dtype=torch.float64)
    gd = torch.Generator().manual_seed(seed if data_seed is None else data_seed)
    x = torch.randn(n, d, generator=gd, dtype=torch.float64)
    z = x @ w.T                                                              # [n, 2]
    y = z + torch.sin(alpha * z.unsqueeze(-1) + beta).sum(-1) + noise * torch.randn(n, 2, generator=gd,
                                                                                     dtype=torch.float64)
    return MultiTaskData(x.float(), y.float(), w.float(), p)


def _tower(d_in: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, 1))


class SharedBottom(nn.Module):
    """``y_k = h_k(f(x))`` with one shared bottom ``f`` (ReLU MLP) and a tower ``h_k`` per task (eq. 1).

    Args:
        d_in: input width. bottom_hidden: width of the shared bottom's output. tower_hidden: hidden width of
        each tower. num_tasks: number of towers.
    """

    def __init__(self, d_in: int, bottom_hidden: int, tower_hidden: int, num_tasks: int = 2):
        super().__init__()
        d_in = check_int("d_in", d_in, minimum=1)
        bottom_hidden = check_int("bottom_hidden", bottom_hidden, minimum=1)
        tower_hidden = check_int("tower_hidden", tower_hidden, minimum=1)
        self.num_tasks = check_int("num_tasks", num_tasks, minimum=1)
        self.bottom = nn.Sequential(nn.Linear(d_in, bottom_hidden), nn.ReLU())
        self.towers = nn.ModuleList(_tower(bottom_hidden, tower_hidden) for _ in range(self.num_tasks))

    def forward(self, x: Tensor) -> Tensor:
        """``[N, d_in]`` -> ``[N, num_tasks]``."""
        h = self.bottom(x)
        return torch.cat([tower(h) for tower in self.towers], dim=-1)


class MMoE(nn.Module):
    """Multi-gate mixture of experts: ``y_k = h^k(Σ_i g^k(x)_i f_i(x))``, ``g^k = softmax(W_{gk} x)``.

    Ma et al. (2018), eq. 5–7. Every expert runs on every example (a dense mixture); each task has its own
    gate (``num_gates = num_tasks``). With ``num_gates=1`` all tasks share one gate — see :class:`OMoE`.

    Args:
        d_in: input width. num_experts: ``E``. expert_hidden: hidden width of each expert's MLP.
        expert_out: width of each expert's output (the towers' input). tower_hidden: hidden width of each
        tower. num_tasks: number of towers. num_gates: ``num_tasks`` (MMoE, default) or 1 (OMoE).
    """

    def __init__(self, d_in: int, num_experts: int, expert_hidden: int, expert_out: int, tower_hidden: int,
                 num_tasks: int = 2, num_gates: int | None = None):
        super().__init__()
        self.d_in = check_int("d_in", d_in, minimum=1)
        self.num_experts = check_int("num_experts", num_experts, minimum=1)
        self.num_tasks = check_int("num_tasks", num_tasks, minimum=1)
        num_gates = self.num_tasks if num_gates is None else num_gates
        num_gates = check_int("num_gates", num_gates, minimum=1)
        if num_gates not in (1, self.num_tasks):
            raise ValueError(f"num_gates must be 1 (one shared gate) or num_tasks={self.num_tasks}, got {num_gates}")
        self.num_gates = num_gates
        self.experts = MLPExperts(self.num_experts, self.d_in, check_int("expert_hidden", expert_hidden, minimum=1),
                                  check_int("expert_out", expert_out, minimum=1), activation="relu")
        self.gates = nn.ModuleList(DenseRouter(self.d_in, self.num_experts, bias=True) for _ in range(num_gates))
        self.towers = nn.ModuleList(_tower(expert_out, check_int("tower_hidden", tower_hidden, minimum=1))
                                    for _ in range(self.num_tasks))

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, num_tasks={self.num_tasks}, num_gates={self.num_gates}"

    def gate_probs(self, x: Tensor) -> Tensor:
        """``g^k(x)`` for every task ``k``: ``[num_tasks, N, E]``; each row sums to 1 over the experts."""
        probs = torch.stack([gate(x).probs.to(x.dtype) for gate in self.gates])
        return probs.expand(self.num_tasks, -1, -1)

    def expert_outputs(self, x: Tensor) -> Tensor:
        """``f_i(x)`` for every expert: ``[N, E, expert_out]``."""
        return self.experts.forward_padded(x.unsqueeze(0).expand(self.num_experts, -1, -1)).transpose(0, 1)

    def forward(self, x: Tensor) -> Tensor:
        """``[N, d_in]`` -> ``[N, num_tasks]``."""
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[-1] != self.d_in:
            raise ValueError(f"x must be a [N, d_in={self.d_in}] tensor, got {getattr(x, 'shape', type(x).__name__)}")
        mixed = torch.einsum("kne,ned->knd", self.gate_probs(x), self.expert_outputs(x))
        return torch.cat([tower(mixed[k]) for k, tower in enumerate(self.towers)], dim=-1)


class OMoE(MMoE):
    """One-gate mixture of experts: :class:`MMoE` with a single gate shared by every task."""

    def __init__(self, d_in: int, num_experts: int, expert_hidden: int, expert_out: int, tower_hidden: int,
                 num_tasks: int = 2):
        super().__init__(d_in, num_experts, expert_hidden, expert_out, tower_hidden, num_tasks, num_gates=1)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fit_multitask(model: nn.Module, data: MultiTaskData, *, steps: int = 500, batch_size: int = 256,
                  lr: float = 1e-3, seed: int = 0, device: str = "cpu") -> list[float]:
    """Adam on the sum of the tasks' mean squared errors (equal weights, as in the paper). Returns the
    training loss of every step."""
    steps = check_int("steps", steps, minimum=0)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    lr = check_positive_float("lr", lr)
    model.to(device).train()
    x, y = data.x.to(device), data.y.to(device)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(data), (batch_size,), generator=g).to(device)
        loss = (model(x[idx]) - y[idx]).square().mean(0).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def task_mse(model: nn.Module, data: MultiTaskData, device: str = "cpu") -> list[float]:
    """Mean squared error of each task on ``data``."""
    model.eval()
    pred = model(data.x.to(device)).cpu()
    return (pred - data.y).square().mean(0).tolist()


def relative_error_run(make_model, correlation: float, task_seed: int, *, n_train: int = 2000,
                       n_test: int = 2000, steps: int = 250, batch_size: int = 256, lr: float = 1e-2,
                       device: str = "cpu") -> float:
    """One multi-task run of chapter 17: draw the task pair ``task_seed`` at ``correlation``, train
    ``make_model()`` (built after ``torch.manual_seed(task_seed)``) on ``n_train`` examples with
    :func:`fit_multitask`, and return the test MSE divided by each task's label variance, averaged over
    the tasks (0 = perfect, 1 = predicting the mean).

    The task definition (``u``, ``α``, ``β``) is ``task_seed``; the training sample ``1000 + task_seed``, the
    test sample ``2000 + task_seed``. The same ``task_seed`` gives every model the same tasks, data, batch
    order and initialisation stream, so models run over the same seeds compare paired
    (:func:`moe_lib.stats.compare`).
    """
    task_seed = check_int("task_seed", task_seed, minimum=0)
    train = synthetic_tasks(n_train, correlation, seed=task_seed, data_seed=1000 + task_seed)
    test = synthetic_tasks(n_test, correlation, seed=task_seed, data_seed=2000 + task_seed)
    torch.manual_seed(task_seed)
    model = make_model()
    fit_multitask(model, train, steps=steps, batch_size=batch_size, lr=lr, seed=task_seed, device=device)
    error = torch.tensor(task_mse(model.cpu(), test)) / test.y.var(0)
    return float(error.mean())
