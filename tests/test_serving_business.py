"""moe_lib.book.serving and moe_lib.book.business: closed forms, measured counts, the LRU cache and the calculator."""
import pytest
import torch

from moe_lib import MoELayer
from moe_lib.book.business import Hardware, ModelShape, breakeven_batch, serve
from moe_lib.book.serving import (LRUExpertCache, cache_hit_rates, decode_bytes, expected_experts_touched, generate,
                             load_anchor, measure_experts_touched)


def test_expected_experts_touched_limits_and_measurement():
    assert expected_experts_touched(8, 2, 1) == pytest.approx(2)
    assert expected_experts_touched(8, 8, 5) == pytest.approx(8)
    assert expected_experts_touched(64, 8, 10_000) == pytest.approx(64)
    g = torch.Generator().manual_seed(0)
    experts = torch.stack([torch.randperm(16, generator=g)[:2] for _ in range(4000)])
    meas = measure_experts_touched(experts, 16, [1, 4, 16], trials=200, generator=g)
    for b, m in zip([1, 4, 16], meas):
        assert m == pytest.approx(expected_experts_touched(16, 2, b), rel=0.03)
    with pytest.raises(ValueError, match="top_k"):
        expected_experts_touched(4, 5, 1)


def test_decode_bytes_counts_shared_once():
    assert decode_bytes(shared_params=10, expert_params=1, num_experts=4, top_k=4, batch=3, bytes_per_param=1) == 14


def test_lru_cache():
    c = LRUExpertCache(2)
    assert [c.access(e) for e in [0, 1, 0, 2, 1, 0]] == [False, False, True, False, False, False]
    assert cache_hit_rates([[0, 1], [0, 1], [0, 1]], [0, 2]) == [0.0, pytest.approx(4 / 6)]


def test_generate_records_experts():
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.moe = MoELayer(8, 8, 4, 2)
            self.out = nn.Linear(8, 10)

        def forward(self, idx):
            return self.out(self.moe(self.emb(idx)))

    torch.manual_seed(0)
    tokens, trace = generate(Tiny(), torch.zeros(3, 2, dtype=torch.long), steps=4)
    assert tokens.shape == (3, 6) and len(trace) == 4
    assert all(1 <= len(step[0]) <= 4 for step in trace)
    with pytest.raises(TypeError, match="prompt"):
        generate(Tiny(), torch.zeros(3, 2), steps=1)


def test_load_anchor():
    assert load_anchor()["info"]["gpu"] == "NVIDIA H200"


def test_calculator():
    mixtral = ModelShape.moe("Mixtral", 46.7e9, 12.9e9, 8, 2)
    assert mixtral.active_params == pytest.approx(12.9e9) and mixtral.total_params == 46.7e9
    hw = Hardware("gpu", 141, 4.0, 700, 3.0)
    one = serve(mixtral, hw, 1)
    dense_active = serve(ModelShape("d", 12.9e9), hw, 1)
    assert one["GB read / step"] == pytest.approx(dense_active["GB read / step"])  # batch 1: k experts only
    many = serve(mixtral, hw, 256)
    assert many["GB read / step"] == pytest.approx(93.4, rel=1e-3)  # every expert touched
    assert many["$ / M tokens"] < one["$ / M tokens"]
    assert breakeven_batch(mixtral, ModelShape("d", 46.7e9), hw) == 1
    with pytest.raises(ValueError, match="expert_params"):
        ModelShape("bad", 10, 5, 4, 1)
    with pytest.raises(ValueError, match="batch"):
        serve(mixtral, hw, 0)
