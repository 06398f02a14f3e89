"""Routing metrics: how balanced, how sparse and how confident a router is.

Every function takes plain tensors so it can be used on any router's output; :func:`routing_stats`
gathers them for one forward pass of :class:`moe_lib.MoELayer`.

On "sparsity". The article this book answers defines a *sparsity ratio* ``(N − Σ_i |w_i|) / N``
(:func:`article_sparsity_ratio`). For any gate whose weights are non-negative and sum to one — a softmax,
or a renormalised top-k — ``Σ|w_i| = 1`` and the ratio is ``(N − 1)/N`` whatever the router does, so it
measures nothing. Chapter 1 shows it by measurement. The quantities that do vary with sparsity are the
fraction of experts that actually run per token (:func:`active_fraction`), the entropy of the gate
(:func:`entropy`) and its exponential, the effective number of experts (:func:`effective_num_experts`).
"""
from __future__ import annotations


import torch
from torch import Tensor

from .dispatch import DispatchPlan
from .routers import Routing


def expert_load(experts: Tensor, num_experts: int) -> Tensor:
    """Assignments per expert: ``bincount`` of the ``[T, k]`` chosen ids (int64 ``[E]``)."""
    return torch.bincount(experts.reshape(-1), minlength=num_experts)


def coefficient_of_variation(values: Tensor) -> float:
    """``std / mean`` (population std) of a load or importance vector; 0 = perfectly balanced.

    Shazeer et al. (2017, eq. 6–7) penalise its square. Returns ``nan`` for an all-zero vector.
    """
    values = values.double()
    mean = values.mean()
    if mean == 0:
        return float("nan")
    return float(values.std(unbiased=False) / mean)


def max_violation(load: Tensor) -> float:
    """MaxVio = ``(max load − mean load) / mean load`` (Wang et al. 2024, §4.1); 0 = balanced."""
    load = load.double()
    mean = load.mean()
    return float("nan") if mean == 0 else float((load.max() - mean) / mean)


