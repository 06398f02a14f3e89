"""The core's small primitives, pinned where mutation testing (``make mutation``) found them unchecked after
they moved into the core (issue 16): the tile-slot bound and schedule, synthetic routings, the padded backend
on empty and one-row plans, a bank's default blocked view, and the reprs a user reads."""
from __future__ import annotations

import re

import pytest
import torch

from moe_lib.backends import padded_backend
from moe_lib.dispatch import DispatchPlan, TokenDispatcher, make_plan, max_tiles, tile_schedule
from moe_lib.experts import ExpertBank, SwiGLUExperts
from moe_lib.losses import AuxTerms, auxiliary_losses
from moe_lib.routers import Routing, TopKRouter, synthetic_routing, zipf_popularity


@pytest.mark.parametrize("call, error, message", [
    (lambda: max_tiles(-1, 4, 16), ValueError, "num_rows must be an integer >= 0, got -1"),
    (lambda: max_tiles(4, 0, 16), ValueError, "num_experts must be an integer >= 1, got 0"),
    (lambda: max_tiles(4, 4, 0), ValueError, "block_m must be an integer >= 1, got 0"),
    (lambda: tile_schedule([1, -2], 16), ValueError, "counts[1] must be an integer >= 0, got -2"),
    (lambda: tile_schedule([1, 2], 0), ValueError, "block_m must be an integer >= 1, got 0"),
    (lambda: synthetic_routing(-1, 4, 2), ValueError, "num_tokens must be an integer >= 0, got -1"),
    (lambda: synthetic_routing(4, 0, 2), ValueError, "num_experts must be an integer >= 1, got 0"),
    (lambda: synthetic_routing(4, 4, 0), ValueError, "top_k must be an integer between 1 and 4, got 0"),
    (lambda: synthetic_routing(4, 4, 5), ValueError, "top_k must be an integer between 1 and 4, got 5"),
    (lambda: synthetic_routing(4, 4, 2, balanced=1), TypeError, "balanced must be True or False, got 1"),
    (lambda: zipf_popularity(0, 1.0), ValueError, "num_experts must be an integer >= 1, got 0"),
    (lambda: zipf_popularity(4, -1.0), ValueError, "exponent must be a finite number >= 0, got -1.0"),
    (lambda: TokenDispatcher(0.0), ValueError, "capacity_factor must be a finite number > 0 or None, got 0.0"),
])
def test_bad_arguments_are_named(call, error, message):
    with pytest.raises(error, match=re.escape(message)):
        call()


def test_tile_slots_and_schedule():
    assert max_tiles(0, 4, 16) == 1  # one slot even without rows: every launch over the slots has a program
    assert max_tiles(1, 4, 16) == 1 and max_tiles(8, 256, 16) == 8 and max_tiles(40, 2, 16) == 4  # 1 row + 39 rows: 1 + 3 tiles
    tile_expert, tile_row = tile_schedule([3, 0, 20], 16)
    assert tile_expert.tolist() == [0, 2, 2] and tile_row.tolist() == [0, 3, 19]
    assert tile_expert.dtype == tile_row.dtype == torch.int64


def test_synthetic_routings_are_reproducible_and_allow_no_tokens():
    routing = synthetic_routing(6, 4, 2, balanced=True, generator=torch.Generator().manual_seed(0))
    assert routing.experts.tolist() == [[1, 0], [3, 2], [1, 0], [3, 2], [1, 0], [3, 2]]  # pinned: chapters use it
    assert torch.bincount(routing.experts.flatten(), minlength=4).tolist() == [3, 3, 3, 3]
    assert synthetic_routing(0, 4, 2).experts.shape == (0, 2)
    p = zipf_popularity(5, 1.0)
    assert torch.allclose(p.double(), torch.tensor([1 / r for r in range(1, 6)], dtype=torch.float64) /
                          sum(1 / r for r in range(1, 6)))


def _plan(T: int, kept_rows: int) -> tuple[DispatchPlan, Routing]:
    """A top-1 plan over 2 experts in which only the first ``kept_rows`` tokens are assignments."""
    experts = torch.zeros(T, 1, dtype=torch.long)
    valid = (torch.arange(T) < kept_rows).unsqueeze(1)
    probs = torch.full((T, 2), 0.5)
    routing = Routing(logits=probs.log(), probs=probs, experts=experts, weights=torch.ones(T, 1), valid=valid)
    return make_plan(routing), routing


@pytest.mark.parametrize("kept_rows", [0, 1])
def test_padded_backend_on_empty_and_one_row_plans(kept_rows):
    torch.manual_seed(0)
    bank = SwiGLUExperts(2, 6, 8, d_out=5)
    x = torch.randn(3, 6)
    plan, _ = _plan(3, kept_rows)
    y = padded_backend(bank, x, plan)
    assert y.shape == (3, 5)
    expected = torch.zeros(3, 5)
    if kept_rows:
        expected[0] = bank.forward_expert(0, x[:1])[0]
    torch.testing.assert_close(y, expected)


class _PerExpert(ExpertBank):
    """A bank defining only ``forward_expert`` (no stacked weights): the blocked view is made of it."""

    kind = "scaled"
    stacked = ()

    def __init__(self):
        super().__init__(2, 3, 4)
        self.scale = torch.nn.Parameter(torch.tensor([2.0, 3.0]))

    def forward_expert(self, e, x, hidden_hook=None):
        h = x * self.scale[e]
        return h if hidden_hook is None else hidden_hook(h)


def test_the_default_blocked_view_calls_each_expert_on_its_block_with_the_hook():
    bank = _PerExpert()
    blocks = [(0, torch.ones(2, 3)), (1, torch.ones(1, 3))]
    plain = bank.forward_blocks(blocks)
    assert [b.tolist() for b in plain] == [[[2.0] * 3] * 2, [[3.0] * 3]]
    hooked = bank.forward_blocks(blocks, hidden_hook=lambda h: h + 10)  # a HiddenHook: h -> h
    assert [b.tolist() for b in hooked] == [[[12.0] * 3] * 2, [[13.0] * 3]]


def test_what_a_user_reads():
    assert TokenDispatcher().extra_repr() == "dropless"
    assert TokenDispatcher(1.25).extra_repr() == "capacity_factor=1.25"
    routing = TopKRouter(4, 3, 2)(torch.randn(5, 4))
    terms, _ = auxiliary_losses(routing, aux_loss_coef=0.01)
    assert isinstance(terms, AuxTerms)
    assert repr(terms) == "AuxTerms(load_balance, z_loss (not computed), importance (not computed))"


def test_a_deferred_plan_answers_dunder_lookups_without_building():
    built = []
    plan = DispatchPlan.deferred(lambda: built.append(1) or _plan(2, 2)[0])
    assert not hasattr(plan, "__no_such_protocol__") and built == []
    assert plan.counts.tolist() == [2, 0] and built == [1]
