"""Chapters 7 and 9 over seeds: counted router FLOPs (moe_lib.metrics.routing_flops_per_token) and the per-run
routing measurements of chapter 9 (moe_lib.models.analysis.train_with_snapshots, routing_summary)."""
from __future__ import annotations

import math

import pytest
import torch

from moe_lib import MoELayer
from moe_lib.metrics import routing_flops_per_token


def _x(tokens=64, d=16, seed=0):
    return torch.randn(tokens, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("router", ["topk", "switch", "gshard", "expert_choice", "base", "auxfree"])
def test_linear_gate_routers_count_one_projection(router):
    layer = MoELayer(16, 8, 4, router=router, expert="mlp").eval()
    assert routing_flops_per_token(layer, _x()) == 2 * 16 * 4
    assert routing_flops_per_token(layer, _x()) == layer.router.flops_per_token()


def test_hash_of_token_ids_costs_no_flops_but_content_hash_does():
    layer = MoELayer(16, 8, 4, router="hash", expert="mlp", router_options={"hash_bits": 6}).eval()
    ids = torch.randint(0, 100, (64,), generator=torch.Generator().manual_seed(1))
    assert routing_flops_per_token(layer, _x(), ids) == 0
    # without ids the router hashes the content: a fixed random projection to hash_bits bits
    assert routing_flops_per_token(layer, _x()) == 2 * 16 * 6
    # the asserted value describes only the content hash
    assert layer.router.flops_per_token() == 2 * 16 * 6


def test_soft_moe_counts_logits_dispatch_and_combine():
    layer = MoELayer(16, 8, 4, router="soft", expert="mlp", router_options={"slots_per_expert": 3}).eval()
    slots = 4 * 3
    assert routing_flops_per_token(layer, _x()) == 3 * 2 * 16 * slots == layer.router.flops_per_token()


def test_noisy_topk_counts_its_noise_projection():
    layer = MoELayer(16, 8, 4, router="noisy_topk", expert="mlp").eval()
    assert routing_flops_per_token(layer, _x()) == 2 * 2 * 16 * 4


def test_routing_flops_do_not_depend_on_batch_layout():
    layer = MoELayer(16, 8, 4, router="topk", expert="mlp").eval()
    x = _x(24)
    assert routing_flops_per_token(layer, x) == routing_flops_per_token(layer, x.reshape(2, 12, 16))


def test_routing_summary_known_values():
    from moe_lib.models.analysis import routing_summary

    # one layer, 2 sequences of 4 tokens, top-2 of 4 experts; label = top expert -> purity 1
    experts = torch.tensor([[[0, 1], [0, 2], [1, 0], [1, 3]],
                            [[2, 3], [2, 0], [3, 1], [3, 2]]])
    labels = experts[..., 0].clone()
    (row,) = routing_summary([experts], labels, 4, ["a", "b", "c", "d", "e"], seed=0)
    assert row["purity"] == 1.0
    assert row["top choice repeats"] == pytest.approx(4 / 6)
    assert row["chance, real load"] == pytest.approx(4 * (1 / 4) ** 2)
    assert 0 <= row["purity, shuffled labels"] <= 1
    assert row["share on top expert: a"] == 1.0
    assert math.isnan(row["share on top expert: e"])  # a label with no token


def test_train_with_snapshots_is_seeded_and_snapshots_every_step_asked():
    from moe_lib.models import LMConfig
    from moe_lib.models.analysis import train_with_snapshots

    cfg = LMConfig(d_model=16, n_layers=1, seq_len=8, ffn="moe", d_ff=16, num_experts=4, top_k=2, router="topk",
                   n_heads=2, vocab_size=256)
    data = torch.randint(0, 256, (400,), generator=torch.Generator().manual_seed(0))
    probe = data[:32].reshape(4, 8)
    runs = [train_with_snapshots(cfg, data, probe, steps=4, batch_size=2, seed=s, snapshot_every=2)
            for s in (0, 0, 1)]
    assert sorted(runs[0][1]) == [0, 2, 4]
    assert runs[0][1][4][0].shape == (4, 8, 2)
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1][4], runs[1][1][4]))  # same seed, same routing
    w0, w2 = (next(r[0].parameters()) for r in (runs[0], runs[2]))
    assert not torch.equal(w0, w2)  # another seed, other weights
