"""moe_lib.patch_transformers / unpatch_transformers on whole Hugging Face models.

Tiny random models of every supported family (2 layers, width 32, built from configs: nothing is
downloaded), fp32, compared with an untouched copy of the same model: logits in eval mode, greedy
generation, one training step's loss and gradients (with the load-balancing loss on, so the router
logits must reach transformers' hooks), and the bit-for-bit round trip of unpatch. A family whose model
class transformers lacks fails here (``random_model`` raises); nothing is skipped per family.
"""
import copy
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

pytest.importorskip("transformers")

import moe_lib  # noqa: E402
from moe_lib.interop import FAMILIES, PatchedMoEBlock, patched_blocks, reset_routing_stats  # noqa: E402
from moe_lib.interop.patch import SUPPORTED_MODEL_TYPES, _hf_tensors, random_model  # noqa: E402
from moe_lib.utils import relative_norm_error  # noqa: E402

TOL = 1e-5
FAMILY_LIST = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "switch_transformers"]


def _inputs(family, batch=2, seq=11, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kw = {"input_ids": torch.randint(2, 96, (batch, seq), generator=gen)}
    if family == "switch_transformers":
        kw["decoder_input_ids"] = torch.randint(2, 96, (batch, 7), generator=gen)
    return kw


def _pair(family, **config):
    """(patched model, untouched copy, state_dict of the model before patching)."""
    model = random_model(family, seed=FAMILY_LIST.index(family), **config)
    reference = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert moe_lib.patch_transformers(model) is model
    return model, reference, before


def test_every_family_is_tested():
    assert set(FAMILY_LIST) == set(FAMILIES) == set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("family", FAMILY_LIST)
def test_patched_model_equals_original(family):
    model, reference, before = _pair(family)
    blocks = patched_blocks(model)
    # every sparse layer is patched (both stacks of Switch's encoder-decoder), and nothing else changed
    assert len(blocks) == (4 if family == "switch_transformers" else 2)  # Switch: 2 encoder + 2 decoder
    assert all(b.family == family and b.backend == "torch" and not b.training for _, b in blocks)
    assert not any(type(m).__name__ in ("MixtralSparseMoeBlock", "DeepseekV3MoE", "SwitchTransformersSparseMLP")
                   or type(m).__name__.endswith("SparseMoeBlock") for m in model.modules())
    # the weights are not held twice: the moe_lib modules own them, the kept blocks hold meta tensors
    hf_numel = sum(p.numel() for p in reference.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == hf_numel
    for _, b in blocks:
        moved = _hf_tensors(b, b.original)
        held = dict(b.original.named_parameters()) | dict(b.original.named_buffers())
        assert all(held[name].is_meta for name in moved)
    # eval-mode logits, then greedy generation of 16 tokens
    inputs = _inputs(family)
    with torch.no_grad():
        expected = reference(**inputs).logits
        got = model(**inputs).logits
    assert relative_norm_error(got, expected) <= TOL
    prompt = _inputs(family, batch=2, seq=6, seed=1)["input_ids"]
    kw = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False)
    out_ref, out = reference.generate(prompt, **kw), model.generate(prompt, **kw)
    assert out.shape[1] >= 16 and torch.equal(out, out_ref)


@pytest.mark.parametrize("family", FAMILY_LIST)
def test_training_step_gradients_equal_the_original(family):
    """Loss with the auxiliary router losses on (``output_router_logits=True``), backward, and every
    Hugging Face parameter's gradient compared: outside the MoE blocks by name, inside them through the
    write-back layout (the moe_lib gradients rearranged exactly as unpatch rearranges the weights)."""
    model, reference, _ = _pair(family)
    model.train()
    reference.train()
    inputs = _inputs(family)
    labels = inputs.get("decoder_input_ids", inputs["input_ids"])
    out = model(**inputs, labels=labels, output_router_logits=True)
    out_ref = reference(**inputs, labels=labels, output_router_logits=True)
    assert relative_norm_error(out.loss.detach(), out_ref.loss.detach()) <= TOL
    # the router logits transformers collected, and the auxiliary losses it computed from them
    logit_keys = [k for k in out_ref.keys() if k.endswith("router_logits")]
    loss_keys = [k for k in out_ref.keys() if k.endswith(("aux_loss", "z_loss"))]
    assert logit_keys and list(out.keys()) == list(out_ref.keys())
    for key in logit_keys:
        assert len(out[key]) == len(out_ref[key]) == 2, key  # Switch: 2 sparse layers per stack
        for a, b in zip(out[key], out_ref[key]):
            assert relative_norm_error(a.detach(), b.detach()) <= 1e-6, key
    assert bool(loss_keys) == (family != "deepseek_v3")  # DeepSeek-V3 balances without an auxiliary loss
    for key in loss_keys:
        assert float(out_ref[key].detach()) > 0, key
        assert relative_norm_error(out[key].detach(), out_ref[key].detach()) <= TOL, key
    out.loss.backward()
    out_ref.loss.backward()
    blocks = patched_blocks(model)
    grads = {n: p.grad for n, p in model.named_parameters()
             if p.grad is not None and not any(n.startswith(f"{name}.") for name, _ in blocks)}
    for name, b in blocks:
        grads |= {f"{name}.{k}": g for k, g in _hf_tensors(b, b.original, get=lambda p: p.grad).items()
                  if g is not None}  # (not the buffer of DeepSeek-V3's correction bias)
    # (an expert no token reached has no gradient in transformers and a zero one in moe_lib)
    expected = {n: torch.zeros_like(p) if p.grad is None else p.grad
                for n, p in reference.named_parameters() if p.requires_grad}
    assert set(grads) == set(expected)
    worst = max(relative_norm_error(grads[n], expected[n]) for n in expected)
    assert worst <= TOL, worst
    # the routers do get a gradient (from the task loss and the load-balancing loss)
    assert all(b.moe.router.gate.weight.grad.abs().sum() > 0 for _, b in patched_blocks(model))


@pytest.mark.parametrize("family", FAMILY_LIST)
def test_unpatch_restores_the_weights_bit_for_bit(family):
    model, reference, before = _pair(family)
    with torch.no_grad():
        model(**_inputs(family))
    assert moe_lib.unpatch_transformers(model) is model
    after = model.state_dict()
    assert list(after) == list(before)
    for k in before:
        a, b = after[k], before[k]
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), k
        assert a.is_contiguous(), k
    assert not any(isinstance(m, PatchedMoEBlock) for m in model.modules())
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    with torch.no_grad():
        assert torch.equal(model(**_inputs(family)).logits, reference(**_inputs(family)).logits)


