"""Hierarchical mixtures of experts (Jordan & Jacobs 1994), built from the book's router and expert bank.

A depth-``L`` tree with branching ``b``: every internal node is a dense softmax gate
(:class:`moe_lib.routers.DenseRouter` with a bias) over its ``b`` children, and the ``b^L`` leaves are one
:class:`moe_lib.LinearExperts` bank. The probability of reaching leaf ``l`` is the product of the gate
probabilities along its path, ``g_l(x) = Π_{nodes n on the path} g_{n→child}(x)``, and the output is the
same weighted combine as every mixture in the book, ``y(x) = Σ_l g_l(x) μ_l(x)`` — a one-level HME is
exactly the 1991 mixture. Each leaf is a Gaussian ``N(y; μ_l(x), σ_l² I)``; the log-likelihood of the tree
is ``Σ_t log Σ_l g_l(x_t) N(y_t; μ_l(x_t), σ_l² I)`` (Jordan & Jacobs 1994, eq. 8–9 with the regression
probability model of §3).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .._validate import check_int
from ..experts import LinearExperts
from ..routers import DenseRouter


class HME(nn.Module):
    """A hierarchical mixture of linear experts.

    Args:
        d_in: input width.
        d_out: output width.
        depth: number of gating levels ``L >= 1`` (``depth=1`` is a flat mixture).
        branching: children per gate ``b >= 2``.

    Attributes:
        gates: ``nn.ModuleList`` of ``(b^L − 1)/(b − 1)`` :class:`DenseRouter` s, breadth first: level ``l``
            holds nodes ``b^l − 1 ... `` in :meth:`level_gates` order; node ``j`` of level ``l`` has children
            ``j·b ... j·b + b − 1`` of level ``l + 1``.
        experts: a :class:`LinearExperts` bank of ``b^L`` leaves.
        log_var: ``[b^L]`` log-variance ``log σ_l²`` of each leaf's Gaussian.
    """

    def __init__(self, d_in: int, d_out: int, depth: int = 2, branching: int = 2):
        super().__init__()
        self.d_in = check_int("d_in", d_in, minimum=1)
        self.d_out = check_int("d_out", d_out, minimum=1)
        self.depth = check_int("depth", depth, minimum=1)
        self.branching = check_int("branching", branching, minimum=2)
        num_gates = sum(self.branching ** level for level in range(self.depth))
        self.gates = nn.ModuleList(DenseRouter(self.d_in, self.branching, bias=True) for _ in range(num_gates))
        self.num_experts = self.branching ** self.depth
        self.experts = LinearExperts(self.num_experts, self.d_in, 1, self.d_out)
        self.log_var = nn.Parameter(torch.zeros(self.num_experts))

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, depth={self.depth}, branching={self.branching}"

    def level_gates(self, level: int) -> list[DenseRouter]:
        """The ``b^level`` gates of one level, left to right."""
        start = sum(self.branching ** j for j in range(level))
        return list(self.gates[start : start + self.branching ** level])

    def gate_probs(self, x: Tensor) -> list[Tensor]:
        """Per level ``l``, the gates' probabilities ``[T, b^l, b]``."""
        return [torch.stack([g(x).probs for g in self.level_gates(level)], dim=1) for level in range(self.depth)]

    def path_probs(self, x: Tensor) -> Tensor:
        """``g_l(x)`` ``[T, b^L]``: the probability of reaching each leaf (rows sum to 1)."""
        probs = x.new_ones(x.shape[0], 1)
        for level_probs in self.gate_probs(x):
            probs = (probs.unsqueeze(-1) * level_probs.to(probs.dtype)).reshape(x.shape[0], -1)
        return probs

    def expert_outputs(self, x: Tensor) -> Tensor:
        """Every leaf's mean ``μ_l(x)`` ``[T, b^L, d_out]``."""
        stacked = x.unsqueeze(0).expand(self.num_experts, -1, -1)
        return self.experts.forward_padded(stacked).transpose(0, 1)

    def forward(self, x: Tensor) -> Tensor:
        """``y = Σ_l g_l(x) μ_l(x)``: ``[T, d_in]`` -> ``[T, d_out]``."""
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[-1] != self.d_in:
            raise ValueError(f"x must be a [T, d_in={self.d_in}] tensor, got {getattr(x, 'shape', type(x).__name__)}")
        return torch.einsum("tl,tld->td", self.path_probs(x), self.expert_outputs(x))

    def joint_log_probs(self, x: Tensor, y: Tensor) -> Tensor:
        """``log g_l(x) + log N(y; μ_l(x), σ_l² I)`` per case and leaf, ``[T, b^L]``."""
        if y.shape != (x.shape[0], self.d_out):
            raise ValueError(f"y must have shape [T, d_out] = {(x.shape[0], self.d_out)}, got {tuple(y.shape)}")
        mu = self.expert_outputs(x)
        var = self.log_var.exp().to(x.dtype)
        sq = (y.unsqueeze(1) - mu).square().sum(-1)
        log_normal = -0.5 * (sq / var + self.d_out * (torch.log(var) + math.log(2 * math.pi)))
        log_g = torch.log(self.path_probs(x).clamp_min(torch.finfo(x.dtype).tiny))
        return log_g + log_normal

    def log_likelihood(self, x: Tensor, y: Tensor) -> Tensor:
        """``Σ_t log Σ_l g_l(x_t) N(y_t; μ_l(x_t), σ_l² I)`` — a scalar (sum over cases)."""
        return torch.logsumexp(self.joint_log_probs(x, y), dim=-1).sum()

    def posteriors(self, x: Tensor, y: Tensor) -> Tensor:
        """``h_l`` ``[T, b^L]``: the posterior probability that leaf ``l`` generated ``y_t`` (the E-step)."""
        return torch.softmax(self.joint_log_probs(x, y), dim=-1)
