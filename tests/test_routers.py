"""Every router behind MoELayer: the shared invariants under hypothesis, each router's own rule (hash,
auxiliary-loss-free bias, GShard, BASE, noisy top-k, expert choice, Soft MoE), backend agreement for every
router, causality, and the errors for bad arguments."""
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from _reference import ALL_ROUTERS as ALL
from _reference import layer_and_input, make_layer, reference_output
from moe_lib import MoELayer
from moe_lib.routers import balanced_assignment, hash_to_expert

#: Routers whose combine weights sum to one for every token (renormalised top-k, the full softmax, hash's
#: weight 1, Soft MoE's combine rows); GShard too, but only in evaluation (in training it may drop the
#: second expert at random). Not Switch and BASE (one raw gate value) nor expert choice and group capacity.
WEIGHTS_SUM_TO_ONE = {"topk", "noisy_topk", "auxfree", "dense", "group_limited", "hash", "soft"}


@given(layer_and_input())
def test_every_router_invariants(case):
    """What every router promises (routers.Routing): shapes, probabilities, weights, distinct valid experts.
    The plan built from the routing (capacity, drops, grouping) is checked in test_routing_properties.py."""
    layer, x = case
    T, E = x.shape[0], layer.num_experts
    y, info = layer(x, return_info=True)
    r = info.routing
    assert y.shape == x.shape
    assert r.probs.shape == (T, E)
    assert r.logits.shape[0] == T and (r.is_soft or r.logits.shape == (T, E))
    # k entries per token: the layer's top_k, except expert choice (a column per expert, masked by valid)
    k = E if layer.router.name == "expert_choice" else layer.top_k
    assert r.experts.shape == r.weights.shape == (T, k)
    assert torch.all(r.weights >= 0)
    assert torch.all(r.weights[~r.mask()] == 0)
    torch.testing.assert_close(r.probs.sum(-1), torch.ones(T), rtol=0, atol=1e-5)
    if T and not r.is_soft:
        assert torch.all(r.experts.sort(dim=1).values.diff(dim=1) > 0), "distinct experts per token"
        assert r.experts.min() >= 0 and r.experts.max() < E
    if layer.router.name in WEIGHTS_SUM_TO_ONE or (layer.router.name == "gshard" and not layer.training):
        torch.testing.assert_close(r.weights.sum(-1), torch.ones(T), rtol=0, atol=1e-5)
    stats = info.stats()
    assert 0.0 <= stats["dropped_fraction"] <= 1.0
    assert torch.isfinite(info.aux_loss)


@given(st.integers(1, 8), st.integers(1, 40), st.data())
def test_expert_choice_fills_every_quota_exactly(num_experts, num_tokens, data):
    top_k = data.draw(st.integers(1, num_experts))
    factor = data.draw(st.one_of(st.none(), st.floats(0.1, 4.0)))
    torch.manual_seed(data.draw(st.integers(0, 1000)))
    layer = make_layer("expert_choice", num_experts, top_k, factor)
    x = torch.randn(num_tokens, 5)
    y, info = layer(x, return_info=True)
    r = info.routing
    # exact arithmetic, as documented: 0.2 · 6 · 5 / 6 is 1.0000000000000002 in floats, so ceil would give 2
    quota = min(num_tokens, math.ceil(Fraction(repr(factor or 1.0)) * num_tokens * top_k / num_experts))
    assert torch.equal(r.valid.sum(0), torch.full((num_experts,), quota))
    assert torch.equal(info.plan.counts, torch.full((num_experts,), quota))
    assert info.plan.dropped_assignments == 0
    # the chosen tokens are each expert's highest-probability tokens
    for e in range(num_experts):
        chosen = r.probs[r.valid[:, e], e]
        others = r.probs[~r.valid[:, e], e]
        if chosen.numel() and others.numel():
            assert chosen.min() >= others.max()
    assert info.stats()["tokens_dropped"] == int((r.valid.sum(1) == 0).sum())


