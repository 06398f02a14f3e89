"""The default ``torch`` backend (blocked: one block of grouped rows per expert, issue 16) against the ``loop``
reference and the padded batched matmul it replaced, on the plans every router makes and on edge cases.

Forward values are compared bit for bit with ``loop``: both run the same matmuls on the same rows and add the
weighted rows in the same order. Gradients are compared to float32 rounding (with ``k >= 3`` the input
gradient adds a token's rows in another order than the loop's per-expert scatters). No timing here: the speed
targets are measured by ``python -m moe_lib.bench`` on the CPU shapes.
"""
from __future__ import annotations

import pytest
import torch

from moe_lib import EXPERTS, MoELayer
from moe_lib.backends import BACKENDS, padded_backend
from moe_lib.dispatch import make_plan
from moe_lib.experts import SwiGLUExperts
from moe_lib.routers import Routing


def _plan(experts: torch.Tensor, weights: torch.Tensor, num_experts: int, capacity_factor=None):
    empty = weights.new_zeros(experts.shape[0], num_experts)
    return make_plan(Routing(logits=empty, probs=empty, experts=experts, weights=weights), capacity_factor)


def _run(backend, bank, x, plan, grad_out):
    """Output and gradients (input, then every bank parameter) of ``backend`` on one plan."""
    bank.zero_grad()
    x = x.detach().requires_grad_()
    y = backend(bank, x, plan)
    y.backward(grad_out)
    return [y.detach(), x.grad] + [p.grad.clone() for p in bank.parameters()]


@pytest.mark.parametrize("expert", sorted(EXPERTS))
@pytest.mark.parametrize("counts", [
    (5, 0, 3, 0),    # empty experts, between and at the end
    (0, 0, 9, 0),    # every row on one expert
    (1, 1, 1, 1),    # one row each
])
def test_blocked_equals_loop_and_padded_on_skewed_loads(expert, counts):
    """Rows per expert exactly as given (k = 1): forward bitwise equal to the loop, gradients close to the
    loop's and to the padded batched matmul's; an empty expert's weight gradient is exactly zero."""
    torch.manual_seed(0)
    E, d = len(counts), 8
    bank = EXPERTS[expert](E, d, 12)
    experts = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))[torch.randperm(sum(counts))]
    T = experts.shape[0]
    plan = _plan(experts[:, None], torch.rand(T, 1), E)
    x, g = torch.randn(T, d), torch.randn(T, bank.d_out)
    new = _run(BACKENDS["torch"], bank, x, plan, g)
    loop = _run(BACKENDS["loop"], bank, x, plan, g)
    old = _run(padded_backend, bank, x, plan, g)
    assert torch.equal(new[0], loop[0])
    for a, b, c in zip(new, loop, old):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    for p in bank.parameters():
        for e, n in enumerate(counts):
            if n == 0:
                assert not p.grad[e].any(), f"empty expert {e} got a weight gradient"


@pytest.mark.parametrize("top_k,capacity_factor", [(1, None), (2, None), (2, 0.5), (3, 1.0), (4, None)])
def test_blocked_equals_loop_for_every_k_with_capacity_drops(top_k, capacity_factor):
    torch.manual_seed(top_k)
    T, E, d = 37, 6, 16
    bank = SwiGLUExperts(E, d, 24)
    experts = torch.stack([torch.randperm(E)[:top_k] for _ in range(T)])
    plan = _plan(experts, torch.softmax(torch.randn(T, top_k), -1), E, capacity_factor)
    if capacity_factor == 0.5:
        assert plan.dropped_assignments > 0  # the case is about drops
    x, g = torch.randn(T, d), torch.randn(T, d)
    new, loop = _run(BACKENDS["torch"], bank, x, plan, g), _run(BACKENDS["loop"], bank, x, plan, g)
    assert torch.equal(new[0], loop[0])
    for a, b in zip(new[1:], loop[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_no_tokens_and_no_kept_rows_give_zeros():
    bank = SwiGLUExperts(4, 8, 8)
    for T, capacity_factor in ((0, None), (5, 0.0)):
        experts = torch.zeros(T, 2, dtype=torch.long) + torch.tensor([0, 1])
        plan = _plan(experts, torch.full((T, 2), 0.5), 4, capacity_factor)
        assert plan.token_index.numel() == 0
        y = BACKENDS["torch"](bank, torch.randn(T, 8), plan)
        assert y.shape == (T, 8) and not y.any()


@pytest.mark.parametrize("router,top_k,options", [
    ("expert_choice", 2, {}),
    ("soft", None, {}),
    ("switch", 1, {"capacity_factor": 1.0}),
    ("topk", 2, {"expert": "mlp"}),
])
def test_layer_with_default_backend_equals_loop(router, top_k, options):
    """Through MoELayer, whose default backend is ``torch``: expert choice (tokens no expert took), Soft MoE's
    slot plan, a capacity-limited top-1 router; outputs bitwise, router and expert gradients close."""
    options = {"expert": "swiglu", **options}
    torch.manual_seed(0)
    layer = MoELayer(8, 12, 4, top_k, router=router, **options)
    assert layer.backend == "torch"
    x = torch.randn(3, 7, 8)
    grads, outs = [], []
    for backend in ("torch", "loop"):
        layer.zero_grad()
        layer.backend = backend
        y = layer(x)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append([p.grad.clone() for p in layer.parameters() if p.grad is not None])
    assert torch.equal(outs[0], outs[1])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
