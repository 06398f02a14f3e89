"""Auxiliary router losses. Each returns an unweighted scalar; the caller picks the coefficient.

* :func:`load_balancing_loss` — Switch / GShard ``E · Σ_i f_i P_i`` (Fedus et al. 2022, eq. 4–6).
* :func:`router_z_loss` — ST-MoE ``(1/T) Σ_t (log Σ_i e^{x_{t,i}})²`` (Zoph et al. 2022, eq. 5).
* :func:`importance_loss` and :func:`load_loss` — Shazeer et al. (2017, §4 and Appendix A, eq. 6–11):
  the squared coefficient of variation of the per-expert importance (sum of gate values) and of the
  smooth per-expert load estimate :func:`shazeer_load`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .routers import Routing


def load_balancing_loss(probs: Tensor, experts: Tensor, valid: Tensor | None = None) -> Tensor:
    """Switch Transformer load-balancing loss ``E · Σ_i f_i · P_i`` (Fedus et al. 2022, eq. 4–6).

    ``f_i`` is the fraction of the assignments routed to expert ``i`` (not differentiable) and
    ``P_i`` the mean router probability of expert ``i`` over the batch, taken from the *full* softmax
    ``probs [T, E]`` — computing it from top-k-masked probabilities would leave a top-1 router without a
    gradient. The loss equals 1 when both are uniform, whatever ``k``; the paper scales it by
    ``α = 0.01``. ``experts`` is ``[T, k]``; ``valid`` (``[T, k]`` bool) excludes entries that are not
    assignments (GShard's unsent second expert, expert choice).
    """
    num_tokens, num_experts = probs.shape
    flat = experts.reshape(-1)
    if valid is not None:
        flat = flat[valid.reshape(-1)]
    if num_tokens == 0 or flat.numel() == 0:
        return probs.new_zeros(())
    counts = torch.bincount(flat, minlength=num_experts).to(probs.dtype)
    f = counts / flat.numel()
    p = probs.mean(dim=0)
    return num_experts * (f * p).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss ``(1/T) Σ_t (log Σ_i e^{x_{t,i}})²`` (Zoph et al. 2022, eq. 5; c_z = 0.001)."""
    if logits.shape[0] == 0:
        return logits.new_zeros((), dtype=torch.float32)
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def cv_squared(values: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation ``Var(v) / (mean(v)² + ε)`` (population variance), differentiable.

    0 for a perfectly even vector; ``E − 1`` when one of ``E`` entries holds everything.
    """
    values = values.float() if values.dtype not in (torch.float32, torch.float64) else values
    if values.numel() <= 1:
        return values.new_zeros(())
    mean = values.mean()
    return ((values - mean) ** 2).mean() / (mean**2 + eps)


def importance_loss(dense_weights: Tensor) -> Tensor:
    """Shazeer et al. (2017, eq. 6–7): ``CV(Importance(X))²`` with ``Importance(X)_i = Σ_x G(x)_i``.

    ``dense_weights`` is ``[T, E]``, the gate values of every token scattered over the experts (zeros
    for experts not selected; :meth:`moe_lib.routers.Routing.dense_weights`). The paper multiplies it by
    ``w_importance`` (0.1 in Table 6).
    """
    return cv_squared(dense_weights.sum(dim=0))


def shazeer_load(clean_logits: Tensor, noisy_logits: Tensor, noise_std: Tensor, top_k: int) -> Tensor:
    """Smooth load estimate of Shazeer et al. (2017, Appendix A, eq. 8–10), ``[E]``, differentiable.

    ``P(x, i) = Φ(((x W_g)_i − kth_excluding(H(x), k, i)) / softplus((x W_noise)_i))`` is the probability
    that expert ``i`` stays in the top ``k`` if only its own noise were re-drawn, where
    ``kth_excluding(H, k, i)`` is the ``k``-th largest entry of ``H`` not counting entry ``i``;
    ``Load(X)_i = Σ_x P(x, i)``. With ``k = E`` every expert is always selected and the load is ``T``.
    """
    num_tokens, num_experts = clean_logits.shape
    if top_k >= num_experts:
        return clean_logits.new_full((num_experts,), float(num_tokens))
    if num_tokens == 0:
        return clean_logits.new_zeros(num_experts)
    top = noisy_logits.topk(top_k + 1, dim=-1).values  # [T, k+1]
    kth = top[:, top_k - 1 : top_k]  # k-th largest: the threshold an expert outside the top k must beat
    next_ = top[:, top_k : top_k + 1]  # (k+1)-th largest: what an expert inside must stay above
    inside = noisy_logits >= kth
    threshold = torch.where(inside, next_, kth)
    normal = torch.distributions.Normal(clean_logits.new_zeros(()), clean_logits.new_ones(()))
    prob = normal.cdf((clean_logits - threshold) / noise_std.clamp_min(1e-9))
    return prob.sum(dim=0)


def load_loss(clean_logits: Tensor, noisy_logits: Tensor, noise_std: Tensor, top_k: int) -> Tensor:
    """Shazeer et al. (2017, Appendix A, eq. 11): ``CV(Load(X))²`` of :func:`shazeer_load`
    (``w_load = 0.1`` in Table 6)."""
    return cv_squared(shazeer_load(clean_logits, noisy_logits, noise_std, top_k))


def auxiliary_losses(routing: Routing, *, aux_loss_coef: float, z_loss_coef: float = 0.0,
                     importance_loss_coef: float = 0.0, load_loss_coef: float = 0.0) -> tuple[dict[str, Tensor], Tensor]:
    """Every auxiliary term of one routing, unweighted by name, and their weighted sum.

    ``"load_balance"`` (Fedus et al. 2022, eq. 4), ``"z_loss"`` (Zoph et al. 2022, eq. 5),
    ``"importance"`` (Shazeer et al. 2017, eq. 6) and, for the noisy top-k router only, ``"load"``
    (Shazeer et al. 2017, eq. 11). The one place the sum is formed: :class:`~moe_lib.MoELayer` and the
    expert-parallel layer both call it.
    """
    terms = {
        "load_balance": load_balancing_loss(routing.probs, routing.experts, routing.valid),
        "z_loss": router_z_loss(routing.logits),
        "importance": importance_loss(routing.dense_weights()),
    }
    total = (aux_loss_coef * terms["load_balance"] + z_loss_coef * terms["z_loss"]
             + importance_loss_coef * terms["importance"])
    if routing.noise_std is not None:
        terms["load"] = load_loss(routing.clean_logits, routing.logits, routing.noise_std, routing.top_k)
        total = total + load_loss_coef * terms["load"]
    return terms, total