@given(st.integers(1, 6), st.integers(1, 3), st.integers(0, 30), st.integers(0, 1000))
def test_soft_moe_dispatch_and_combine_are_normalised(num_experts, slots, num_tokens, seed):
    torch.manual_seed(seed)
    layer = make_layer("soft", num_experts, router_options={"slots_per_expert": slots})
    x = torch.randn(num_tokens, 5) * 3
    y, info = layer(x, return_info=True)
    r = info.routing
    S = num_experts * slots
    assert r.dispatch.shape == r.combine.shape == (num_tokens, S)
    assert torch.all(r.dispatch >= 0) and torch.all(r.combine >= 0)
    if num_tokens:
        torch.testing.assert_close(r.dispatch.sum(0), torch.ones(S), rtol=0, atol=1e-5)
        torch.testing.assert_close(r.combine.sum(1), torch.ones(num_tokens), rtol=0, atol=1e-5)
    # y = C · experts(Dᵀ X): recompute slot by slot
    slots_in = r.dispatch.t() @ x
    slot_out = torch.stack([layer.experts.forward_expert(s // slots, slots_in[s : s + 1])[0] for s in range(S)])
    torch.testing.assert_close(y, r.combine @ slot_out, rtol=1e-4, atol=1e-5)
    assert info.stats()["tokens_dropped"] == 0


@given(st.integers(1, 16), st.lists(st.integers(0, 10**6), min_size=0, max_size=50), st.integers(0, 5))
def test_hash_routing_is_deterministic(num_experts, ids, seed):
    ids = torch.tensor(ids, dtype=torch.long)
    a = hash_to_expert(ids, num_experts, seed)
    assert torch.equal(a, hash_to_expert(ids, num_experts, seed))
    assert a.numel() == 0 or (a.min() >= 0 and a.max() < num_experts)
    # two layers built independently route the same ids (and the same content) the same way
    torch.manual_seed(seed)
    l1 = make_layer("hash", num_experts, router_options={"hash_seed": seed})
    torch.manual_seed(seed + 1)
    l2 = make_layer("hash", num_experts, router_options={"hash_seed": seed})
    x = torch.randn(ids.numel(), 5)
    for kwargs in ({"token_ids": ids}, {}):
        r1, r2 = l1.router(x, **kwargs), l2.router(x, **kwargs)
        assert torch.equal(r1.experts, r2.experts)
        assert torch.all(r1.weights == 1)
    assert torch.equal(l1.router(x, token_ids=ids).experts[:, 0], a)
    # same id -> same expert whatever the input
    assert torch.equal(l1.router(torch.randn_like(x), token_ids=ids).experts, l1.router(x, token_ids=ids).experts)


def test_hash_routing_spreads_ids_evenly():
    counts = torch.bincount(hash_to_expert(torch.arange(8000), 8), minlength=8)
    assert counts.min() > 900 and counts.max() < 1100


@given(st.integers(1, 6), st.integers(1, 4), st.integers(0, 1000), st.floats(-0.5, 0.5))
def test_aux_free_bias_changes_selection_never_gate_values(num_experts, top_k, seed, shift):
    top_k = min(top_k, num_experts)
    torch.manual_seed(seed)
    layer = make_layer("auxfree", num_experts, top_k)
    x = torch.randn(20, 5)
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.linspace(-1, 1, num_experts) * shift)
    bias = layer.router.expert_bias.clone()  # the selection uses the bias before this pass's update
    r = layer.router(x)
    probs = torch.softmax(x @ layer.router.gate.weight.T, -1)
    torch.testing.assert_close(r.probs, probs)
    gate = probs.gather(1, r.experts)
    torch.testing.assert_close(r.weights, gate / gate.sum(-1, keepdim=True))
    # the selection is the top-k of probs + bias
    biased = probs + bias
    torch.testing.assert_close(biased.gather(1, r.experts).min(1).values,
                               biased.topk(top_k, -1).values[:, -1])


def test_aux_free_bias_update_rule():
    torch.manual_seed(0)
    layer = make_layer("auxfree", 4, 1, router_options={"update_rate": 0.01})
    with torch.no_grad():  # every token to expert 0
        layer.router.expert_bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    x = torch.randn(8, 5)
    layer.train()
    with torch.no_grad():  # no gradients: not a training step, the bias stays
        layer(x)
    torch.testing.assert_close(layer.router.expert_bias, torch.tensor([1.0, 0.0, 0.0, 0.0]))
    layer.eval()
    layer(x)  # evaluation: the bias stays
    torch.testing.assert_close(layer.router.expert_bias, torch.tensor([1.0, 0.0, 0.0, 0.0]))
    layer.train()
    _, info = layer(x, return_info=True)  # load [8, 0, 0, 0], mean 2 -> b += 0.01 * sign(2 - load)
    assert info.routing.experts.flatten().tolist() == [0] * 8  # chosen with the old bias
    torch.testing.assert_close(layer.router.expert_bias, torch.tensor([0.99, 0.01, 0.01, 0.01]))


def test_gshard_random_second_expert():
    torch.manual_seed(0)
    layer = make_layer("gshard", 4).train()
    x = torch.randn(4000, 5) * 3
    r = layer.router(x)
    assert torch.all(r.valid[:, 0])
    g2 = r.probs.topk(2, -1).values
    g2 = (g2[:, 1] / g2.sum(-1))
    # the second expert is sent with probability min(1, 2 g2): compare the empirical rate
    sent = r.valid[:, 1].float()
    assert abs(float(sent.mean()) - float(torch.clamp(2 * g2, max=1).detach().mean())) < 0.03
    torch.testing.assert_close(r.weights[:, 0] + g2 * sent, r.weights.sum(-1))
    layer.eval()
    assert torch.all(layer.router(x).valid)


@given(st.integers(1, 8), st.integers(0, 60), st.integers(0, 1000))
def test_balanced_assignment_respects_capacity(num_experts, num_tokens, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(num_tokens, num_experts, generator=g)
    assign = balanced_assignment(scores)
    cap = math.ceil(num_tokens / num_experts) if num_tokens else 0
    assert assign.shape == (num_tokens,)
    assert num_tokens == 0 or (assign.min() >= 0 and assign.max() < num_experts)
    assert num_tokens == 0 or torch.bincount(assign, minlength=num_experts).max() <= cap


def test_balanced_assignment_is_argmax_when_feasible_and_balances_a_collapsed_router():
    scores = torch.eye(4).repeat(2, 1)  # 8 tokens, favourites already balanced
    assert torch.equal(balanced_assignment(scores), scores.argmax(1))
    scores = torch.tensor([[1.0, 0.0]] * 6)  # all prefer expert 0
    assert torch.equal(torch.bincount(balanced_assignment(scores), minlength=2), torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="capacity"):
        balanced_assignment(scores, capacity=2)


def test_base_router_balances_in_training_greedy_in_eval():
    torch.manual_seed(0)
    layer = make_layer("base", 4)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[0, 0] = 1.0
    x = torch.randn(32, 5).abs()
    r = layer.train().router(x)
    assert torch.bincount(r.experts[:, 0], minlength=4).max() == 8
    torch.testing.assert_close(r.weights, torch.sigmoid(r.logits.gather(1, r.experts)))
    assert torch.all(layer.eval().router(x).experts == 0)


def test_noisy_top_k_noise_only_in_training():
    torch.manual_seed(0)
    layer = make_layer("noisy_topk", 4, 2)
    with torch.no_grad():
        layer.router.gate.weight.normal_()
        layer.router.noise.weight.normal_()
    x = torch.randn(10, 5)
    r = layer.eval().router(x)
    torch.testing.assert_close(r.logits, r.clean_logits)
    r = layer.train().router(x)
    assert not torch.allclose(r.logits, r.clean_logits)
    torch.testing.assert_close(r.noise_std, torch.nn.functional.softplus(x @ layer.router.noise.weight.T))
    kept = r.logits.gather(1, r.experts)
    torch.testing.assert_close(r.weights, torch.softmax(kept, -1))
    _, info = layer(x, return_info=True)
    assert "load" in info.aux_losses


@pytest.mark.parametrize("router", ALL)
@pytest.mark.parametrize("capacity_factor", [None, 1.0, 0.5])
@pytest.mark.parametrize("training", [False, True])
def test_backends_agree_for_every_router(router, capacity_factor, training):
    for num_experts in (2, 4):
        torch.manual_seed(num_experts)
        layer = make_layer(router, num_experts, 2 if num_experts > 1 else 1, capacity_factor,
                           d_model=6, backend="loop").train(training)
        if router == "noisy_topk":
            with torch.no_grad():
                layer.router.gate.weight.normal_()
        x = torch.randn(3, 7, 6)
        torch.manual_seed(1)
        y_loop = layer(x)
        layer.backend = "torch"
        torch.manual_seed(1)
        y_torch = layer(x)
        torch.testing.assert_close(y_torch, y_loop, rtol=1e-5, atol=1e-6)
        if router != "soft":
            torch.manual_seed(1)
            ref = reference_output(layer, x)
            torch.testing.assert_close(y_loop.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("router", ALL)
def test_every_router_trains(router):
    """The public API works for every router: a gradient reaches every parameter (the router's, if it has
    any, and every expert's) and the input, and one SGD step moves every parameter."""
    torch.manual_seed(0)
    layer = make_layer(router, 4, 2, importance_loss_coef=0.1, z_loss_coef=0.001)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    x = torch.randn(2, 9, 5, requires_grad=True)
    y, info = layer(x, return_info=True)
    (y.square().mean() + info.aux_loss).backward()
    router_params = dict(layer.router.named_parameters())
    assert (router_params == {}) == (router == "hash")  # hashing learns nothing; every other router does
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    for name, p in layer.named_parameters():
        assert not torch.equal(p.detach(), before[name]), name
    stats = info.stats()
    assert stats["tokens"] == 18


@pytest.mark.parametrize("router", ["expert_choice", "soft"])
def test_non_causal_routers_let_the_future_change_the_past(router):
    torch.manual_seed(0)
    layer = make_layer(router, 4, 1).eval()
    x = torch.randn(1, 12, 5)
    y = layer(x)
    causal = make_layer("topk", 4, 1).eval()
    changed = 0
    for _ in range(20):  # some future token changes an earlier token's output; never for top-k
        x2 = x.clone()
        x2[0, -1] = 3 * torch.randn(5)
        changed += bool((layer(x2)[0, :-1] - y[0, :-1]).abs().max() > 1e-6)
        assert torch.equal(causal(x2)[0, :-1], causal(x)[0, :-1])
    assert changed > 0


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"router": "switch", "top_k": 2}, ValueError, ["switch", "top_k"]),
        ({"router": "gshard", "top_k": 1}, ValueError, ["gshard", "top_k"]),
        ({"router": "hash", "top_k": 2}, ValueError, ["hash", "top_k"]),
        ({"router": "base", "top_k": 2}, ValueError, ["base", "top_k"]),
        ({"router": "soft", "top_k": 2}, ValueError, ["soft", "top_k"]),
        ({"router": "topk", "load_loss_coef": 0.1}, ValueError, ["load_loss_coef", "noisy_topk"]),
        ({"router": "soft", "router_options": {"slots_per_expert": 0}}, ValueError, ["slots_per_expert"]),
        ({"router": "soft", "router_options": {"bogus": 1}}, ValueError, ["bogus", "slots_per_expert"]),
        ({"router": "topk", "router_options": [1]}, TypeError, ["router_options"]),
        ({"router": "topk", "router_dtype": "fp8"}, ValueError, ["router_dtype", "'bfloat16'"]),
        ({"router": "auxfree", "router_options": {"update_rate": -1.0}}, ValueError, ["update_rate"]),
        ({"importance_loss_coef": -1.0}, ValueError, ["importance_loss_coef"]),
    ],
)
def test_bad_router_arguments(kwargs, error, words):
    base = dict(d_model=8, d_ff=16, num_experts=4)
    with pytest.raises(error) as excinfo:
        MoELayer(**{**base, **kwargs})
    for word in words:
        assert word in str(excinfo.value)


