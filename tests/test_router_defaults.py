"""Public defaults of the routers, pinned: the Switch router (Fedus et al. 2022: top-1, raw probability, no
gate bias, float32), each router's default ``top_k`` as :class:`moe_lib.MoELayer` uses it when
``top_k=None``, and the noisy top-k router's FLOPs (gate and noise matmuls, Shazeer et al. 2017, eq. 4).
"""
from __future__ import annotations

import math

import pytest
import torch

from moe_lib import MoELayer
from moe_lib.routers import (BaseRouter, GShardRouter, HashRouter, NoisyTopKRouter, Router, SoftMoERouter,
                             SwitchRouter, TopKRouter)


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


# ------------------------------------------------------- every router and expert bank built directly
from moe_lib.experts import GLUExperts, LinearExperts, MLPExperts, SwiGLUExperts  # noqa: E402
from moe_lib.routers import ROUTERS  # noqa: E402


def _build(name, d_model=4, num_experts=3, **kwargs):
    cls = ROUTERS[name]
    top_k = kwargs.pop("top_k") if "top_k" in kwargs else cls.default_top_k(num_experts)
    return cls(d_model, num_experts, top_k, **kwargs)


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_router_constructor_defaults(name):
    router = _build(name)
    assert router.router_dtype == "float32" and router.d_model == 4 and router.num_experts == 3
    assert router.gate is None if name == "hash" else router.gate.bias is None
    assert router.top_k == {"dense": 3, "soft": 3, "topk": 2, "noisy_topk": 2, "gshard": 2, "auxfree": 2,
                            "group_limited": 2, "expert_choice": 2}.get(name, 1)
    if hasattr(router, "normalize"):
        assert router.normalize is (name not in ("switch", "group_capacity"))
    expected = {
        "expert_choice": {"capacity_factor": None},
        "hash": {"hash_bits": 8, "hash_seed": 0},
        "soft": {"slots_per_expert": 1},
        "auxfree": {"update_rate": 0.001},
        "group_capacity": {"expert_capacity": None, "group_size": None, "capacity_factor": None},
    }.get(name, {})
    for attr, value in expected.items():
        assert getattr(router, attr) == value, attr


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_router_constructor_checks_its_arguments(name):
    """Each router, built directly (not through MoELayer), names the bad argument."""
    with pytest.raises(ValueError, match=r"\bd_model\b"):
        _build(name, d_model=0)
    top_k = {"dense": None, "soft": None, "gshard": 2}.get(name, 1)
    with pytest.raises(ValueError, match=r"\bnum_experts\b"):
        _build(name, num_experts=0, top_k=top_k)
    with pytest.raises(ValueError, match=r"\brouter_dtype\b"):
        _build(name, router_dtype="float16")
    with pytest.raises(TypeError, match=r"\bnum_experts\b"):
        _build(name, num_experts="3", top_k=top_k)
    with pytest.raises(TypeError, match=r"\bd_model\b"):
        _build(name, d_model=None)
    if name not in ("hash", "soft"):
        with pytest.raises(TypeError, match=r"\brouter_bias\b"):
            _build(name, bias="yes")
        assert _build(name, bias=True).gate.bias is not None
    # the smallest legal sizes are accepted
    small = _build(name, d_model=1, num_experts=2 if name == "gshard" else 1)
    assert small.d_model == 1 and small.router_dtype == "float32"
    assert _build(name, router_dtype="bfloat16").router_dtype == "bfloat16"


@pytest.mark.parametrize("name", ["topk", "noisy_topk", "auxfree", "expert_choice", "group_limited"])
def test_router_top_k_range(name):
    kwargs = {"n_group": 1} if name == "group_limited" else {}
    assert _build(name, top_k=3, **kwargs).top_k == 3  # k = E is allowed
    assert _build(name, top_k=1, **kwargs).top_k == 1
    for bad in (0, 4):
        with pytest.raises(ValueError, match=r"\btop_k\b"):
            _build(name, top_k=bad, **kwargs)
    with pytest.raises(TypeError, match=r"\btop_k\b"):
        _build(name, top_k=None, **kwargs)


