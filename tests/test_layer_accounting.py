""":class:`moe_lib.MoELayer`'s accounting, pinned by hand: ``active_flops_per_token`` (gate plus ``k``
experts; Soft MoE: slot logits, dispatch and combine plus ``S/T`` expert passes, Puigcerver et al. 2024),
``num_parameters`` (integers: total, and gate plus ``k/E`` of the experts), the module's ``repr``; token ids and
the tokens' dtype carried through the forward pass.
"""
from __future__ import annotations

import copy

import pytest
import torch

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


def test_token_ids_reach_the_hash_router_through_the_layer():
    """``MoELayer.forward(x, token_ids=...)`` routes by id (Roller et al. 2021): batched ids of shape
    ``x.shape[:-1]`` are flattened in token order and hashed; without ids the content is hashed instead."""
    from moe_lib.routers import hash_to_expert
    layer = MoELayer(4, 8, 8, router="hash", expert="linear", aux_loss_coef=0.0)
    x = torch.randn(2, 5, 4)
    ids = torch.arange(10).reshape(2, 5) * 7 + 3
    _, info = layer(x, return_info=True, token_ids=ids)
    assert info.routing.experts[:, 0].tolist() == hash_to_expert(ids.reshape(-1), 8).tolist()
    _, by_content = layer(x, return_info=True)
    assert by_content.routing.experts[:, 0].tolist() == hash_to_expert(
        layer.router.content_ids(x.reshape(-1, 4)), 8).tolist()
    assert by_content.routing.experts.tolist() != info.routing.experts.tolist()


def test_soft_moe_layer_in_bfloat16_and_float64():
    """The slot mixing casts the router's float32 dispatch and combine weights to the tokens' dtype."""
    torch.manual_seed(0)
    layer = MoELayer(4, 8, 3, router="soft", expert="mlp", aux_loss_coef=0.0)
    x = torch.randn(6, 4)
    y32 = layer(x)
    y16 = copy.deepcopy(layer).bfloat16()(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=0.1, atol=0.05)
    y64 = copy.deepcopy(layer).double()(x.double())
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64.float(), y32, rtol=1e-5, atol=1e-6)


def test_a_layer_can_be_copied_and_pickled_after_a_forward_pass():
    """``last_info`` holds the last pass's autograd graph: copies and pickles leave it out (``deepcopy`` of
    a non-leaf tensor raises), and the copy computes what the original does."""
    import io
    layer = MoELayer(4, 8, 3)
    x = torch.randn(5, 4)
    layer(x).sum().backward()
    assert layer.last_info is not None
    twin = copy.deepcopy(layer)
    assert twin.last_info is None and layer.last_info is not None
    torch.testing.assert_close(twin(x), layer(x), rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.last_info is None
    torch.testing.assert_close(loaded(x), layer(x), rtol=0, atol=0)