def test_bad_token_ids():
    layer = MoELayer(8, 16, 4, router="hash")
    with pytest.raises(ValueError, match="token_ids"):
        layer(torch.randn(2, 3, 8), token_ids=torch.zeros(6, dtype=torch.long))
    with pytest.raises(TypeError, match="token_ids"):
        layer(torch.randn(2, 3, 8), token_ids=torch.zeros(2, 3))


def test_future_influence_metric():
    from moe_lib.metrics import CAUSAL_ATOL, future_influence

    torch.manual_seed(0)
    x = torch.randn(16, 5)
    assert future_influence(make_layer("topk", 4, 2), x) < CAUSAL_ATOL
    assert future_influence(make_layer("soft", 4), x) > 100 * CAUSAL_ATOL
    assert future_influence(make_layer("expert_choice", 4, 1), x, trials=20) > 100 * CAUSAL_ATOL


# --------------------------------------------------------------------------- DeepSeek-V3's router
def _deepseek_v3_reference(s, bias, k, n_group, topk_group, normalize, scaling):
    """Token by token, in plain Python: DeepSeek-AI 2024, eq. 12–16, written independently of the library.
    ``s`` [T, E] gate scores (already sigmoid or softmax). Returns (experts [T][k], weights [T][k])."""
    experts, weights = [], []
    E = len(s[0])
    per = E // n_group
    for row in s:
        choice = [row[e] + bias[e] for e in range(E)]
        groups = [sorted(choice[g * per:(g + 1) * per], reverse=True)[:2] for g in range(n_group)]
        group_score = [sum(top) for top in groups]
        best_groups = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
        eligible = [e for e in range(E) if e // per in best_groups]
        chosen = sorted(eligible, key=lambda e: -choice[e])[:k]
        w = [row[e] for e in chosen]
        if normalize:
            w = [v / sum(w) for v in w]
        experts.append(chosen)
        weights.append([v * scaling for v in w])
    return experts, weights


def test_group_limited_router_defaults():
    from moe_lib.routers import GroupLimitedRouter
    r = GroupLimitedRouter(4, 8, 2)
    assert (r.normalize, r.score, r.n_group, r.topk_group) == (True, "sigmoid", 1, 1)
    assert (r.scaling_factor, r.update_rate, r.router_dtype) == (1.0, 0.0, "float32")
    assert r.gate.bias is None and r.score_bias.tolist() == [0.0] * 8
    layer = MoELayer(4, 4, 8, 2, router="group_limited", expert="linear")
    assert (layer.router.n_group, layer.router.scaling_factor, layer.router.score) == (1, 1.0, "sigmoid")


@pytest.mark.parametrize("E, k, n_group, topk_group", [(8, 2, 1, 1), (8, 3, 4, 2), (8, 2, 2, 1), (4, 2, 4, 3),
                                                        (12, 4, 3, 2)])
@pytest.mark.parametrize("score, normalize, scaling", [("sigmoid", True, 2.5), ("softmax", False, 1.0),
                                                       ("sigmoid", False, 1.0)])
def test_group_limited_router_matches_an_independent_reference(E, k, n_group, topk_group, score, normalize,
                                                               scaling):
    from moe_lib.routers import GroupLimitedRouter
    torch.manual_seed(E * 100 + k * 10 + n_group)
    r = GroupLimitedRouter(6, E, k, score=score, n_group=n_group, topk_group=topk_group, normalize=normalize,
                           scaling_factor=scaling).double()
    with torch.no_grad():
        r.score_bias.copy_(torch.randn(E, dtype=torch.float64) * 0.3)
    x = torch.randn(9, 6, dtype=torch.float64)
    routing = r(x)
    logits = x @ r.gate.weight.T
    s = logits.sigmoid() if score == "sigmoid" else logits.softmax(-1)
    experts, weights = _deepseek_v3_reference(s.tolist(), r.score_bias.tolist(), k, n_group, topk_group,
                                              normalize, scaling)
    assert routing.experts.tolist() == experts
    torch.testing.assert_close(routing.weights, torch.tensor(weights, dtype=torch.float64), rtol=1e-12, atol=0)
    expected_probs = s / s.sum(-1, keepdim=True) if score == "sigmoid" else s
    torch.testing.assert_close(routing.probs, expected_probs, rtol=1e-12, atol=0)
    torch.testing.assert_close(routing.logits, logits, rtol=1e-12, atol=0)
    assert routing.weights.dtype == routing.probs.dtype == torch.float64


def test_group_limited_group_score_is_the_sum_of_the_two_best():
    """Group 0 holds the single best expert (0.9) but group 1's two best sum higher (0.8 + 0.7): with one
    eligible group the token must go to group 1 (a max-per-group rule would pick group 0)."""
    from moe_lib.routers import GroupLimitedRouter
    r = GroupLimitedRouter(2, 6, 2, n_group=2, topk_group=1)
    scores = torch.tensor([[0.9, 0.0, 0.1, 0.8, 0.7, 0.0]])
    assert r.select(scores).tolist() == [[3, 4]]
    # three per group: a third-best that would tip a top-3 sum must not count (0.9 + 0.55 + 0.55 > 0.8 + 0.7)
    scores = torch.tensor([[0.9, 0.55, 0.55, 0.8, 0.7, 0.0]])
    assert r.select(scores).tolist() == [[3, 4]]
    # the correction bias enters the selection: lift expert 1 and group 0 wins
    with torch.no_grad():
        r.score_bias[1] = 1.0
    assert r.select(scores).tolist() == [[1, 0]]  # 1.55 + 0.9 beats 1.5
    # without a group limit the plain top-k of scores + bias
    assert GroupLimitedRouter(2, 6, 2).select(torch.tensor([[0.9, 0.0, 0.1, 0.8, 0.7, 0.0]])).tolist() == [[0, 3]]


def test_group_limited_gate_values_ignore_the_bias_and_scale_after_normalising():
    from moe_lib.routers import GroupLimitedRouter
    r = GroupLimitedRouter(3, 4, 2, scaling_factor=2.5)
    with torch.no_grad():
        r.gate.weight.copy_(torch.eye(4, 3))
        r.score_bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
    x = torch.tensor([[2.0, 1.0, -1.0]])
    routing = r(x)
    assert routing.experts.tolist() == [[2, 0]]  # the bias lifts expert 2 into the selection
    s = torch.tensor([2.0, 1.0, -1.0, 0.0]).sigmoid()
    expected = torch.stack([s[2], s[0]]) / (s[2] + s[0]) * 2.5
    torch.testing.assert_close(routing.weights[0], expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(routing.probs[0], s / s.sum(), rtol=1e-6, atol=0)
    assert routing.weights.dtype == torch.float32
    unnormalised = GroupLimitedRouter(3, 4, 2, normalize=False)
    with torch.no_grad():
        unnormalised.gate.weight.copy_(torch.eye(4, 3))
    torch.testing.assert_close(unnormalised(x).weights[0], torch.stack([s[0], s[1]]), rtol=1e-6, atol=0)


def test_group_limited_bias_update_in_a_training_forward():
    """b_i += u · sign(mean load − load_i) in a training forward pass only, once per pass (Wang et al. 2024,
    eq. 3)."""
    from moe_lib.routers import GroupLimitedRouter
    r = GroupLimitedRouter(3, 3, 1, update_rate=0.25)
    with torch.no_grad():
        r.gate.weight.copy_(torch.eye(3))
    x = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0]])  # load [3, 1, 0], mean 4/3
    r.eval()
    r(x)
    assert r.score_bias.tolist() == [0.0, 0.0, 0.0]  # evaluation passes do not count
    r.train()
    first = r(x)
    assert first.experts.flatten().tolist() == [0, 0, 1, 0]  # chosen before the update
    assert r.score_bias.tolist() == [-0.25, 0.25, 0.25]
    second = r(x)  # a second training pass moves it again, from its own load: the new bias sends every
    assert second.experts.flatten().tolist() == [1, 1, 1, 1]  # token to expert 1 (ties to the lower index)
    assert r.score_bias.tolist() == [0.0, 0.0, 0.5]  # load [0, 4, 0], mean 4/3
    fixed = GroupLimitedRouter(3, 3, 1)  # update_rate 0: the bias never moves
    fixed.train()
    fixed(x)
    assert fixed.score_bias.tolist() == [0.0, 0.0, 0.0]