def test_noisy_topk_starts_at_zero_weights():
    router = NoisyTopKRouter(4, 3, 2, bias=True)
    assert router.gate.weight.abs().sum() == 0 and router.noise.weight.abs().sum() == 0
    assert router.gate.bias.abs().sum() == 0 and router.noise.bias is None
    assert router.noise.in_features == 4 and router.noise.out_features == 3
    with pytest.raises(ValueError, match=r"\bnormalize_weights\b"):
        NoisyTopKRouter(4, 3, 2, normalize=False)


def test_hash_router_options():
    router = HashRouter(5, 4, hash_bits=30, hash_seed=7)
    assert router.gate is None and router.hash_bits == 30 and router.hash_seed == 7
    expected = torch.randn(5, 30, generator=torch.Generator().manual_seed(7))
    assert torch.equal(router.projection, expected)  # the documented fixed projection of the seed
    assert "projection" in dict(router.named_buffers()) and not list(router.parameters())
    assert not torch.equal(HashRouter(5, 4).projection[:, :8], HashRouter(5, 4, hash_seed=1).projection[:, :8])
    assert HashRouter(5, 4, hash_bits=1).projection.shape == (5, 1)
    for kwargs, arg in [({"hash_bits": 0}, "hash_bits"), ({"hash_bits": 31}, "hash_bits"),
                        ({"hash_seed": -1}, "hash_seed")]:
        with pytest.raises(ValueError, match=rf"\b{arg}\b"):
            HashRouter(5, 4, **kwargs)
    assert HashRouter(5, 4, router_dtype="bfloat16").router_dtype == "bfloat16"


def test_soft_moe_router_options():
    router = SoftMoERouter(4, 3, slots_per_expert=2)
    assert router.gate.out_features == 6 and router.gate.in_features == 4 and router.gate.bias is None
    assert router.top_k == 3 and SoftMoERouter(4, 3, 3).top_k == 3
    with pytest.raises(ValueError, match=r"\bslots_per_expert\b"):
        SoftMoERouter(4, 3, slots_per_expert=0)
    with pytest.raises(ValueError, match=r"\btop_k\b"):
        SoftMoERouter(4, 3, 2)
    with pytest.raises(ValueError, match=r"\brouter_bias\b"):
        SoftMoERouter(4, 3, bias=True)
    assert SoftMoERouter(4, 3, router_dtype="bfloat16").router_dtype == "bfloat16"


@pytest.mark.parametrize("cls", [LinearExperts, MLPExperts, SwiGLUExperts, GLUExperts])
def test_expert_bank_constructor(cls):
    bank = cls(3, 4, 5)
    assert (bank.num_experts, bank.d_model, bank.d_ff, bank.d_out) == (3, 4, 5, 4)  # d_out defaults to d_model
    assert cls(3, 4, 5, 6).d_out == 6
    smallest = cls(1, 1, 1, 1)
    assert (smallest.num_experts, smallest.d_model, smallest.d_ff, smallest.d_out) == (1, 1, 1, 1)
    for args, arg in [((0, 4, 5), "num_experts"), ((3, 0, 5), "d_model"), ((3, 4, 0), "d_ff"),
                      ((3, 4, 5, 0), "d_out")]:
        with pytest.raises(ValueError, match=rf"\b{arg}\b"):
            cls(*args)
    with pytest.raises(TypeError, match=r"\bd_ff\b"):
        cls(3, 4, 2.5)
    with pytest.raises(TypeError, match=r"\bnum_experts\b"):
        cls(None, 4, 5)
    with pytest.raises(TypeError, match=r"\bd_model\b"):
        cls(3, "4", 5)
    with pytest.raises(TypeError, match=r"\bd_out\b"):
        cls(3, 4, 5, 1.5)


def test_layer_constructor_defaults():
    """MoELayer's public defaults: top-2 softmax router, SwiGLU experts, the torch backend, dropless,
    Switch aux loss 0.01 and no other auxiliary term, float32 router without bias."""
    layer = MoELayer(4, 8, 3)
    assert (layer.d_model, layer.d_ff, layer.num_experts, layer.top_k, layer.d_out) == (4, 8, 3, 2, 4)
    assert (layer.router.name, layer.experts.kind, layer.backend) == ("topk", "swiglu", "torch")
    assert layer.capacity_factor is None and layer.last_info is None
    assert (layer.aux_loss_coef, layer.z_loss_coef, layer.importance_loss_coef, layer.load_loss_coef) == (
        0.01, 0.0, 0.0, 0.0)
    assert layer.router.gate.bias is None and layer.router.router_dtype == "float32"
    assert layer.router.normalize is True


