"""Composable construction (issue 16): upcycling, merging and the Hugging Face converter build their MoE layers
from ready-made parts — an expert bank made from given weights (``ExpertBank.from_weights``) and a router that
takes its weights before it is injected — and expert dropout runs the wrapped bank's own formula through a
hidden-activation hook.

The book calls these functions after fixed seeds, so each one must leave its results and the global RNG
exactly where the earlier build-by-name-then-overwrite code left them. Each test below spells that earlier
procedure out (build by name, which draws the init, then copy the weights in) and compares bit for bit: the
state dict, the outputs and ``torch.get_rng_state()``.
"""
from __future__ import annotations

import dataclasses
import os
import warnings

import pytest
import torch
from torch import nn

from moe_lib import MoELayer
from moe_lib.experts import EXPERTS, ExpertBank, GLUExperts, LinearExperts, MLPExperts, SwiGLUExperts
from moe_lib.models import LMConfig, TransformerLM
from moe_lib.models.transformer import SwiGLU
from moe_lib.practice import DropoutExperts, add_expert_dropout, merge_into_moe, upcycle, upcycle_ffn
from moe_lib.routers import ROUTERS

BANK_OPTIONS = {"linear": {}, "mlp": {"activation": "relu"}, "swiglu": {}, "glu": {"activation": "gelu"}}


def _same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# ------------------------------------------------------------------------------------ the bank from weights
@pytest.mark.parametrize("kind", sorted(EXPERTS))
def test_from_weights_draws_nothing_and_consume_init_draws_replays_the_constructor(kind):
    cls, options = EXPERTS[kind], BANK_OPTIONS[kind]
    torch.manual_seed(0)
    built = cls(3, 8, 12, 5, **options)
    after_constructor = torch.get_rng_state()
    weights = [getattr(built, name).detach().clone() for name in cls.stacked]

    torch.manual_seed(0)
    seeded = torch.get_rng_state()
    bank = cls.from_weights(*weights, **options)
    assert torch.equal(torch.get_rng_state(), seeded)  # no draw
    bank.consume_init_draws()
    assert torch.equal(torch.get_rng_state(), after_constructor)  # exactly the constructor's draws

    assert type(bank) is cls and (bank.num_experts, bank.d_model, bank.d_out) == (3, 8, 5)
    assert bank.d_ff == (1 if kind == "linear" else 12)
    assert getattr(bank, "activation", None) == options.get("activation")
    _same_state(bank, built)
    for name, w in zip(cls.stacked, weights):  # copies: the given tensors are not the parameters
        assert getattr(bank, name).data_ptr() != w.data_ptr()
    x = torch.randn(4, 8)
    assert torch.equal(bank.forward_expert(1, x), built.forward_expert(1, x))


def test_from_weights_keeps_dtype_and_makes_views_contiguous():
    w_gate = torch.randn(2, 12, 8, dtype=torch.float64).transpose(1, 2)  # [2, 8, 12], not contiguous
    bank = SwiGLUExperts.from_weights(w_gate, torch.randn(2, 8, 12, dtype=torch.float64),
                                      torch.randn(1, 12, 8, dtype=torch.float64).expand(2, -1, -1))
    assert bank.w_gate.dtype == torch.float64 and bank.w_gate.is_contiguous() and bank.w_down.is_contiguous()
    assert torch.equal(bank.w_gate, w_gate) and bank.d_ff == 12
    glu = GLUExperts.from_weights(bank.w_gate, bank.w_up, bank.w_down, activation="relu")
    assert glu.activation == "relu" and glu.kind == "glu"