def test_group_limited_scores_keep_float64_and_lift_bfloat16():
    from moe_lib.routers import GroupLimitedRouter
    r = GroupLimitedRouter(3, 4, 2, router_dtype="bfloat16")
    logits = torch.randn(5, 4).bfloat16()
    assert r.gate_scores(logits).dtype == torch.float32
    assert GroupLimitedRouter(3, 4, 2, score="softmax").gate_scores(logits.double()).dtype == torch.float64
    torch.testing.assert_close(GroupLimitedRouter(3, 4, 2, score="softmax").gate_scores(logits),
                               logits.float().softmax(-1), rtol=1e-2, atol=1e-3)


def test_balanced_assignment_auction_rounds_by_hand():
    """Lewis et al. 2021, §3.1, by the greedy auction: each round every unassigned token bids for its best
    expert with room, each expert takes its highest bids up to its room."""
    # all four tokens want expert 0 (capacity 2): it keeps the two highest bids, the rest move on
    scores = torch.tensor([[0.6, 0.1], [0.9, 0.1], [0.7, 0.1], [0.8, 0.1]])
    assert balanced_assignment(scores).tolist() == [1, 0, 1, 0]
    # two experts fill in the same round, each by its own bids' ranks
    scores = torch.tensor([[0.1, 0.9], [0.95, 0.1], [0.2, 0.8], [0.3, 0.85]])
    assert balanced_assignment(scores).tolist() == [1, 0, 0, 1]
    # capacity 1: token 1 loses expert 0 to token 0, expert 1 is taken by token 2, so it gets expert 2
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.3, 0.2], [0.1, 0.5, 0.0]])
    assert balanced_assignment(scores).tolist() == [0, 2, 1]
    # an explicit capacity: ceil(4 / 2) = 2 by default, 3 lets expert 0 keep three tokens
    scores = torch.tensor([[0.6, 0.1], [0.9, 0.1], [0.7, 0.1], [0.8, 0.1]])
    assert balanced_assignment(scores, capacity=3).tolist() == [1, 0, 0, 0]
    assert balanced_assignment(scores, capacity=4).tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match=r"capacity must be >= ceil\(T / E\) = 2, got 1"):
        balanced_assignment(scores, capacity=1)
    # ceil, not floor: 5 tokens over 2 experts allow 3 on one expert
    five = torch.tensor([[0.9, 0.0], [0.8, 0.0], [0.7, 0.0], [0.6, 0.0], [0.5, 0.0]])
    assert balanced_assignment(five).tolist() == [0, 0, 0, 1, 1]
    out = balanced_assignment(torch.zeros(0, 3))
    assert out.tolist() == [] and out.dtype == torch.int64
    # an expert's ranks count from its own first bidder: token 2 (expert 1's only bidder, after two
    # bidders of expert 0) wins expert 1 in round one, before token 1, turned away by expert 0, bids 0.7 for it
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.7, 0.0], [0.1, 0.5, 0.0]])
    assert balanced_assignment(scores).tolist() == [0, 2, 1]
    grad = torch.tensor([[0.2, 0.8], [0.9, 0.1]], dtype=torch.float64, requires_grad=True)
    assert balanced_assignment(grad).tolist() == [1, 0]


