"""Expert parallelism (moe_lib.distributed) on 2 and 4 local CPU ranks (gloo) against one process.

Each launch spawns fresh Python processes (~2 s each on a loaded 2-core machine), so the router and
capacity cases of one world size share one launch.
"""
import pytest
import torch

from moe_lib import MoELayer
from moe_lib.distributed import LaunchError, check, ep_cost, expected_remote_fraction, launch, shard_range
from moe_lib.distributed.cost import a2a_bytes

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

TOL = 1e-5  # fp32; observed differences are ~1e-7 (different padding of the batched matmuls)

CASES_2 = [
    dict(d_model=16, d_ff=24, num_experts=4, top_k=1, router="topk"),
    dict(d_model=16, d_ff=24, num_experts=4, top_k=2, router="topk"),
    dict(d_model=16, d_ff=24, num_experts=4, router="switch"),
    dict(d_model=16, d_ff=24, num_experts=4, router="switch", capacity_factor=1.0),      # drops
    dict(d_model=16, d_ff=24, num_experts=4, top_k=2, router="topk", capacity_factor=0.75, expert="mlp"),
    dict(d_model=16, d_ff=24, num_experts=4, top_k=2, router="expert_choice"),          # owns capacity
]
CASES_4 = [
    dict(d_model=16, d_ff=24, num_experts=8, top_k=2, router="topk"),
    dict(d_model=16, d_ff=24, num_experts=8, router="switch", capacity_factor=1.25),
    dict(d_model=16, d_ff=24, num_experts=4, top_k=1, router="topk", backend="loop", capacity_factor=0.5),
]


def _check(results, cases, world_size):
    assert len(results) == world_size
    for rank_results in results:
        assert len(rank_results) == len(cases)
        for r in rank_results:
            kw = cases[r["case"]]
            for key in ("out", "grad_x", "grad_experts", "grad_router"):
                assert r[key] <= TOL * max(1.0, r["ref_scale"]), (kw, key, r)
            assert r["router_grad_norm"] > 0, kw  # the router really receives a gradient
            if kw.get("capacity_factor") and kw.get("router") != "expert_choice" and kw["capacity_factor"] <= 1.0:
                assert r["dropped"] > 0, kw       # the capacity case really drops
    # Counts are consistent: what rank i sends to rank j is what j receives from i.
    for c in range(len(cases)):
        sent = [rank_results[c]["traffic"]["sent_rows"] for rank_results in results]
        recv = [rank_results[c]["traffic"]["recv_rows"] for rank_results in results]
        for i in range(world_size):
            for j in range(world_size):
                assert sent[i][j] == recv[j][i]


def test_two_ranks_equal_single_process():
    _check(launch(check.run_cases, 2, (CASES_2,)), CASES_2, 2)


def test_four_ranks_equal_single_process():
    _check(launch(check.run_cases, 4, (CASES_4,)), CASES_4, 4)


def test_config_errors_fail_fast():
    bad = dict(d_model=8, d_ff=16, num_experts=3, top_k=1)
    msgs = launch(check.expect_config_error, 2, ([bad, bad],), timeout_s=30)
    assert all("divisible" in m and "num_experts=3" in m for m in msgs)
    a, b = dict(d_model=8, d_ff=16, num_experts=4, top_k=2), dict(d_model=12, d_ff=16, num_experts=4, top_k=2)
    msgs = launch(check.expect_config_error, 2, ([a, b],), timeout_s=30)
    assert all("disagree" in m and "d_model" in m for m in msgs)


def test_dead_rank_fails_instead_of_hanging():
    with pytest.raises(LaunchError) as info:
        launch(check.survive_dead_peer, 2, (), timeout_s=10, join_timeout_s=90)
    outcomes = info.value.outcomes
    assert outcomes[1][0] == "died"
    kind, survivor = outcomes[0]
    assert kind == "ok" and survivor["error"] is not None
    assert survivor["seconds"] < 60


def test_no_process_group_and_bad_layer():
    layer = MoELayer(d_model=8, d_ff=16, num_experts=4, top_k=1)
    from moe_lib.distributed import ExpertParallelMoE
    with pytest.raises(RuntimeError, match="process group"):
        ExpertParallelMoE.from_layer(layer)
    with pytest.raises(TypeError, match="MoELayer"):
        ExpertParallelMoE.from_layer(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="divisible"):
        shard_range(6, 4, 0)
    assert shard_range(8, 4, 3) == (6, 8)


def test_cost_model():
    assert expected_remote_fraction(1) == 0.0
    assert a2a_bytes(100, 2, 10, 4, 2) == pytest.approx(100 * 2 * 0.75 * 10 * 2)
    one = ep_cost(tokens_per_gpu=4096, d_model=1024, d_ff=4096, num_experts=64, top_k=2, world_size=1)
    assert one.a2a_bytes_per_gpu == 0 and one.a2a_seconds == 0
    many = [ep_cost(tokens_per_gpu=4096, d_model=1024, d_ff=4096, num_experts=64, top_k=2, world_size=w)
            for w in (2, 8, 64)]
    assert [c.weight_bytes_per_gpu for c in many] == sorted([c.weight_bytes_per_gpu for c in many], reverse=True)
    assert many[0].a2a_bytes_per_gpu < many[-1].a2a_bytes_per_gpu < 2 * 4096 * 2 * 1024 * 2
    assert len({c.expert_flops_per_gpu for c in many}) == 1  # compute per GPU does not depend on W
    with pytest.raises(ValueError, match="divisible"):
        ep_cost(tokens_per_gpu=1, d_model=1, d_ff=1, num_experts=6, top_k=1, world_size=4)
    with pytest.raises(TypeError, match="top_k"):
        ep_cost(tokens_per_gpu=1, d_model=1, d_ff=1, num_experts=4, top_k=1.5, world_size=4)
