"""Router and dispatch invariants under hypothesis: any sizes, any k, any capacity."""
import torch
from hypothesis import given
from hypothesis import strategies as st

from moe_lib import MoELayer, make_plan
from moe_lib.dispatch import expert_capacity



@st.composite
def layer_and_input(draw):
    num_experts = draw(st.integers(1, 8))
    top_k = draw(st.integers(1, num_experts))
    router = draw(st.sampled_from(["topk", "dense"]))
    if router == "dense":
        top_k = num_experts
    capacity_factor = draw(st.one_of(st.none(), st.floats(0.1, 3.0)))
    d_model = draw(st.integers(1, 6))
    num_tokens = draw(st.integers(0, 40))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    layer = MoELayer(d_model, 4, num_experts, top_k, router=router, expert="mlp", capacity_factor=capacity_factor)
    x = torch.randn(num_tokens, d_model) * draw(st.sampled_from([0.1, 1.0, 10.0]))
    return layer, x


@given(layer_and_input())
def test_router_invariants(case):
    layer, x = case
    r = layer.router(x)
    T, k, E = x.shape[0], layer.top_k, layer.num_experts
    assert r.experts.shape == r.weights.shape == (T, k)
    assert r.probs.shape == r.logits.shape == (T, E)
    if T:
        # k distinct experts per token, valid ids
        assert torch.all(r.experts.sort(dim=1).values.diff(dim=1) > 0)
        assert r.experts.min() >= 0 and r.experts.max() < E
    assert torch.all(r.weights >= 0)
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(T), rtol=0, atol=1e-5)
    torch.testing.assert_close(r.probs.sum(-1), torch.ones(T), rtol=0, atol=1e-5)


@given(layer_and_input())
def test_dispatch_invariants(case):
    layer, x = case
    r = layer.router(x)
    plan = make_plan(r, layer.capacity_factor)
    T, k, E = x.shape[0], layer.top_k, layer.num_experts
    # counts sum to T·k minus drops; requested sums to T·k
    assert int(plan.requested.sum()) == T * k
    assert int(plan.counts.sum()) == T * k - plan.dropped_assignments == plan.token_index.numel()
    assert int(plan.kept.sum()) == plan.token_index.numel()
    # capacity never exceeded; dropless drops nothing
    if layer.capacity_factor is None:
        assert plan.dropped_assignments == 0
    else:
        cap = expert_capacity(T, k, E, layer.capacity_factor)
        assert int(plan.counts.max()) <= cap if T else True
        # an expert drops only when it is full
        assert torch.all((plan.counts == torch.clamp(plan.requested, max=cap)))
    # rows grouped by expert with consistent offsets
    assert torch.all(plan.expert_index.diff() >= 0)
    assert torch.equal(plan.offsets[1:] - plan.offsets[:-1], plan.counts)
    # each kept row points at the right (token, slot) and weight
    assert torch.equal(r.experts[plan.token_index, plan.slot_index], plan.expert_index)
    assert torch.equal(r.weights[plan.token_index, plan.slot_index], plan.weights)
    assert torch.all(plan.kept[plan.token_index, plan.slot_index])
    # a token is dropped only if none of its choices was kept
    assert plan.dropped_tokens == int((plan.kept.sum(1) == 0).sum())


@given(layer_and_input())
def test_output_is_weighted_sum_of_kept_experts(case):
    layer, x = case
    y, info = layer(x, return_info=True)
    r, plan = info.routing, info.plan
    expected = torch.zeros(x.shape[0], layer.d_out, dtype=torch.float64)
    for t, j in plan.kept.nonzero().tolist():
        e = int(r.experts[t, j])
        expected[t] += r.weights[t, j].item() * layer.experts.forward_expert(e, x[t : t + 1])[0].detach().double()
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)
    stats = info.stats()
    assert sum(stats["processed"]) == x.shape[0] * layer.top_k - stats["assignments_dropped"]


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