@pytest.mark.parametrize("router", ALL)
@pytest.mark.parametrize("backend", ["loop", "torch", "grouped_mm"])
def test_forward_follows_the_input_device_not_the_default_device(router, backend):
    """Every tensor the data path creates goes on the input's device. Under ``torch.device("meta")`` as the
    default device (as ``torch.set_default_device("cuda")`` would be for a GPU user), a tensor created
    without ``device=`` lands on ``meta`` and the forward pass fails or changes."""
    capacity = None if router in ("dense", "soft") else 1.0
    layer = MoELayer(4, 8, 4, router=router, expert="mlp", backend=backend, capacity_factor=capacity)
    x = torch.randn(6, 4)
    for training in (False, True):
        layer.train(training)
        torch.manual_seed(1)
        expected = layer(x)
        stats = layer.last_info.stats()
        torch.manual_seed(1)
        with torch.device("meta"):
            y, info = layer(x, return_info=True)
            again = info.stats()
        assert again.keys() == stats.keys()
        for key, value in stats.items():  # the same numbers (nan where there were no tokens to average)
            assert again[key] == value or (value != value and again[key] != again[key]), key
        assert y.device.type == "cpu"
        torch.testing.assert_close(y, expected, rtol=0, atol=0)
        plan = info.plan
        for name in ("token_index", "expert_index", "slot_index", "weights", "counts", "offsets", "requested",
                     "kept"):
            assert getattr(plan, name).device.type == "cpu", name