def entropy(weights: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy in nats of non-negative weights along ``dim`` (normalised first; ``0 log 0 = 0``)."""
    p = weights.double()
    p = p / p.sum(dim=dim, keepdim=True)
    return -(torch.special.xlogy(p, p)).sum(dim=dim)


def effective_num_experts(weights: Tensor) -> Tensor:
    """``exp(entropy)`` per token: 1 when one expert carries all weight, ``N`` when ``N`` share equally."""
    return entropy(weights).exp()


def active_fraction(dense_weights: Tensor, threshold: float = 0.0) -> Tensor:
    """Per token, the fraction of experts whose weight exceeds ``threshold`` — the experts that must run.

    ``dense_weights`` is ``[T, E]`` (zeros for unchosen experts). It is ``k/E`` for a top-k router. For a
    softmax gate it is 1 in exact arithmetic; in float32 a very confident gate's smallest weights underflow
    to zero, yet a dense layer still runs every expert — :func:`routing_stats` therefore reports the
    experts a layer *runs* (``k/E``) as ``active_fraction``.
    """
    return (dense_weights.abs() > threshold).double().mean(dim=-1)


def article_sparsity_ratio(dense_weights: Tensor) -> Tensor:
    """The article's "sparsity ratio" ``(N − Σ_i |w_i|) / N`` per token, reproduced to be tested.

    Constant ``(N − 1)/N`` for any gate whose weights sum to one; see the module docstring.
    """
    n = dense_weights.shape[-1]
    return (n - dense_weights.abs().double().sum(dim=-1)) / n


def specialisation(assigned: Tensor, labels: Tensor, num_experts: int, num_labels: int) -> Tensor:
    """Counts ``[num_labels, E]``: how many tokens of each label (region, class, token type) went to
    each expert. ``assigned`` is ``[T]`` (e.g. each token's top expert) or ``[T, k]`` (every choice)."""
    assigned = assigned.reshape(labels.shape[0], -1)
    rows = labels.reshape(-1, 1).expand_as(assigned).reshape(-1)
    flat = rows * num_experts + assigned.reshape(-1)
    return torch.bincount(flat, minlength=num_labels * num_experts).reshape(num_labels, num_experts)


def purity(counts: Tensor) -> float:
    """Share of tokens handled by their label's most frequent expert, from :func:`specialisation` counts.

    1.0 when every label is served by a single expert; ``max_e share`` of a label is its purity.
    """
    total = counts.sum()
    return float("nan") if total == 0 else float(counts.max(dim=1).values.sum() / total)


def routing_stats(routing: Routing, plan: DispatchPlan) -> dict[str, float | list[int]]:
    """Summary of one forward pass, as plain Python numbers.

    Keys:
        ``load``: assignments the router sent to each expert (before capacity).
        ``processed``: assignments each expert actually processed (after capacity).
        ``load_cv``: coefficient of variation of ``load``; ``max_violation``: MaxVio of ``load``.
        ``experts_used_fraction``: fraction of experts that received at least one assignment.
        ``active_fraction``: fraction of the experts that run for each token, ``k / E`` (1 for a dense gate
        and Soft MoE; assignments / (T·E) for expert choice and GShard's random second expert).
        ``gate_entropy``: mean entropy (nats) of the combine weights a token uses.
        ``router_entropy``: mean entropy (nats) of the full softmax over all experts.
        ``effective_experts``: mean of ``exp(gate_entropy)`` per token.
        ``article_sparsity_ratio``: the article's ``(N − Σ|w|)/N``, mean over tokens.
        ``tokens``: ``T``; ``assignments``: ``T·k`` (the valid ones; the slots for Soft MoE).
        ``assignments_dropped`` / ``tokens_dropped`` / ``dropped_fraction``: capacity overflow;
        ``tokens_dropped`` also counts tokens no expert chose (expert choice).
    """
    num_tokens, top_k = routing.experts.shape
    num_experts = routing.num_experts
    load = plan.requested
    with torch.no_grad():
        dense = routing.dense_weights()
        weights, probs = routing.weights.detach(), routing.probs.detach()
        mask = routing.mask()
    if routing.is_soft:  # Soft MoE: the experts process slots, every token uses every expert
        assignments = int(plan.requested.sum())
        active = 1.0
    else:
        assignments = int(mask.sum())
        active = assignments / (num_tokens * num_experts) if num_tokens else top_k / num_experts
    # tokens that received no weight at all (expert choice can leave tokens unchosen)
    used = weights.sum(-1) > 0

    def mean(per_token: Tensor) -> float:  # over the tokens that were used; nan when there are none
        return float(per_token[used].mean())

    return {
        "tokens": num_tokens,
        "assignments": assignments,
        "load": load.tolist(),
        "processed": plan.counts.tolist(),
        "load_cv": coefficient_of_variation(load),
        "max_violation": max_violation(load),
        "experts_used_fraction": float((load > 0).double().mean()),
        "active_fraction": active,
        "gate_entropy": mean(entropy(weights)),
        "router_entropy": mean(entropy(probs)),
        "effective_experts": mean(effective_num_experts(weights)),
        "article_sparsity_ratio": mean(article_sparsity_ratio(dense)),
        "assignments_dropped": plan.dropped_assignments,
        "tokens_dropped": plan.dropped_tokens,
        "dropped_fraction": plan.dropped_assignments / assignments if assignments else 0.0,
    }


#: A change of earlier outputs below this is float32 rounding, not information from the future: when the
#: last token moves to another expert, the other experts' matmuls see one row more or less, and a BLAS
#: may sum a row in another order for another number of rows (MKL's COMPATIBLE branch does: ~1e-7).
CAUSAL_ATOL = 1e-5


@torch.no_grad()
def future_influence(layer: torch.nn.Module, x: Tensor, trials: int = 8, seed: int = 0) -> float:
    """How much the *last* token of a sequence changes the outputs of the tokens *before* it.

    ``x`` is ``[L, d_model]`` (one sequence); the last token is replaced by ``trials`` random tokens of the
    same scale and the largest absolute change of ``layer(x)[:-1]`` is returned. A causal layer (every
    token-choice router without a capacity limit) gives 0 up to float32 rounding (below
    :data:`CAUSAL_ATOL`): a language model may use it. Expert choice and Soft MoE route each token using
    the whole batch, so the future leaks into the past (Zhou et al. 2022, §6; Puigcerver et al. 2024, §6),
    by changes of the order of the outputs themselves.
    """
    g = torch.Generator().manual_seed(seed)
    was_training = layer.training
    layer.eval()
    base = layer(x)
    worst = 0.0
    for _ in range(trials):
        changed = x.clone()
        changed[-1] = torch.randn(x.shape[-1], generator=g) * x.std()
        worst = max(worst, float((layer(changed)[:-1] - base[:-1]).abs().max()))
    layer.train(was_training)
    return worst


@torch.no_grad()
def routing_flops_per_token(layer: torch.nn.Module, x: Tensor, token_ids: Tensor | None = None) -> float:
    """Counted matmul FLOPs per token of a :class:`moe_lib.MoELayer`'s *routing*: everything one forward
    pass computes except the experts themselves (2 FLOPs per multiply-add, ``torch.utils.flop_counter``).

    Counted, not asserted: the whole forward pass of ``layer`` on ``x [T, d_model]`` (with ``token_ids``
    for routers that read them) minus the same layer's experts run alone on the same dispatch plan. For a
    learned gate that is ``x W_g``; for Soft MoE also the dispatch and combine matmuls; for a hash of token
    ids nothing at all. Counted in the layer's current mode (call ``layer.eval()`` for inference cost).
    """
    from torch.utils.flop_counter import FlopCounterMode

    from .backends import BACKENDS

    tokens = x.reshape(-1, x.shape[-1])
    ids = None if token_ids is None else token_ids.reshape(-1)
    with FlopCounterMode(display=False) as whole:
        _, info = layer(tokens, return_info=True, token_ids=ids)
    routing = info.routing
    inputs = layer.dispatcher.expert_inputs(tokens, routing)
    with FlopCounterMode(display=False) as experts:
        BACKENDS[layer.backend](layer.experts, inputs, info.plan)
    return (whole.get_total_flops() - experts.get_total_flops()) / max(1, tokens.shape[0])
