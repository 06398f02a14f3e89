"""MoELayer end to end: backends agree, outputs equal Σ w·expert(x) computed directly, shapes, grads."""
import pytest
import torch

from _reference import reference_output
from moe_lib import EXPERTS, MoELayer
from moe_lib.backends import BACKENDS


@pytest.mark.parametrize("expert", sorted(EXPERTS))
@pytest.mark.parametrize("shape", [(1, 6), (5, 6), (2, 7, 6), (3, 1, 4, 6)])
@pytest.mark.parametrize("capacity_factor", [None, 1.0, 0.5])
def test_backends_agree_for_every_k(expert, shape, capacity_factor):
    num_experts = 4
    for k in range(1, num_experts + 1):
        torch.manual_seed(k)
        layer = MoELayer(6, 10, num_experts, k, expert=expert, backend="loop", capacity_factor=capacity_factor)
        x = torch.randn(shape)
        y_loop = layer(x)
        layer.backend = "torch"
        y_torch = layer(x)
        assert y_loop.shape == x.shape
        torch.testing.assert_close(y_torch, y_loop, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(y_loop.double(), reference_output(layer, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["loop", "torch"])
def test_dense_router_is_softmax_mixture(backend):
    """router='dense': f(x) = Σ_i softmax(x W_g)_i · h_i(x) over every expert (Jacobs et al. 1991)."""
    torch.manual_seed(0)
    layer = MoELayer(3, 5, 4, router="dense", expert="linear", router_bias=True, backend=backend)
    x = torch.randn(11, 3)
    w = torch.softmax(x @ layer.router.gate.weight.T + layer.router.gate.bias, dim=-1)
    h = torch.stack([layer.experts.forward_expert(e, x) for e in range(4)], dim=1)  # [T, E, d]
    torch.testing.assert_close(layer(x), (w.unsqueeze(-1) * h).sum(1), rtol=1e-5, atol=1e-6)
    assert layer.top_k == 4


@pytest.mark.parametrize("backend", sorted(set(BACKENDS) - {"loop"}))
def test_gradients_agree_between_backends(backend):
    """Every backend's gradients (parameters and input) against the reference loop backend's."""
    torch.manual_seed(0)
    # a kind every backend runs, widths multiples of 4 (grouped_mm on the CPU wants 16-byte aligned rows)
    layer = MoELayer(8, 8, 5, 2, expert="swiglu", backend="loop", capacity_factor=1.0)
    x = torch.randn(4, 9, 8, requires_grad=True)
    y, info = layer(x, return_info=True)
    (y.square().sum() + info.aux_loss).backward()
    ref = [p.grad.clone() for p in layer.parameters()] + [x.grad.clone()]
    layer.zero_grad()
    x.grad = None
    layer.backend = backend
    y, info = layer(x, return_info=True)
    (y.square().sum() + info.aux_loss).backward()
    got = [p.grad for p in layer.parameters()] + [x.grad]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert layer.router.gate.weight.grad.abs().sum() > 0, "the router must receive a gradient"


def test_gradcheck_float64():
    torch.manual_seed(0)
    layer = MoELayer(4, 6, 3, 2, expert="swiglu").double()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: layer(inp), (x,))


def test_empty_batch_returns_empty_output():
    layer = MoELayer(8, 16, 4, 2)
    for shape in [(0, 8), (2, 0, 8)]:
        y, info = layer(torch.randn(shape), return_info=True)
        assert y.shape == shape
        assert info.stats()["tokens"] == 0
        assert info.plan.dropped_tokens == 0


def test_d_out_changes_only_last_dimension():
    layer = MoELayer(3, 8, 4, 2, expert="mlp", d_out=5)
    assert layer(torch.randn(2, 6, 3)).shape == (2, 6, 5)


def test_dropped_tokens_produce_zero_and_are_counted():
    """A token whose every choice overflowed capacity gets no expert output, and is counted."""
    torch.manual_seed(0)
    layer = MoELayer(4, 8, 2, 1, expert="linear", capacity_factor=0.25)
    with torch.no_grad():  # route every token to expert 0
        layer.router.gate.weight.copy_(torch.tensor([[0.0] * 4, [0.0] * 4]))
        layer.router.gate.weight[0, 0] = 1.0
    x = torch.randn(16, 4)
    x[:, 0] = x[:, 0].abs() + 1.0
    y, info = layer(x, return_info=True)
    capacity = info.plan.capacity
    assert capacity == 2  # ceil(0.25 * 16 * 1 / 2)
    assert info.plan.dropped_tokens == 16 - capacity
    assert info.stats()["tokens_dropped"] == 14
    assert torch.all(y[capacity:] == 0)  # first-come first-served: the earliest tokens are kept
    assert torch.all(y[:capacity].abs().sum(-1) > 0)


def test_aux_losses_reachable_and_weighted():
    layer = MoELayer(8, 16, 4, 2, aux_loss_coef=0.5, z_loss_coef=0.25)
    y, info = layer(torch.randn(32, 8), return_info=True)
    assert layer.last_info is info
    expected = 0.5 * info.aux_losses["load_balance"] + 0.25 * info.aux_losses["z_loss"]
    torch.testing.assert_close(info.aux_loss, expected)


def test_active_flops_match_flop_counter():
    """The analytic FLOPs per token equal what torch's FLOP counter measures on the loop backend."""
    from moe_lib import count_flops

    torch.manual_seed(0)
    for expert in sorted(EXPERTS):
        for k in (1, 2, 4):
            layer = MoELayer(8, 12, 4, k, expert=expert, backend="loop")
            x = torch.randn(20, 8)
            assert count_flops(layer, x) == 20 * layer.active_flops_per_token()


def test_soft_moe_flops_per_token_need_the_batch_size():
    """Soft MoE shares E·p slots across the batch: the per-token cost depends on T, and matches the counter."""
    from moe_lib import count_flops

    torch.manual_seed(0)
    layer = MoELayer(8, 12, 4, None, router="soft", expert="swiglu", backend="loop",
                     router_options={"slots_per_expert": 2})
    with pytest.raises(ValueError, match="num_tokens"):
        layer.active_flops_per_token()
    for num_tokens in (5, 20):
        x = torch.randn(num_tokens, 8)
        assert count_flops(layer, x) == pytest.approx(num_tokens * layer.active_flops_per_token(num_tokens))


def test_parameter_count():
    layer = MoELayer(8, 16, 4, 2, expert="swiglu")
    counts = layer.num_parameters()
    assert counts["total"] == sum(p.numel() for p in layer.parameters()) == 8 * 4 + 4 * 3 * 8 * 16
    assert counts["active"] == 8 * 4 + 2 * 3 * 8 * 16


def test_bf16_input_keeps_dtype_and_router_runs_in_fp32():
    layer = MoELayer(8, 16, 4, 2).to(torch.bfloat16)
    y, info = layer(torch.randn(5, 8, dtype=torch.bfloat16), return_info=True)
    assert y.dtype == torch.bfloat16
    assert info.routing.probs.dtype == torch.float32


def test_expert_outputs_are_every_expert_on_every_token():
    torch.manual_seed(0)
    layer = MoELayer(5, 7, 3, 2, expert="mlp")
    x = torch.randn(2, 4, 5)
    h = layer.expert_outputs(x)
    assert h.shape == (2, 4, 3, 5)
    for e in range(3):
        torch.testing.assert_close(h[:, :, e], layer.experts.forward_expert(e, x.reshape(-1, 5)).reshape(2, 4, 5))
    # with the dense router the layer is exactly the softmax-weighted sum of these outputs
    dense = MoELayer(5, 7, 3, router="dense", expert="mlp")
    w = dense.router(x.reshape(-1, 5)).probs.reshape(2, 4, 3, 1)
    torch.testing.assert_close(dense(x), (w * dense.expert_outputs(x)).sum(-2), rtol=1e-5, atol=1e-6)


def test_switch_router_keeps_raw_probability_by_default():
    """Regression: the layer's normalize_weights default must not renormalise Switch's top-1 weight to 1,
    which would leave the router without a gradient from the task loss."""
    torch.manual_seed(0)
    layer = MoELayer(6, 8, 4, router="switch", expert="mlp")
    x = torch.randn(32, 6)
    y, info = layer(x, return_info=True)
    assert torch.all(info.routing.weights < 1)
    torch.testing.assert_close(info.routing.weights[:, 0], info.routing.probs.max(dim=1).values)
    y.square().sum().backward()
    assert layer.router.gate.weight.grad.abs().sum() > 0


def test_top1_renormalised_training_warns_once():
    layer = MoELayer(6, 8, 4, 1, router="topk", normalize_weights=True)
    with pytest.warns(UserWarning, match="no gradient from the task loss"):
        layer(torch.randn(5, 6))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(5, 6))  # only once
        layer.eval()
        MoELayer(6, 8, 4, 1, router="topk").eval()(torch.randn(5, 6))  # inference: no warning


def test_activation_reaches_every_expert_kind_that_takes_one():
    """Regression: MoELayer passed ``activation`` only to MLP experts, so a GLU bank silently kept SiLU."""
    assert MoELayer(8, 16, 4, 2, expert="glu", activation="gelu").experts.activation == "gelu"
    assert MoELayer(8, 16, 4, 2, expert="glu").experts.activation == "silu"
    assert MoELayer(8, 16, 4, 2, expert="mlp").experts.activation == "gelu"
    assert MoELayer(8, 16, 4, 2, expert="mlp", activation="relu").experts.activation == "relu"
