"""Auxiliary router losses. Each returns an unweighted scalar; the caller picks the coefficient."""
from __future__ import annotations

import torch
from torch import Tensor


def load_balancing_loss(probs: Tensor, experts: Tensor) -> Tensor:
    """Switch Transformer load-balancing loss ``E · Σ_i f_i · P_i`` (Fedus et al. 2022, eq. 4–6).

    ``f_i`` is the fraction of the ``T·k`` assignments routed to expert ``i`` (not differentiable) and
    ``P_i`` the mean router probability of expert ``i`` over the batch, taken from the *full* softmax
    ``probs [T, E]`` — computing it from top-k-masked probabilities would leave a top-1 router without a
    gradient. The loss equals 1 when both are uniform, whatever ``k``; the paper scales it by
    ``α = 0.01``. ``experts`` is ``[T, k]``.
    """
    num_tokens, num_experts = probs.shape
    if num_tokens == 0:
        return probs.new_zeros(())
    counts = torch.bincount(experts.reshape(-1), minlength=num_experts).to(probs.dtype)
    f = counts / experts.numel()
    p = probs.mean(dim=0)
    return num_experts * (f * p).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss ``(1/T) Σ_t (log Σ_i e^{x_{t,i}})²`` (Zoph et al. 2022, eq. 5; c_z = 0.001)."""
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
