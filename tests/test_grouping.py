"""moe_lib.book.grouping: skewed routings, padding and tile statistics, FLOPs and the memory-traffic model."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from moe_lib.book import grouping as G
from moe_lib.backends import loop_backend, padded_backend
from moe_lib.bench.timing import wall_time
from moe_lib.dispatch import make_plan, max_tiles, tile_schedule
from moe_lib.experts import SwiGLUExperts
from moe_lib.metrics import expert_load
from moe_lib.routers import synthetic_routing, zipf_popularity


# ------------------------------------------------------------------------------------------ routings

@pytest.mark.parametrize("kw", [{"balanced": True}, {"zipf": 0.0}, {"zipf": 1.2}])
def test_synthetic_routing_is_a_valid_topk_routing(kw):
    g = torch.Generator().manual_seed(0)
    r = synthetic_routing(100, 8, 3, generator=g, **kw)
    assert r.experts.shape == (100, 3) and r.weights.shape == (100, 3) and r.probs.shape == (100, 8)
    assert all(len(set(row)) == 3 for row in r.experts.tolist())  # k distinct experts
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(100))
    assert (r.weights >= 0).all()
    # the chosen experts are the top-k of the routing's own logits, in order
    assert torch.equal(r.logits.topk(3, dim=-1).indices, r.experts)
    torch.testing.assert_close(r.probs, torch.softmax(r.logits, -1))


def test_balanced_routing_is_exact_and_deterministic():
    r = synthetic_routing(96, 8, 2, balanced=True, generator=torch.Generator().manual_seed(1))
    assert expert_load(r.experts, 8).tolist() == [24] * 8
    a = synthetic_routing(50, 8, 2, zipf=1.0, generator=torch.Generator().manual_seed(3))
    b = synthetic_routing(50, 8, 2, zipf=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.experts, b.experts) and torch.equal(a.weights, b.weights)


def test_zipf_top1_frequencies_follow_popularity():
    """Gumbel top-1 samples exactly proportionally to p."""
    p = zipf_popularity(6, 1.0)
    torch.testing.assert_close(p.sum(), torch.tensor(1.0))
    r = synthetic_routing(60000, 6, 1, zipf=1.0, generator=torch.Generator().manual_seed(0))
    freq = expert_load(r.experts, 6).float() / 60000
    torch.testing.assert_close(freq, p, atol=0.01, rtol=0)


def test_skew_grows_with_the_zipf_exponent():
    def waste_at(s):
        routing = synthetic_routing(4096, 16, 2, zipf=s, generator=torch.Generator().manual_seed(0))
        return G.padding_stats(expert_load(routing.experts, 16))["waste"]

    waste = [waste_at(s) for s in (0.0, 0.5, 1.0, 2.0)]
    assert waste == sorted(waste) and waste[0] < 0.2 and waste[-1] > 2


# ----------------------------------------------------------------------------------- padding, tiles

def test_padding_and_tile_stats_hand_computed():
    counts = [3, 0, 5]
    p = G.padding_stats(counts)
    assert p["real_rows"] == 8 and p["padded_rows"] == 15
    assert p["waste"] == pytest.approx(7 / 8) and p["max_over_mean"] == pytest.approx(15 / 8)
    assert G.padding_stats(counts, capacity=4)["padded_rows"] == 12
    t = G.tile_stats(counts, 2)
    assert t["tiles"] == 2 + 0 + 3 and t["tile_rows"] == 10 and t["waste"] == pytest.approx(2 / 8)
    assert t["max_tiles"] == 3 + (8 - 3) // 2  # m + floor((N - m) / M), m = min(E, N): tight (1 + 1 + 3 rows' tiles)
    te, tr = tile_schedule(counts, 2)
    assert te.tolist() == [0, 0, 2, 2, 2] and tr.tolist() == [0, 2, 3, 5, 7]
    assert G.padding_stats(torch.tensor([0, 0]))["waste"] == 0.0


@given(st.lists(st.integers(0, 300), min_size=1, max_size=12), st.sampled_from([1, 16, 64]))
def test_tile_bounds(counts, block_m):
    t = G.tile_stats(counts, block_m)
    n = sum(counts)
    assert t["tiles"] <= t["max_tiles"]
    assert n <= t["tile_rows"] <= n + len(counts) * (block_m - 1)
    te, tr = tile_schedule(counts, block_m)
    assert te.numel() == t["tiles"]
    # every grouped row is covered by exactly one tile of its own expert
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    covered = []
    for e, r0 in zip(te.tolist(), tr.tolist()):
        covered += [r for r in range(r0, min(r0 + block_m, offsets[e + 1]))]
        assert offsets[e] <= r0 < offsets[e + 1]
    assert covered == list(range(n))


@given(st.integers(1, 64), st.integers(1, 16), st.integers(1, 4), st.floats(0, 3))
def test_padding_waste_is_bounded_by_e_over_k(tokens, experts, k, zipf):
    k = min(k, experts)
    r = synthetic_routing(tokens, experts, k, zipf=zipf, generator=torch.Generator().manual_seed(tokens))
    assert G.padding_stats(expert_load(r.experts, experts))["waste"] <= experts / k - 1 + 1e-9


def test_tile_schedule_matches_the_kernels_reference():
    from moe_lib.kernels import reference  # plain torch: no optional package, so never skipped
    g = torch.Generator().manual_seed(0)
    r = synthetic_routing(200, 8, 2, zipf=1.0, generator=g)
    block_m = 16
    n = r.experts.numel()
    counts, offsets, _, tile_expert, tile_row = reference.permute_metadata_ref(
        r.experts, 8, block_m, max_tiles(n, 8, block_m))
    te, tr = tile_schedule(counts, block_m)
    used = tile_expert >= 0
    assert torch.equal(tile_expert[used].long(), te) and torch.equal(tile_row[used].long(), tr)
    assert (tile_expert[te.numel():] == -1).all()


# ------------------------------------------------------------------------------------------- FLOPs

def _counted(fn, *args):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return int(counter.get_total_flops())


def test_grouped_flops_match_counted_flops():
    torch.manual_seed(0)
    T, d, f, E, k = 40, 8, 12, 4, 2
    experts = SwiGLUExperts(E, d, f)
    routing = synthetic_routing(T, E, k, zipf=1.5, generator=torch.Generator().manual_seed(0))
    plan = make_plan(routing)
    x = torch.randn(T, d)
    assert _counted(loop_backend, experts, x, plan) == G.grouped_flops(plan.counts, d, f, "loop")
    assert _counted(padded_backend, experts, x, plan) == G.grouped_flops(plan.counts, d, f, "padded")
    assert G.grouped_flops(plan.counts, d, f, "loop") == T * k * experts.flops_per_token()
    assert G.grouped_flops(plan.counts, d, f, "grouped") == G.grouped_flops(plan.counts, d, f, "loop")
    assert G.grouped_flops(plan.counts, d, f, "fused", block_m=16) >= G.grouped_flops(plan.counts, d, f, "loop")


# ------------------------------------------------------------------------------------ memory traffic

def test_memory_traffic_hand_computed():
    """counts [3, 0, 1], T = 2, d = f = 1 (elements = bytes with bytes_per_elem = 1)."""
    kw = dict(num_tokens=2, d_model=1, d_ff=1, bytes_per_elem=1)
    loop = G.memory_traffic([3, 0, 1], variant="loop", **kw)
    assert loop == {"weights": 6, "permuted copy": 8, "padding": 0, "activations": 52, "combine": 22, "total": 88}
    padded = G.memory_traffic([3, 0, 1], variant="padded", **kw)
    # index_put is out of place: it reads the whole zero batch (9) and the rows (4), writes the batch (9)
    assert padded == {"weights": 9, "permuted copy": 8, "padding": 39, "activations": 99, "combine": 22, "total": 177}
    assert G.memory_traffic([3, 0, 1], variant="grouped", **kw)["total"] == 80
    fused = G.memory_traffic([3, 0, 1], variant="fused", **kw)
    assert fused == {"weights": 6, "permuted copy": 0, "padding": 0, "activations": 20, "combine": 6, "total": 32}
    assert G.compulsory_traffic([3, 0, 1], 2, 1, 1, bytes_per_elem=1) == 10


def test_memory_traffic_orders_and_scales():
    counts_bal, counts_skew = [64] * 8, [300, 100, 50, 30, 20, 8, 4, 0]
    args = dict(num_tokens=256, d_model=32, d_ff=64)
    for counts in (counts_bal, counts_skew):
        t = {v: G.memory_traffic(counts, variant=v, **args)["total"] for v in G.VARIANTS}
        assert t["fused"] < t["grouped"] < t["loop"] < t["padded"]
        assert G.compulsory_traffic(counts, 256, 32, 64) < t["fused"]
    assert (G.memory_traffic(counts_skew, variant="padded", **args)["padding"]
            > G.memory_traffic(counts_bal, variant="padded", **args)["padding"])
    # balanced: the padded batch has no padding rows, only the extra copies
    assert G.memory_traffic(counts_bal, variant="padded", **args)["activations"] == \
        G.memory_traffic(counts_bal, variant="grouped", **args)["activations"]
    two = G.memory_traffic(counts_skew, variant="loop", bytes_per_elem=2, **args)
    four = G.memory_traffic(counts_skew, variant="loop", bytes_per_elem=4, **args)
    assert all(2 * two[key] == four[key] for key in four)
    ops = G.traffic_ops(counts_skew, 256, 32, 64, "fused")
    assert {op.category for op in ops} <= {"weights", "activations", "combine"}


def _grouped_mm_backend(experts, x, plan):
    """torch._grouped_mm over the permuted copy (the ``grouped`` variant of the traffic model)."""
    from moe_lib.backends import BACKENDS
    from moe_lib.dispatch import combine

    if "grouped_mm" in BACKENDS:
        return BACKENDS["grouped_mm"](experts, x, plan)
    rows = x[plan.token_index]
    offs = plan.offsets[1:].to(torch.int32)
    h = torch.nn.functional.silu(torch._grouped_mm(rows, experts.w_gate, offs=offs)) \
        * torch._grouped_mm(rows, experts.w_up, offs=offs)
    return combine(torch._grouped_mm(h, experts.w_down, offs=offs), plan, x.shape[0])


@pytest.mark.parametrize("kw", [{"balanced": True}, {"zipf": 0.0}, {"zipf": 1.5}])
def test_traffic_model_equals_the_operations_torch_runs(kw):
    """The analytic model of the eager variants equals the bytes counted over the ATen ops they dispatch."""
    torch.manual_seed(0)
    T, d, f, E, k = 96, 8, 12, 4, 2
    experts = SwiGLUExperts(E, d, f)
    x = torch.randn(T, d)
    plan = make_plan(synthetic_routing(T, E, k, generator=torch.Generator().manual_seed(0), **kw))
    assert (plan.counts > 0).all()  # the model reads only touched experts' weights; bmm and grouped_mm read all
    for variant, fn in (("loop", loop_backend), ("padded", padded_backend), ("grouped", _grouped_mm_backend)):
        with torch.no_grad():
            counted = G.count_traffic(fn, experts, x, plan)
        model = G.traffic_ops(plan.counts, T, d, f, variant)
        assert counted["read"] == 4 * sum(op.read for op in model), variant
        assert counted["written"] == 4 * sum(op.written for op in model), variant
        assert counted["total"] == G.memory_traffic(plan.counts, T, d, f, variant)["total"]


def test_count_traffic_rules():
    x = torch.randn(10, 4)
    idx = torch.tensor([0, 3, 3])
    c = G.count_traffic(lambda: (x[idx], x.t(), x.new_zeros(2, 2), x * 2, idx + 1))
    names = [name for name, _, _ in c["ops"]]
    assert names == ["index", "new_zeros", "mul"]  # the view and the integer op move nothing
    assert c["ops"][0] == ("index", 48, 48) and c["ops"][1] == ("new_zeros", 0, 16) and c["ops"][2] == ("mul", 160, 160)
    assert c["total"] == c["read"] + c["written"] == 48 + 48 + 16 + 320


def test_bad_arguments():
    with pytest.raises(ValueError, match="variant"):
        G.memory_traffic([1], 1, 1, 1, "cuda")
    with pytest.raises(ValueError, match="count"):
        G.padding_stats([3, -1])
    with pytest.raises(ValueError):
        G.padding_stats([])
    with pytest.raises(ValueError, match="block_m"):
        G.tile_stats([3], 0)
    with pytest.raises(ValueError, match="top_k"):
        synthetic_routing(4, 2, 3)
    with pytest.raises(TypeError, match="balanced"):
        synthetic_routing(4, 2, 1, balanced=1)
    with pytest.raises(ValueError, match="exponent"):
        zipf_popularity(4, -1.0)


def test_wall_time():
    calls = []
    t = wall_time(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and t >= 0 and math.isfinite(t)
    assert wall_time(lambda: None, repeats=3, statistic="median") >= 0
    with pytest.raises(ValueError, match="statistic"):
        wall_time(lambda: None, statistic="mean")


def test_chapter_11_plots_draw():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moe_lib.book.plot import plot_permutation, plot_row_layouts, plot_tile_schedule

    r = synthetic_routing(6, 4, 2, zipf=1.0, generator=torch.Generator().manual_seed(0))
    ax = plot_permutation(r.experts, 4)
    assert len(ax.patches) == 2 * 12  # one box per assignment on each side
    counts = [5, 0, 3]
    ax = plot_row_layouts(counts, 4)
    assert ax.get_xlim()[1] >= 3 * 5
    te, tr = tile_schedule(counts, 4)
    offsets = torch.tensor([0, 5, 5, 8])
    ax = plot_tile_schedule(torch.cat([te, torch.tensor([-1])]), torch.cat([tr, torch.tensor([0])]), offsets, 4)
    assert len(ax.get_xticks()) == te.numel() + 1
    plt.close("all")
