"""Public defaults of the routers, pinned: the Switch router (Fedus et al. 2022: top-1, raw probability, no
gate bias, float32), each router's default ``top_k`` as :class:`moe_lib.MoELayer` uses it when
``top_k=None``, and the noisy top-k router's FLOPs (gate and noise matmuls, Shazeer et al. 2017, eq. 4).
"""
from __future__ import annotations

import math

import pytest
import torch

from moe_lib import MoELayer
from moe_lib.routers import BaseRouter, GShardRouter, NoisyTopKRouter, Router, SwitchRouter, TopKRouter


def test_switch_defaults():
    router = SwitchRouter(4, 3)
    assert router.top_k == 1
    assert router.gate.bias is None
    assert router.normalize is False
    assert router.router_dtype == "float32"
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]]))
    x = torch.tensor([[2.0, 1.0, 0.0, 5.0]])
    routing = router(x)
    assert routing.experts.tolist() == [[0]]
    expected = math.exp(2) / (math.exp(2) + math.exp(1) + 1)  # raw probability, not renormalised
    assert routing.weights.item() == pytest.approx(expected, rel=1e-6)
    assert routing.logits.dtype == torch.float32


def test_switch_options_reach_the_router():
    assert SwitchRouter(4, 3, bias=True).gate.bias is not None
    router = SwitchRouter(4, 3, router_dtype="bfloat16")
    assert router.router_dtype == "bfloat16"
    assert router(torch.randn(2, 4)).logits.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="top_k must be 1"):
        SwitchRouter(4, 3, 2)


@pytest.mark.parametrize("router, expected", [
    ("switch", 1), ("hash", 1), ("base", 1), ("group_capacity", 1), ("gshard", 2), ("topk", 2),
    ("noisy_topk", 2), ("auxfree", 2), ("dense", 6), ("soft", 6),
])
def test_layer_default_top_k(router, expected):
    layer = MoELayer(4, 4, 6, router=router, expert="linear")
    assert layer.top_k == expected
    assert layer.router.top_k == expected


def test_default_top_k_classmethods():
    assert Router.default_top_k(8) == 2 and Router.default_top_k(1) == 1  # min(2, E)
    assert TopKRouter.default_top_k(5) == 2
    assert BaseRouter.default_top_k(8) == 1
    assert GShardRouter.default_top_k(8) == 2
    assert SwitchRouter.default_top_k(8) == 1


def test_noisy_topk_flops_count_gate_and_noise_matmuls():
    router = NoisyTopKRouter(6, 4, 2)
    assert router.flops_per_token() == 2 * (2 * 6 * 4)
    layer = MoELayer(6, 4, 4, 2, router="noisy_topk", expert="linear")
    assert layer.active_flops_per_token() == 96 + 2 * (2 * 6 * 6)