def test_from_weights_names_what_is_wrong():
    w = torch.randn(2, 8, 12)
    with pytest.raises(TypeError, match=r"SwiGLUExperts.from_weights takes 3 weights \(w_gate, w_up, w_down\), got 2"):
        SwiGLUExperts.from_weights(w, w)
    with pytest.raises(ValueError, match=r"w_down must have shape \[2, 12, 12\] .*got \[2, 8, 12\]"):
        SwiGLUExperts.from_weights(w, w, w)
    with pytest.raises(ValueError, match=r"w_up must have shape \[2, 8, 12\] .*got \[2, 8, 11\]"):
        SwiGLUExperts.from_weights(w, torch.randn(2, 8, 11), torch.randn(2, 12, 8))
    with pytest.raises(TypeError, match="w_up must be a torch.Tensor, got list"):
        SwiGLUExperts.from_weights(w, [[1.0]], w)
    with pytest.raises(ValueError, match=r"b1 must be stacked \[num_experts, \.\.\.\], got shape \[12\]"):
        MLPExperts.from_weights(w, torch.zeros(12), torch.randn(2, 12, 8), torch.zeros(2, 8))
    with pytest.raises(ValueError, match="activation"):
        MLPExperts.from_weights(w, torch.zeros(2, 12), torch.randn(2, 12, 8), torch.zeros(2, 8), activation="nope")
    with pytest.raises(TypeError, match="ExpertBank names no stacked parameters"):
        ExpertBank.from_weights(w)


# ------------------------------------------------------------------------------------ the hidden hook
@pytest.mark.parametrize("kind", ["mlp", "swiglu", "glu"])
def test_every_view_applies_the_hidden_hook_between_activation_and_output(kind):
    torch.manual_seed(1)
    bank = EXPERTS[kind](3, 8, 12, **BANK_OPTIONS[kind])
    x = torch.randn(3, 4, 8)  # 4 rows per expert: grouped_mm wants float32 widths that are multiples of 4
    offsets = torch.tensor([0, 4, 8, 12])
    index = torch.arange(3).repeat_interleave(4)
    seen = []

    def record(h):
        seen.append(tuple(h.shape))
        return h

    def zero(h):
        return torch.zeros_like(h)

    blocks = [(e, x[e]) for e in range(3)]
    plain = {"expert": [bank.forward_expert(e, x[e]) for e in range(3)], "blocks": bank.forward_blocks(blocks),
             "padded": bank.forward_padded(x), "grouped": bank.forward_grouped(x.reshape(12, 8), offsets, index)}
    hooked = {"expert": [bank.forward_expert(e, x[e], hidden_hook=record) for e in range(3)],
              "blocks": bank.forward_blocks(blocks, hidden_hook=record),
              "padded": bank.forward_padded(x, hidden_hook=record),
              "grouped": bank.forward_grouped(x.reshape(12, 8), offsets, index, hidden_hook=record)}
    assert seen == [(4, 12)] * 6 + [(3, 4, 12), (12, 12)]  # the hidden activations, d_ff wide
    for view in plain:  # an identity hook changes no bit
        a, b = plain[view], hooked[view]
        assert all(torch.equal(u, v) for u, v in zip(a, b)) if isinstance(a, list) else torch.equal(a, b)
    # a hook that zeroes the hidden activations leaves only the output bias (none for gated experts)
    bias = bank.b2[0] if kind == "mlp" else torch.zeros(8)
    assert torch.equal(bank.forward_expert(0, x[0], hidden_hook=zero), bias.expand(4, 8))
    assert torch.equal(bank.forward_padded(x, hidden_hook=zero)[0], bias.expand(4, 8))


def test_linear_experts_refuse_a_hidden_hook():
    bank = LinearExperts(2, 8, d_out=4)
    with pytest.raises(ValueError, match="hidden_hook must be None for linear experts"):
        bank.forward_expert(0, torch.randn(3, 8), hidden_hook=lambda h: h)
    with pytest.raises(ValueError, match="hidden_hook must be None for linear experts"):
        bank.forward_padded(torch.randn(2, 3, 8), hidden_hook=lambda h: h)


def _dropped_reference(bank, e, x, p):
    """Expert dropout as it was written before the hook: the formula restated, dropout on the hidden layer."""
    if bank.kind == "mlp":
        h = nn.functional.dropout(torch.relu(x @ bank.w1[e] + bank.b1[e]), p, True)
        return h @ bank.w2[e] + bank.b2[e]
    act = nn.functional.gelu if bank.kind == "glu" else nn.functional.silu
    h = nn.functional.dropout(act(x @ bank.w_gate[e]) * (x @ bank.w_up[e]), p, True)
    return h @ bank.w_down[e]


