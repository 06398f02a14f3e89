"""Hand-built cases for :class:`moe_lib.routers.GroupCapacityRouter` (router="group_capacity"): top-k
with a fixed expert capacity per group of consecutive tokens (Switch Transformer as Mesh TensorFlow and
Hugging Face run it; Fedus et al. 2022, eq. 3).

Every expected kept mask is written out by hand from the documented rules: the tokens are cut into
consecutive groups of ``group_size``; inside a group each expert serves at most ``expert_capacity`` (or
``ceil(capacity_factor · G · k / E)``) assignments, every first choice before any second choice and
earlier tokens first; the overflow is ``valid = False`` with weight 0. The gate is the identity
(``d_model = E``), so each token's logits are its input row and its choices can be read off the test.
"""
from __future__ import annotations

import math

import pytest
import torch

from moe_lib import MoELayer
from moe_lib.routers import GroupCapacityRouter


def _router(num_experts: int, top_k: int = 1, **kwargs) -> GroupCapacityRouter:
    """A router whose logits are its input (``d_model = E``, gate weight = identity)."""
    router = GroupCapacityRouter(num_experts, num_experts, top_k, **kwargs)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(num_experts))
    return router


def _rows(choices: list[int], num_experts: int) -> torch.Tensor:
    """One token per entry, its logit 3 on the chosen expert and 0 elsewhere (top-1 = that expert)."""
    x = torch.zeros(len(choices), num_experts)
    x[torch.arange(len(choices)), torch.tensor(choices)] = 3.0
    return x


def _raw_top1(x: torch.Tensor) -> torch.Tensor:
    """The raw softmax probability of each row's top expert, by hand: ``e^{max} / Σ e^{x}``."""
    return torch.tensor([[math.exp(max(r)) / sum(math.exp(v) for v in r)] for r in x.tolist()])


# ------------------------------------------------------------------------------------------ defaults


def test_defaults_are_switch_top1_raw_probability_dropless():
    router = GroupCapacityRouter(4, 3)
    assert router.top_k == 1
    assert router.gate.bias is None
    assert router.normalize is False
    assert router.router_dtype == "float32"
    assert router.expert_capacity is None and router.capacity_factor is None and router.group_size is None
    assert router.capacity(10) is None  # neither limit: unlimited
    assert GroupCapacityRouter.default_top_k(8) == 1
    assert MoELayer(3, 4, 3, router="group_capacity", expert="linear").top_k == 1

    # dropless, and the gate value is the raw probability of the chosen expert (Switch eq. 2), not 1
    router = _router(3)
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.5], [0.2, 0.1, 0.9]])
    routing = router(x)
    assert routing.experts.tolist() == [[0], [1], [2]]
    assert routing.mask().all()
    torch.testing.assert_close(routing.weights, _raw_top1(x))


def test_constructor_options_reach_the_router():
    assert GroupCapacityRouter(4, 3, bias=True).gate.bias is not None
    router = _router(3, top_k=2, normalize=True)
    weights = router(torch.tensor([[1.0, 0.0, 0.5], [0.0, 2.0, 1.0]])).weights
    torch.testing.assert_close(weights.sum(-1), torch.ones(2))
    router = GroupCapacityRouter(4, 3, router_dtype="bfloat16")
    assert router.router_dtype == "bfloat16"
    assert router.scores(torch.randn(2, 4)).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------ arguments


def test_expert_capacity_is_validated_and_zero_is_allowed():
    with pytest.raises(ValueError, match=r"^expert_capacity must be an integer >= 0, got -1"):
        GroupCapacityRouter(4, 3, expert_capacity=-1)
    with pytest.raises(TypeError, match=r"^expert_capacity must be an integer"):
        GroupCapacityRouter(4, 3, expert_capacity=1.5)
    assert GroupCapacityRouter(4, 3, expert_capacity=2).expert_capacity == 2
    assert GroupCapacityRouter(4, 3, expert_capacity=2).capacity(100) == 2
    # capacity 0: every assignment overflows, every weight is 0
    routing = _router(3, expert_capacity=0)(_rows([0, 1, 2, 0], 3))
    assert routing.valid.tolist() == [[False]] * 4
    assert routing.weights.tolist() == [[0.0]] * 4


def test_capacity_factor_is_validated_and_sets_the_capacity_per_group():
    with pytest.raises(ValueError, match=r"^capacity_factor must be a finite number > 0"):
        GroupCapacityRouter(4, 3, capacity_factor=0.0)
    with pytest.raises(TypeError, match=r"^capacity_factor must be a positive number or None"):
        GroupCapacityRouter(4, 3, capacity_factor="1")
    router = GroupCapacityRouter(4, 4, capacity_factor=1.25)
    assert router.capacity_factor == 1.25
    assert router.capacity(10) == 4  # ceil(1.25 · 10 · 1 / 4) = ceil(3.125)
    assert router.capacity(8) == 3  # ceil(2.5)
    assert GroupCapacityRouter(4, 4, 2, capacity_factor=1.0).capacity(6) == 3  # ceil(6 · 2 / 4)


def test_group_size_is_validated():
    with pytest.raises(ValueError, match=r"^group_size must be an integer >= 1, got 0"):
        GroupCapacityRouter(4, 3, group_size=0)
    with pytest.raises(TypeError, match=r"^group_size must be an integer"):
        GroupCapacityRouter(4, 3, group_size=2.0)
    assert GroupCapacityRouter(4, 3, group_size=5).group_size == 5
    with pytest.raises(ValueError, match="multiple of group_size"):
        _router(3, expert_capacity=1, group_size=2)(_rows([0, 1, 2], 3))