def test_training_the_patched_model_carries_over_to_unpatch():
    """One SGD step on the patched model and on the original: unpatch returns the trained weights (the
    same as the original's after its step, up to float rounding of equal gradients), exactly the bits the
    moe_lib parameters hold."""
    model, reference, before = _pair("qwen2_moe")
    for m in (model, reference):
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        m.train()
        m(**_inputs("qwen2_moe"), labels=_inputs("qwen2_moe")["input_ids"]).loss.backward()
        opt.step()
    with torch.no_grad():
        held = {f"{n}.{k}": v.clone() for n, b in patched_blocks(model) for k, v in _hf_tensors(b, b.original).items()}
    moe_lib.unpatch_transformers(model)
    after, trained = model.state_dict(), reference.state_dict()
    for k, v in held.items():
        assert torch.equal(after[k], v)
        assert not torch.equal(after[k], before[k]) or k.endswith("e_score_correction_bias"), k
    assert max(relative_norm_error(after[k], trained[k]) for k in trained) <= TOL


def test_save_pretrained_after_unpatch_writes_the_original_format(tmp_path):
    model, reference, _ = _pair("mixtral")
    moe_lib.unpatch_transformers(model)
    model.save_pretrained(tmp_path)
    loaded = type(reference).from_pretrained(tmp_path).eval()
    ref_state = reference.state_dict()
    assert all(torch.equal(v, ref_state[k]) for k, v in loaded.state_dict().items())


def test_router_logits_reach_hooks_installed_before_patching():
    """transformers installs its output hooks once, on the first output_router_logits call; the
    patched blocks' logits taps get theirs at patch time."""
    model = random_model("olmoe", seed=3)
    inputs = _inputs("olmoe")
    with torch.no_grad():
        before = model(**inputs, output_router_logits=True)
        moe_lib.patch_transformers(model)
        after = model(**inputs, output_router_logits=True)
    assert len(after.router_logits) == len(before.router_logits) == 2
    for a, b in zip(after.router_logits, before.router_logits):
        assert relative_norm_error(a, b) <= 1e-6
    assert relative_norm_error(after.aux_loss, before.aux_loss) <= TOL