def test_layer_passes_its_options_to_the_router_and_the_experts():
    assert MoELayer(4, 8, 3, normalize_weights=False).router.normalize is False
    assert MoELayer(4, 8, 3, router="switch", normalize_weights=True).router.normalize is True
    assert MoELayer(4, 8, 3, router_bias=True).router.gate.bias is not None
    assert MoELayer(4, 8, 3, router_dtype="bfloat16").router.router_dtype == "bfloat16"
    ec = MoELayer(4, 8, 3, 1, router="expert_choice", capacity_factor=2.0)
    assert ec.router.capacity_factor == 2.0 and ec.capacity_factor == 2.0
    assert MoELayer(4, 8, 3, router="hash", router_options={"hash_bits": 5}).router.hash_bits == 5
    layer = MoELayer(4, 8, 3, expert="mlp", activation="relu", d_out=6)
    assert layer.experts.activation == "relu" and layer.d_out == 6 and layer.experts.d_out == 6
    assert MoELayer(4, 8, 3, expert="glu", activation="gelu").experts.activation == "gelu"
    assert MoELayer(4, 8, 3, router="noisy_topk", load_loss_coef=0.5).load_loss_coef == 0.5
    coefs = MoELayer(4, 8, 3, aux_loss_coef=0.0, z_loss_coef=1e-3, importance_loss_coef=0.1)
    assert (coefs.aux_loss_coef, coefs.z_loss_coef, coefs.importance_loss_coef) == (0.0, 1e-3, 0.1)
    assert MoELayer(1, 1, 1).top_k == 1


def test_every_expert_routers_explain_their_top_k():
    with pytest.raises(ValueError) as excinfo:
        ROUTERS["dense"](4, 3, 2)
    assert str(excinfo.value) == ("router='dense' weights every expert, so top_k must equal num_experts (3) or be "
                                  "None, got top_k=2; use router='topk' to keep only k experts")
    with pytest.raises(ValueError) as excinfo:
        SoftMoERouter(4, 3, 1)
    assert str(excinfo.value) == ("router='soft' mixes every expert into every token, so top_k must equal "
                                  "num_experts (3) or be None, got top_k=1; set slots_per_expert instead")


@pytest.mark.parametrize("cls, default", [(MLPExperts, "gelu"), (GLUExperts, "silu")])
def test_expert_activation_choice(cls, default):
    assert cls(3, 4, 5).activation == default
    assert cls(3, 4, 5, activation="tanh").activation == "tanh"
    with pytest.raises(ValueError) as excinfo:
        cls(3, 4, 5, activation="swish")
    assert str(excinfo.value) == "unknown activation 'swish'; accepted values: 'gelu', 'relu', 'silu', 'tanh'"


def test_expert_weights_start_like_nn_linear():
    """Every expert weight and bias starts ``U(-1/√fan_in, 1/√fan_in)``, ``nn.Linear``'s default."""
    torch.manual_seed(0)
    bank = LinearExperts(4, 64, d_out=64)
    bound = 1 / math.sqrt(64)
    for p in (bank.weight, bank.bias):
        assert p.abs().max() <= bound and p.abs().max() > 0.95 * bound
    mlp = MLPExperts(4, 16, 64)
    swiglu = SwiGLUExperts(4, 16, 64)
    for p, fan_in in ((mlp.w1, 16), (mlp.b1, 16), (mlp.w2, 64), (mlp.b2, 64), (swiglu.w_gate, 16),
                      (swiglu.w_up, 16), (swiglu.w_down, 64)):
        assert p.abs().max() <= 1 / math.sqrt(fan_in) and p.abs().max() > 0.9 / math.sqrt(fan_in)


