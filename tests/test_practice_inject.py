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

import pytest
import torch
from torch import nn

from moe_lib import MoELayer
from moe_lib.experts import EXPERTS, ExpertBank, GLUExperts, LinearExperts, MLPExperts, SwiGLUExperts
from moe_lib.practice import DropoutExperts, add_expert_dropout

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
