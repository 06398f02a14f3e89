"""The Triton kernels against their torch references, in Triton's interpreter on the CPU.

Shapes are tiny (the interpreter runs every program instance in numpy) but chosen to hit the edges: experts
with no rows, one expert taking every row, row counts that are not a multiple of the tile, widths that are
not a multiple of the blocks, several counting-sort blocks, a non-power-of-two expert count. float32 and
float16 only: the interpreter's bfloat16 ``tl.dot`` is wrong.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_lib  # noqa: F401  (sets TRITON_INTERPRET before triton is imported)
from moe_lib import MoELayer
from moe_lib import kernels as K

pytestmark = pytest.mark.skipif(not K.available(), reason="triton is not installed")

META_FIELDS = ("counts", "offsets", "row_assignment", "tile_expert", "tile_row")


def _experts(kind: str, num_tokens: int, top_k: int, num_experts: int, seed: int = 0) -> torch.Tensor:
    """Routing patterns: random distinct choices, most experts empty, or one expert on every first choice."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_tokens, num_experts, generator=g)
    if kind == "sparse":  # only experts 1 and num_experts-2 receive rows
        scores[:, [1, num_experts - 2]] += 10
    elif kind == "one_takes_all":
        scores[:, 3] += 10
    return torch.topk(scores, top_k, dim=1).indices.to(torch.int32)


