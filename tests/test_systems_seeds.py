"""Repeated-run helpers of the systems chapters (13 expert parallelism, 14 serving, 18 business)."""
import math

import pytest

from moe_lib.distributed import traffic_summary
from moe_lib.distributed.cost import a2a_bytes


def _rows(values_by_seed, tokens=64, top_k=2, ranks=4):
    # every rank of a seed sends the same bytes, so the per-seed mean over ranks is that value
    return [{"rank": r, "tokens": tokens, "top_k": top_k, "seed": s, "sent_remote_bytes": v}
            for s, v in enumerate(values_by_seed) for r in range(ranks)]


def test_traffic_summary_known_mean_and_spread():
    model = a2a_bytes(64, 2, 16, 4, 4)
    vals = [model * 0.98, model * 1.00, model * 1.02]
    out = traffic_summary(_rows(vals), d_model=16, world_size=4, bytes_per_elem=4)
    row = out.iloc[0]
    assert row["seeds"] == 3
    assert row["measured / model"] == pytest.approx(1.0)
    assert row["std ratio"] == pytest.approx(0.02)
    assert row["± ratio"] == pytest.approx(4.3027 * 0.02 / math.sqrt(3), rel=1e-4)
    assert row["model_KB"] == pytest.approx(model / 1e3)
    assert bool(row["model in CI"])


def test_traffic_summary_flags_a_model_outside_the_interval():
    model = a2a_bytes(64, 2, 16, 4, 4)
    out = traffic_summary(_rows([model * 1.10, model * 1.11, model * 1.12]), d_model=16, world_size=4)
    assert not bool(out.iloc[0]["model in CI"])


def test_traffic_summary_needs_seeds():
    rows = _rows([1000.0])
    with pytest.raises(ValueError, match="at least 2"):
        traffic_summary(rows, d_model=16, world_size=4)
    with pytest.raises(ValueError, match="--seeds"):
        traffic_summary([{k: v for k, v in r.items() if k != "seed"} for r in rows], d_model=16, world_size=4)
