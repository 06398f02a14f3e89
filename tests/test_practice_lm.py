"""Tests for moe_lib.practice: freezing by role, expert dropout, upcycling and merging."""
import warnings

import pytest
import torch

from moe_lib import ROUTERS, seed_everything
from moe_lib.models import LMConfig, TransformerLM, train_lm
from moe_lib.models.transformer import SwiGLU
from moe_lib.practice import (DropoutExperts, add_expert_dropout, expert_utilisation, ffn_inputs, finetune_lm, freeze_roles,
                              gate_vectors_from_hidden, merge_into_moe, parameter_roles, router_drift,
                              top_expert_assignments, upcycle, upcycle_ffn)
from moe_lib.book.tasks import TaskModel

# Routers whose per-token weights sum to 1 (renormalised top-k or the full softmax): an upcycled layer is
# then exactly the dense FFN. Excluded: "switch", "hash", "base" (one expert scaled by a gate value < 1), "expert_choice" (a
# token may be picked by no expert), "gshard" (drops the second expert at random), "soft" (experts see mixtures of tokens), "group_capacity" (drops).
SUM_TO_ONE = ["dense", "topk", "noisy_topk", "auxfree", "group_limited"]


def tiny_cfg(**kw):
    base = dict(seq_len=16, d_model=32, n_layers=2, n_heads=4, d_ff=48, ffn="dense")
    base.update(kw)
    return LMConfig(**base)


@pytest.mark.parametrize("router", [r for r in SUM_TO_ONE if r in ROUTERS])
def test_upcycled_layer_equals_dense_ffn_for_any_router(router):
    seed_everything(0)
    ffn = SwiGLU(16, 24)
    torch.nn.init.normal_(ffn.down.weight)
    x = torch.randn(3, 7, 16)
    top_k = None if router in ("dense", "hash", "base") else 2
    layer = upcycle_ffn(ffn, 4, top_k, router=router)
    with torch.no_grad():
        torch.nn.init.normal_(layer.router.gate.weight, std=3.0)  # any router: strongly non-uniform gates
        layer.train()  # noisy routers add their noise in training mode
        y = layer(x, token_ids=torch.arange(21).reshape(3, 7))
        torch.testing.assert_close(y, ffn(x), rtol=1e-5, atol=1e-6)


def test_upcycled_switch_is_not_identity_documents_the_exclusion():
    seed_everything(0)
    ffn = SwiGLU(16, 24)
    layer = upcycle_ffn(ffn, 4, 1, router="switch")
    x = torch.randn(20, 16)
    with torch.no_grad():
        assert not torch.allclose(layer(x), ffn(x))  # scaled by p < 1


def test_upcycled_transformer_reproduces_dense_model():
    seed_everything(0)
    dense = TransformerLM(tiny_cfg())
    moe = upcycle(dense, num_experts=4, top_k=2)
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(moe(idx), dense(idx), rtol=1e-5, atol=1e-5)
    assert moe.cfg.ffn == "moe" and len(moe.moe_layers()) == 2
    assert sum(p.numel() for p in moe.parameters()) > sum(p.numel() for p in dense.parameters())


def test_upcycle_rejects_bad_input():
    seed_everything(0)
    with pytest.raises(TypeError, match="dense"):
        upcycle(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="ffn"):
        upcycle(TransformerLM(tiny_cfg(ffn="moe", num_experts=4)))
    with pytest.raises(TypeError, match="ffn"):
        upcycle_ffn(torch.nn.Linear(2, 2), 4)


def _finetune_ffn_only(model, seed):
    """Change only the FFN weights of a copy of ``model`` (as FFN-only fine-tuning would)."""
    import copy
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if ".ffn." in name or name.startswith("moe.experts"):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m


@pytest.mark.parametrize("target", [0, 1, 2])
def test_merged_lm_routed_to_one_source_reproduces_it(target):
    seed_everything(0)
    base = TransformerLM(tiny_cfg())
    sources = [_finetune_ffn_only(base, s) for s in range(3)]
    d = base.cfg.d_model
    gates = torch.zeros(3, d)
    merged = merge_into_moe(sources, gates)
    with torch.no_grad():
        for layer in merged.moe_layers():  # a gate bias that always picks `target`
            layer.router.gate.bias = torch.nn.Parameter(torch.full((3,), -100.0).index_fill(0, torch.tensor(target), 100.0))
        idx = torch.randint(0, 256, (2, 16))
        torch.testing.assert_close(merged(idx), sources[target](idx), rtol=1e-5, atol=1e-5)
        # and it differs from the other sources
        other = (target + 1) % 3
        assert not torch.allclose(merged(idx), sources[other](idx), atol=1e-4)


