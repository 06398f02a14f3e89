""":class:`moe_lib.MoELayer`'s accounting, pinned by hand: ``active_flops_per_token`` (gate plus ``k``
experts; Soft MoE: slot logits, dispatch and combine plus ``S/T`` expert passes, Puigcerver et al. 2024),
``num_parameters`` (integers: total, and gate plus ``k/E`` of the experts) and the module's ``repr``.
"""
from __future__ import annotations

import pytest

from moe_lib import MoELayer


def _soft(slots_per_expert: int = 2) -> MoELayer:
    # d = 4, E = 3, p = 2 (S = 6 slots), linear experts 4 -> 4
    return MoELayer(4, 4, 3, router="soft", expert="linear", router_options={"slots_per_expert": slots_per_expert})


def test_soft_flops_per_token_depend_on_the_batch():
    layer = _soft()
    router = 3 * 2 * 4 * 6  # slot logits + dispatch + combine, each 2 · d · S per token
    expert = 2 * 4 * 4
    assert layer.active_flops_per_token(num_tokens=1) == router + 6 * expert
    assert layer.active_flops_per_token(num_tokens=4) == router + 6 / 4 * expert
    assert layer.active_flops_per_token(num_tokens=12) == router + 0.5 * expert


def test_soft_flops_need_a_positive_token_count():
    layer = _soft()
    with pytest.raises(ValueError, match="pass num_tokens"):
        layer.active_flops_per_token()
    with pytest.raises(ValueError, match=r"^num_tokens must be an integer >= 1, got 0"):
        layer.active_flops_per_token(num_tokens=0)
    with pytest.raises(TypeError, match=r"^num_tokens must be an integer"):
        layer.active_flops_per_token(num_tokens=2.0)


def test_token_choice_flops_are_gate_plus_k_experts():
    layer = MoELayer(4, 8, 3, 2, expert="mlp")
    assert layer.active_flops_per_token() == 2 * 4 * 3 + 2 * (2 * 8 * (4 + 4))
    assert layer.active_flops_per_token(num_tokens=5) == layer.active_flops_per_token()


def test_num_parameters_are_integers():
    layer = MoELayer(4, 4, 3, 2, expert="linear")
    gate = 4 * 3  # no bias
    experts = 3 * (4 * 4 + 4)  # weight and bias per expert
    counts = layer.num_parameters()
    assert counts == {"total": gate + experts, "active": gate + 2 * (4 * 4 + 4)}
    assert all(type(v) is int for v in counts.values())


def test_repr_names_the_configuration():
    layer = MoELayer(4, 8, 3)
    assert layer.extra_repr() == ("d_model=4, d_ff=8, num_experts=3, top_k=2, router='topk', expert='swiglu', "
                                  "backend='torch', dropless")
    assert "dropless" in repr(layer)
    layer = MoELayer(4, 8, 3, 1, router="switch", expert="mlp", backend="loop", capacity_factor=1.25)
    assert layer.extra_repr() == ("d_model=4, d_ff=8, num_experts=3, top_k=1, router='switch', expert='mlp', "
                                  "backend='loop', capacity_factor=1.25")