@pytest.mark.parametrize("kind", ["mlp", "swiglu", "glu"])
def test_dropout_experts_is_the_bank_in_eval_and_the_earlier_dropout_in_training(kind):
    torch.manual_seed(2)
    bank = EXPERTS[kind](3, 8, 12, **BANK_OPTIONS[kind])
    dropped = DropoutExperts(bank, 0.3)
    x = torch.randn(5, 8)
    blocks = [(2, x), (0, x[:3])]
    dropped.eval()
    assert all(torch.equal(dropped.forward_expert(e, x), bank.forward_expert(e, x)) for e in range(3))
    assert all(torch.equal(a, b) for a, b in zip(dropped.forward_blocks(blocks), bank.forward_blocks(blocks)))
    assert torch.equal(dropped.forward_padded(x.expand(3, 5, 8)), bank.forward_padded(x.expand(3, 5, 8)))
    dropped.train()
    torch.manual_seed(3)
    got = [dropped.forward_expert(e, x) for e in range(3)] + dropped.forward_blocks(blocks)
    rng = torch.get_rng_state()
    torch.manual_seed(3)
    want = [_dropped_reference(bank, e, x, 0.3) for e in range(3)] + [_dropped_reference(bank, e, xe, 0.3)
                                                                      for e, xe in blocks]
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert not torch.equal(got[0], bank.forward_expert(0, x))  # dropout did act


@pytest.mark.parametrize("backend", ["loop", "torch"])
def test_expert_dropout_in_a_layer_is_the_layer_in_eval_mode(backend):
    torch.manual_seed(4)
    layer = MoELayer(8, 12, 4, 2, backend=backend)
    x = torch.randn(10, 8)
    before = layer(x)
    add_expert_dropout(layer, 0.5)
    assert torch.equal(layer.eval()(x), before)
    assert not torch.equal(layer.train()(x), before)


# ------------------------------------------------------------------------------------ upcycling
def _dense_ffn(seed=5, d_model=8, d_ff=16):
    torch.manual_seed(seed)
    return SwiGLU(d_model, d_ff)


def _copy_ffn_into(bank, ffn, experts=None):
    """The earlier code's way: overwrite a bank drawn by its constructor with the FFN's weights."""
    with torch.no_grad():
        for name, lin in (("w_gate", ffn.gate), ("w_up", ffn.up), ("w_down", ffn.down)):
            w = getattr(bank, name)
            for e in range(w.shape[0]) if experts is None else experts:
                w[e].copy_(lin.weight.t())


@pytest.mark.parametrize("top_k, kwargs", [(2, {}), (None, {"router": "switch", "capacity_factor": 1.5,
                                                            "router_bias": True}),
                                           (2, {"router": "noisy_topk", "backend": "loop"})])
