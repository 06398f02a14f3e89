"""The two error functions of Jacobs, Jordan, Nowlan & Hinton (1991) and the posterior they share.

Notation of the paper, per training case ``c``: ``p_i`` is the gate's probability for expert ``i``,
``o_i`` that expert's output vector and ``d`` the desired output. Tensors carry a leading case dimension:

* ``gate_probs`` ``[T, E]`` — ``p_i`` (rows sum to 1; e.g. ``layer.router(x).probs``);
* ``expert_out`` ``[T, E, D]`` — ``o_i`` (e.g. ``layer.expert_outputs(x)``);
* ``target`` ``[T, D]`` — ``d``.

Every loss returns the mean over the ``T`` cases (``reduction="mean"``), their sum (``"sum"``) or the
per-case values (``"none"``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._validate import check_choice

REDUCTIONS = ("mean", "sum", "none")


def _check(gate_probs: Tensor, expert_out: Tensor, target: Tensor) -> None:
    for name, t, dims in (("gate_probs", gate_probs, 2), ("expert_out", expert_out, 3), ("target", target, 2)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != dims:
            raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(t.shape)}")
    T, E, D = expert_out.shape
    if gate_probs.shape != (T, E):
        raise ValueError(f"gate_probs must have shape [T, E] = {(T, E)} to match expert_out, got {tuple(gate_probs.shape)}")
    if target.shape != (T, D):
        raise ValueError(f"target must have shape [T, D] = {(T, D)} to match expert_out, got {tuple(target.shape)}")


def _reduce(per_case: Tensor, reduction: str) -> Tensor:
    reduction = check_choice("reduction", reduction, REDUCTIONS)
    if reduction == "mean":
        return per_case.mean()
    if reduction == "sum":
        return per_case.sum()
    return per_case


def mixture_output(gate_probs: Tensor, expert_out: Tensor) -> Tensor:
    """The blended output ``o = Σ_i p_i o_i``: ``[T, E]``, ``[T, E, D]`` -> ``[T, D]``."""
    return torch.einsum("te,ted->td", gate_probs, expert_out)


def cooperative_loss(gate_probs: Tensor, expert_out: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """``E = ‖d − Σ_i p_i o_i‖²`` — Jacobs et al. (1991), eq. 1.

    The experts *cooperate*: each one's error signal depends on all the others' outputs,
    ``∂E/∂o_i = −2 p_i (d − o)`` with ``o = Σ_j p_j o_j``, so an expert is pushed to cancel the residual
    left by the blend rather than to fit the case itself.
    """
    _check(gate_probs, expert_out, target)
    residual = target - mixture_output(gate_probs, expert_out)
    return _reduce(residual.square().sum(-1), reduction)


def expert_log_likelihoods(gate_probs: Tensor, expert_out: Tensor, target: Tensor) -> Tensor:
    """``log p_i − ½‖d − o_i‖²`` per case and expert, ``[T, E]`` (the terms inside eq. 3's sum)."""
    _check(gate_probs, expert_out, target)
    sq = (target.unsqueeze(1) - expert_out).square().sum(-1)
    return torch.log(gate_probs.clamp_min(torch.finfo(gate_probs.dtype).tiny)) - 0.5 * sq


def competitive_loss(gate_probs: Tensor, expert_out: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """``E = −log Σ_i p_i exp(−½‖d − o_i‖²)`` — Jacobs et al. (1991), eq. 3.

    The negative log-likelihood of ``d`` under a mixture of unit-variance Gaussians centred on the experts'
    outputs (without the constant ``(D/2) log 2π``). The experts *compete*: the gradient is
    ``∂E/∂o_i = −h_i (d − o_i)`` (eq. 5), where ``h_i`` (:func:`posterior`) is the probability that
    expert ``i`` generated ``d``, so each expert is pulled towards the target only as far as it is
    responsible for the case. Computed with a log-sum-exp, so it is finite even for far-off outputs.
    """
    per_case = -torch.logsumexp(expert_log_likelihoods(gate_probs, expert_out, target), dim=-1)
    return _reduce(per_case, reduction)


def posterior(gate_probs: Tensor, expert_out: Tensor, target: Tensor) -> Tensor:
    """``h_i = p_i e^{−½‖d−o_i‖²} / Σ_j p_j e^{−½‖d−o_j‖²}``, ``[T, E]`` (Jacobs et al. 1991, eq. 5).

    The gate's prior ``p_i`` updated by how well each expert explains the target: the *responsibility*
    that the E-step of EM computes (Jordan & Jacobs 1994) and the soft target the gate learns towards
    (``∂E/∂logit_i = p_i − h_i`` for a softmax gate).
    """
    return torch.softmax(expert_log_likelihoods(gate_probs, expert_out, target), dim=-1)
