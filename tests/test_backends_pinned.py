"""Backends on the edge cases of a dispatch plan, against sums written out by hand:

* a plan with no kept row at all (every assignment over capacity) gives zeros of shape ``[T, d_out]``;
* a plan with exactly one kept row gives that row's weighted expert output;
* ``backend="triton"`` takes inputs of another dtype than the (float32) expert weights and computes in the
  input's dtype. float16 here: the Triton interpreter's bfloat16 ``tl.dot`` is wrong (see
  tests/test_kernels.py) and float64 comes out as nan there.
"""
from __future__ import annotations

import pytest
import torch

from moe_lib import MoELayer
from moe_lib.backends import BACKENDS


def _all_dropped_layer(backend: str) -> MoELayer:
    # expert capacity 0: the router marks every assignment as overflow, the plan keeps no row
    return MoELayer(4, 8, 2, router="group_capacity", expert="linear", backend=backend, d_out=8,
                    router_options={"expert_capacity": 0})


@pytest.mark.parametrize("backend", ["loop", "torch", "grouped_mm"])
def test_plan_without_rows_gives_zeros_of_the_output_shape(backend):
    layer = _all_dropped_layer(backend)
    x = torch.randn(3, 4)  # T = 3 differs from d_model = 4 and from d_out = 8
    y, info = layer(x, return_info=True)
    assert info.plan.token_index.numel() == 0
    assert y.shape == (3, 8) and not y.any()
    direct = BACKENDS[backend](layer.experts, x, info.plan)
    assert direct.shape == (3, 8) and not direct.any()


@pytest.mark.parametrize("backend", ["loop", "torch", "grouped_mm"])
def test_plan_with_one_row_gives_that_weighted_expert_output(backend):
    layer = MoELayer(4, 8, 2, router="switch", expert="linear", backend=backend)
    x = torch.randn(1, 4, generator=torch.Generator().manual_seed(0))
    y, info = layer(x, return_info=True)
    assert info.plan.token_index.numel() == 1
    e = int(info.routing.experts[0, 0])
    w = float(info.routing.weights[0, 0].detach())
    with torch.no_grad():
        expected = w * (x[0] @ layer.experts.weight[e] + layer.experts.bias[e])
    torch.testing.assert_close(y[0], expected)


def test_triton_backend_computes_in_the_input_dtype():
    torch.manual_seed(0)
    layer = MoELayer(16, 16, 4, 2, expert="swiglu", backend="triton")
    x = torch.randn(5, 16).half()
    y, info = layer(x, return_info=True)
    assert y.dtype == torch.float16
    x = x.double()
    ex = layer.experts
    expected = torch.zeros(5, 16, dtype=torch.float64)
    with torch.no_grad():
        for t in range(5):
            for j in range(2):
                e = int(info.routing.experts[t, j])
                g, u = x[t] @ ex.w_gate[e].double(), x[t] @ ex.w_up[e].double()
                h = g * torch.sigmoid(g) * u  # silu(g) ⊙ u
                expected[t] += float(info.routing.weights[t, j]) * (h @ ex.w_down[e].double())
    torch.testing.assert_close(y.double(), expected, rtol=2e-3, atol=2e-3)
