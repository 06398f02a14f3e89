"""Hand-built cases that pin what the agreement tests cannot: every expected value here is written out or
computed by hand in the test from the papers' formulas, never by the library's own helper.

* capacity: ``C = ceil(c · T · k / E)`` for non-integer ``c·T·k/E`` (``ceil`` ≠ ``floor``), through the plan;
* priority: the exact kept mask under choice-major priority with ``k = 2`` on a routing where token-major
  order keeps a different set (and drops a whole token);
* every auxiliary loss term of :class:`~moe_lib.MoELayer` with its coefficient (Switch, z-loss, importance,
  load), each computed by hand from the router's logits;
* top-k selection against an independent ``softmax(x Wᵀ).topk(k)``;
* every backend × every expert kind against a naive per-token reference (a backend that does not support a
  kind must say so);
* expert parallelism against one process: its auxiliary loss and its gathered expert state.
"""
from __future__ import annotations

import math

import pytest
import torch

from moe_lib import EXPERTS, MoELayer
from moe_lib.backends import BACKENDS
from moe_lib.dispatch import make_plan, slot_plan
from moe_lib.routers import Routing

# ------------------------------------------------------------------------------------------ helpers


def _routing(experts: list[list[int]], num_experts: int) -> Routing:
    """A hand-made routing: ``experts[t][j]`` is token ``t``'s ``j``-th choice (weights uniform)."""
    ex = torch.tensor(experts, dtype=torch.long)
    num_tokens, top_k = ex.shape
    probs = torch.full((num_tokens, num_experts), 1.0 / num_experts)
    return Routing(logits=torch.zeros(num_tokens, num_experts), probs=probs, experts=ex,
                   weights=torch.full((num_tokens, top_k), 1.0 / top_k))


def _identity_gate_layer(num_experts: int, top_k: int, capacity_factor: float | None) -> MoELayer:
    """A layer whose router logits are the input itself (``d_model = E``, gate weight = identity)."""
    layer = MoELayer(num_experts, 4, num_experts, top_k, router="topk", expert="linear", backend="loop",
                     capacity_factor=capacity_factor)
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.eye(num_experts))
    return layer


