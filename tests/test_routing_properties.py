"""Dispatch and combine invariants under hypothesis, for every router that assigns tokens to experts: any
sizes, any k, any capacity. (The routers' own invariants are in test_routers.py.)"""
import torch
from hypothesis import given
from hypothesis import strategies as st

from _reference import ALL_ROUTERS, layer_and_input, reference_output
from moe_lib import MoELayer, make_plan
from moe_lib.dispatch import expert_capacity

#: Every router but Soft MoE, whose experts see mixtures of tokens (no per-token assignment, no plan).
ASSIGNING = [r for r in ALL_ROUTERS if r != "soft"]


@given(layer_and_input(ASSIGNING))
def test_dispatch_invariants(case):
    layer, x = case
    y, info = layer(x, return_info=True)
    r, plan = info.routing, info.plan
    T, E = x.shape[0], layer.num_experts
    assignments = int(r.mask().sum())  # T·k, less the entries a router marks invalid (GShard, expert choice)
    if r.valid is None:
        assert assignments == T * r.top_k
    # requested = valid assignments; kept = requested minus drops
    assert int(plan.requested.sum()) == assignments
    assert int(plan.counts.sum()) == assignments - plan.dropped_assignments == plan.token_index.numel()
    assert int(plan.kept.sum()) == plan.token_index.numel()
    assert not torch.any(plan.kept & ~r.mask())
    # capacity never exceeded; dropless (or a router that enforces its own capacity) drops nothing
    if layer.capacity_factor is None or layer.router.owns_capacity:
        assert plan.dropped_assignments == 0
    elif T:
        cap = expert_capacity(T, r.top_k, E, layer.capacity_factor)
        assert int(plan.counts.max()) <= cap
        # an expert drops only when it is full
        assert torch.equal(plan.counts, torch.clamp(plan.requested, max=cap))
    # rows grouped by expert with consistent offsets
    assert torch.all(plan.expert_index.diff() >= 0)
    assert torch.equal(plan.offsets[1:] - plan.offsets[:-1], plan.counts)
    # each kept row points at the right (token, slot) and weight
    assert torch.equal(r.experts[plan.token_index, plan.slot_index], plan.expert_index)
    assert torch.equal(r.weights[plan.token_index, plan.slot_index], plan.weights)
    assert torch.all(plan.kept[plan.token_index, plan.slot_index])
    # a token is dropped only if none of its choices was kept
    assert plan.dropped_tokens == int((plan.kept.sum(1) == 0).sum())
    # the plan is make_plan of the routing (nothing else decides what is kept)
    again = make_plan(r, None if layer.router.owns_capacity else layer.capacity_factor)
    assert torch.equal(again.kept, plan.kept) and torch.equal(again.token_index, plan.token_index)


@given(layer_and_input(ASSIGNING))
def test_output_is_weighted_sum_of_kept_experts(case):
    layer, x = case
    y, info = layer(x, return_info=True)
    expected = reference_output(layer, x, info.routing, info.plan)
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)
    stats = info.stats()
    assert sum(stats["processed"]) == int(info.routing.mask().sum()) - stats["assignments_dropped"]


@given(st.integers(1, 64), st.integers(1, 8), st.data())
def test_permute_then_unpermute_is_identity(num_tokens, num_experts, data):
    """Scatter-back of the grouped rows with unit weights returns each token k times (k·x)."""
    top_k = data.draw(st.integers(1, num_experts))
    torch.manual_seed(data.draw(st.integers(0, 1000)))
    layer = MoELayer(3, 4, num_experts, top_k)
    x = torch.randn(num_tokens, 3)
    plan = make_plan(layer.router(x))
    grouped = x[plan.token_index]
    back = torch.zeros_like(x).index_add(0, plan.token_index, grouped)
    torch.testing.assert_close(back, top_k * x)