@pytest.mark.parametrize("router", ALL)
def test_router_output_dtypes(router):
    """float64 inputs stay float64 end to end; a bfloat16 router still returns float32 probabilities and
    weights (routers.Routing), and the experts' ids are int64."""
    layer = MoELayer(4, 8, 4, router=router, expert="linear").double()
    r = layer.router(torch.randn(5, 4, dtype=torch.float64))
    assert r.probs.dtype == r.weights.dtype == torch.float64, router
    assert r.experts.dtype == torch.int64 and (r.valid is None or r.valid.dtype == torch.bool)
    low = MoELayer(4, 8, 4, router=router, expert="linear", router_dtype="bfloat16").router
    r = low(torch.randn(5, 4))
    assert r.probs.dtype == r.weights.dtype == torch.float32, router
    if router not in ("hash",):
        assert r.logits.dtype == torch.bfloat16
    if r.is_soft:
        assert r.dispatch.dtype == r.combine.dtype == torch.float32


@pytest.mark.parametrize("kwargs, error, message", [
    ({"normalize": "yes"}, TypeError, "normalize_weights must be True or False"),
    ({"score": "tanh"}, ValueError, "unknown score 'tanh'; accepted values: 'sigmoid', 'softmax'"),
    ({"n_group": 0}, ValueError, "n_group must be an integer between 1 and 8, got 0"),
    ({"n_group": 16}, ValueError, "n_group must be an integer between 1 and 8, got 16"),
    ({"n_group": 3}, ValueError, "n_group must divide num_experts=8, got n_group=3"),
    ({"n_group": 4, "topk_group": 0}, ValueError, "topk_group must be an integer between 1 and 4, got 0"),
    ({"n_group": 4, "topk_group": 5}, ValueError, "topk_group must be an integer between 1 and 4, got 5"),
    ({"n_group": 4, "topk_group": 1}, ValueError,
     "top_k must be <= topk_group * num_experts / n_group = 2 (the experts a token may reach), got top_k=3"),
    ({"scaling_factor": 0.0}, ValueError, "scaling_factor must be"),
    ({"update_rate": -0.1}, ValueError, "update_rate must be a finite number >= 0"),
])
def test_group_limited_router_bad_arguments(kwargs, error, message):
    from moe_lib.routers import GroupLimitedRouter
    with pytest.raises(error) as excinfo:
        GroupLimitedRouter(4, 8, 3, **kwargs)
    assert str(excinfo.value).startswith(message), str(excinfo.value)
    ok = GroupLimitedRouter(4, 8, 2, n_group=8, topk_group=8, score="softmax", scaling_factor=0.5, update_rate=0.0)
    assert (ok.n_group, ok.topk_group, ok.score, ok.scaling_factor) == (8, 8, "softmax", 0.5)
    assert GroupLimitedRouter(4, 8, 2, n_group=4, topk_group=1).top_k == 2  # exactly the reachable experts


