"""The Triton kernels of the fused MoE path, and the launchers that size their grids.

Data path (one MoE FFN layer, ``T`` tokens, ``k`` choices, ``E`` experts, ``N = T·k`` assignments)::

    logits [T, E] ─ _router_kernel ─▶ weights [T, k], experts [T, k]
    experts ─ _metadata_small_kernel ─▶ everything below in one program, when N ≤ 4096 (decode), else:
    experts ─ _count_kernel ─▶ per-block histograms ─ _scan_kernel ─▶ per-expert prefix, counts
            ─ _schedule_kernel ─▶ offsets [E+1], tile schedule ─ _scatter_kernel ─▶ row_assignment [N]
    x ─ _up_kernel (gather rows, one wide GEMM over interleaved gate|up, act(g)·u epilogue) ─▶ h [N, f]
        (+ g, u interleaved [N, 2f], saved for backward)
    h ─ _down_kernel (GEMM, ·w epilogue, store to the assignment's slot) ─▶ out [T·k, d]
    out ─ _combine_kernel (Σ over the k slots, fixed order) ─▶ y [T, d]

Backward: ``_dh_kernel`` (dy gathered by token, ``G = dy W_dᵀ``, epilogue: the routing-weight gradient
``⟨G, h⟩`` and the gated activation's backward, ``dg|du`` interleaved) → ``_down_kernel`` again for ``dX``
(one GEMM over ``K = 2f`` against the interleaved weights, no scale) → ``_combine_kernel``; ``_wgrad_kernel``
for ``dW_d`` and, in one pass over the gathered x, ``dW_gu`` (interleaved, one GEMM of width ``2f``), each a
reduction over an expert's rows, split over several programs for a heavy expert (``_wgrad_schedule_kernel``,
``_wgrad_reduce_kernel``). No kernel uses atomics, so every result is bitwise deterministic.

Every address that involves a row index or an expert index is computed in 64-bit (:func:`_offset64`):
``T·d`` and ``E·d·f`` pass 2³¹ on real shapes (DeepSeek-V3: 256·7168·2048 ≈ 3.8·10⁹ weight elements).

All GEMM grids run over a fixed number of tile slots (``m + ⌊(N − m) / block_m⌋``, ``m = min(E, N)``: the
most tiles any routing can need, :func:`moe_lib.dispatch.max_tiles`), never over a count read back from the
device, so a forward pass launches without a host synchronisation. At decode this is the number of live tiles
(one per chosen expert), not ``E`` spare slots per column block. The tile-slot GEMMs (up, down, dh) keep
their body in a ``_*_tile`` function so that, with ``PERSISTENT`` (``MOE_LIB_PERSISTENT=1``, off by default),
a grid of one program per SM loops over the same work items in the same order.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import config

# --------------------------------------------------------------------------------------------- helpers


@triton.jit
def _offset64(index, stride):
    """``index · stride`` in 64-bit: row/expert indices times strides overflow int32 on real shapes."""
    return index.to(tl.int64) * stride


@triton.jit
def _act(x, ACT: tl.constexpr):
    """0 = SiLU, 1 = GELU (erf), 2 = ReLU, 3 = tanh; float32 in, float32 out."""
    if ACT == 0:
        y = x * tl.sigmoid(x)
    elif ACT == 1:
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 2:
        y = tl.maximum(x, 0.0)
    else:
        y = 2.0 * tl.sigmoid(2.0 * x) - 1.0
    return y


@triton.jit
def _act_grad(x, ACT: tl.constexpr):
    """Derivative of :func:`_act` at ``x``."""
    if ACT == 0:
        s = tl.sigmoid(x)
        d = s * (1.0 + x * (1.0 - s))
    elif ACT == 1:
        d = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    elif ACT == 2:
        d = (x > 0.0).to(tl.float32)
    else:
        t = 2.0 * tl.sigmoid(2.0 * x) - 1.0
        d = 1.0 - t * t
    return d


@triton.jit
def _tile(pid, num_slots, TileExpert, TileRow, Offsets, width, BM: tl.constexpr, BN: tl.constexpr,
          GROUP: tl.constexpr):
    """Work item ``pid``'s tile and output column block, its expert (-1: unused slot), grouped rows and mask.

    The ``num_slots · ⌈width / BN⌉`` work items enumerate (tile slot, column block) pairs in groups of
    ``GROUP`` tiles: the items that run together share ``GROUP`` tiles' rows and each column block's weights,
    so both stay in L2 (the grouped ordering of Triton's matmul tutorial, applied to tile slots)."""
    num_n = tl.cdiv(width, BN)
    per_group = GROUP * num_n
    first = (pid // per_group) * GROUP
    size = tl.minimum(num_slots - first, GROUP)
    slot = first + (pid % per_group) % size
    nb = (pid % per_group) // size
    e = tl.load(TileExpert + slot)
    row0 = tl.load(TileRow + slot)
    end = tl.load(Offsets + tl.maximum(e, 0) + 1)
    rows = row0 + tl.arange(0, BM)
    return e, rows, rows < end, nb


# ---------------------------------------------------------------------------------------------- router


@triton.jit
def _router_kernel(Logits, Bias, Weights, Experts, T, E, stride_l,
                   K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr,
                   SCORE: tl.constexpr, RENORM: tl.constexpr, HAS_BIAS: tl.constexpr):
    """One program per ``BT`` tokens: score (0 softmax, 1 sigmoid) → k rounds of argmax (lowest index wins
    ties) → gather the unbiased scores → renormalise. Everything stays in registers."""
    rt = tl.program_id(0) * BT + tl.arange(0, BT)
    re = tl.arange(0, BE)
    tmask = rt < T
    emask = re < E
    l = tl.load(Logits + _offset64(rt, stride_l)[:, None] + re[None, :],
                mask=tmask[:, None] & emask[None, :], other=0.0).to(tl.float32)
    if SCORE == 0:
        l = tl.where(emask[None, :], l, -float("inf"))
        mx = tl.max(l, axis=1)
        p = tl.exp(l - mx[:, None])
        p = tl.where(emask[None, :], p, 0.0)
        s = p / tl.sum(p, axis=1)[:, None]
    else:
        s = tl.sigmoid(l)
    sel = s
    if HAS_BIAS:
        sel = s + tl.load(Bias + re, mask=emask, other=0.0).to(tl.float32)[None, :]
    sel = tl.where(emask[None, :], sel, -float("inf"))
    kk = tl.arange(0, KP)
    w_tile = tl.zeros((BT, KP), tl.float32)
    i_tile = tl.zeros((BT, KP), tl.int32)
    for j in tl.static_range(K):
        best = tl.max(sel, axis=1)
        idx = tl.min(tl.where(sel == best[:, None], re[None, :], BE), axis=1)
        idx = tl.minimum(idx, E - 1)  # NaN scores: stay in bounds (routing is then unspecified)
        pick = re[None, :] == idx[:, None]
        val = tl.sum(tl.where(pick, s, 0.0), axis=1)
        w_tile = tl.where(kk[None, :] == j, val[:, None], w_tile)
        i_tile = tl.where(kk[None, :] == j, idx[:, None], i_tile)
        sel = tl.where(pick, -float("inf"), sel)
    if RENORM:
        w_tile = w_tile / tl.sum(w_tile, axis=1)[:, None]
    out = _offset64(rt, K)[:, None] + kk[None, :]
    omask = tmask[:, None] & (kk[None, :] < K)
    tl.store(Weights + out, w_tile, mask=omask)
    tl.store(Experts + out, i_tile, mask=omask)


# -------------------------------------------------------------------------------- permutation metadata


@triton.jit
def _count_kernel(Experts, BlockCounts, N, E, BN: tl.constexpr, BE: tl.constexpr):
    """Histogram of one block of ``BN`` assignments → ``BlockCounts[block, :E]``."""
    b = tl.program_id(0)
    ra = b * BN + tl.arange(0, BN)
    ids = tl.load(Experts + ra, mask=ra < N, other=0)
    hist = tl.histogram(ids, BE, mask=ra < N)
    re = tl.arange(0, BE)
    tl.store(BlockCounts + _offset64(b, E) + re, hist, mask=re < E)


@triton.jit
def _scan_kernel(BlockCounts, BlockPrefix, Counts, NB, E, BB: tl.constexpr, BE: tl.constexpr):
    """For ``BE`` experts: exclusive prefix of the block histograms over blocks, and the total count."""
    re = tl.program_id(0) * BE + tl.arange(0, BE)
    emask = re < E
    carry = tl.zeros((BE,), tl.int32)
    for b0 in range(0, NB, BB):
        rb = b0 + tl.arange(0, BB)
        m = (rb < NB)[:, None] & emask[None, :]
        ptr = _offset64(rb, E)[:, None] + re[None, :]
        c = tl.load(BlockCounts + ptr, mask=m, other=0)
        incl = tl.cumsum(c, axis=0)
        tl.store(BlockPrefix + ptr, incl - c + carry[None, :], mask=m)
        carry += tl.sum(c, axis=0)
    tl.store(Counts + re, carry, mask=emask)


@triton.jit
def _schedule_slots(counts, re, emask, slots, E, BM: tl.constexpr):
    """Expert (``E`` for an unused slot) and first grouped row of tile ``slots``, from ``counts`` held in
    registers: expert ``e`` owns ``ceil(counts[e] / BM)`` consecutive slots."""
    ends = tl.cumsum(counts, axis=0)
    starts = ends - counts
    tiles = (counts + BM - 1) // BM
    tile_ends = tl.cumsum(tiles, axis=0)
    tile_starts = tile_ends - tiles
    # expert of a slot = number of experts whose tiles end at or before it
    tile_ends_m = tl.where(emask, tile_ends, 2147483647)
    e = tl.sum((tile_ends_m[None, :] <= slots[:, None]).to(tl.int32), axis=1)
    pick = re[None, :] == e[:, None]
    first_tile = tl.sum(tl.where(pick, tile_starts[None, :], 0), axis=1)
    first_row = tl.sum(tl.where(pick, starts[None, :], 0), axis=1)
    return e, first_row + (slots - first_tile) * BM


@triton.jit
def _store_schedule(TileExpert, TileRow, counts, re, emask, slots, E, MAX_TILES, BM: tl.constexpr):
    """Write tile ``slots`` of the schedule (``-1`` / row 0 for unused slots)."""
    e, row = _schedule_slots(counts, re, emask, slots, E, BM)
    used = e < E
    smask = slots < MAX_TILES
    tl.store(TileExpert + slots, tl.where(used, e, -1), mask=smask)
    tl.store(TileRow + slots, tl.where(used, row, 0), mask=smask)


@triton.jit
def _schedule_kernel(Counts, Offsets, TileExpert, TileRow, E, MAX_TILES,
                     BM: tl.constexpr, BE: tl.constexpr, BS: tl.constexpr):
    """Offsets ``[E+1]`` (program 0 writes them) and ``BS`` slots of the tile schedule per program.

    Each program recomputes the tiny cumulative sums over ``E`` so no program waits for another."""
    re = tl.arange(0, BE)
    emask = re < E
    counts = tl.load(Counts + re, mask=emask, other=0)
    if tl.program_id(0) == 0:
        tl.store(Offsets + re, tl.cumsum(counts, axis=0) - counts, mask=emask)
        tl.store(Offsets + E, tl.sum(counts, axis=0))
    _store_schedule(TileExpert, TileRow, counts, re, emask, tl.program_id(0) * BS + tl.arange(0, BS), E,
                    MAX_TILES, BM)


@triton.jit
def _metadata_small_kernel(Experts, Counts, Offsets, RowAssignment, TileExpert, TileRow, N, E, MAX_TILES,
                           BN: tl.constexpr, SHIFT: tl.constexpr, BE: tl.constexpr, BM: tl.constexpr,
                           BS: tl.constexpr):
    """All the metadata in one program when ``N ≤ BN`` (decode): sort the keys ``expert·2^SHIFT +
    assignment`` (unique, so the sort is stable by construction), histogram, offsets, tile schedule.
    One launch instead of four: at decode sizes launches, not bytes, are the cost."""
    ra = tl.arange(0, BN)
    amask = ra < N
    ids = tl.load(Experts + ra, mask=amask, other=E)  # padding sorts after every real expert
    keys = tl.sort((ids << SHIFT) | ra)
    tl.store(RowAssignment + ra, keys & (BN - 1), mask=amask)
    re = tl.arange(0, BE)
    emask = re < E
    counts = tl.histogram(tl.where(amask, ids, 0), BE, mask=amask)
    tl.store(Counts + re, counts, mask=emask)
    tl.store(Offsets + re, tl.cumsum(counts, axis=0) - counts, mask=emask)
    tl.store(Offsets + E, tl.sum(counts, axis=0))
    for s0 in range(0, MAX_TILES, BS):
        _store_schedule(TileExpert, TileRow, counts, re, emask, s0 + tl.arange(0, BS), E, MAX_TILES, BM)


@triton.jit
def _scatter_kernel(Experts, BlockPrefix, Offsets, RowAssignment, N, E, BN: tl.constexpr):
    """Grouped row of each assignment = expert start + earlier blocks' count + rank inside this block
    (a stable counting sort), then ``RowAssignment[row] = assignment``."""
    b = tl.program_id(0)
    i = tl.arange(0, BN)
    ra = b * BN + i
    amask = ra < N
    ids = tl.load(Experts + ra, mask=amask, other=-1)
    same_before = (ids[:, None] == ids[None, :]) & (i[None, :] < i[:, None])
    rank = tl.sum(same_before.to(tl.int32), axis=1)
    safe = tl.where(amask, ids, 0)
    row = tl.load(Offsets + safe, mask=amask, other=0) + tl.load(BlockPrefix + _offset64(b, E) + safe,
                                                                  mask=amask, other=0) + rank
    tl.store(RowAssignment + row, ra, mask=amask)


# ------------------------------------------------------------------------------------- grouped GEMMs


@triton.jit
def _up_tile(work, num_slots, X, WGU, H, GU, RowAssignment, TileExpert, TileRow, Offsets, top_k, d, f, stride_x,
             stride_we, stride_wk, stride_wn, stride_h, stride_gu, ACT: tl.constexpr, SAVE_GU: tl.constexpr,
             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
    """One work item of :func:`_up_kernel` (an unused tile slot does nothing)."""
    e, rows, rmask, nb = _tile(work, num_slots, TileExpert, TileRow, Offsets, f, BM, BN, GROUP)
    if e >= 0:
        tok = tl.load(RowAssignment + rows, mask=rmask, other=0) // top_k
        rn2 = nb * 2 * BN + tl.arange(0, 2 * BN)
        nmask2 = rn2 < 2 * f
        a_ptr = X + _offset64(tok, stride_x)[:, None]
        w_off = _offset64(e, stride_we) + rn2[None, :] * stride_wn
        acc = tl.zeros((BM, 2 * BN), tl.float32)
        for k0 in range(0, d, BK):
            rk = k0 + tl.arange(0, BK)
            kmask = rk < d
            a = tl.load(a_ptr + rk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(WGU + w_off + _offset64(rk, stride_wk)[:, None], mask=kmask[:, None] & nmask2[None, :],
                        other=0.0)
            acc = tl.dot(a, b, acc)
        g, u = tl.split(tl.reshape(acc, (BM, BN, 2)))
        h = _act(g, ACT) * u
        rn = nb * BN + tl.arange(0, BN)
        h_ptr = H + _offset64(rows, stride_h)[:, None] + rn[None, :]
        tl.store(h_ptr, h.to(H.dtype.element_ty), mask=rmask[:, None] & (rn < f)[None, :])
        if SAVE_GU:
            gu_ptr = GU + _offset64(rows, stride_gu)[:, None] + rn2[None, :]
            tl.store(gu_ptr, acc.to(GU.dtype.element_ty), mask=rmask[:, None] & nmask2[None, :])


@triton.jit
def _up_kernel(X, WGU, H, GU, RowAssignment, TileExpert, TileRow, Offsets, top_k, d, f, stride_x, stride_we,
               stride_wk, stride_wn, stride_h, stride_gu, num_slots, ACT: tl.constexpr, SAVE_GU: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr = 8,
               PERSISTENT: tl.constexpr = False):
    """``h[r] = act(x_t W_g[e]) ⊙ (x_t W_u[e])`` for a ``BM × BN`` block of one expert's rows.

    ``WGU [E, d, 2f]`` holds the gate and up weights interleaved by column (``2j``: gate ``j``, ``2j+1``: up
    ``j``; :func:`moe_lib.kernels.interleave_gate_up`), so each K step is one ``tl.dot`` of width ``2·BN``
    (one B tile, one accumulator: the tensor cores see a wide GEMM, as in SonicMoE and Triton's
    ``triton_kernels``) and the epilogue splits the accumulator into its gate and up halves in registers.
    The gather ``x[t]`` (``t = assignment // k``) happens inside the A-tile load: the permuted copy of the
    tokens is never written. The activation and product are the epilogue, so ``g`` and ``u`` reach memory
    (interleaved, as computed) only when the backward needs them (``SAVE_GU``)."""
    if PERSISTENT:  # a fixed grid of programs (about one per SM), each looping over work items
        for work in range(tl.program_id(0), num_slots * tl.cdiv(f, BN), tl.num_programs(0)):
            _up_tile(work, num_slots, X, WGU, H, GU, RowAssignment, TileExpert, TileRow, Offsets, top_k, d, f, stride_x,
                     stride_we, stride_wk, stride_wn, stride_h, stride_gu, ACT, SAVE_GU, BM, BN, BK, GROUP)
    else:
        _up_tile(tl.program_id(0), num_slots, X, WGU, H, GU, RowAssignment, TileExpert, TileRow, Offsets, top_k, d, f,
                 stride_x, stride_we, stride_wk, stride_wn, stride_h, stride_gu, ACT, SAVE_GU, BM, BN, BK, GROUP)


@triton.jit
def _down_tile(work, num_slots, A, B1, Out, Weights, RowAssignment, TileExpert, TileRow, Offsets, K1, n_out, stride_a,
               stride_b1e, stride_b1k, stride_b1n, stride_out, SCALE: tl.constexpr, BM: tl.constexpr,
               BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
    """One work item of :func:`_down_kernel` (an unused tile slot does nothing)."""
    e, rows, rmask, nb = _tile(work, num_slots, TileExpert, TileRow, Offsets, n_out, BM, BN, GROUP)
    if e >= 0:
        assign = tl.load(RowAssignment + rows, mask=rmask, other=0)
        rn = nb * BN + tl.arange(0, BN)
        nmask = rn < n_out
        a_ptr = A + _offset64(rows, stride_a)[:, None]
        acc = tl.zeros((BM, BN), tl.float32)
        b1 = B1 + _offset64(e, stride_b1e) + rn[None, :] * stride_b1n
        for k0 in range(0, K1, BK):
            rk = k0 + tl.arange(0, BK)
            kmask = rk < K1
            a = tl.load(a_ptr + rk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(b1 + _offset64(rk, stride_b1k)[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0)
            acc = tl.dot(a, b, acc)
        if SCALE:
            acc = acc * tl.load(Weights + assign, mask=rmask, other=0.0).to(tl.float32)[:, None]
        out_ptr = Out + _offset64(assign, stride_out)[:, None] + rn[None, :]
        tl.store(out_ptr, acc.to(Out.dtype.element_ty), mask=rmask[:, None] & nmask[None, :])


@triton.jit
def _down_kernel(A, B1, Out, Weights, RowAssignment, TileExpert, TileRow, Offsets, K1, n_out, stride_a, stride_b1e,
                 stride_b1k, stride_b1n, stride_out, num_slots, SCALE: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr = 8, PERSISTENT: tl.constexpr = False):
    """``out[a] = (w_a ·) A_r B1[e]`` (``K1`` columns of ``A``) stored at the row of assignment ``a``.

    Forward: ``A = h``, ``B1 = W_d``, ``SCALE``: the routing weight is applied in the epilogue and the
    result lands directly in the token's ``j``-th slot of ``[T·k, d]`` — no scatter pass, no atomics.
    Backward ``dX``: ``A = dgu`` (interleaved ``[dg | du]`` columns), ``B1 = W_guᵀ`` (a strided view of the
    interleaved weights, no copy): one GEMM with ``K1 = 2f``."""
    if PERSISTENT:  # a fixed grid of programs (about one per SM), each looping over work items
        for work in range(tl.program_id(0), num_slots * tl.cdiv(n_out, BN), tl.num_programs(0)):
            _down_tile(work, num_slots, A, B1, Out, Weights, RowAssignment, TileExpert, TileRow, Offsets, K1, n_out,
                       stride_a, stride_b1e, stride_b1k, stride_b1n, stride_out, SCALE, BM, BN, BK, GROUP)
    else:
        _down_tile(tl.program_id(0), num_slots, A, B1, Out, Weights, RowAssignment, TileExpert, TileRow, Offsets, K1,
                   n_out, stride_a, stride_b1e, stride_b1k, stride_b1n, stride_out, SCALE, BM, BN, BK, GROUP)


@triton.jit
def _combine_kernel(Src, Y, T, n_out, top_k, stride_src, stride_y, BT: tl.constexpr, BN: tl.constexpr):
    """``y[t] = Σ_j src[t·k + j]`` in float32, ``j`` in a fixed order: a deterministic combine."""
    rt = tl.program_id(0) * BT + tl.arange(0, BT)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    m = (rt < T)[:, None] & (rn < n_out)[None, :]
    acc = tl.zeros((BT, BN), tl.float32)
    for j in range(0, top_k):
        src = Src + _offset64(rt * top_k + j, stride_src)[:, None] + rn[None, :]
        acc += tl.load(src, mask=m, other=0.0).to(tl.float32)
    tl.store(Y + _offset64(rt, stride_y)[:, None] + rn[None, :], acc.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _dh_tile(work, num_slots, DY, WD, GU, Weights, DGU, DWPartial, RowAssignment, TileExpert, TileRow, Offsets, top_k,
             d_out, f, stride_dy, stride_wde, stride_wdf, stride_wdd, stride_gu, stride_dgu, stride_dwp,
             ACT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
    """One work item of :func:`_dh_kernel` (an unused tile slot does nothing)."""
    e, rows, rmask, nb = _tile(work, num_slots, TileExpert, TileRow, Offsets, f, BM, BN, GROUP)
    if e >= 0:
        assign = tl.load(RowAssignment + rows, mask=rmask, other=0)
        tok = assign // top_k
        rn = nb * BN + tl.arange(0, BN)
        nmask = rn < f
        dy_ptr = DY + _offset64(tok, stride_dy)[:, None]
        wd = WD + _offset64(e, stride_wde) + _offset64(rn, stride_wdf)[None, :]
        acc = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, d_out, BK):
            rk = k0 + tl.arange(0, BK)
            kmask = rk < d_out
            a = tl.load(dy_ptr + rk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(wd + rk[:, None] * stride_wdd, mask=kmask[:, None] & nmask[None, :], other=0.0)
            acc = tl.dot(a, b, acc)
        rn2 = nb * 2 * BN + tl.arange(0, 2 * BN)
        m2 = rmask[:, None] & (rn2 < 2 * f)[None, :]
        gu = tl.load(GU + _offset64(rows, stride_gu)[:, None] + rn2[None, :], mask=m2, other=0.0).to(tl.float32)
        g, u = tl.split(tl.reshape(gu, (BM, BN, 2)))
        a_g = _act(g, ACT)
        partial = tl.sum(acc * a_g * u, axis=1)
        tl.store(DWPartial + _offset64(rows, stride_dwp) + nb, partial, mask=rmask)
        dh = acc * tl.load(Weights + assign, mask=rmask, other=0.0).to(tl.float32)[:, None]
        dgu = tl.reshape(tl.join(dh * u * _act_grad(g, ACT), dh * a_g), (BM, 2 * BN))
        tl.store(DGU + _offset64(rows, stride_dgu)[:, None] + rn2[None, :], dgu.to(DGU.dtype.element_ty), mask=m2)


@triton.jit
def _dh_kernel(DY, WD, GU, Weights, DGU, DWPartial, RowAssignment, TileExpert, TileRow, Offsets, top_k, d_out, f,
               stride_dy, stride_wde, stride_wdf, stride_wdd, stride_gu, stride_dgu, stride_dwp, num_slots,
               ACT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr = 8,
               PERSISTENT: tl.constexpr = False):
    """``G = dy_t W_d[e]ᵀ`` for a ``BM × BN`` block of hidden units, with the epilogue: the routing-weight
    gradient's partial sum ``Σ_n G ⊙ act(g) ⊙ u`` (one column per hidden block, summed later in a fixed
    order), then ``dh = w G``, ``dg = dh ⊙ u ⊙ act'(g)``, ``du = dh ⊙ act(g)``. ``g, u`` are read and
    ``dg, du`` written interleaved by column (the layout of ``_up_kernel``'s saved pre-activations), one
    ``BM × 2BN`` block each."""
    if PERSISTENT:  # a fixed grid of programs (about one per SM), each looping over work items
        for work in range(tl.program_id(0), num_slots * tl.cdiv(f, BN), tl.num_programs(0)):
            _dh_tile(work, num_slots, DY, WD, GU, Weights, DGU, DWPartial, RowAssignment, TileExpert, TileRow, Offsets,
                     top_k, d_out, f, stride_dy, stride_wde, stride_wdf, stride_wdd, stride_gu, stride_dgu, stride_dwp,
                     ACT, BM, BN, BK, GROUP)
    else:
        _dh_tile(tl.program_id(0), num_slots, DY, WD, GU, Weights, DGU, DWPartial, RowAssignment, TileExpert, TileRow,
                 Offsets, top_k, d_out, f, stride_dy, stride_wde, stride_wdf, stride_wdd, stride_gu, stride_dgu,
                 stride_dwp, ACT, BM, BN, BK, GROUP)


@triton.jit
def _wgrad_schedule_kernel(Counts, Offsets, UnitExpert, UnitRows, UnitPartial, SplitExpert, SplitFirst, SplitCount,
                           E, MAX_UNITS, MAX_SPLIT, R, BE: tl.constexpr, BS: tl.constexpr):
    """Work units of the weight-gradient GEMM: expert ``e`` is cut into ``max(1, ⌈n_e / R⌉)`` units of at most
    ``R`` consecutive rows (an empty expert keeps one unit, which writes its zeros). A unit of an expert with
    one unit writes ``dW[e]`` directly; the units of a *split* expert (``n_e > R``) write float32 partials to
    consecutive slots, which :func:`_wgrad_reduce_kernel` sums in unit order. Per slot block of ``BS``: the
    unit table (expert or -1, rows ``[r0, r1)``, partial slot or -1) and the split-expert table (expert or -1,
    first partial slot, number of partials). Each program recomputes the cumulative sums over ``E``."""
    re = tl.arange(0, BE)
    emask = re < E
    counts = tl.load(Counts + re, mask=emask, other=0)
    starts = tl.load(Offsets + re, mask=emask, other=0)
    units = tl.where(emask, tl.maximum((counts + R - 1) // R, 1), 0)
    unit_ends = tl.cumsum(units, axis=0)
    unit_starts = unit_ends - units
    heavy = units >= 2
    partials = tl.where(heavy, units, 0)
    partial_starts = tl.cumsum(partials, axis=0) - partials
    heavy_ends = tl.cumsum(heavy.to(tl.int32), axis=0)
    slots = tl.program_id(0) * BS + tl.arange(0, BS)
    # unit slots: expert = number of experts whose units end at or before the slot
    e = tl.sum((tl.where(emask, unit_ends, 2147483647)[None, :] <= slots[:, None]).to(tl.int32), axis=1)
    pick = re[None, :] == e[:, None]
    s = slots - tl.sum(tl.where(pick, unit_starts[None, :], 0), axis=1)
    start = tl.sum(tl.where(pick, starts[None, :], 0), axis=1)
    r0 = start + s * R
    r1 = tl.minimum(r0 + R, start + tl.sum(tl.where(pick, counts[None, :], 0), axis=1))
    split = tl.sum(tl.where(pick & heavy[None, :], 1, 0), axis=1) > 0
    used = e < E
    umask = slots < MAX_UNITS
    tl.store(UnitExpert + slots, tl.where(used, e, -1), mask=umask)
    tl.store(UnitRows + 2 * slots, tl.where(used, r0, 0), mask=umask)
    tl.store(UnitRows + 2 * slots + 1, tl.where(used, r1, 0), mask=umask)
    first = tl.sum(tl.where(pick, partial_starts[None, :], 0), axis=1)
    tl.store(UnitPartial + slots, tl.where(used & split, first + s, -1), mask=umask)
    # split-expert slots: the i-th expert with n_e > R
    h = tl.sum((tl.where(emask, heavy_ends, 2147483647)[None, :] <= slots[:, None]).to(tl.int32), axis=1)
    hpick = re[None, :] == h[:, None]
    hused = h < E
    smask = slots < MAX_SPLIT
    tl.store(SplitExpert + slots, tl.where(hused, h, -1), mask=smask)
    tl.store(SplitFirst + slots, tl.sum(tl.where(hpick, partial_starts[None, :], 0), axis=1), mask=smask)
    tl.store(SplitCount + slots, tl.sum(tl.where(hpick, units[None, :], 0), axis=1), mask=smask)


@triton.jit
def _wgrad_kernel(A, B, DW, Partial, Weights, RowAssignment, Offsets, UnitExpert, UnitRows,
                  UnitPartial, top_k, M, n_out, stride_a, stride_b, stride_dwe, stride_dwm, stride_dwn, stride_p,
                  GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, SCALE_A: tl.constexpr, SPLIT: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                  GROUP: tl.constexpr = 8):
    """``dW[e] = Σ_{rows r of e} (w_r ·) A_rᵀ B_r`` for one ``BM × BN`` block of expert ``e``'s weight.

    A row is a grouped row, or the token it came from (``GATHER``). The 1-D grid puts the work unit on the
    slow axis: consecutive programs are the output blocks of one unit (they read the same rows of ``A`` and
    ``B``), in groups of ``GROUP`` block rows (the grouped ordering of Triton's matmul tutorial) so each
    column block of ``A`` and ``B`` is reused from L2. Without ``SPLIT`` a unit is an expert, its rows
    ``Offsets[e]:Offsets[e+1]``; with ``SPLIT`` a unit is a row range from :func:`_wgrad_schedule_kernel` —
    a heavy expert's units reduce disjoint rows in parallel and store float32 partials (deterministic
    split-K: no atomics, summed in a fixed order by :func:`_wgrad_reduce_kernel`). An empty expert writes
    zeros. ``dW_g`` and ``dW_u`` are one GEMM: ``B = dgu`` interleaved gives ``dW_gu`` in the weights'
    interleaved layout."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(n_out, BN)
    per_unit = num_m * num_n
    unit = pid // per_unit
    t = pid % per_unit
    per_group = GROUP * num_n
    first_m = (t // per_group) * GROUP
    size = tl.minimum(num_m - first_m, GROUP)
    pm = first_m + (t % per_group) % size
    pn = (t % per_group) // size
    if SPLIT:
        e = tl.load(UnitExpert + unit)
        r0 = tl.load(UnitRows + 2 * unit)
        r1 = tl.load(UnitRows + 2 * unit + 1)
        slot = tl.load(UnitPartial + unit)
    else:
        e = unit
        r0 = tl.load(Offsets + e)
        r1 = tl.load(Offsets + e + 1)
        slot = -1
    if e < 0:
        return
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    mmask = rm < M
    nmask = rn < n_out
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(r0, r1, BK):
        rk = k0 + tl.arange(0, BK)
        kmask = rk < r1
        assign = tl.load(RowAssignment + rk, mask=kmask, other=0)
        if GATHER_A:
            arow = assign // top_k
        else:
            arow = rk
        if GATHER_B:
            brow = assign // top_k
        else:
            brow = rk
        at = tl.load(A + _offset64(arow, stride_a)[None, :] + rm[:, None], mask=mmask[:, None] & kmask[None, :],
                     other=0.0)
        if SCALE_A:
            w = tl.load(Weights + assign, mask=kmask, other=0.0).to(tl.float32)
            at = (at.to(tl.float32) * w[None, :]).to(A.dtype.element_ty)
        b_off = _offset64(brow, stride_b)[:, None] + rn[None, :]
        bmask = kmask[:, None] & nmask[None, :]
        acc = tl.dot(at, tl.load(B + b_off, mask=bmask, other=0.0), acc)
    omask = mmask[:, None] & nmask[None, :]
    if slot >= 0:  # one of a split expert's units: a float32 partial, summed later in unit order
        p_off = _offset64(slot, stride_p) + _offset64(rm, n_out)[:, None] + rn[None, :]
        tl.store(Partial + p_off, acc, mask=omask)
    else:
        out = _offset64(e, stride_dwe) + _offset64(rm, stride_dwm)[:, None] + rn[None, :] * stride_dwn
        tl.store(DW + out, acc.to(DW.dtype.element_ty), mask=omask)


@triton.jit
def _wgrad_reduce_kernel(Partial, DW, SplitExpert, SplitFirst, SplitCount, M, n_out, stride_p,
                         stride_dwe, stride_dwm, stride_dwn,
                         BM: tl.constexpr, BN: tl.constexpr):
    """``dW[e] = Σ_s partial[first_e + s]`` for the split experts, ``s`` in increasing order (the same sum,
    bit for bit, on every run), in float32, cast once."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(n_out, BN)
    i = pid // (num_m * num_n)
    t = pid % (num_m * num_n)
    e = tl.load(SplitExpert + i)
    if e < 0:
        return
    first = tl.load(SplitFirst + i)
    count = tl.load(SplitCount + i)
    rm = (t // num_n) * BM + tl.arange(0, BM)
    rn = (t % num_n) * BN + tl.arange(0, BN)
    omask = (rm < M)[:, None] & (rn < n_out)[None, :]
    block = _offset64(rm, n_out)[:, None] + rn[None, :]
    acc = tl.zeros((BM, BN), tl.float32)
    for s in range(0, count):
        acc += tl.load(Partial + _offset64(first + s, stride_p) + block, mask=omask, other=0.0)
    out = _offset64(e, stride_dwe) + _offset64(rm, stride_dwm)[:, None] + rn[None, :] * stride_dwn
    tl.store(DW + out, acc.to(DW.dtype.element_ty), mask=omask)


# ------------------------------------------------------------------------------------------- probes


@triton.jit
def _offset_probe_kernel(Index, Stride, Out, n, BLOCK: tl.constexpr):
    """Test hook: evaluates :func:`_offset64` on given indices and strides (no big allocation needed)."""
    i = tl.arange(0, BLOCK)
    m = i < n
    idx = tl.load(Index + i, mask=m, other=0)
    stride = tl.load(Stride + i, mask=m, other=0)
    tl.store(Out + i, _offset64(idx, stride), mask=m)


#: Kernels and the constexpr/keyword configuration a compile check should try (see ``compile_check``).
GEMM_KERNELS = {
    "up": _up_kernel,
    "down": _down_kernel,
    "dh": _dh_kernel,
    "wgrad": _wgrad_kernel,
}
OTHER_KERNELS = {
    "router": _router_kernel,
    "count": _count_kernel,
    "scan": _scan_kernel,
    "schedule": _schedule_kernel,
    "metadata_small": _metadata_small_kernel,
    "scatter": _scatter_kernel,
    "combine": _combine_kernel,
    "wgrad_schedule": _wgrad_schedule_kernel,
    "wgrad_reduce": _wgrad_reduce_kernel,
}
__all__ = ["config", "GEMM_KERNELS", "OTHER_KERNELS"]
