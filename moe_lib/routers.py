"""Routers (gating networks): score every expert for every token, then choose which experts run.

A router maps tokens ``x [T, d_model]`` to a :class:`Routing`: the raw scores, the full softmax over the
``E`` experts, and for each token the ``k`` chosen experts with their combine weights. Everything after
the router (dispatch, experts, combine) only reads the ``Routing``, so routers are interchangeable.

Two routers live here; later chapters add more through :data:`ROUTERS`.

* ``"dense"`` — the classical softmax gate of Jacobs et al. (1991, eq. 1–3) and of the article the book
  answers: every expert is weighted, ``f(x) = Σ_i w_i(x) h_i(x)`` with ``w = softmax(x W_g)``. ``k = E``.
* ``"topk"`` — keep the ``k`` largest gate probabilities per token (Shazeer et al. 2017, eq. 3–5 without
  the noise; Switch Transformer with ``k = 1``, Fedus et al. 2022, eq. 1–2; Mixtral with ``k = 2``).
  With ``normalize=True`` (default) the kept probabilities are renormalised to sum to 1, which equals a
  softmax over the top-k logits (Mixtral); with ``normalize=False`` they are the raw probabilities
  (Switch, GShard-style ``p_i`` without renormalisation).

Router arithmetic is done in float32 whatever the input dtype ("selective precision", Fedus et al. 2022,
§2.4): a softmax in bfloat16 is one of the documented causes of training instability.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._validate import check_bool, check_int


@dataclass
class Routing:
    """What a router decided for ``T`` tokens over ``E`` experts, ``k`` per token.

    Attributes:
        logits: ``[T, E]`` router scores (float32, or float64 for float64 input) ``x W_g`` (before any softmax).
        probs: ``[T, E]`` float32 softmax of ``logits`` over *all* experts. Auxiliary losses use these
            (the Switch load-balancing loss needs the full softmax, not the top-k-masked one).
        experts: ``[T, k]`` int64 ids of the chosen experts; the ``k`` ids of a row are distinct and
            ordered from the highest score to the lowest.
        weights: ``[T, k]`` float32 combine weights of the chosen experts (``>= 0``).
    """

    logits: Tensor
    probs: Tensor
    experts: Tensor
    weights: Tensor

    @property
    def num_tokens(self) -> int:
        return self.experts.shape[0]

    @property
    def top_k(self) -> int:
        return self.experts.shape[1]

    @property
    def num_experts(self) -> int:
        return self.logits.shape[1]

    def dense_weights(self) -> Tensor:
        """The combine weights scattered into a ``[T, E]`` matrix (zeros for experts not chosen)."""
        out = torch.zeros_like(self.probs)
        return out.scatter(1, self.experts, self.weights)


class Router(nn.Module):
    """Base class: a linear gate ``x W_g (+ b)`` scored in float32. Subclasses choose the experts.

    Args:
        d_model: token width.
        num_experts: ``E``.
        top_k: experts chosen per token.
        bias: add a learned bias to the gate scores. Modern sparse routers have none; a 1-D regression
            gate needs one to place its boundaries (chapter 1).
    """

    name = "base"

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, bias: bool = False):
        super().__init__()
        self.d_model = check_int("d_model", d_model, minimum=1)
        self.num_experts = check_int("num_experts", num_experts, minimum=1)
        self.top_k = check_int("top_k", top_k, minimum=1, maximum=self.num_experts)
        self.gate = nn.Linear(self.d_model, self.num_experts, bias=check_bool("router_bias", bias))

    def scores(self, x: Tensor) -> Tensor:
        """Router logits ``[T, E]``, computed in float32 at least (float64 inputs stay float64)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        bias = None if self.gate.bias is None else self.gate.bias.to(dtype)
        return nn.functional.linear(x.to(dtype), self.gate.weight.to(dtype), bias)

    def forward(self, x: Tensor) -> Routing:  # pragma: no cover - abstract
        raise NotImplementedError


class DenseRouter(Router):
    """Softmax gate over every expert: ``w = softmax(x W_g)``, ``k = E`` (Jacobs et al. 1991)."""

    name = "dense"

    def __init__(self, d_model: int, num_experts: int, top_k: int | None = None, *, bias: bool = False):
        top_k = num_experts if top_k is None else top_k
        if top_k != num_experts:
            raise ValueError(
                f"router='dense' weights every expert, so top_k must equal num_experts ({num_experts}) "
                f"or be None, got top_k={top_k}; use router='topk' to keep only k experts"
            )
        super().__init__(d_model, num_experts, top_k, bias=bias)

    def forward(self, x: Tensor) -> Routing:
        logits = self.scores(x)
        probs = logits.softmax(dim=-1)
        experts = torch.arange(self.num_experts, device=x.device).expand(x.shape[0], -1)
        return Routing(logits=logits, probs=probs, experts=experts, weights=probs)


class TopKRouter(Router):
    """Keep the ``k`` most probable experts per token (Shazeer et al. 2017, eq. 3–5, noise-free).

    Args:
        normalize: renormalise the ``k`` kept probabilities to sum to 1 (Mixtral, DeepSeek-V3's
            ``norm_topk_prob``). ``False`` keeps the raw softmax probabilities (Switch Transformer).
    """

    name = "topk"

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, bias: bool = False, normalize: bool = True):
        super().__init__(d_model, num_experts, top_k, bias=bias)
        self.normalize = check_bool("normalize_weights", normalize)

    def forward(self, x: Tensor) -> Routing:
        logits = self.scores(x)
        probs = logits.softmax(dim=-1)
        top_p, experts = probs.topk(self.top_k, dim=-1)
        weights = top_p / top_p.sum(dim=-1, keepdim=True) if self.normalize else top_p
        return Routing(logits=logits, probs=probs, experts=experts, weights=weights)


#: Router name -> class. ``MoELayer(router=name)`` looks names up here.
ROUTERS: dict[str, type[Router]] = {DenseRouter.name: DenseRouter, TopKRouter.name: TopKRouter}