def test_noisy_top_k_noise_is_scaled_by_its_learned_std():
    """H = x W_g + N(0, 1) · softplus(x W_noise) (Shazeer et al. 2017, eq. 4): (H − x W_g) / softplus(...)
    is standard normal, here with the noise std set to softplus(3) ≈ 3.05."""
    from moe_lib.routers import NoisyTopKRouter
    router = NoisyTopKRouter(2, 4, 2).train()
    with torch.no_grad():
        router.noise.weight.fill_(1.5)
    torch.manual_seed(0)
    r = router(torch.ones(4000, 2))
    z = (r.logits - r.clean_logits) / r.noise_std
    torch.testing.assert_close(r.noise_std, torch.full_like(r.noise_std, math.log1p(math.exp(3.0))))
    assert abs(z.std().item() - 1.0) < 0.03 and abs(z.mean().item()) < 0.03


def _auction_reference(scores, capacity):
    """The greedy auction of balanced_assignment, one token at a time in plain Python."""
    T, E = len(scores), len(scores[0])
    assign, load = [-1] * T, [0] * E
    while -1 in assign:
        bids = {}
        for t in range(T):
            if assign[t] < 0:
                open_experts = [e for e in range(E) if load[e] < capacity]
                best = max(open_experts, key=lambda e: scores[t][e])
                bids.setdefault(best, []).append((scores[t][best], t))
        for e, offers in bids.items():
            for _, t in sorted(offers, key=lambda o: (-o[0], o[1]))[:capacity - load[e]]:
                assign[t] = e
            load[e] = min(capacity, load[e] + len(offers))
    return assign


