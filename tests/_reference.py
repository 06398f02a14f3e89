"""Helpers shared by the layer, router and dispatch tests (imported as ``from _reference import ...``; pytest
puts ``tests/`` on ``sys.path``). One copy of each idea: the naive per-token reference output, the layer
factory that gives each router the ``top_k`` it accepts, and the hypothesis strategy of layers and inputs."""
from __future__ import annotations

import torch
from hypothesis import strategies as st

from moe_lib import EXPERTS, ROUTERS, MoELayer
from moe_lib.dispatch import make_plan

#: Every router, in a stable order (hypothesis and parametrize need one).
ALL_ROUTERS = sorted(ROUTERS)


def make_layer(router: str, num_experts: int, top_k: int | None = None, capacity_factor: float | None = None,
               d_model: int = 5, expert: str = "mlp", **kw) -> MoELayer:
    """A ``MoELayer`` (``d_ff = 6``) with the ``top_k`` each router accepts: 1 for Switch, hash and BASE, 2 for
    GShard (with at least 2 experts), every expert for the dense and Soft MoE routers, ``top_k`` otherwise."""
    if router in ("switch", "hash", "base"):
        top_k = 1
    elif router == "gshard":
        top_k, num_experts = 2, max(num_experts, 2)
    elif router in ("dense", "soft"):
        top_k = num_experts
    if router == "soft":
        capacity_factor = None  # Soft MoE drops nothing: MoELayer refuses a capacity for it
    return MoELayer(d_model, 6, num_experts, top_k, router=router, expert=expert,
                    capacity_factor=capacity_factor, **kw)


@st.composite
def layer_and_input(draw, routers=ALL_ROUTERS):
    """A ``(layer, x)`` pair: any router of ``routers``, any expert kind, 1-8 experts, any ``top_k`` the router
    accepts, dropless or any capacity factor in [0.1, 3], ``d_model`` 1-6, 0-40 tokens at scale 0.1, 1 or 10,
    training or evaluation mode."""
    router = draw(st.sampled_from(routers))
    expert = draw(st.sampled_from(sorted(EXPERTS)))
    d_model = draw(st.integers(1, 6))
    num_experts = draw(st.integers(1, 8))
    top_k = draw(st.integers(1, num_experts))
    capacity_factor = draw(st.one_of(st.none(), st.floats(0.1, 3.0)))
    num_tokens = draw(st.integers(0, 40))
    seed = draw(st.integers(0, 2**16))
    training = draw(st.booleans())
    torch.manual_seed(seed)
    layer = make_layer(router, num_experts, top_k, capacity_factor, d_model=d_model, expert=expert).train(training)
    x = torch.randn(num_tokens, d_model) * draw(st.sampled_from([0.1, 1.0, 10.0]))
    return layer, x


def reference_output(layer: MoELayer, x: torch.Tensor, routing=None, plan=None) -> torch.Tensor:
    """``y_t = Σ_{kept j} w_{t,j} · h_{e_{t,j}}(x_t)`` summed assignment by assignment in float64, honouring
    capacity drops (and ``valid`` masks); any leading shape of ``x``. Each expert is called once, on the tokens
    of its kept assignments in token order (experts act row by row, so this is ``h_e(x_t)`` for each of them;
    one call per assignment costs more than the whole test on a busy CPU).

    ``routing``/``plan``: the ones the layer's forward used (``info.routing``, ``info.plan``), for routers that
    draw random numbers; by default the routing is computed here with ``layer.router`` and the plan with
    ``make_plan`` (the layer's capacity factor unless the router enforces its own capacity). Not for Soft MoE.
    """
    tokens = x.reshape(-1, layer.d_model)
    if routing is None:
        routing = layer.router(tokens)
    if plan is None:
        plan = make_plan(routing, None if layer.router.owns_capacity else layer.capacity_factor)
    # Soft MoE's experts see mixtures of tokens: test_routers.py checks it with its own reference
    assert not routing.is_soft, "Soft MoE has no per-token assignments"
    out = torch.zeros(tokens.shape[0], layer.d_out, dtype=torch.float64)
    by_expert: dict[int, list[tuple[int, int]]] = {}
    for t, j in plan.kept.nonzero().tolist():
        by_expert.setdefault(int(routing.experts[t, j]), []).append((t, j))
    for e, assignments in by_expert.items():
        h = layer.experts.forward_expert(e, tokens[[t for t, _ in assignments]]).detach().double()
        for (t, j), h_t in zip(assignments, h):
            out[t] += routing.weights[t, j].detach().double() * h_t
    return out.reshape(*x.shape[:-1], layer.d_out)