def test_merged_task_model_reproduces_source_with_hidden_gates():
    seed_everything(0)
    base = TaskModel(6, 3, d_model=8, d_ff=16, num_experts=1, router="dense", expert="mlp")
    sources = [_finetune_ffn_only(base, s) for s in range(2)]
    x0, x1 = torch.randn(50, 6) + 5.0, torch.randn(50, 6) - 5.0  # two well-separated domains
    hidden = [ffn_inputs(base, x)[0] for x in (x0, x1)]
    gates = gate_vectors_from_hidden(hidden, scale=10.0)
    merged = merge_into_moe(sources, gates)
    with torch.no_grad():
        top = top_expert_assignments(merged, x0)
        assert (top == 0).all()
        torch.testing.assert_close(merged(x0), sources[0](x0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged(x1), sources[1](x1), rtol=1e-5, atol=1e-5)


def test_merge_rejects_bad_input():
    seed_everything(0)
    base = TransformerLM(tiny_cfg())
    with pytest.raises(TypeError, match="models"):
        merge_into_moe([base], torch.zeros(1, 32))
    with pytest.raises(ValueError, match="gate_vectors"):
        merge_into_moe([base, base], torch.zeros(3, 32))
    with pytest.raises(TypeError, match="hidden_by_domain"):
        gate_vectors_from_hidden(torch.zeros(2, 3))


@pytest.mark.parametrize("train", [("non_expert",), ("experts",), ("experts", "non_expert"), ("router",)])
def test_freezing_leaves_frozen_parameters_unchanged_after_a_step(train):
    seed_everything(0)
    model = TransformerLM(tiny_cfg(ffn="moe", num_experts=4, top_k=2))
    freeze_roles(model, train)
    roles = parameter_roles(model)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    data = torch.randint(0, 256, (400,))
    train_lm(model, data, steps=2, batch_size=4, warmup=1, weight_decay=0.1, progress=False)
    for name, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[name])
        assert changed == (roles[name] in train), (name, roles[name])


def test_parameter_roles_and_bad_roles():
    model = TransformerLM(tiny_cfg(ffn="moe", num_experts=4, top_k=2, num_shared=1))
    roles = parameter_roles(model)
    assert roles["blocks.0.ffn.moe.router.gate.weight"] == "router"
    assert roles["blocks.0.ffn.moe.experts.w_up"] == "experts"
    assert roles["blocks.0.ffn.shared.up.weight"] == "non_expert"
    assert roles["embed.weight"] == "non_expert"
    with pytest.raises(ValueError, match="train"):
        freeze_roles(model, ["routers"])
    with pytest.raises(TypeError, match="train"):
        freeze_roles(model, "router")


@pytest.mark.parametrize("kind", ["swiglu", "mlp"])
def test_expert_dropout_eval_identical_train_different(kind):
    seed_everything(0)
    model = TaskModel(6, 3, d_model=8, d_ff=16, num_experts=4, top_k=2, expert=kind)
    x = torch.randn(32, 6)
    with torch.no_grad():
        ref = model.eval()(x)
        assert add_expert_dropout(model, 0.5) == 1
        assert isinstance(model.moe.experts, DropoutExperts)
        torch.testing.assert_close(model.eval()(x), ref)
        model.moe.backend = "loop"
        torch.testing.assert_close(model.eval()(x), ref)
        assert not torch.allclose(model.train()(x), ref)
    assert parameter_roles(model)["moe.experts.bank.w1" if kind == "mlp" else "moe.experts.bank.w_up"] == "experts"
    with pytest.raises(ValueError, match="p must"):
        add_expert_dropout(model, 1.5)


def test_router_drift_and_utilisation():
    seed_everything(0)
    model = TransformerLM(tiny_cfg(ffn="moe", num_experts=4, top_k=2))
    idx = torch.randint(0, 256, (2, 16))
    a = top_expert_assignments(model, idx)
    assert a.shape == (2, 32)
    assert torch.equal(router_drift(a, a), torch.zeros(2, dtype=torch.float64))
    with torch.no_grad():
        model.blocks[0].ffn.moe.router.gate.weight.neg_()
    drift = router_drift(a, top_expert_assignments(model, idx))
    assert drift[0] > 0 and drift[1] == 0
    util = expert_utilisation(model, idx)
    torch.testing.assert_close(util.sum(1), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        router_drift(a, a[:1])


def test_finetune_lm_of_the_experts_only_changes_every_expert_and_nothing_else():
    seed_everything(0)
    model = TransformerLM(tiny_cfg(ffn="moe", num_experts=4, top_k=2))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    data = torch.randint(0, 256, (600,))
    probe = data[:32].reshape(2, 16)
    out = finetune_lm(model, data, data, train=("experts",), steps=3, batch_size=2, probe=probe)
    assert out["drift"] == 0.0  # router and everything before it frozen: routing cannot move
    roles = parameter_roles(model)
    assert out["model"] is not model and all(torch.equal(p, before[k]) for k, p in model.named_parameters())
    tuned = dict(out["model"].named_parameters())
    assert set(tuned) == set(before)
    for name, p in tuned.items():  # a copy was trained: its experts moved, everything else did not
        changed = not torch.equal(p.detach(), before[name])
        assert changed == (roles[name] == "experts"), (name, roles[name], changed)
    assert out["utilisation"].shape == (2, 4)