@pytest.mark.parametrize("num_tokens, num_experts, seed", [(64, 4, 0), (200, 8, 1), (333, 5, 2)])
def test_balanced_assignment_matches_a_token_by_token_auction(num_tokens, num_experts, seed):
    """Larger batches than the hand cases, where the order of each expert's bids must survive the sort by
    expert (a sort that is not stable reorders them at these sizes)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(num_tokens, num_experts, generator=g, dtype=torch.float64)
    scores[:, 0] += 2.0  # a popular expert: several rounds
    capacity = math.ceil(num_tokens / num_experts)
    assert balanced_assignment(scores).tolist() == _auction_reference(scores.tolist(), capacity)


def test_group_limited_normalisation_epsilon_matches_deepseek_v3():
    """w = s / (Σ s + 1e-20), as DeepSeek-V3's reference code: with logits of -60 the sigmoid scores
    (8.8e-27) are far below the epsilon, and the weights stay small and non-negative."""
    from moe_lib.routers import GroupLimitedRouter
    r = GroupLimitedRouter(2, 4, 2)
    with torch.no_grad():
        r.gate.weight.fill_(-30.0)
    w = r(torch.ones(1, 2)).weights
    s = torch.tensor(-60.0).sigmoid()
    torch.testing.assert_close(w, (s / (2 * s + 1e-20)).expand(1, 2))
    assert (w > 0).all()
