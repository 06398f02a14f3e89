"""Auxiliary router losses. Each returns an unweighted scalar; the caller picks the coefficient.

* :func:`load_balancing_loss` — Switch / GShard ``E · Σ_i f_i P_i`` (Fedus et al. 2022, eq. 4–6).
* :func:`router_z_loss` — ST-MoE ``(1/T) Σ_t (log Σ_i e^{x_{t,i}})²`` (Zoph et al. 2022, eq. 5).
* :func:`importance_loss` and :func:`load_loss` — Shazeer et al. (2017, §4 and Appendix A, eq. 6–11):
  the squared coefficient of variation of the per-expert importance (sum of gate values) and of the
  smooth per-expert load estimate :func:`shazeer_load`.
"""
from __future__ import annotations

from collections.abc import Mapping
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


class AuxTerms(Mapping):
    """The auxiliary terms of one routing by name, each computed when first read.

    The terms a layer is configured with (coefficient > 0) are computed in its forward pass, because the
    training loss needs them; the others are computed only if someone reads them (a plot, a metric). Keys:
    ``"load_balance"``, ``"z_loss"``, ``"importance"`` and, for the noisy top-k router, ``"load"``."""

    def __init__(self, routing: Routing):
        self._routing = routing
        self._values: dict[str, Tensor] = {}
        self._names = tuple(name for name, (applies, _) in _TERMS.items() if applies(routing))

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._names:
            raise KeyError(name)
        if name not in self._values:
            self._values[name] = _TERMS[name][1](self._routing)
        return self._values[name]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def computed(self) -> tuple[str, ...]:
        """The names computed so far (the configured terms right after a forward pass)."""
        return tuple(n for n in self._names if n in self._values)

    def __repr__(self) -> str:
        return f"AuxTerms({', '.join(n + ('' if n in self._values else ' (not computed)') for n in self._names)})"


def _always(routing) -> bool:
    return True


#: name -> (does the term exist for this routing, the term). The order is the order of the weighted sum.
_TERMS = {
    "load_balance": (_always, lambda r: load_balancing_loss(r.probs, r.experts, r.valid)),
    "z_loss": (_always, lambda r: router_z_loss(r.logits)),
    "importance": (_always, lambda r: importance_loss(r.dense_weights())),
    "load": (lambda r: getattr(r, "noise_std", None) is not None,  # the noisy router's NoisyRouting
             lambda r: load_loss(r.clean_logits, r.logits, r.noise_std, r.top_k)),
}


def auxiliary_losses(routing: Routing, *, aux_loss_coef: float, z_loss_coef: float = 0.0,
                     importance_loss_coef: float = 0.0, load_loss_coef: float = 0.0) -> tuple[AuxTerms, Tensor]:
    """The auxiliary terms of one routing by name (:class:`AuxTerms`, unweighted) and their weighted sum.

    ``"load_balance"`` (Fedus et al. 2022, eq. 4), ``"z_loss"`` (Zoph et al. 2022, eq. 5),
    ``"importance"`` (Shazeer et al. 2017, eq. 6) and, for the noisy top-k router only, ``"load"``
    (Shazeer et al. 2017, eq. 11). Only the terms with a positive coefficient are computed and summed (in
    that order); with none configured the sum is a zero without a graph. The one place the sum is formed:
    :class:`~moe_lib.MoELayer` calls it, whatever its dispatcher.
    """
    terms = AuxTerms(routing)
    coefs = {"load_balance": aux_loss_coef, "z_loss": z_loss_coef, "importance": importance_loss_coef,
             "load": load_loss_coef}
    total = None
    for name in terms:
        if coefs[name] > 0:
            weighted = coefs[name] * terms[name]
            total = weighted if total is None else total + weighted
    if total is None:
        total = torch.zeros((), device=routing.probs.device)
    return terms, total