def _softmax(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


def _top(row: list[float], k: int) -> list[int]:
    """Indices of the ``k`` largest entries, largest first (no ties in these tests)."""
    return sorted(range(len(row)), key=lambda i: -row[i])[:k]


def _cv_squared(values: list[float]) -> float:
    """Shazeer et al. (2017, §4): CV² = Var / mean², population variance (tensor2tensor's ``cv_squared``)."""
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / len(values) / mean**2


def _phi(z: float) -> float:
    """Standard normal CDF."""
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def _rows(t: torch.Tensor) -> list[list[float]]:
    return t.detach().double().tolist()


# ------------------------------------------------------------------------------------------ capacity
#
# The library's convention (moe_lib/dispatch.py, Lepikhin et al. 2021 §2.2, Fedus et al. 2022 eq. 3):
# per call and per expert, C = ceil(capacity_factor · T · k / E) *assignments* (not tokens), T being the
# tokens of the call and k the router's top-k. Rounding is up, so c = 1 never drops a perfectly even load.


@pytest.mark.parametrize("num_tokens, top_k, num_experts, factor, expected", [
    (10, 2, 3, 1.0, 7),    # 20/3 = 6.67: ceil 7, floor 6
    (10, 1, 4, 1.25, 4),   # 12.5/4 = 3.125: ceil 4, floor 3
    (9, 2, 4, 0.5, 3),     # 9/4 = 2.25: ceil 3, floor 2
    (8, 2, 4, 1.0, 4),     # integer: 16/4 = 4
    (50, 1, 1, 1.1, 55),   # 1.1 · 50 = 55 exactly (float arithmetic: 55.000000000000007, ceiling 56)
    (30, 1, 1, 1.1, 33),   # 33 exactly (float: 33.000000000000004)
])
def test_capacity_is_the_ceiling_of_c_t_k_over_e(num_tokens, top_k, num_experts, factor, expected):
    # Every token's first choice is expert 0 (over capacity whenever T > C), further choices spread.
    experts = [[0] + [1 + (t + j) % (num_experts - 1) for j in range(top_k - 1)] for t in range(num_tokens)]
    plan = make_plan(_routing(experts, num_experts), factor)
    assert plan.capacity == expected
    kept_first = min(num_tokens, expected)
    assert plan.kept[:, 0].tolist() == [True] * kept_first + [False] * (num_tokens - kept_first)
    assert int(plan.counts[0]) == kept_first
    assert int(plan.counts.max()) <= expected


def test_capacity_through_the_layer_keeps_seven_of_ten():
    """T=10, k=2, E=3, c=1: C = ceil(20/3) = 7. Every token's first choice is expert 0 (10 requests: tokens
    0-6 kept, 7-9 dropped); second choices go to expert 1 (tokens 0-4) and 2 (tokens 5-9), under capacity."""
    layer = _identity_gate_layer(3, 2, capacity_factor=1.0)
    x = torch.tensor([[3.0, 2.0, 0.0]] * 5 + [[3.0, 0.0, 2.0]] * 5)
    _, info = layer(x, return_info=True)
    plan = info.plan
    assert info.routing.experts.tolist() == [[0, 1]] * 5 + [[0, 2]] * 5
    assert plan.capacity == 7
    assert plan.requested.tolist() == [10, 5, 5]
    assert plan.counts.tolist() == [7, 5, 5]
    assert plan.kept.tolist() == [[True, True]] * 7 + [[False, True]] * 3
    assert plan.dropped_assignments == 3 and plan.dropped_tokens == 0
    assert plan.token_index[:7].tolist() == list(range(7))  # expert 0 serves tokens 0..6, in order


# ------------------------------------------------------------------------------------------ priority


# E=3, k=2, T=4, c=0.75: C = ceil(0.75·4·2/3) = 2.
#   token:        0       1       2       3
#   choices:    (1, 0)  (1, 0)  (0, 1)  (0, 2)
# Choice-major (every first choice before any second choice, earlier tokens first within a choice):
#   expert 0 queue: t2.1st, t3.1st | t0.2nd, t1.2nd  -> keeps t2.1st, t3.1st
#   expert 1 queue: t0.1st, t1.1st | t2.2nd          -> keeps t0.1st, t1.1st
#   expert 2 queue: t3.2nd                           -> keeps it
# Token-major order would keep t0.2nd, t1.2nd at expert 0 instead and drop all of token 2.
PRIORITY_CHOICES = [[1, 0], [1, 0], [0, 1], [0, 2]]
PRIORITY_KEPT = [[True, False], [True, False], [True, False], [True, True]]


def test_choice_major_priority_kept_mask():
    plan = make_plan(_routing(PRIORITY_CHOICES, 3), capacity_factor=0.75)
    assert plan.capacity == 2
    assert plan.kept.tolist() == PRIORITY_KEPT
    assert plan.requested.tolist() == [4, 3, 1] and plan.counts.tolist() == [2, 2, 1]
    assert plan.dropped_assignments == 3
    assert plan.dropped_tokens == 0  # token-major would drop token 2 entirely
    # rows grouped by expert, in priority order within each expert
    assert plan.expert_index.tolist() == [0, 0, 1, 1, 2]
    assert plan.token_index.tolist() == [2, 3, 0, 1, 3]
    assert plan.slot_index.tolist() == [0, 0, 0, 0, 1]


def test_choice_major_priority_through_the_layer():
    layer = _identity_gate_layer(3, 2, capacity_factor=0.75)
    # logits whose top-2 are the choices above (first choice = largest)
    x = torch.tensor([[2.0, 3.0, 0.0], [2.0, 3.5, 0.0], [3.0, 2.0, 0.0], [3.0, 0.0, 2.0]])
    y, info = layer(x, return_info=True)
    assert info.routing.experts.tolist() == PRIORITY_CHOICES
    assert info.plan.kept.tolist() == PRIORITY_KEPT
    assert info.plan.dropped_assignments == 3 and info.plan.dropped_tokens == 0
    # token 0 keeps only its first choice (expert 1): y = w_{0,1st} · (x W_1 + b_1)
    w, b = layer.experts.weight.detach(), layer.experts.bias.detach()
    expected0 = info.routing.weights[0, 0] * (x[0] @ w[1] + b[1])
    torch.testing.assert_close(y[0], expected0, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------ aux losses


def _hand_aux_terms(x: torch.Tensor, layer: MoELayer) -> dict[str, float]:
    """Each auxiliary term from the papers, computed here from ``x`` and the router's weights.

    Logits ``h(x) = x W_gᵀ`` (evaluation: the noisy router adds no noise, ``H = h``); ``p = softmax(h)``;
    the gate ``G(x)`` keeps the top-k and renormalises them (= softmax over the kept logits, Shazeer et
    al. 2017 eq. 3, 5; Mixtral); ``k`` assignments per token.
    """
    router = layer.router
    k, num_experts = layer.top_k, layer.num_experts
    logits = _rows(x.double() @ router.gate.weight.detach().double().T)
    num_tokens = len(logits)
    probs = [_softmax(row) for row in logits]
    chosen = [_top(row, k) for row in logits]
    # Switch (Fedus et al. 2022, eq. 4-6): E · Σ_i f_i P_i; with k choices f_i counts the T·k assignments.
    f = [sum(i in c for c in chosen) / (num_tokens * k) for i in range(num_experts)]
    p_mean = [sum(p[i] for p in probs) / num_tokens for i in range(num_experts)]
    switch = num_experts * sum(fi * pi for fi, pi in zip(f, p_mean))
    # z-loss (Zoph et al. 2022, eq. 5): (1/T) Σ_x (log Σ_j exp h_j(x))².
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits) / num_tokens
    # Importance (Shazeer et al. 2017, eq. 6-7): CV(Σ_x G(x))².
    importance = [0.0] * num_experts
    for row, c in zip(logits, chosen):
        kept = _softmax([row[i] for i in c])
        for i, g in zip(c, kept):
            importance[i] += g
    terms = {"load_balance": switch, "z_loss": z, "importance": _cv_squared(importance)}
    if router.name == "noisy_topk":
        # Load (Shazeer et al. 2017, Appendix A, eq. 8-11): P(x, i) = Φ((h_i − kth_excluding(H, k, i)) / σ_i),
        # σ = softplus(x W_noiseᵀ); Load_i = Σ_x P(x, i); loss CV(Load)².
        sigma = _rows(torch.nn.functional.softplus(x.double() @ router.noise.weight.detach().double().T))
        load = [0.0] * num_experts
        for row, s in zip(logits, sigma):
            for i in range(num_experts):
                others = sorted((row[j] for j in range(num_experts) if j != i), reverse=True)
                load[i] += _phi((row[i] - others[k - 1]) / s[i])
        terms["load"] = _cv_squared(load)
    return terms


COEF_OF = {"load_balance": "aux_loss_coef", "z_loss": "z_loss_coef", "importance": "importance_loss_coef",
           "load": "load_loss_coef"}


def _aux_layer(router: str, seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(6, 8, 5, 2, router=router, expert="swiglu", aux_loss_coef=0.0)
    with torch.no_grad():  # the noisy router starts with zero weights (equal load): give it a real gate
        layer.router.gate.weight.normal_(0.0, 1.0)
        if router == "noisy_topk":
            layer.router.noise.weight.normal_(0.0, 0.5)
    return layer.eval()


@pytest.mark.parametrize("router", ["topk", "noisy_topk"])
def test_every_aux_loss_term_with_its_coefficient(router):
    layer = _aux_layer(router)
    x = torch.randn(12, 6, generator=torch.Generator().manual_seed(1))
    hand = _hand_aux_terms(x, layer)
    assert set(hand) == ({"load_balance", "z_loss", "importance", "load"} if router == "noisy_topk"
                         else {"load_balance", "z_loss", "importance"})
    _, info = layer(x, return_info=True)
    assert set(info.aux_losses) == set(hand)
    assert info.aux_loss.item() == 0.0  # every coefficient 0
    for name, value in hand.items():
        assert value > 1e-3, name  # each term is really non-zero here, so a dropped term shows
        assert info.aux_losses[name].item() == pytest.approx(value, rel=1e-5), name
    # Setting one coefficient changes aux_loss by exactly coef · term, for each term.
    coefs = {"load_balance": 0.37, "z_loss": 0.013, "importance": 0.29, "load": 0.41}
    for name in hand:
        setattr(layer, COEF_OF[name], coefs[name])
        _, info = layer(x, return_info=True)
        assert info.aux_loss.item() == pytest.approx(coefs[name] * hand[name], rel=1e-5), name
        setattr(layer, COEF_OF[name], 0.0)
    # All together: the weighted sum.
    for name in hand:
        setattr(layer, COEF_OF[name], coefs[name])
    _, info = layer(x, return_info=True)
    assert info.aux_loss.item() == pytest.approx(sum(coefs[n] * hand[n] for n in hand), rel=1e-5)


# ------------------------------------------------------------------------------------------ top-k


@pytest.mark.parametrize("router, top_k, normalized", [("topk", 2, True), ("topk", 3, True),
                                                       ("topk", 2, False), ("switch", 1, False)])
def test_topk_selection_against_softmax_topk(router, top_k, normalized):
    """Experts (as a set per token) and weights equal ``softmax(x Wᵀ).topk(k)``, renormalised or raw as the
    router's convention says (Mixtral renormalises; Switch keeps the raw probability)."""
    torch.manual_seed(3)
    options = {} if router == "switch" else {"normalize_weights": normalized}
    layer = MoELayer(8, 8, 6, top_k, router=router, expert="linear", **options)
    x = torch.randn(20, 8)
    _, info = layer(x, return_info=True)
    values, indices = torch.softmax(x.double() @ layer.router.gate.weight.detach().double().T, -1).topk(top_k)
    if normalized:
        values = values / values.sum(-1, keepdim=True)
    for t in range(x.shape[0]):
        expected = dict(zip(indices[t].tolist(), values[t].tolist()))
        got = dict(zip(info.routing.experts[t].tolist(), info.routing.weights[t].double().tolist()))
        assert set(got) == set(expected), t
        for e in expected:
            assert got[e] == pytest.approx(expected[e], rel=1e-5, abs=1e-7), (t, e)
    assert info.plan.kept.all()  # dropless: every chosen expert is processed


# ------------------------------------------------------------------------------------------ backends


def _naive_expert(bank, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` on one token, from the bank's stacked weights, in float64 (experts.py's formulas)."""
    p = {n: q.detach().double() for n, q in bank.named_parameters()}
    act = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu,
           "tanh": torch.tanh}
    x = x.double()
    if bank.kind == "linear":
        return x @ p["weight"][e] + p["bias"][e]
    if bank.kind == "mlp":
        return act[bank.activation](x @ p["w1"][e] + p["b1"][e]) @ p["w2"][e] + p["b2"][e]
    gate = act[getattr(bank, "activation", "silu")]  # swiglu: silu; glu: its activation
    return (gate(x @ p["w_gate"][e]) * (x @ p["w_up"][e])) @ p["w_down"][e]


def _naive_moe(layer: MoELayer, x: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
    """``y_t = Σ_{kept j} G_j(x_t) · h_{e_j}(x_t)`` with the top-k and gate recomputed here."""
    logits = _rows(x.double() @ layer.router.gate.weight.detach().double().T)
    out = torch.zeros(x.shape[0], layer.d_out, dtype=torch.float64)
    for t, row in enumerate(logits):
        chosen = _top(row, layer.top_k)
        gates = _softmax([row[i] for i in chosen])  # renormalised top-k (topk router's default)
        for j, (e, g) in enumerate(zip(chosen, gates)):
            if kept is None or kept[t, j]:
                out[t] += g * _naive_expert(layer.experts, e, x[t])
    return out


TRITON_KINDS = ("swiglu", "glu")


@pytest.mark.parametrize("expert", sorted(EXPERTS))
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_every_backend_every_expert_kind_against_naive_reference(backend, expert):
    options = {"activation": "gelu"} if expert == "glu" else {}
    for capacity_factor in (None, 0.75):
        torch.manual_seed(5)
        if backend == "triton" and expert not in TRITON_KINDS:
            with pytest.raises(ValueError, match=rf"backend='triton' cannot run \w+ \(expert='{expert}'\)"):
                MoELayer(8, 12, 4, 2, router="topk", expert=expert, backend=backend,
                         capacity_factor=capacity_factor, **options)
            return
        layer = MoELayer(8, 12, 4, 2, router="topk", expert=expert, backend=backend,
                         capacity_factor=capacity_factor, **options)
        x = torch.randn(10, 8)
        y, info = layer(x, return_info=True)
        if capacity_factor is not None:
            assert info.plan.dropped_assignments > 0  # the capacity case really drops
        # the kept mask is pinned by the priority tests above; here it only says which terms to sum
        kept = None if capacity_factor is None else info.plan.kept
        torch.testing.assert_close(y.double(), _naive_moe(layer, x, kept), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ expert parallelism

EP_CASES = [
    dict(d_model=8, d_ff=12, num_experts=4, top_k=2, router="topk", aux_loss_coef=0.01, z_loss_coef=0.001,
         importance_loss_coef=0.1),
    dict(d_model=8, d_ff=12, num_experts=4, top_k=2, router="noisy_topk", expert="mlp", capacity_factor=1.0,
         aux_loss_coef=0.01, z_loss_coef=0.001, importance_loss_coef=0.1, load_loss_coef=0.1),
]


def ep_rank_vs_single_process(rank: int, world_size: int, cases: list[dict]) -> list[dict]:
    """On each rank: the expert-parallel layer's aux loss on this rank's tokens against ``MoELayer``'s on
    the same tokens, and its gathered expert state against the single-process layer's, before and after
    one SGD step (the single-process step uses the losses of every rank's tokens)."""
    from moe_lib.distributed import ExpertParallelMoE

    out = []
    for kw in cases:
        torch.manual_seed(0)
        layer = MoELayer(**kw)
        with torch.no_grad():
            layer.router.gate.weight.normal_(0.0, 1.0)
            if kw["router"] == "noisy_topk":
                layer.router.noise.weight.normal_(0.0, 0.5)
        layer.eval()  # deterministic routing (the noisy router adds no noise), identical on every rank
        ep = ExpertParallelMoE.from_layer(layer).eval()
        inputs = []
        for r in range(world_size):
            g = torch.Generator().manual_seed(100 + r)
            n = 12 + 3 * r
            inputs.append((torch.randn(n, kw["d_model"], generator=g), torch.randn(n, layer.d_out, generator=g)))
        before = ep.full_expert_state()
        state_before = max((before[n] - p.detach()).abs().max().item() for n, p in layer.experts.named_parameters())
        x, target = inputs[rank]
        y, info_ep = ep(x, return_info=True)
        aux_ep = info_ep.aux_loss
        _, info = layer(x, return_info=True)
        # one SGD step on the experts: expert parallel on this rank's tokens, single process on all of them
        ((y * target).sum()).backward()
        sum(((layer(xr) * tr).sum() for xr, tr in inputs)).backward()
        with torch.no_grad():
            for p in ep.experts.parameters():
                p -= 0.5 * p.grad
            for p in layer.experts.parameters():
                p -= 0.5 * p.grad
        after = ep.full_expert_state()
        state_after = max((after[n] - p.detach()).abs().max().item() for n, p in layer.experts.named_parameters())
        out.append({"aux_ep": aux_ep.item(), "aux_single": info.aux_loss.item(),
                    "terms": {k: v.item() for k, v in info.aux_losses.items()},
                    "state_keys": sorted(after) == sorted(n for n, _ in layer.experts.named_parameters()),
                    "state_before": state_before, "state_after": state_after,
                    "moved": max((after[n] - before[n]).abs().max().item() for n in after)})
    return out


def test_expert_parallel_aux_loss_and_gathered_state_equal_single_process():
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    from moe_lib.distributed import launch

    results = launch(ep_rank_vs_single_process, 2, (EP_CASES,))
    for rank_results in results:
        for kw, r in zip(EP_CASES, rank_results):
            assert r["terms"]["importance"] > 1e-3, kw  # the importance (and load) terms really count here
            assert kw["router"] != "noisy_topk" or r["terms"]["load"] > 1e-3, kw
            assert r["aux_ep"] == pytest.approx(r["aux_single"], rel=1e-6, abs=1e-9), (kw, r)
            assert r["state_keys"], kw
            assert r["state_before"] == 0.0, (kw, r)    # the gather is the unsharded bank, bit for bit
            assert r["moved"] > 1e-3, (kw, r)           # the step really changed the experts
            assert r["state_after"] <= 1e-6, (kw, r)


# ------------------------------------------------------------------ every field of a plan, by hand
def _plan_fields(plan):
    return {name: getattr(plan, name).tolist() for name in
            ("token_index", "expert_index", "slot_index", "weights", "counts", "offsets", "requested", "kept")}


def test_make_plan_every_field_by_hand():
    """Top-2 over 3 experts, 4 tokens, c = ceil(1.0 · 4 · 2 / 3) = 3. Expert 0 is asked by tokens 0, 1, 2
    (first choices) and token 3 (second choice): the second choice is dropped. Rows are grouped by expert
    in (choice, token) order."""
    experts = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    weights = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.6, 0.4], [0.9, 0.1]])
    routing = Routing(logits=torch.zeros(4, 3), probs=torch.full((4, 3), 1 / 3), experts=experts, weights=weights)
    plan = make_plan(routing, capacity_factor=1.0)
    assert _plan_fields(plan) == {
        "token_index": [0, 1, 2, 3, 0, 2, 1], "expert_index": [0, 0, 0, 1, 1, 1, 2],
        "slot_index": [0, 0, 0, 0, 1, 1, 1], "weights": pytest.approx([0.75, 0.5, 0.6, 0.9, 0.25, 0.4, 0.5]),
        "counts": [3, 3, 1], "offsets": [0, 3, 6, 7], "requested": [4, 3, 1],
        "kept": [[True, True], [True, True], [True, True], [True, False]],
    }
    assert plan.capacity == 3 and plan.valid is None
    assert (plan.num_experts, plan.num_tokens, plan.dropped_assignments, plan.dropped_tokens) == (3, 4, 1, 0)
    assert plan.position_in_expert().tolist() == [0, 1, 2, 0, 1, 2, 0]
    for name in ("token_index", "expert_index", "slot_index", "counts", "offsets", "requested"):
        assert getattr(plan, name).dtype == torch.int64, name
    assert plan.kept.dtype == torch.bool and plan.weights.dtype == torch.float32
    # dropless: the same rows plus token 3's second choice, last in expert 0's block
    dropless = make_plan(routing)
    assert dropless.capacity is None and dropless.dropped_assignments == 0
    assert dropless.token_index.tolist() == [0, 1, 2, 3, 3, 0, 2, 1]
    assert dropless.slot_index.tolist() == [0, 0, 0, 1, 0, 1, 1, 1]
    assert dropless.offsets.tolist() == [0, 4, 7, 8] and dropless.kept.all()


def test_make_plan_skips_invalid_entries():
    """An entry marked not valid is no assignment: not requested, not kept, not counted as dropped."""
    experts = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    valid = torch.tensor([[True, True], [True, False], [True, True], [True, True]])
    weights = torch.tensor([[0.75, 0.25], [0.5, 0.0], [0.6, 0.4], [0.9, 0.1]])
    routing = Routing(logits=torch.zeros(4, 3), probs=torch.full((4, 3), 1 / 3), experts=experts,
                      weights=weights, valid=valid)
    plan = make_plan(routing, capacity_factor=1.0)
    assert plan.requested.tolist() == [4, 3, 0] and plan.counts.tolist() == [3, 3, 0]
    assert plan.token_index.tolist() == [0, 1, 2, 3, 0, 2] and plan.offsets.tolist() == [0, 3, 6, 6]
    assert plan.kept.tolist() == [[True, True], [True, False], [True, True], [True, False]]
    assert plan.dropped_assignments == 1 and plan.dropped_tokens == 0 and plan.valid is valid
    nobody = Routing(logits=torch.zeros(2, 2), probs=torch.full((2, 2), 0.5), experts=torch.tensor([[0], [1]]),
                     weights=torch.tensor([[1.0], [0.0]]), valid=torch.tensor([[True], [False]]))
    plan = make_plan(nobody)
    assert plan.dropped_tokens == 1 and plan.dropped_assignments == 0 and plan.token_index.tolist() == [0]


def test_slot_plan_every_field():
    """Soft MoE's plan: slot s is row s, processed by expert s // p with weight 1 (Puigcerver et al. 2024)."""
    plan = slot_plan(3, 2)
    assert _plan_fields(plan) == {
        "token_index": [0, 1, 2, 3, 4, 5], "expert_index": [0, 0, 1, 1, 2, 2], "slot_index": [0] * 6,
        "weights": [1.0] * 6, "counts": [2, 2, 2], "offsets": [0, 2, 4, 6], "requested": [2, 2, 2],
        "kept": [[True]] * 6,
    }
    assert plan.capacity is None and plan.valid is None and plan.dropped_assignments == 0
    assert plan.requested is not plan.counts
    for name in ("token_index", "expert_index", "slot_index", "counts", "offsets", "requested"):
        assert getattr(plan, name).dtype == torch.int64, name
    assert plan.weights.dtype == torch.float32 and plan.kept.dtype == torch.bool
    assert slot_plan(2, 1).offsets.tolist() == [0, 1, 2] and slot_plan(1, 3).expert_index.tolist() == [0, 0, 0]
    assert slot_plan(2, 2, device="cpu").token_index.device.type == "cpu"