def test_router_logits_after_unpatching_when_hooks_came_while_patched():
    """Hooks installed while the model was patched went to the taps; unpatching gives the original
    routers theirs."""
    model, reference, _ = _pair("qwen2_moe")
    inputs = _inputs("qwen2_moe")
    with torch.no_grad():
        model(**inputs, output_router_logits=True)
        moe_lib.unpatch_transformers(model)
        after = model(**inputs, output_router_logits=True)
        expected = reference(**inputs, output_router_logits=True)
    assert len(after.router_logits) == 2
    assert relative_norm_error(after.aux_loss, expected.aux_loss) == 0.0


def test_every_backend_and_backend_switch():
    """The patched blocks run on each moe_lib backend (Triton in its interpreter without CUDA)."""
    model, reference, _ = _pair("deepseek_v3")
    inputs = _inputs("deepseek_v3", batch=1, seq=6)
    with torch.no_grad():
        expected = reference(**inputs).logits
    for backend in ("loop", "grouped_mm", "triton"):
        for _, b in patched_blocks(model):
            b.backend = backend
        with torch.no_grad():
            assert relative_norm_error(model(**inputs).logits, expected) <= TOL, backend
    other = moe_lib.patch_transformers(random_model("deepseek_v3", seed=4), backend="loop")
    assert all(b.backend == "loop" for _, b in patched_blocks(other))


def test_routing_report_after_forward_and_generate():
    model, _, _ = _pair("mixtral")
    with torch.no_grad():
        model(**_inputs("mixtral", batch=3, seq=5))
    total, last = moe_lib.routing_report(model), moe_lib.routing_report(model, last=True)
    assert [r["layer"] for r in total] == [0, 1]
    assert [r["name"] for r in total] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for t, one in zip(total, last):  # one pass: the accumulated statistics are routing_stats' own
        assert t["passes"] == 1 and t["tokens"] == one["tokens"] == 15
        for key in ("assignments", "load", "processed", "assignments_dropped", "tokens_dropped"):
            assert t[key] == one[key], key
        for key in ("load_cv", "max_violation", "experts_used_fraction", "gate_entropy", "router_entropy",
                    "dropped_fraction"):
            assert t[key] == pytest.approx(one[key], rel=1e-12, abs=1e-12), key
        assert sum(t["load"]) == 15 * 2
    reset_routing_stats(model)
    assert all(r["passes"] == 0 and r["tokens"] == 0 for r in moe_lib.routing_report(model))
    prompt = _inputs("mixtral", batch=2, seq=6)["input_ids"]
    model.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    for r in moe_lib.routing_report(model):  # prefill (2 x 6 tokens) + 15 decode steps of 2 tokens
        assert r["passes"] == 16 and r["tokens"] == 12 + 15 * 2 and sum(r["load"]) == 2 * r["tokens"]
        assert r["assignments_dropped"] == 0 and r["dropped_fraction"] == 0.0


def test_routing_report_counts_switch_drops():
    """Capacity 1 per expert per sequence: most tokens overflow, and the report counts them."""
    model = moe_lib.patch_transformers(random_model("switch_transformers", expert_capacity=1))
    inputs = _inputs("switch_transformers", batch=2, seq=10)
    with torch.no_grad():
        model(**inputs)
    rows = moe_lib.routing_report(model)
    encoder = [r for r in rows if r["name"].startswith("encoder.")]
    assert len(encoder) == 2
    for r in encoder:  # 2 sequences x 10 tokens, at most 1 token per expert per sequence kept (4 experts)
        # the group-capacity router marks an overflowing choice invalid: it is not an assignment, and its
        # token, which has no other choice, is a dropped token (the definitions of metrics.routing_stats)
        assert r["tokens"] == 20 and r["assignments"] <= 2 * 4
        assert r["tokens_dropped"] == 20 - r["assignments"] >= 20 - 2 * 4
        assert sum(r["processed"]) == sum(r["load"]) == r["assignments"]


def test_init_weights_runs_on_a_patched_model():
    """transformers' initialiser visits every module of a router class; the logits taps are such modules
    and must not make it fail (what it redraws is its business: init_weights reinitialises the model)."""
    model = moe_lib.patch_transformers(random_model("deepseek_v3"))
    model.init_weights()
    with torch.no_grad():
        assert torch.isfinite(model(**_inputs("deepseek_v3")).logits).all()
    assert not any(k.endswith(("router_logits.weight", "e_score_correction_bias")) for k in model.state_dict())