# ------------------------------------------------------------------------------------------ kept mask


def test_top1_one_group_keeps_the_first_capacity_tokens_of_each_expert():
    # E = 4, expert 3 never chosen; capacity 2: the third token for expert 0 and expert 2 overflow
    x = _rows([0, 0, 2, 0, 1, 2, 2, 1], 4)
    routing = _router(4, expert_capacity=2)(x)
    expected = [True, True, True, False, True, True, False, True]
    assert routing.experts.squeeze(1).tolist() == [0, 0, 2, 0, 1, 2, 2, 1]
    assert routing.valid.squeeze(1).tolist() == expected
    kept = torch.tensor(expected, dtype=torch.float32).unsqueeze(1)
    torch.testing.assert_close(routing.weights, _raw_top1(x) * kept)


def test_capacity_applies_per_group_of_tokens():
    # two groups of G = 3; E = 2, capacity_factor 1 -> ceil(1 · 3 · 1 / 2) = 2 per expert per group.
    # One group of 6 would allow 3 and keep the first three tokens instead.
    x = _rows([0, 0, 0, 0, 0, 1], 2)
    routing = _router(2, capacity_factor=1.0, group_size=3)(x)
    assert routing.valid.squeeze(1).tolist() == [True, True, False, True, True, True]
    assert routing.weights[2].item() == 0.0 and routing.weights[5].item() > 0
    # the same tokens without a group size: one group of all 6 tokens, capacity ceil(6/2) = 3
    routing = _router(2, capacity_factor=1.0)(x)
    assert routing.valid.squeeze(1).tolist() == [True, True, True, False, False, True]


def test_group_size_one_gives_each_token_its_own_capacity():
    routing = _router(2, expert_capacity=1, group_size=1)(_rows([1, 1, 1, 1], 2))
    assert routing.valid.tolist() == [[True]] * 4


def test_single_token_is_subject_to_capacity():
    routing = _router(3, expert_capacity=0)(_rows([1], 3))
    assert routing.valid.tolist() == [[False]]
    assert routing.weights.tolist() == [[0.0]]


def test_top2_priority_is_choice_major_then_token_order():
    # logits = x; choices: t0 -> (1, 0), t1 -> (0, 2), t2 -> (0, 1). Expert 0 is asked by t0's second
    # choice and by the first choices of t1 and t2. Capacity 2, first choices first: t1, t2 keep expert 0
    # and t0's second choice overflows (token-major order would drop t2's first choice instead).
    x = torch.tensor([[2.0, 3.0, 0.0], [3.0, 0.0, 2.0], [3.0, 2.0, 0.0]])
    router = _router(3, top_k=2, expert_capacity=2)
    routing = router(x)
    assert routing.experts.tolist() == [[1, 0], [0, 2], [0, 1]]
    assert routing.valid.tolist() == [[True, False], [True, True], [True, True]]
    probs = torch.tensor([[math.exp(v) for v in r] for r in x.tolist()])
    probs = probs / probs.sum(-1, keepdim=True)  # raw (normalize=False) probabilities, by hand
    expected = torch.stack([probs[0, [1, 0]] * torch.tensor([1.0, 0.0]), probs[1, [0, 2]], probs[2, [0, 1]]])
    torch.testing.assert_close(routing.weights, expected)


def test_top2_two_groups():
    # groups of G = 2, E = 3, capacity_factor 1 -> ceil(1 · 2 · 2 / 3) = 2 per expert per group.
    # group 0: t0 -> (0, 1), t1 -> (0, 2): nothing overflows. group 1: t2 -> (1, 0), t3 -> (1, 0):
    # expert 1 takes both first choices, expert 0 both second choices: all within 2.
    # Then capacity 1 (expert_capacity): the second occupant of an expert in a group overflows.
    x = torch.tensor([[3.0, 2.0, 0.0], [3.0, 0.0, 2.0], [2.0, 3.0, 0.0], [2.0, 3.0, 0.0]])
    routing = _router(3, top_k=2, capacity_factor=1.0, group_size=2)(x)
    assert routing.experts.tolist() == [[0, 1], [0, 2], [1, 0], [1, 0]]
    assert routing.valid.all()
    routing = _router(3, top_k=2, expert_capacity=1, group_size=2)(x)
    # group 0: first choices t0 -> 0 (kept), t1 -> 0 (overflow); second: t0 -> 1 (kept), t1 -> 2 (kept)
    # group 1: first choices t2 -> 1 (kept), t3 -> 1 (overflow); second: t2 -> 0 (kept), t3 -> 0 (overflow)
    assert routing.valid.tolist() == [[True, True], [False, True], [True, True], [False, False]]


def test_layer_drops_and_counts_the_overflow():
    layer = MoELayer(2, 4, 2, router="group_capacity", expert="linear", backend="loop",
                     router_options={"expert_capacity": 1, "group_size": 2})
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.eye(2))
    x = _rows([0, 0, 1, 0], 2)
    y, info = layer(x, return_info=True)
    assert info.plan.kept.squeeze(1).tolist() == [True, False, True, True]
    assert info.stats()["tokens_dropped"] == 1
    assert y[1].abs().max().item() == 0.0 and y[0].abs().max().item() > 0