def test_upcycle_ffn_matches_the_layer_built_by_name_and_overwritten(top_k, kwargs):
    ffn = _dense_ffn()
    torch.manual_seed(6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = MoELayer(8, 16, 4, top_k, **kwargs)
    _copy_ffn_into(reference.experts, ffn)
    rng = torch.get_rng_state()
    torch.manual_seed(6)
    layer = upcycle_ffn(ffn, 4, top_k, **kwargs)
    assert torch.equal(torch.get_rng_state(), rng)
    _same_state(layer, reference)
    assert layer.router.name == reference.router.name and layer.capacity_factor == reference.capacity_factor
    x = torch.randn(6, 8)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    assert torch.equal(y, reference(x))
    with torch.no_grad():  # the experts are copies: training the layer leaves the dense FFN alone
        layer.experts.w_gate.add_(1.0)
    assert torch.equal(ffn.gate.weight, _dense_ffn().gate.weight)


def test_upcycle_ffn_takes_a_ready_router_and_refuses_other_expert_kinds():
    ffn = _dense_ffn()
    router = ROUTERS["topk"](8, 4, 1)
    assert upcycle_ffn(ffn, 4, router=router).router is router
    with pytest.raises(ValueError, match="expert must be 'swiglu' to copy a SwiGLU FFN, got 'mlp'"):
        upcycle_ffn(ffn, 4, expert="mlp")


CFG = LMConfig(vocab_size=32, seq_len=8, d_model=16, n_layers=2, n_heads=2, d_ff=24, ffn="dense")


def _upcycle_by_overwriting(dense, num_experts, top_k, router="topk", router_std=0.02, **overrides):
    """The earlier ``upcycle``: build the MoE LM by its config, then per block draw a spare upcycled layer, copy
    its experts in and re-initialise the router."""
    cfg = dataclasses.replace(dense.cfg, ffn="moe", num_experts=num_experts, top_k=top_k, router=router,
                              num_shared=0, name=f"upcycled {dense.cfg.name}".strip(), **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        moe = TransformerLM(cfg)
    moe.load_state_dict({k: v for k, v in dense.state_dict().items() if ".ffn." not in k}, strict=False)
    for block_d, block_m in zip(dense.blocks, moe.blocks):
        spare = MoELayer(cfg.d_model, cfg.d_ff, num_experts)  # draws a router and an expert init
        _copy_ffn_into(spare.experts, block_d.ffn)
        block_m.ffn.moe.experts.load_state_dict(spare.experts.state_dict())
        nn.init.normal_(block_m.ffn.moe.router.gate.weight, std=router_std)
    return moe


@pytest.mark.parametrize("args, kwargs", [((4, 2), {}),
                                          ((3, 1), {"router": "switch", "moe_options": {"capacity_factor": 1.25},
                                                    "router_std": 0.1, "aux_loss_coef": 0.0})])
def test_upcycle_matches_the_model_built_by_config_and_overwritten(args, kwargs):
    torch.manual_seed(8)
    dense = TransformerLM(CFG)
    torch.manual_seed(9)
    reference = _upcycle_by_overwriting(dense, *args, **kwargs)
    rng = torch.get_rng_state()
    torch.manual_seed(9)
    moe = upcycle(dense, *args, **kwargs)
    assert torch.equal(torch.get_rng_state(), rng)
    _same_state(moe, reference)
    assert [m.training for m in moe.modules()] == [m.training for m in reference.modules()]
    for layer, ref in zip(moe.moe_layers(), reference.moe_layers()):
        assert type(layer.router) is type(ref.router) and layer.capacity_factor == ref.capacity_factor
        assert (layer.aux_loss_coef, layer.z_loss_coef, layer.backend) == (ref.aux_loss_coef, ref.z_loss_coef,
                                                                          ref.backend)
    idx = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(10))
    assert torch.equal(moe.eval()(idx), reference.eval()(idx))


def test_upcycle_refuses_experts_that_cannot_hold_the_dense_ffn():
    dense = TransformerLM(CFG)
    with pytest.raises(ValueError, match="moe_options must leave expert='swiglu' .*got expert='mlp'"):
        upcycle(dense, 2, 1, moe_options={"expert": "mlp"})


# ------------------------------------------------------------------------------------ merging
def _merge_by_overwriting(models, gates, top_k=1):
    """The earlier ``merge_into_moe`` for TransformerLMs: build the merged model, overwrite experts and gates."""
    cfg = dataclasses.replace(models[0].cfg, ffn="moe", num_experts=len(models), top_k=top_k, router="topk",
                              num_shared=0, name="merged")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = TransformerLM(cfg)
    states = [m.state_dict() for m in models]
    merged.load_state_dict({k: torch.stack([s[k] for s in states]).mean(0) for k in states[0] if ".ffn." not in k},
                           strict=False)
    with torch.no_grad():
        for layer, block in enumerate(merged.blocks):
            for e, source in enumerate(models):
                _copy_ffn_into(block.ffn.moe.experts, source.blocks[layer].ffn, experts=[e])
            block.ffn.moe.router.gate.weight.copy_(gates[layer])
    return merged.eval()


def test_merge_into_moe_matches_the_model_built_by_config_and_overwritten():
    torch.manual_seed(11)
    sources = [TransformerLM(CFG) for _ in range(3)]
    gates = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(12))
    torch.manual_seed(13)
    reference = _merge_by_overwriting(sources, gates, top_k=2)
    rng = torch.get_rng_state()
    torch.manual_seed(13)
    merged = merge_into_moe(sources, gates, top_k=2)
    assert torch.equal(torch.get_rng_state(), rng)
    _same_state(merged, reference)
    assert not merged.training and all(not m.training for m in merged.modules())
    idx = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(14))
    assert torch.equal(merged(idx), reference(idx))
    layer = merged.blocks[1].ffn.moe
    assert torch.equal(layer.router.gate.weight, gates[1])
    assert layer.experts.w_up.data_ptr() != sources[0].blocks[1].ffn.up.weight.data_ptr()