def _weights(num_experts, d, f, d_out=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    d_out = d if d_out is None else d_out
    wg = torch.randn(num_experts, d, f, generator=g) / d**0.5
    wu = torch.randn(num_experts, d, f, generator=g) / d**0.5
    wd = torch.randn(num_experts, f, d_out, generator=g) / f**0.5
    return [w.to(dtype) for w in (wg, wu, wd)]


# ---------------------------------------------------------------------------------------------- router


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("num_experts,top_k", [(8, 2), (6, 3), (64, 8), (5, 5)])
def test_router_matches_reference(score, renormalize, num_experts, top_k):
    g = torch.Generator().manual_seed(num_experts)
    logits = torch.randn(37, num_experts, generator=g)
    bias = torch.randn(num_experts, generator=g) * 0.3 if score == "sigmoid" else None
    w, e = K.route(logits, top_k, score, renormalize, bias)
    w_ref, e_ref = K.route(logits, top_k, score, renormalize, bias, impl="torch")
    assert e.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(e, e_ref)
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
    assert all(len(set(row)) == top_k for row in e.tolist())  # k distinct experts


def test_router_ties_and_bias_select_only():
    logits = torch.zeros(4, 8)  # every score ties: the lowest indices win
    w, e = K.route(logits, 3)
    assert e.tolist() == [[0, 1, 2]] * 4
    torch.testing.assert_close(w, torch.full((4, 3), 1 / 3))
    bias = torch.zeros(8)
    bias[7] = 1.0  # the bias moves expert 7 into the selection but not into the weight
    w, e = K.route(logits, 2, score="sigmoid", renormalize=False, bias=bias)
    assert e[:, 0].tolist() == [7] * 4
    torch.testing.assert_close(w, torch.full((4, 2), 0.5))


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_router_backward_matches_reference(score):
    logits = torch.randn(20, 8, generator=torch.Generator().manual_seed(1))
    upstream = torch.randn(20, 2, generator=torch.Generator().manual_seed(2))
    grads = []
    for impl in K.IMPLS:
        l = logits.clone().requires_grad_(True)
        w, _ = K.route(l, 2, score, True, impl=impl)
        (w * upstream).sum().backward()
        grads.append(l.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    assert grads[0].abs().sum() > 0


# -------------------------------------------------------------------------------------------- metadata


@pytest.mark.parametrize("kind", ["random", "sparse", "one_takes_all"])
@pytest.mark.parametrize("num_tokens,top_k,num_experts,block_m", [
    (37, 2, 8, 16),     # T·k not a multiple of the tile, two counting-sort blocks
    (100, 3, 6, 32),    # E not a power of two, five blocks
    (1, 1, 4, 16),      # a single assignment
    (300, 8, 64, 16),   # many experts, 38 blocks
])
def test_metadata_matches_reference(kind, num_tokens, top_k, num_experts, block_m):
    experts = _experts(kind, num_tokens, top_k, num_experts)
    meta = K.permute_metadata(experts, num_experts, block_m)
    ref = K.permute_metadata(experts, num_experts, block_m, impl="torch")
    for field in META_FIELDS:
        assert torch.equal(getattr(meta, field), getattr(ref, field)), field
    # invariants: counts sum to T·k, rows grouped by expert, every assignment exactly once
    assert int(meta.counts.sum()) == num_tokens * top_k
    flat = experts.reshape(-1).long()
    assert torch.equal(torch.sort(meta.row_assignment.long()).values, torch.arange(num_tokens * top_k))
    assert torch.all(flat[meta.row_assignment.long()].diff() >= 0)
    used = meta.tile_expert >= 0
    assert int(used.sum()) == int(((meta.counts + block_m - 1) // block_m).sum())
    assert meta.tiles_used() <= meta.max_tiles


@pytest.mark.parametrize("kind", ["random", "sparse", "one_takes_all"])
@pytest.mark.parametrize("small_limit", [0, 4096], ids=["blocked", "one-program"])
def test_both_metadata_paths_match_reference(kind, small_limit):
    """Decode-sized inputs take the one-program sort by default; force each path on the same input."""
    from moe_lib.kernels import ops

    experts = _experts(kind, 150, 4, 12)
    ref = K.reference.permute_metadata_ref(experts, 12, 16, 150 * 4 // 16 + 13)
    got = ops.permute_metadata(experts, 12, 16, 150 * 4 // 16 + 13, small_limit=small_limit)
    for field, a, b in zip(META_FIELDS, got, ref):
        assert torch.equal(a, b), field


@settings(max_examples=25)  # expensive: each example runs the Triton kernels (interpreted on a CPU)
@given(num_tokens=st.integers(1, 70), num_experts=st.integers(1, 40), data=st.data())
def test_router_and_metadata_invariants(num_tokens, num_experts, data):
    """Any shape: k distinct experts, weights ≥ 0 summing to 1, metadata equal to the reference."""
    top_k = data.draw(st.integers(1, min(num_experts, 8)))
    block_m = data.draw(st.sampled_from([16, 32]))
    seed = data.draw(st.integers(0, 2**16))
    logits = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(seed))
    w, e = K.route(logits, top_k)
    assert torch.all(w >= 0) and torch.allclose(w.sum(1), torch.ones(num_tokens))
    assert all(len(set(row)) == top_k for row in e.tolist())
    meta = K.permute_metadata(e, num_experts, block_m)
    ref = K.permute_metadata(e, num_experts, block_m, impl="torch")
    for field in META_FIELDS:
        assert torch.equal(getattr(meta, field), getattr(ref, field)), field


def test_tile_schedule_covers_every_row_once():
    experts = _experts("sparse", 45, 2, 8)
    meta = K.permute_metadata(experts, 8, 16)
    covered = torch.zeros(meta.num_assignments, dtype=torch.int64)
    for e, r in zip(meta.tile_expert.tolist(), meta.tile_row.tolist()):
        if e < 0:
            continue
        end = min(r + 16, int(meta.offsets[e + 1]))
        assert r >= int(meta.offsets[e])
        covered[r:end] += 1
    assert torch.equal(covered, torch.ones_like(covered))


def test_max_tiles_is_the_tight_bound():
    """Brute force over every split of N rows into E experts: the slot count equals the most tiles any
    split needs, and never exceeds min(N, ceil(N/M) + E) (the decode grid follows the live tiles)."""
    import itertools

    from moe_lib.dispatch import max_tiles

    for n, e, m in itertools.product(range(1, 8), range(1, 5), (1, 2, 3, 16)):
        worst = max(sum(-(-c // m) for c in split)
                    for split in itertools.product(range(n + 1), repeat=e) if sum(split) == n)
        assert max_tiles(n, e, m) == worst, (n, e, m)
        assert max_tiles(n, e, m) <= min(n, -(-n // m) + e)
    assert max_tiles(0, 4, 16) == 1  # one program, so the schedule kernel still writes the offsets
    assert max_tiles(8, 256, 16) == 8  # DeepSeek-V3 decode, T=1: 8 slots, not 257


@pytest.mark.parametrize("num_tokens,top_k,num_experts", [(1, 8, 256), (40, 1, 8)], ids=["decode", "tight"])
def test_decode_grid_uses_exactly_the_live_tiles(num_tokens, top_k, num_experts):
    """At T=1, k=8, E=256 the grid has 8 slots (8·E programs before); with 7 experts of one row and one of
    33 rows (16-row tiles) all 10 slots of the bound are live. The kernels match the reference in both."""
    if num_tokens == 1:
        experts = torch.tensor([[3, 250, 17, 0, 255, 128, 64, 9]], dtype=torch.int32)
    else:
        experts = torch.zeros(num_tokens, 1, dtype=torch.int32)
        experts[:7, 0] = torch.arange(1, 8)
    meta = K.permute_metadata(experts, num_experts, 16)
    ref = K.permute_metadata(experts, num_experts, 16, impl="torch")
    for field in META_FIELDS:
        assert torch.equal(getattr(meta, field), getattr(ref, field)), field
    assert meta.max_tiles == meta.tiles_used() == (8 if num_tokens == 1 else 10)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(num_tokens, 16, generator=g)
    weights = torch.rand(num_tokens, top_k, generator=g)
    ws = _weights(num_experts, 16, 16)
    leaves = [[t.clone().requires_grad_(True) for t in (x, weights, *ws)] for _ in K.IMPLS]
    ys = [K.expert_ffn(l[0], l[1], meta, *l[2:], impl=impl) for l, impl in zip(leaves, K.IMPLS)]
    torch.testing.assert_close(ys[0], ys[1], rtol=1e-4, atol=1e-5)
    for y in ys:
        y.pow(2).sum().backward()
    for a, b in zip(*leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ expert FFN


def _ffn_case(kind, num_tokens, top_k, num_experts, d, f, dtype, seed=0):
    experts = _experts(kind, num_tokens, top_k, num_experts, seed)
    meta = K.permute_metadata(experts, num_experts, 16)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(num_tokens, d, generator=g).to(dtype)
    weights = torch.rand(num_tokens, top_k, generator=g)
    return x, weights, meta, _weights(num_experts, d, f, dtype=dtype, seed=seed)


FFN_CASES = [
    ("random", 37, 2, 8, 32, 48),       # T not a multiple of the tile, f not a multiple of BN
    ("sparse", 40, 2, 8, 40, 24),       # six empty experts; d, f not multiples of the blocks
    ("one_takes_all", 33, 2, 8, 32, 32),
    ("random", 20, 4, 6, 16, 64),       # E not a power of two
    ("random", 30, 1, 8, 32, 32),       # top-1: the down kernel writes y directly, no combine pass
]


@pytest.mark.parametrize("case", FFN_CASES, ids=lambda c: f"{c[0]}-T{c[1]}-k{c[2]}-E{c[3]}-d{c[4]}-f{c[5]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_expert_ffn_forward_backward_match_reference(case, dtype):
    x, weights, meta, ws = _ffn_case(*case, dtype=dtype)
    # the reference runs in float32 from the same (rounded) inputs
    inputs = [x, weights, *ws]
    outs, grads = [], []
    upstream = torch.randn(x.shape[0], ws[2].shape[2], generator=torch.Generator().manual_seed(9))
    for impl in K.IMPLS:
        leaves = [t.detach().float().clone() if impl == "torch" else t.detach().clone() for t in inputs]
        for t in leaves:
            t.requires_grad_(True)
        y = K.expert_ffn(leaves[0], leaves[1], meta, *leaves[2:], impl=impl)
        (y.float() * upstream).sum().backward()
        outs.append(y.float())
        grads.append([t.grad.float() for t in leaves])
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(outs[0], outs[1], **tol)
    for name, a, b in zip(["x", "weights", "w_gate", "w_up", "w_down"], grads[0], grads[1]):
        scale = b.abs().max().clamp(min=1e-6)
        assert (a - b).abs().max() / scale < (1e-4 if dtype == torch.float32 else 2e-2), name
    if case[0] == "sparse":  # experts with no rows get exactly zero weight gradient
        empty = (meta.counts == 0).nonzero().squeeze(1)
        for g in grads[0][2:]:
            assert torch.all(g[empty] == 0)


@pytest.mark.parametrize("case", FFN_CASES[:3], ids=["random", "sparse", "one_takes_all"])
def test_each_kernel_matches_its_reference(case):
    """Kernel by kernel, the same inputs through the Triton launcher and its torch reference."""
    from moe_lib.kernels import ops

    x, weights, meta, (wg, wu, wd) = _ffn_case(*case, dtype=torch.float32)
    wflat = weights.reshape(-1).contiguous()
    ra, off, k = meta.row_assignment, meta.offsets, meta.top_k
    n_slots = meta.num_tokens * k
    close = {"rtol": 1e-4, "atol": 1e-5}
    wgu = K.interleave_gate_up(wg, wu)
    # forward: up (gather + one wide GEMM over interleaved gate|up + SwiGLU), down (GEMM + weight + slot
    # store), combine
    h, gu = ops.up(x, wgu, meta, "silu", save_gu=True)
    h_ref, gu_ref = K.reference.up_ref(x, ra, off, k, wg, wu)
    torch.testing.assert_close(h, h_ref, **close)
    torch.testing.assert_close(gu, gu_ref, **close)
    out = ops.down(h, wd, wflat, meta)
    torch.testing.assert_close(out, K.reference.down_ref(h, ra, off, wd, wflat, n_slots), **close)
    torch.testing.assert_close(ops.combine(out, meta), K.reference.combine_ref(out, meta.num_tokens, k), **close)
    # backward: dH (+ routing-weight gradient), dX slots, weight gradients (gathered and scaled variants)
    dy = torch.randn(meta.num_tokens, wd.shape[2], generator=torch.Generator().manual_seed(5))
    dgu, dw_row = ops.dh(dy, gu, wd, wflat, meta, "silu")
    dgu_ref, dw_row_ref = K.reference.dh_ref(dy, gu, ra, off, k, wd, wflat)
    torch.testing.assert_close(dgu, dgu_ref, **close)
    torch.testing.assert_close(dw_row, dw_row_ref, **close)
    slots = ops.dx_slots(dgu, wgu, meta)  # interleaved [dg | du] times W_guᵀ (one GEMM over 2f), per slot
    torch.testing.assert_close(slots, K.reference.down_ref(dgu, ra, off, wgu.transpose(1, 2), None, n_slots),
                               **close)
    x_rows, dy_rows = x[ra.long() // k], dy[ra.long() // k]
    dwgu = ops.wgrad(x, dgu, torch.empty_like(wgu), wflat, meta, True, False, False)
    torch.testing.assert_close(dwgu, K.reference.wgrad_ref(x_rows, dgu, off), **close)
    dwd = ops.wgrad(h, dy, torch.empty_like(wd), wflat, meta, False, True, True)
    scaled_h = h * wflat[ra.long()].unsqueeze(-1)
    torch.testing.assert_close(dwd, K.reference.wgrad_ref(scaled_h, dy_rows, off), **close)


def _skewed_experts(num_tokens, top_k, num_experts, hot=2, seed=0):
    """Zipf-like routing: expert ``hot`` is every token's first choice, the rest spread by a power law."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_tokens, num_experts, generator=g) / torch.arange(1, num_experts + 1) ** 1.5
    scores[:, hot] += 10
    return torch.topk(scores, top_k, dim=1).indices.to(torch.int32)


@pytest.mark.parametrize("split_rows", [16, 32, 1000], ids=["split16", "split32", "unsplit"])
def test_wgrad_split_k_matches_reference_and_is_deterministic(split_rows):
    """A hot expert (every token's first choice: 45 of 90 rows) cut into units of 16/32 rows that write
    float32 partials summed in a fixed order; empty experts still get zeros. Equal to the reference, and
    bitwise equal across runs."""
    from moe_lib.kernels import ops

    num_experts, k = 8, 2
    experts = _skewed_experts(45, k, num_experts)
    experts[experts == 6] = 5  # expert 6 empty (every first choice is 2, so the pair stays distinct)
    meta = K.permute_metadata(experts, num_experts, 16)
    assert int(meta.counts[2]) == 45 and int(meta.counts[6]) == 0
    g = torch.Generator().manual_seed(3)
    x = torch.randn(45, 24, generator=g)
    wflat = torch.rand(45 * k, generator=g)
    dy = torch.randn(45, 40, generator=g)
    ra = meta.row_assignment.long()
    h = torch.randn(meta.num_assignments, 36, generator=g)
    runs = []
    for _ in range(2):
        dwa = ops.wgrad(x, h, torch.full((num_experts, 24, 36), float("nan")), wflat, meta, True, False, False,
                        split_rows=split_rows)
        dwd = ops.wgrad(h, dy, torch.full((num_experts, 36, 40), float("nan")), wflat, meta, False, True, True,
                        split_rows=split_rows)
        runs.append((dwa, dwd))
    close = {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(runs[0][0], K.reference.wgrad_ref(x[ra // k], h, meta.offsets), **close)
    scaled = h * wflat[ra].unsqueeze(-1)
    torch.testing.assert_close(runs[0][1], K.reference.wgrad_ref(scaled, dy[ra // k], meta.offsets), **close)
    assert torch.all(runs[0][0][6] == 0) and torch.all(runs[0][1][6] == 0)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_wgrad_split_rows_spreads_a_hot_expert():
    """The split is chosen from N, E and the output size (no host read): on Qwen3-30B-A3B's down projection
    (E=128, dW_d 768×2048: 96 output blocks of 128×128) an expert holding all 32k rows spreads over ≥ 264
    programs, balanced experts are never split, partials stay under half of a bf16 dW, and a shape whose
    expert already has ≥ 264 blocks (DeepSeek-V3) is not split."""
    from moe_lib.kernels import config

    gpu = {"BM": 128, "BN": 128, "BK": 64}
    n, e = 4096 * 8, 128
    r = config.wgrad_split_rows(n, e, 768, 2048, gpu, min_rows=256)
    assert r % 64 == 0 and r > 8 * n // e - 64       # balanced experts (n/E rows) stay whole
    assert -(-n // r) * 96 >= 264                     # the hot expert's units × blocks
    assert (2 * n // r) * 768 * 2048 * 4 <= e * 768 * 2048 * 2 / 2
    assert config.wgrad_split_rows(n, 256, 7168, 2048, gpu, min_rows=256) >= n


def test_interleave_gate_up_layout_and_inverse():
    wg, wu, _ = _weights(3, 4, 5)
    wgu = K.interleave_gate_up(wg, wu)
    assert wgu.shape == (3, 4, 10) and wgu.is_contiguous()
    assert torch.equal(wgu[..., 4], wg[..., 2]) and torch.equal(wgu[..., 7], wu[..., 3])  # 2j gate, 2j+1 up
    g, u = K.split_gate_up(wgu)
    assert torch.equal(g, wg) and torch.equal(u, wu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_expert_ffn_on_interleaved_weights(dtype):
    """Interleaved weights (w_up=None, no conversion) give the two-weight result, and the gradient w.r.t.
    the interleaved tensor is the two gradients interleaved (capacity drops: incomplete metadata)."""
    x, weights, meta, (wg, wu, wd) = _ffn_case("sparse", 26, 2, 8, 32, 24, dtype)
    keep = torch.ones(meta.num_assignments, dtype=torch.bool)
    keep[::5] = False  # drop every fifth grouped row, as a capacity limit would
    counts = torch.stack([keep[int(a):int(b)].sum() for a, b in zip(meta.offsets[:-1], meta.offsets[1:])])

    class Plan:  # the fields metadata_from_plan reads
        kept = torch.ones(26, 2, dtype=torch.bool)
        num_experts = 8

    Plan.token_index = meta.row_assignment[keep].long() // 2
    Plan.slot_index = meta.row_assignment[keep].long() % 2
    Plan.counts = counts
    Plan.offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    meta = K.metadata_from_plan(Plan, block_m=16)
    assert not meta.complete
    upstream = torch.randn(26, 32, generator=torch.Generator().manual_seed(4)).to(dtype)
    two = [t.clone().requires_grad_(True) for t in (x, wg, wu, wd)]
    y2 = K.expert_ffn(two[0], weights, meta, *two[1:])
    (y2.float() * upstream.float()).sum().backward()
    one = [t.clone().requires_grad_(True) for t in (x, K.interleave_gate_up(wg, wu), wd)]
    y1 = K.expert_ffn(one[0], weights, meta, one[1], None, one[2])
    (y1.float() * upstream.float()).sum().backward()
    assert torch.equal(y1, y2)
    assert torch.equal(one[1].grad, K.interleave_gate_up(two[1].grad, two[2].grad))
    assert torch.equal(one[0].grad, two[0].grad) and torch.equal(one[2].grad, two[3].grad)
    leaves = [t.detach().float().clone().requires_grad_(True) for t in (x, wg, wu, wd)]
    y_ref = K.expert_ffn(leaves[0], weights, meta, *leaves[1:], impl="torch")
    (y_ref * upstream.float()).sum().backward()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y1.float(), y_ref, rtol=tol, atol=tol)
    ref_gu = K.interleave_gate_up(leaves[1].grad, leaves[2].grad)
    assert (one[1].grad.float() - ref_gu).abs().max() / ref_gu.abs().max() < tol


def test_interleaved_copy_is_cached_until_the_weights_change():
    """Inference converts once: the same copy while the weights are unchanged, a fresh one after an in-place
    update (its _version moves) — the layer's triton backend then still matches the loop backend."""
    torch.manual_seed(0)
    ref = MoELayer(16, 24, 4, top_k=2, expert="swiglu", backend="loop")
    layer = MoELayer(16, 24, 4, top_k=2, expert="swiglu", backend="triton")
    layer.load_state_dict(ref.state_dict())
    wg, wu = layer.experts.w_gate, layer.experts.w_up
    first = K.interleaved_gate_up(wg, wu)
    assert K.interleaved_gate_up(wg, wu) is first
    x = torch.randn(10, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref(x), rtol=1e-4, atol=1e-5)
        for m in (ref, layer):
            m.experts.w_up.mul_(-2.0)
        assert K.interleaved_gate_up(wg, wu) is not first
        torch.testing.assert_close(layer(x), ref(x), rtol=1e-4, atol=1e-5)
    K.clear_interleave_cache()
    assert K.interleaved_gate_up(wg, wu) is not first


@pytest.mark.parametrize("activation", ["gelu", "relu", "tanh"])
def test_expert_ffn_other_activations(activation):
    x, weights, meta, ws = _ffn_case("random", 24, 2, 4, 16, 32, torch.float32)
    leaves = [[t.clone().requires_grad_(True) for t in (x, weights, *ws)] for _ in K.IMPLS]
    ys = [K.expert_ffn(l[0], l[1], meta, *l[2:], activation=activation, impl=impl) for l, impl in zip(leaves, K.IMPLS)]
    torch.testing.assert_close(ys[0], ys[1], rtol=1e-4, atol=1e-5)
    for y in ys:
        y.pow(2).sum().backward()
    for a, b in zip(*leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-4)


def test_persistent_grid_gives_the_same_bits(monkeypatch):
    """MOE_LIB_PERSISTENT=1: three programs (the interpreter's 'SM count') loop over every work item of the
    tile-slot GEMMs; forward and every gradient equal the one-program-per-item grid bit for bit."""
    x, weights, meta, ws = _ffn_case("one_takes_all", 33, 2, 8, 32, 48, torch.float32)
    runs = []
    for flag in ("0", "1"):
        monkeypatch.setenv("MOE_LIB_PERSISTENT", flag)
        leaves = [t.clone().requires_grad_(True) for t in (x, weights, *ws)]
        y = K.expert_ffn(leaves[0], leaves[1], meta, *leaves[2:])
        y.pow(2).sum().backward()
        runs.append([y.detach()] + [t.grad for t in leaves])
    from moe_lib.kernels import config, ops
    assert config.persistent() and ops._grid(meta, 48, "up")[0] == 3 < meta.max_tiles * 2
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_expert_ffn_is_deterministic():
    x, weights, meta, ws = _ffn_case("one_takes_all", 33, 2, 8, 32, 32, torch.float32)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_(True) for t in (x, weights, *ws)]
        y = K.expert_ffn(leaves[0], leaves[1], meta, *leaves[2:])
        y.pow(2).sum().backward()
        runs.append([y.detach()] + [t.grad for t in leaves])
    for a, b in zip(*runs):
        assert torch.equal(a, b)  # bitwise: no atomics anywhere


def test_fused_moe_matches_reference_and_returns_routing():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(29, 32, generator=g)
    router = torch.randn(8, 32, generator=g) / 32**0.5
    ws = _weights(8, 32, 48)
    y, (w, e, meta) = K.fused_moe(x, router, *ws, top_k=2, return_routing=True)
    y_ref = K.fused_moe(x, router, *ws, top_k=2, impl="torch")
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    assert w.shape == e.shape == (29, 2) and meta.num_assignments == 58
    # equals the book's loop backend through MoELayer with the same weights
    layer = MoELayer(32, 48, 8, top_k=2, expert="swiglu", backend="loop")
    with torch.no_grad():
        layer.router.gate.weight.copy_(router)
        layer.experts.w_gate.copy_(ws[0]); layer.experts.w_up.copy_(ws[1]); layer.experts.w_down.copy_(ws[2])
        torch.testing.assert_close(layer(x), y, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------ MoELayer backend


@pytest.mark.parametrize("options", [
    {"top_k": 2},
    {"top_k": 2, "capacity_factor": 0.8},                      # drops: incomplete metadata
    {"top_k": 1, "router": "switch", "capacity_factor": 1.0},
    {"top_k": 2, "expert": "glu", "activation": "gelu"},
], ids=["dropless", "capacity", "switch", "geglu"])
@pytest.mark.parametrize("backend", ["triton", "grouped_mm"])
def test_layer_backends_match_loop(options, backend):
    options = {"expert": "swiglu", **options}
    torch.manual_seed(0)
    ref = MoELayer(32, 48, 8, backend="loop", **options)
    layer = MoELayer(32, 48, 8, backend=backend, **options)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(3, 20, 32)
    y_ref, info = ref(x, return_info=True)
    y = layer(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    if "capacity_factor" in options:
        assert info.plan.dropped_assignments > 0
    y_ref.pow(2).sum().backward()
    y.pow(2).sum().backward()
    for (name, p), q in zip(ref.named_parameters(), layer.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_triton_backend_rejects_ungated_experts():
    with pytest.raises(ValueError, match=r"backend='triton' cannot run MLPExperts \(expert='mlp'\); it runs on "
                                         r"backend in \['loop', 'torch', 'grouped_mm'\]"):
        MoELayer(16, 32, 4, top_k=2, expert="mlp", backend="triton")
    layer = MoELayer(16, 32, 4, top_k=2, expert="mlp")
    with pytest.raises(ValueError, match="backend='triton' cannot run MLPExperts"):
        layer.backend = "triton"  # refused when assigned, not at the next forward
    assert layer.backend == "torch"
    # the backend function itself still refuses a bank it cannot run (direct use, without a layer)
    layer.experts.backends = ("loop", "torch", "grouped_mm", "triton")
    layer.backend = "triton"
    with pytest.raises(ValueError, match="backend='triton' supports expert kinds"):
        layer(torch.randn(5, 16))


# ---------------------------------------------------------------------------------- 64-bit addressing


def test_offsets_are_64_bit():
    """Every row/expert address in the kernels goes through ``_offset64``; evaluate it in a kernel on
    indices whose products pass 2³¹ (DeepSeek-V3: 256 experts × 7168 × 2048 weights; 300k tokens × 7168)."""
    from moe_lib.kernels import triton_kernels as tk

    index = torch.tensor([300_000, 255, 2**31 - 1, 7], dtype=torch.int32)
    stride = torch.tensor([7168, 7168 * 2048, 4096, 3], dtype=torch.int32)
    out = torch.zeros(4, dtype=torch.int64)
    tk._offset_probe_kernel[(1,)](index, stride, out, 4, BLOCK=4)
    expected = index.long() * stride.long()
    assert torch.equal(out, expected)
    assert (expected > 2**31 - 1).sum() == 3  # the case is real: int32 arithmetic would wrap
    wrapped = (index.numpy().astype(np.int32) * stride.numpy().astype(np.int32))
    assert not np.array_equal(wrapped.astype(np.int64), expected.numpy())


def test_every_kernel_address_uses_offset64():
    """Source check: in the GEMM and combine kernels, row and expert indices reach a pointer only through
    ``_offset64`` (a plain ``rows * stride`` would be int32)."""
    import inspect
    import re

    from moe_lib.kernels import triton_kernels as tk

    for fn in [*tk.GEMM_KERNELS.values(), tk._up_tile, tk._down_tile, tk._dh_tile, tk._combine_kernel,
               tk._router_kernel, tk._wgrad_reduce_kernel]:
        src = inspect.getsource(fn.fn)
        bad = re.findall(r"\b(rows|tok|assign|arow|brow|rt|e)\s*\*\s*stride", src)
        assert not bad, f"{fn.fn.__name__} multiplies {bad} by a stride in int32"


# ------------------------------------------------------------------------------------------ bad input


def test_bad_input_names_the_argument():
    logits = torch.randn(4, 8)
    with pytest.raises(ValueError, match="unknown impl .cuda.; accepted values"):
        K.route(logits, 2, impl="cuda")
    with pytest.raises(ValueError, match="score"):
        K.route(logits, 2, score="relu")
    with pytest.raises(ValueError, match="top_k"):
        K.route(logits, 9)
    with pytest.raises(ValueError, match="bias"):
        K.route(logits, 2, bias=torch.zeros(7))
    experts = _experts("random", 4, 2, 8)
    with pytest.raises(ValueError, match="block_m must be one of"):
        K.permute_metadata(experts, 8, block_m=48)
    with pytest.raises(TypeError, match="experts must be an integer tensor"):
        K.permute_metadata(experts.float(), 8)
    meta = K.permute_metadata(experts, 8)
    ws = _weights(8, 16, 32)
    with pytest.raises(ValueError, match="must match meta"):
        K.expert_ffn(torch.randn(5, 16), torch.rand(5, 2), meta, *ws)
    with pytest.raises(ValueError, match="w_down must have shape"):
        K.expert_ffn(torch.randn(4, 16), torch.rand(4, 2), meta, ws[0], ws[1], ws[2][:, :8])
    with pytest.raises(TypeError, match="share one dtype"):
        K.expert_ffn(torch.randn(4, 16).half(), torch.rand(4, 2), meta, *ws)
    with pytest.raises(ValueError, match="activation"):
        K.expert_ffn(torch.randn(4, 16), torch.rand(4, 2), meta, *ws, activation="swish")
    with pytest.raises(ValueError, match="with w_up=None, w_gate must be the interleaved"):
        K.expert_ffn(torch.randn(4, 16), torch.rand(4, 2), meta, ws[0][..., :31], None, ws[2])
    with pytest.raises(ValueError, match="unknown backend .cuda."):
        MoELayer(16, 32, 4, backend="cuda")


def test_gpu_check_smoke_runs(tmp_path):
    """The device check of benchmarks/run_h200.sh, on tiny shapes (here: the interpreter, float32)."""
    import json

    from moe_lib.kernels import gpu_check

    out = tmp_path / "check.json"
    assert gpu_check.main(["--smoke", "--tokens", "24", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["shape"] for r in rows] == ["smoke-coarse", "smoke-fine"]
    assert all(r["ok"] and r["deterministic"] and r["relerr_dx"] < 1e-5 for r in rows)


@pytest.mark.parametrize("router,options", [
    ("soft", {"top_k": None, "router_options": {"slots_per_expert": 2}}),   # Soft MoE's slot plan
    ("expert_choice", {"top_k": 2}),
    ("hash", {"top_k": 1}),
    ("gshard", {"top_k": 2}),   # training mode: second experts dropped by the coin flip (valid mask)
])
def test_triton_backend_serves_every_router(router, options):
    torch.manual_seed(0)
    ref = MoELayer(16, 32, 4, expert="swiglu", backend="loop", router=router, **options)
    layer = MoELayer(16, 32, 4, expert="swiglu", backend="triton", router=router, **options)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(12, 16)
    kwargs = {"token_ids": torch.randint(0, 50, (12,))} if router == "hash" else {}
    torch.manual_seed(1)
    y_ref = ref(x, **kwargs)
    torch.manual_seed(1)  # the same random choices (GShard's coin flips) in both layers
    y = layer(x, **kwargs)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------ tuned table


def _small_candidates():
    gemm = [{"BN": 16, "BK": 16, "num_warps": 4, "num_stages": 2},
            {"BN": 32, "BK": 16, "num_warps": 4, "num_stages": 2}]
    wgrad = [{**c, "BM": 16} for c in gemm]
    return {"up": gemm, "down": gemm, "dh": gemm, "wgrad": wgrad}


def test_tuned_table_is_read_for_its_device_only(tmp_path, monkeypatch):
    """A (fake) table: its entry wins on the device it names, for its key only; elsewhere the heuristic."""
    import json

    from moe_lib.kernels import config

    cfg = {"BN": 256, "BK": 32, "num_warps": 8, "num_stages": 3}
    table = {"format": 1, "device": "Fake GPU 9000", "entries": [
        {"op": "up", "block_m": 128, "k": 4096, "n": 14336, "config": cfg},
        {"op": "wgrad_down", "block_m": 0, "k": 14336, "n": 4096, "config": {**cfg, "BM": 64}}]}
    (tmp_path / "fake.json").write_text(json.dumps(table))
    monkeypatch.setattr(config, "TUNED_DIR", tmp_path)
    config.load_tables.cache_clear()
    try:
        assert config.gemm_meta("up", 128, "up", 4096, 14336, device="Fake GPU 9000") == cfg
        assert config.gemm_meta("wgrad", 0, "wgrad_down", 14336, 4096, device="Fake GPU 9000")["BM"] == 64
        heuristic = config.gemm_meta("up", 128)
        assert config.gemm_meta("up", 128, "up", 4096, 14336, device="Other GPU") == heuristic
        assert config.gemm_meta("up", 64, "up", 4096, 14336, device="Fake GPU 9000") == config.gemm_meta("up", 64)
        assert config.gemm_meta("up", 128, "up", 4096, 14336) == heuristic  # the interpreter names no device
        with pytest.raises(ValueError, match="launches the 'up' kernel, not 'down'"):
            config.gemm_meta("down", 128, "up", 4096, 14336)
        table["entries"][0]["config"] = {"BN": 256}
        (tmp_path / "fake.json").write_text(json.dumps(table))
        config.load_tables.cache_clear()
        with pytest.raises(ValueError, match=r"fake.json is malformed: up/bm128/k4096/n14336: a 'up' config must"):
            config.load_tables()
    finally:
        monkeypatch.undo()
        config.load_tables.cache_clear()


def test_tune_times_each_candidate_through_the_real_launch(tmp_path, monkeypatch):
    """tune_case on a tiny shape in the interpreter, with a fake clock that reports the BN the launched kernel
    actually received: so each candidate reaches the launch; the table picks the faster; gemm_meta reads it."""
    import json

    from moe_lib.bench.shapes import Shape
    from moe_lib.kernels import config, tune
    from moe_lib.kernels import triton_kernels as tk

    launched = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                launched.append(kwargs["BN"])
                return self.kernel[grid](*args, **kwargs)
            return run

    monkeypatch.setattr(tk, "GEMM_KERNELS", {k: Recorder(v) for k, v in tk.GEMM_KERNELS.items()})

    def bench(fn):
        fn()
        return float(launched[-1])  # "time" = the BN the kernel was launched with

    shape = Shape("tiny", 32, 24, 4, 2)
    rows = tune.tune_case(shape, 20, bench, candidates=_small_candidates(), dtype=torch.float32, device="cpu")
    assert {r["op"] for r in rows} == {"up", "down", "dh", "dx", "wgrad_gu", "wgrad_down"}
    assert all(r["ms"] == r["config"]["BN"] for r in rows), rows
    table = tune.build_table({"tiny/T=20": rows}, {"device": "Fake GPU 9000"})
    assert len(table["entries"]) == 6 and all(e["config"]["BN"] == 16 for e in table["entries"])
    (tmp_path / "fake.json").write_text(json.dumps(table))
    monkeypatch.setattr(config, "TUNED_DIR", tmp_path)
    config.load_tables.cache_clear()
    try:
        assert config.gemm_meta("down", 16, "dx", 48, 32, device="Fake GPU 9000")["BN"] == 16
    finally:
        monkeypatch.undo()
        config.load_tables.cache_clear()
    assert tune.device_slug("NVIDIA H200") == "h200"
    assert tune.main(["--shapes", "olmoe-1b-7b"]) == 2  # no GPU here: refuses, writes nothing