def test_router_base_class_defaults():
    """The base class's own defaults (a subclass that forwards only some arguments inherits them)."""
    base = Router(4, 3, 1)
    assert base.router_dtype == "float32" and base.gate.bias is None
    assert (base.d_model, base.num_experts, base.top_k) == (4, 3, 1) and base.gate.out_features == 3
    with pytest.raises(ValueError, match=r"^d_model must be an integer >= 1, got 0$"):
        Router(0, 3, 1)
    with pytest.raises(ValueError, match=r"^top_k must be an integer between 1 and 3, got 4$"):
        Router(4, 3, 4)


def test_signature_defaults_reach_the_object():
    """Defaults a caller gets by leaving an argument out (not through MoELayer, which passes them all)."""
    assert GShardRouter(4, 3).top_k == 2 and BaseRouter(4, 3).top_k == 1 and SwitchRouter(4, 3).top_k == 1
    assert HashRouter(4, 3).top_k == 1 and LinearExperts(3, 4).d_ff == 1
    from moe_lib.routers import AuxFreeRouter, ExpertChoiceRouter
    assert AuxFreeRouter(4, 3, 2, normalize=False).normalize is False
    assert ExpertChoiceRouter(4, 3, 1).capacity_factor is None


@pytest.mark.parametrize("build, error, message", [
    (lambda: GShardRouter(4, 1), ValueError, "router='gshard' needs num_experts >= 2, got 1"),
    (lambda: GShardRouter(4, 0), ValueError, "num_experts must be an integer >= 1, got 0"),
    (lambda: GShardRouter(4, 3, normalize="yes"), TypeError, "normalize_weights must be True or False"),
    (lambda: ROUTERS["expert_choice"](4, 3, 1, capacity_factor=0.0), ValueError, "capacity_factor must be"),
    (lambda: ROUTERS["auxfree"](4, 3, 2, update_rate=-1.0), ValueError, "update_rate must be a finite number"),
    (lambda: MoELayer(4, 8, 3, router_options={"noise": 1}), ValueError,
     "router_options key 'noise' is not accepted by router='topk'; accepted: ['bias', 'normalize', "
     "'router_dtype']"),
])
def test_router_argument_messages(build, error, message):
    with pytest.raises(error) as excinfo:
        build()
    assert str(excinfo.value).startswith(message), str(excinfo.value)


def test_aux_free_bias_moves_only_in_a_training_pass():
    from moe_lib.routers import AuxFreeRouter
    router = AuxFreeRouter(4, 3, 2, update_rate=0.5)
    x = torch.randn(6, 4)
    router.eval()(x)  # inference, with gradients enabled: no move
    with torch.inference_mode():
        router.train()(x)  # training mode without gradients: no move
    assert router.expert_bias.tolist() == [0.0, 0.0, 0.0]
    router(x)
    assert router.expert_bias.abs().sum() > 0


def test_hash_of_token_ids_is_pinned():
    """The hash decides which expert every vocabulary id uses: a model trained with hash routing depends on
    it, so changing the hash (its constants or its formula) is a breaking change this test reports."""
    from moe_lib.routers import hash_to_expert
    ids = torch.tensor([0, 1, 2, 3, 17, 1000, 2**31 - 2, 2**40])
    assert hash_to_expert(ids, 8).tolist() == PINNED_HASH_SEED0
    assert hash_to_expert(ids, 8, seed=3).tolist() == PINNED_HASH_SEED3


def test_float64_inputs_and_low_precision_routers():
    """``scores`` is float32 at least: float64 inputs stay float64 even through a float32 module with a
    bias, and a bfloat16 router does not round float64 inputs (Router._linear)."""
    router = TopKRouter(4, 3, 2, bias=True)
    x = torch.randn(5, 4, dtype=torch.float64)
    logits = router.scores(x)
    assert logits.dtype == torch.float64
    expected = x @ router.gate.weight.double().T + router.gate.bias.double()
    torch.testing.assert_close(logits, expected, rtol=1e-12, atol=0)
    low = TopKRouter(4, 3, 2, router_dtype="bfloat16")
    assert low.scores(x).dtype == torch.float64 and low.scores(x.float()).dtype == torch.bfloat16


#: hash_to_expert(ids, 8) for the ids of test_hash_of_token_ids_is_pinned, seeds 0 and 3 (recorded once)
PINNED_HASH_SEED0 = [6, 1, 3, 6, 2, 6, 3, 5]
PINNED_HASH_SEED3 = [1, 3, 4, 6, 3, 5, 7, 2]
