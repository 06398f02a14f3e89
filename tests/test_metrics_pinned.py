"""Routing metrics on hand-made inputs whose values are counted by hand: :func:`moe_lib.metrics.purity`
(share of tokens served by their label's most frequent expert; ``nan`` when there are no tokens) and
:func:`moe_lib.metrics.expert_load` (assignments per expert, every expert listed).
"""
from __future__ import annotations

import math

import pytest
import torch

from moe_lib import metrics


def test_purity_is_the_share_of_each_labels_top_expert():
    # label 0: 3 of 4 tokens on expert 0; label 1: all 4 on expert 1 -> (3 + 4) / 8
    assert metrics.purity(torch.tensor([[3, 1], [0, 4]])) == 0.875
    assert metrics.purity(torch.tensor([[1, 1, 1], [2, 2, 2]])) == pytest.approx(3 / 9, rel=1e-6)


def test_purity_of_a_single_token_is_one():
    assert metrics.purity(torch.tensor([[0, 1]])) == 1.0
    assert metrics.purity(torch.tensor([[0, 1], [0, 0]])) == 1.0


def test_purity_without_tokens_is_nan():
    value = metrics.purity(torch.zeros(2, 3, dtype=torch.long))
    assert isinstance(value, float) and math.isnan(value)


def test_expert_load_counts_every_expert():
    load = metrics.expert_load(torch.tensor([[0, 2], [2, 3]]), 5)
    assert load.tolist() == [1, 0, 2, 1, 0]
    assert load.dtype == torch.int64
    assert metrics.expert_load(torch.tensor([[1], [1], [1]]), 3).tolist() == [0, 3, 0]
    assert metrics.expert_load(torch.zeros(0, 2, dtype=torch.long), 4).tolist() == [0, 0, 0, 0]


def _entropy(ws):
    total = sum(ws)
    return -sum(w / total * math.log(w / total) for w in ws if w > 0)


def test_routing_stats_counted_by_hand():
    """Top-2 over 3 experts, 4 tokens, capacity 1.0: c = ceil(1.0 · 4 · 2 / 3) = 3, expert 0 is asked 4
    times and drops token 3's second choice (choice-major priority)."""
    from moe_lib.dispatch import make_plan
    from moe_lib.routers import Routing
    experts = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    w = [[0.75, 0.25], [0.5, 0.5], [0.6, 0.4], [0.9, 0.1]]
    p = [[0.5, 0.3, 0.2], [0.4, 0.2, 0.4], [0.5, 0.4, 0.1], [0.05, 0.9, 0.05]]
    routing = Routing(logits=torch.tensor(p).log(), probs=torch.tensor(p), experts=experts, weights=torch.tensor(w))
    stats = metrics.routing_stats(routing, make_plan(routing, capacity_factor=1.0))
    mean_load, load = 8 / 3, [4, 3, 1]
    std = math.sqrt(sum((v - mean_load) ** 2 for v in load) / 3)
    expected = {
        "tokens": 4, "assignments": 8, "load": load, "processed": [3, 3, 1],
        "load_cv": std / mean_load, "max_violation": (4 - mean_load) / mean_load, "experts_used_fraction": 1.0,
        "active_fraction": 8 / 12, "gate_entropy": sum(map(_entropy, w)) / 4,
        "router_entropy": sum(map(_entropy, p)) / 4,
        "effective_experts": sum(math.exp(_entropy(r)) for r in w) / 4,
        "article_sparsity_ratio": 2 / 3, "assignments_dropped": 1, "tokens_dropped": 0, "dropped_fraction": 1 / 8,
    }
    assert set(stats) == set(expected)
    for key, value in expected.items():
        assert stats[key] == pytest.approx(value, rel=1e-6), key
        assert type(stats[key]) is type(value), key


def test_routing_stats_leave_out_tokens_nobody_chose():
    """Expert choice can leave a token unchosen: it counts as a dropped token, and the per-token means
    (entropies, effective experts, the article's ratio) are taken over the tokens that were used."""
    from moe_lib.dispatch import make_plan
    from moe_lib.routers import Routing
    p = torch.tensor([[0.5, 0.5], [0.2, 0.8], [0.9, 0.1]])
    routing = Routing(logits=p.log(), probs=p, experts=torch.tensor([[0, 1], [0, 1], [0, 1]]),
                      weights=torch.tensor([[0.7, 0.0], [0.0, 0.4], [0.0, 0.0]]),
                      valid=torch.tensor([[True, False], [False, True], [False, False]]))
    stats = metrics.routing_stats(routing, make_plan(routing))
    assert stats["assignments"] == 2 and stats["load"] == [1, 1] and stats["processed"] == [1, 1]
    assert stats["active_fraction"] == pytest.approx(2 / 6)
    assert stats["tokens_dropped"] == 1 and stats["assignments_dropped"] == 0 and stats["dropped_fraction"] == 0.0
    assert stats["gate_entropy"] == 0.0 and stats["effective_experts"] == 1.0
    assert stats["router_entropy"] == pytest.approx((_entropy([0.5, 0.5]) + _entropy([0.2, 0.8])) / 2, rel=1e-6)
    assert stats["article_sparsity_ratio"] == pytest.approx(((2 - 0.7) / 2 + (2 - 0.4) / 2) / 2, rel=1e-6)
    assert stats["experts_used_fraction"] == 1.0 and stats["load_cv"] == 0.0 and stats["max_violation"] == 0.0


def test_routing_stats_of_an_empty_batch_and_of_soft_moe():
    from moe_lib.dispatch import make_plan, slot_plan
    from moe_lib.routers import Routing, SoftMoERouter
    empty = Routing(logits=torch.zeros(0, 4), probs=torch.zeros(0, 4), experts=torch.zeros(0, 2, dtype=torch.long),
                    weights=torch.zeros(0, 2))
    stats = metrics.routing_stats(empty, make_plan(empty))
    assert stats["tokens"] == 0 and stats["assignments"] == 0 and stats["active_fraction"] == 0.5
    assert math.isnan(stats["gate_entropy"]) and math.isnan(stats["load_cv"]) and stats["dropped_fraction"] == 0.0
    assert stats["experts_used_fraction"] == 0.0 and stats["load"] == [0, 0, 0, 0]
    routing = SoftMoERouter(4, 3, slots_per_expert=2)(torch.randn(5, 4))
    stats = metrics.routing_stats(routing, slot_plan(3, 2))
    assert stats["assignments"] == 6 and stats["active_fraction"] == 1.0 and stats["load"] == [2, 2, 2]
    assert stats["tokens"] == 5 and stats["tokens_dropped"] == 0


def test_routing_stats_of_a_single_token():
    from moe_lib.dispatch import make_plan
    from moe_lib.routers import Routing
    p = torch.tensor([[0.6, 0.3, 0.1]])
    routing = Routing(logits=p.log(), probs=p, experts=torch.tensor([[0, 1]]), weights=torch.tensor([[0.75, 0.25]]))
    stats = metrics.routing_stats(routing, make_plan(routing))
    assert stats["gate_entropy"] == pytest.approx(_entropy([0.75, 0.25]), rel=1e-6)
    assert stats["router_entropy"] == pytest.approx(_entropy([0.6, 0.3, 0.1]), rel=1e-6)
    assert stats["effective_experts"] == pytest.approx(math.exp(_entropy([0.75, 0.25])), rel=1e-6)
    assert stats["load"] == [1, 1, 0] and stats["experts_used_fraction"] == pytest.approx(2 / 3)
