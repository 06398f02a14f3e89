"""The fused kernels as parts of MoELayer (issue 16, item 1): ``FusedTopKRouter`` + ``KernelDispatcher`` +
``backend="triton"`` is the kernels' fused path through the one forward, equal to ``fused_moe`` bit for bit
(Triton's interpreter on the CPU; small shapes, fp32)."""
from __future__ import annotations

import pytest
import torch

import moe_lib.dispatch as dispatch_module
from moe_lib import MoELayer
from moe_lib.dispatch import DispatchPlan, make_plan
from moe_lib.kernels import fused_moe
from moe_lib.kernels.parts import FusedTopKRouter, KernelDispatcher
from moe_lib.routers import TopKRouter

pytestmark = pytest.mark.skipif(not __import__("moe_lib").kernels.available(), reason="needs triton")

D, F, E, K, T = 16, 32, 4, 2, 12


def _fused_layer(impl="triton", **kwargs):
    return MoELayer(D, F, E, router=FusedTopKRouter(D, E, K, impl=impl), dispatcher=KernelDispatcher(impl=impl),
                    backend="triton", **kwargs)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_the_layer_configuration_is_fused_moe(impl):
    torch.manual_seed(0)
    layer = _fused_layer(impl)
    x = torch.randn(T, D)
    y, info = layer(x, return_info=True)
    fused, (weights, experts, _) = fused_moe(x, layer.router.gate.weight, layer.experts.w_gate, layer.experts.w_up,
                                             layer.experts.w_down, K, impl=impl, return_routing=True)
    assert torch.equal(y, fused)
    assert torch.equal(info.routing.experts, experts.long()) and torch.equal(info.routing.weights, weights)


def test_it_computes_what_the_reference_layer_computes_forward_and_backward():
    torch.manual_seed(0)
    reference = MoELayer(D, F, E, K, backend="loop", z_loss_coef=1e-3)
    layer = _fused_layer(z_loss_coef=1e-3)
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(T, D)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    outs = [m(xi, return_info=True) for m, xi in ((reference, xs[0]), (layer, xs[1]))]
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[1][1].aux_loss, outs[0][1].aux_loss)
    for y, info in outs:
        (y.square().sum() + info.aux_loss).backward()
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(reference.named_parameters(), layer.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_the_fused_router_is_the_topk_router_with_a_kernel_selection():
    torch.manual_seed(0)
    fused = FusedTopKRouter(D, E, K)
    plain = TopKRouter(D, E, K)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(40, D)
    a, b = fused(x), plain(x)
    assert torch.equal(a.experts, b.experts) and a.experts.dtype == torch.int64
    torch.testing.assert_close(a.weights, b.weights)
    assert torch.equal(a.probs, b.probs) and torch.equal(a.logits, b.logits)
    with pytest.raises(ValueError, match="unknown impl .cuda.; accepted values"):
        FusedTopKRouter(D, E, K, impl="cuda")


def test_the_plan_is_made_only_when_read(monkeypatch):
    calls = []
    real = dispatch_module.make_plan
    monkeypatch.setattr("moe_lib.kernels.parts.make_plan", lambda routing: calls.append(1) or real(routing))
    torch.manual_seed(0)
    layer = _fused_layer()
    y, info = layer(torch.randn(T, D), return_info=True)
    assert calls == []  # the forward groups the rows on the device; no plan, no host sync for it
    expected = make_plan(info.routing)
    assert torch.equal(info.plan.counts, expected.counts) and torch.equal(info.plan.token_index, expected.token_index)
    assert info.stats()["tokens"] == T and calls == [1]  # made once, then plain attributes
    assert info.plan.dropped_assignments == 0


def test_deferred_plan():
    torch.manual_seed(0)
    routing = TopKRouter(D, E, K)(torch.randn(5, D))
    built = []
    plan = DispatchPlan.deferred(lambda: built.append(1) or make_plan(routing))
    assert built == [] and isinstance(plan, DispatchPlan)
    assert plan.num_experts == E and plan.offsets[-1] == 5 * K and built == [1]
    with pytest.raises(TypeError, match="must return a DispatchPlan, got int"):
        DispatchPlan.deferred(lambda: 3).counts  # noqa: B018
    with pytest.raises(AttributeError):
        DispatchPlan.deferred(lambda: make_plan(routing)).no_such_field  # noqa: B018


def test_what_it_cannot_run_is_refused_by_name():
    with pytest.raises(ValueError, match=r"backend='torch' cannot run with dispatcher=KernelDispatcher.*"
                                         r"\['triton'\]"):
        MoELayer(D, F, E, K, dispatcher=KernelDispatcher())
    layer = MoELayer(D, F, E, K, dispatcher=KernelDispatcher(), backend="triton")
    with pytest.raises(ValueError, match="backend='grouped_mm' cannot run with dispatcher=KernelDispatcher"):
        layer.backend = "grouped_mm"
    with pytest.raises(ValueError, match="invalid .expert choice, GShard.*dispatcher=None"):
        MoELayer(D, F, E, 2, router="expert_choice", dispatcher=KernelDispatcher(), backend="triton")(
            torch.randn(T, D))
    with pytest.raises(ValueError, match="Soft MoE slots"):
        MoELayer(D, F, E, router="soft", dispatcher=KernelDispatcher(), backend="triton")(torch.randn(T, D))
    with pytest.raises(ValueError, match="block_m must be one of .16, 32, 64, 128. or None"):
        KernelDispatcher(block_m=48)