def test_a_frozen_block_stays_frozen():
    model = random_model("qwen3_moe")
    model.model.layers[0].mlp.requires_grad_(False)
    moe_lib.patch_transformers(model)
    assert not any(p.requires_grad for p in model.model.layers[0].mlp.parameters())
    assert all(p.requires_grad for p in model.model.layers[1].mlp.parameters())


# ------------------------------------------------------------------------------------ bad input
def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2))


@pytest.mark.parametrize("bad", ["llama", "linear", "string"])
def test_unsupported_model_names_its_class_and_the_families(bad):
    model = {"llama": _llama, "linear": lambda: nn.Linear(4, 4), "string": lambda: "mixtral"}[bad]()
    with pytest.raises(TypeError) as err:
        moe_lib.patch_transformers(model)
    message = str(err.value)
    assert {"llama": "LlamaForCausalLM", "linear": "Linear", "string": "str"}[bad] in message
    for family in FAMILIES.values():
        assert family["name"] in message


def test_model_without_a_sparse_layer_is_an_error():
    model = random_model("qwen2_moe", mlp_only_layers=[0, 1])
    with pytest.raises(TypeError, match=r"Qwen2MoeForCausalLM \(model_type 'qwen2_moe'\) has no sparse MoE block"):
        moe_lib.patch_transformers(model)


def test_bad_backend_names_the_accepted_ones_and_changes_nothing():
    model = random_model("olmoe")
    with pytest.raises(ValueError, match="unknown backend 'cuda'; accepted values: 'grouped_mm', 'loop', "
                                         "'torch', 'triton'"):
        moe_lib.patch_transformers(model, backend="cuda")
    assert not patched_blocks(model)
    moe_lib.patch_transformers(model)
    with pytest.raises(ValueError, match="backend"):
        patched_blocks(model)[0][1].backend = "cutlass"


def test_patch_twice_unpatch_unpatched_and_report_unpatched_are_errors():
    model = random_model("olmoe")
    with pytest.raises(ValueError, match="OlmoeForCausalLM has no block patched"):
        moe_lib.unpatch_transformers(model)
    with pytest.raises(ValueError, match="has no block patched"):
        moe_lib.routing_report(model)
    moe_lib.patch_transformers(model)
    with pytest.raises(ValueError, match="already patched"):
        moe_lib.patch_transformers(model)
    with pytest.raises(ValueError, match="has not run a forward pass"):
        moe_lib.routing_report(model, last=True)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        moe_lib.unpatch_transformers("model")


def test_without_transformers_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install moe-lib\[interop\]"):
        moe_lib.patch_transformers(nn.Linear(2, 2))


def test_exported_from_the_package():
    assert moe_lib.patch_transformers is moe_lib.interop.patch_transformers
    assert moe_lib.unpatch_transformers is moe_lib.interop.unpatch_transformers
    assert moe_lib.routing_report is moe_lib.interop.routing_report
    for name in ("patch_transformers", "unpatch_transformers", "routing_report"):
        assert name in moe_lib.__all__


def test_a_block_that_would_not_round_trip_is_refused_and_nothing_changes():
    """A block whose tensors have two dtypes cannot live in one moe_lib module without rounding: patching
    says so, and no block of the model (not even the convertible first one) is touched."""
    model = random_model("deepseek_v3")
    model.model.layers[1].mlp.experts.to(torch.bfloat16)  # its router stays float32
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="DeepseekV3MoE: tensor 'gate.weight' would not round-trip bit for bit"):
        moe_lib.patch_transformers(model)
    assert not patched_blocks(model)
    after = model.state_dict()
    assert all(not v.is_meta and torch.equal(v, before[k]) for k, v in after.items())


def test_training_only_jitter_is_announced():
    with pytest.warns(UserWarning, match="router_jitter_noise=0.01 acts only in train"):
        moe_lib.patch_transformers(random_model("mixtral", router_jitter_noise=0.01))


def test_statistics_can_be_switched_off():
    model = moe_lib.patch_transformers(random_model("olmoe"), record_stats=False)
    with torch.no_grad():
        model(**_inputs("olmoe"))
    assert all(r["passes"] == 0 for r in moe_lib.routing_report(model))
    assert all(r["tokens"] == 22 for r in moe_lib.routing_report(model, last=True))
