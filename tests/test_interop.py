"""moe_lib.from_transformers: Hugging Face sparse-MoE blocks rebuilt on MoELayer give the same outputs.

Random small configs only (nothing is downloaded: HF_HUB_OFFLINE=1). Every family is checked on several
configs — top-k and normalisation variations, odd sizes, shared experts on and off — in eval mode, on
both moe_lib backends: output relative error <= 1e-5 in fp32, the same router logits, the same set of
experts per token, the same gate values, and (Switch) the same dropped tokens.
"""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

pytest.importorskip("transformers")

import moe_lib  # noqa: E402
from moe_lib.interop import (  # noqa: E402
    FAMILIES,
    SUPPORTED_BLOCKS,
    ConvertedMoEBlock,
    equivalence,
    from_transformers,
    random_block,
)
from moe_lib.interop.hf import hf_routing  # noqa: E402

TOL = 1e-5

CONFIGS = {
    "mixtral": [
        {},
        {"hidden_size": 19, "intermediate_size": 7, "num_local_experts": 5, "num_experts_per_tok": 3},
        {"hidden_size": 24, "intermediate_size": 40, "num_local_experts": 4, "num_experts_per_tok": 1},
        {"hidden_act": "gelu", "num_local_experts": 6, "num_experts_per_tok": 2},
    ],
    "qwen2_moe": [
        {},
        {"norm_topk_prob": True, "num_experts_per_tok": 3, "num_experts": 7, "hidden_size": 21},
        {"shared_expert_intermediate_size": 0, "num_experts": 5, "num_experts_per_tok": 1},
        {"hidden_size": 13, "moe_intermediate_size": 9, "shared_expert_intermediate_size": 11,
         "num_experts": 6, "num_experts_per_tok": 6},
    ],
    "qwen3_moe": [
        {},
        {"norm_topk_prob": False, "num_experts": 9, "num_experts_per_tok": 2, "hidden_size": 17,
         "moe_intermediate_size": 5},
        {"num_experts": 3, "num_experts_per_tok": 1},
    ],
    "olmoe": [
        {},
        {"norm_topk_prob": True, "num_experts": 11, "num_experts_per_tok": 3, "hidden_size": 15,
         "intermediate_size": 7},
        {"num_experts": 2, "num_experts_per_tok": 2},
    ],
    "deepseek_v3": [
        {},
        {"norm_topk_prob": False, "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1},
        {"n_routed_experts": 12, "n_group": 3, "topk_group": 1, "num_experts_per_tok": 3,
         "n_shared_experts": 0, "hidden_size": 23, "moe_intermediate_size": 7},
        {"n_routed_experts": 8, "n_group": 2, "topk_group": 2, "num_experts_per_tok": 2,
         "n_shared_experts": 2, "routed_scaling_factor": 1.7},
    ],
    "switch_transformers": [
        {},
        {"expert_capacity": 1, "num_experts": 3, "d_model": 11, "d_ff": 5},  # heavy dropping
        {"expert_capacity": 64, "router_bias": True, "dense_act_fn": "gelu"},  # dropless, biased router
        {"expert_capacity": 2, "num_experts": 5},
    ],
}

CASES = [(family, i, cfg) for family, cfgs in CONFIGS.items() for i, cfg in enumerate(cfgs)]


def _width(block) -> int:
    if hasattr(block, "router"):
        return block.router.classifier.in_features
    return block.gate.weight.shape[1]


def test_every_family_is_tested():
    assert set(CONFIGS) == set(FAMILIES) == set(SUPPORTED_BLOCKS.values())


@pytest.mark.parametrize("backend", ["loop", "torch"])
@pytest.mark.parametrize("family,index,config", CASES, ids=[f"{f}-{i}" for f, i, _ in CASES])
def test_outputs_and_routing_match(family, index, config, backend):
    block = random_block(family, seed=index, **config)
    converted = from_transformers(block, backend=backend)
    assert isinstance(converted, ConvertedMoEBlock) and converted.family == family
    assert not converted.training
    torch.manual_seed(100 + index)
    for shape in [(2, 9), (1, 1), (3, 16)]:
        x = torch.randn(*shape, _width(block)) * 2
        result = equivalence(block, x, converted)
        assert result["output_rel_error"] <= TOL, result
        assert result["logits_max_abs_error"] <= 1e-6, result
        assert result["expert_agreement"] == 1.0, result
        assert result["weights_max_abs_error"] <= 1e-6, result
        assert result["kept_agreement"] == 1.0, result


def test_switch_drops_what_hugging_face_drops():
    """With capacity 1 per expert per sequence most tokens overflow: their output is zero in both, and
    moe_lib counts them."""
    block = random_block("switch_transformers", seed=3, expert_capacity=1, num_experts=3)
    x = torch.randn(2, 12, 32)
    converted = from_transformers(block)
    y, info = converted(x, return_info=True)
    dropped = ~hf_routing(block, x)["kept"][:, 0]
    assert int(dropped.sum()) >= 2 * 12 - 2 * 3
    assert info.plan.dropped_tokens == int(dropped.sum())
    assert torch.all(y.reshape(-1, 32)[dropped] == 0)
    torch.testing.assert_close(y, block(x), rtol=1e-5, atol=1e-6)


def test_deepseek_bias_changes_selection_but_not_weights():
    """e_score_correction_bias steers the choice; the gate values are the uncorrected sigmoid scores."""
    block = random_block("deepseek_v3", seed=0, bias_std=5.0, n_group=1, topk_group=1)
    converted = from_transformers(block)
    x = torch.randn(40, 32)
    routing = converted.moe.router(x)
    s = torch.sigmoid(x @ block.gate.weight.t())
    plain = s.topk(4, dim=-1).indices.sort(-1).values
    assert not torch.equal(plain, routing.experts.sort(-1).values)
    w = s.gather(1, routing.experts)
    torch.testing.assert_close(routing.weights, 2.5 * w / w.sum(-1, keepdim=True))
    assert equivalence(block, x.unsqueeze(0), converted)["output_rel_error"] <= TOL


def test_group_limit_restricts_experts_to_the_best_groups():
    block = random_block("deepseek_v3", seed=1, n_routed_experts=16, n_group=4, topk_group=2)
    router = from_transformers(block).moe.router
    experts = router(torch.randn(64, 32)).experts
    groups = experts // 4
    assert all(len(set(row.tolist())) <= 2 for row in groups)


def test_ModuleList_expert_layout_is_read():
    """transformers 4.x kept one MLP per expert: the same weights in that layout convert the same."""
    block = random_block("qwen3_moe", seed=0)
    fused = block.experts
    d_ff = fused.down_proj.shape[2]
    mlps = nn.ModuleList()
    for e in range(fused.gate_up_proj.shape[0]):
        mlp = nn.Module()
        mlp.gate_proj = nn.Linear(32, d_ff, bias=False)
        mlp.up_proj = nn.Linear(32, d_ff, bias=False)
        mlp.down_proj = nn.Linear(d_ff, 32, bias=False)
        mlp.act_fn = nn.SiLU()
        with torch.no_grad():
            mlp.gate_proj.weight.copy_(fused.gate_up_proj[e, :d_ff])
            mlp.up_proj.weight.copy_(fused.gate_up_proj[e, d_ff:])
            mlp.down_proj.weight.copy_(fused.down_proj[e])
        mlps.append(mlp)
    x = torch.randn(1, 10, 32)
    expected = from_transformers(block)(x)
    block.experts = mlps
    torch.testing.assert_close(from_transformers(block)(x), expected, rtol=1e-6, atol=1e-7)


def test_converted_block_trains():
    """The conversion is an ordinary nn.Module: gradients reach the router and the experts."""
    converted = from_transformers(random_block("mixtral", seed=0)).train()
    y, info = converted(torch.randn(2, 5, 32), return_info=True)
    (y.square().mean() + info.aux_losses["load_balance"]).backward()
    assert converted.moe.router.gate.weight.grad is not None
    assert converted.moe.experts.w_down.grad.abs().sum() > 0


def test_exported_from_the_package():
    assert moe_lib.interop.from_transformers is from_transformers
    assert "group_limited" in moe_lib.ROUTERS and "group_capacity" in moe_lib.ROUTERS
    assert "glu" in moe_lib.EXPERTS


@pytest.mark.parametrize("bad", [nn.Linear(4, 4), "mixtral", None, torch.randn(3)])
def test_bad_input_names_the_accepted_blocks(bad):
    with pytest.raises(TypeError, match="MixtralSparseMoeBlock.*SwitchTransformersSparseMLP"):
        from_transformers(bad)


def test_bad_backend_and_family():
    block = random_block("olmoe")
    with pytest.raises(ValueError, match="backend"):
        from_transformers(block, backend="cuda")
    with pytest.raises(ValueError, match="family"):
        random_block("llama")
    converted = from_transformers(block)
    with pytest.raises(ValueError, match="backend"):
        converted.backend = "cutlass"
    with pytest.raises(TypeError, match="hidden_states"):
        converted([1.0, 2.0])


def test_unsupported_activation_is_a_clear_error():
    block = random_block("mixtral", hidden_act="gelu_new")
    with pytest.raises(ValueError, match="activation"):
        from_transformers(block)
