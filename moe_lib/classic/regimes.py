"""Where a mixture's regression error sits, on a problem made of regimes (chapter 1).

A mixture fitted to a piecewise target with jumps (:func:`moe_lib.book.data.piecewise_regression`) can miss in two
ways: near a jump, where its gate cannot switch exactly at the edge, and inside a regime, where no expert owns
the regime (two regimes share one expert, or an expert is used only blended with another). These helpers
measure both, so a chapter can say which one its leftover error is, rather than guess.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .._validate import check_int, check_positive_float
from ..layer import MoELayer
from ..metrics import purity, specialisation


def _distance_to_edges(x: Tensor, edges: Sequence[float]) -> Tensor:
    if x.dim() != 2 or x.shape[1] != 1:
        raise ValueError(f"x must have shape [T, 1] (one input feature), got {tuple(x.shape)}")
    e = torch.as_tensor(list(edges), dtype=x.dtype, device=x.device)
    if e.numel() == 0:
        raise ValueError("edges must hold at least one jump position")
    return (x - e).abs().min(dim=1).values


@torch.no_grad()
def error_near_edges(model: nn.Module, x: Tensor, y: Tensor, edges: Sequence[float],
                     width: float = 0.05) -> tuple[float, float]:
    """The mean squared error of ``model`` on ``(x [T, 1], y [T, D])`` split into two *contributions*: from
    the points within ``width`` of an edge (a jump of the target) and from all the others. The two sum to
    the MSE (each is a sum over its points divided by ``T``)."""
    width = check_positive_float("width", width)
    near = _distance_to_edges(x, edges) < width
    sq = (model(x) - y).square().sum(-1)
    T = len(x)
    return float(sq[near].sum() / T), float(sq[~near].sum() / T)


@torch.no_grad()
def regime_diagnosis(layer: MoELayer, x: Tensor, y: Tensor, regions: Tensor, edges: Sequence[float], *,
                     width: float = 0.05, min_share: float = 0.01) -> dict[str, float]:
    """One trained dense-gate mixture on a regime problem, in numbers (one row per seed of a table):

    * ``"test MSE"`` — of the dense blend;
    * ``"MSE within {width} of a jump"`` — its contribution from the points near an edge (see
      :func:`error_near_edges`); the rest comes from inside the regimes;
    * ``"top-1 expert alone, MSE"`` and ``"mean top gate weight"`` — :func:`moe_lib.classic.top_expert_error`;
    * ``"experts that win"`` — experts that are the gate's first choice for at least ``min_share`` of the points;
    * ``"purity"`` — :func:`moe_lib.metrics.purity` of the regime → first-choice-expert table.
    """
    from .two_stage import top_expert_error

    num_regimes = check_int("number of regimes", int(regions.max()) + 1, minimum=1)
    near, _ = error_near_edges(layer, x, y, edges, width)
    top1, weight = top_expert_error(layer, x, y)
    winner = layer.router(x).probs.argmax(dim=1)
    share = torch.bincount(winner, minlength=layer.num_experts).to(x.dtype) / len(x)
    counts = specialisation(winner, regions, num_experts=layer.num_experts, num_labels=num_regimes)
    return {"test MSE": float((layer(x) - y).square().mean()),
            f"MSE within {width:g} of a jump": near,
            "top-1 expert alone, MSE": top1,
            "mean top gate weight": weight,
            "experts that win": float((share >= min_share).sum()),
            "purity": float(purity(counts))}


@torch.no_grad()
def gate_sparsity(layer: MoELayer, x: Tensor, threshold: float = 0.01) -> dict[str, float]:
    """How sparse ``layer``'s gate is on ``x``, four ways (means over the inputs; chapter 1, section 1.7):

    * ``"article's sparsity ratio"`` — ``(N − Σ_i |w_i|) / N``; ``(N − 1)/N`` whenever the weights sum to 1;
    * ``"experts run per prediction"`` — experts that actually compute (``k`` of a top-k gate, ``N`` of a
      dense one);
    * ``"experts with weight > {threshold}"``;
    * ``"gate entropy (nats)"`` and ``"effective experts"`` (``e^H``) — how concentrated the weight is.
    """
    from ..metrics import active_fraction

    _, info = layer(x, return_info=True)
    s = info.stats()
    above = active_fraction(info.routing.dense_weights(), threshold=threshold).mean()
    n = layer.num_experts
    return {"article's sparsity ratio": float(s["article_sparsity_ratio"]),
            "experts run per prediction": float(s["active_fraction"]) * n,
            f"experts with weight > {threshold:g}": float(above) * n,
            "gate entropy (nats)": float(s["gate_entropy"]),
            "effective experts": float(s["effective_experts"])}