def test_merge_into_moe_of_task_models_keeps_each_source_expert_and_its_activation():
    from moe_lib.practice.merge import TaskModel  # wherever the book keeps it, merge uses this class

    torch.manual_seed(15)
    sources = [TaskModel(5, 3, d_model=8, d_ff=12, num_experts=1, router="dense", expert="mlp", activation="relu")
               for _ in range(2)]
    gates = torch.randn(2, 8, generator=torch.Generator().manual_seed(16))
    torch.manual_seed(17)
    TaskModel(5, 3, d_model=8, d_ff=12, num_experts=2, router="topk", top_k=1, expert="mlp")  # what merging builds
    after_constructor = torch.get_rng_state()
    torch.manual_seed(17)
    merged = merge_into_moe(sources, gates)
    assert torch.equal(torch.get_rng_state(), after_constructor)  # no draw beyond the model's constructor
    bank = merged.moe.experts
    assert bank.activation == "relu" and bank.num_experts == 2
    for e, source in enumerate(sources):
        for name in bank.stacked:
            assert torch.equal(getattr(bank, name)[e], getattr(source.moe.experts, name)[0])
    assert torch.equal(merged.moe.router.gate.weight, gates)
    h = merged.norm1(merged.embed(torch.randn(4, 5)))
    for e, source in enumerate(sources):  # expert e computes source e's FFN
        assert torch.equal(bank.forward_expert(e, h), source.moe.experts.forward_expert(0, h))
    with pytest.raises(ValueError, match=r"one kind and activation, got \['mlp \(gelu\)', 'mlp \(relu\)'\]"):
        merge_into_moe([sources[0], TaskModel(5, 3, d_model=8, d_ff=12, num_experts=1, router="dense",
                                              expert="mlp")], gates)


# ------------------------------------------------------------------------------------ Hugging Face blocks
def _constructor_draws(family, block):
    """What the earlier converter drew: the routed bank, the router (built by name), the shared bank and the
    shared expert's gate, each by its constructor."""
    if family == "switch_transformers":
        num_experts, d_model = block.router.classifier.weight.shape
        MLPExperts(num_experts, d_model, block.experts["expert_0"].wi.weight.shape[0])
        ROUTERS["group_capacity"](d_model, num_experts, 1)
        return
    num_experts, d_model = block.gate.weight.shape
    experts = block.experts
    d_ff = experts.down_proj.shape[-1] if experts.down_proj.shape[1] == d_model else experts.down_proj.shape[1]
    SwiGLUExperts(num_experts, d_model, d_ff)
    ROUTERS["topk"](d_model, num_experts, 1)
    shared = getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)
    if shared is not None:
        SwiGLUExperts(1, d_model, shared.gate_proj.weight.shape[0])
        if getattr(block, "shared_expert_gate", None) is not None:
            nn.Linear(d_model, 1, bias=block.shared_expert_gate.bias is not None)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "switch_transformers"])
def test_from_transformers_draws_what_the_constructors_drew_and_copies_the_weights(family):
    pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from moe_lib.interop import from_transformers, random_block

    block = random_block(family, seed=1)
    torch.manual_seed(18)
    _constructor_draws(family, block)
    rng = torch.get_rng_state()
    torch.manual_seed(18)
    converted = from_transformers(block)
    assert torch.equal(torch.get_rng_state(), rng)
    moe = converted.moe
    if family == "switch_transformers":
        assert torch.equal(moe.router.gate.weight, block.router.classifier.weight)
        assert torch.equal(moe.experts.w1[3], block.experts["expert_3"].wi.weight.t())
        assert not moe.experts.b1.any() and moe.router.expert_capacity == block.router.expert_capacity
    else:
        assert torch.equal(moe.router.gate.weight, block.gate.weight)
        if family == "deepseek_v3":
            assert torch.equal(moe.router.score_bias, block.gate.e_score_correction_bias)
            assert (moe.router.n_group, moe.router.topk_group, moe.router.scaling_factor) == (4, 2, 2.5)
    assert moe.aux_loss_coef == 0.0
