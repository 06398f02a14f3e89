"""Launchers for the Triton kernels and the autograd Functions that tie them together.

Only imported when Triton is; the public, validated entry points are in :mod:`moe_lib.kernels`.
"""
from __future__ import annotations

import functools

import torch
import triton
from torch import Tensor

from . import config
from . import triton_kernels as tk

ACT_CODES = {"silu": 0, "gelu": 1, "relu": 2, "tanh": 3}
TILE_KERNELS = ("up", "down", "dh")  # the kernels over tile slots (PERSISTENT, num_slots)
SCATTER_BLOCK = 64  # assignments per block of the counting sort (the rank uses a BLOCK² comparison)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _meta(kind: str, block_m: int, gemm: tuple | None = None) -> dict:
    """Blocks of kernel ``kind``; ``gemm = (op, k, n)`` names the GEMM for the tuned table."""
    op, k, n = gemm if gemm is not None else (None, None, None)
    return config.gemm_meta(kind, block_m, op, k, n)


@functools.lru_cache(maxsize=None)
def _tuned(kind: str):
    """An autotuned copy of a GEMM kernel (``MOE_LIB_AUTOTUNE=1``), keyed on the sizes that matter."""
    kernel = tk.GEMM_KERNELS[kind]
    keys = {"up": ["d", "f", "BM"], "down": ["K1", "n_out", "BM"], "dh": ["d_out", "f", "BM"],
            "wgrad": ["M", "n_out", "SPLIT"]}[kind]
    configs = []
    for c in config.autotune_configs(kind):
        c = dict(c)
        configs.append(triton.Config(c, num_warps=c.pop("num_warps"), num_stages=c.pop("num_stages")))
    # the dh kernel writes one partial-sum column per hidden block: configs with another BN leave other
    # columns behind, so the autotuner must zero that buffer between trials
    reset = ["DWPartial"] if kind == "dh" else None
    return triton.autotune(configs=configs, key=keys, reset_to_zero=reset)(kernel)


def _launch(kind: str, grid, *args, block_m: int | None = None, gemm: tuple | None = None, **constexprs):
    """Launch GEMM kernel ``kind`` (the GEMM ``gemm = (op, k, n)``): with the tuned table's blocks for this
    device, else the heuristic ones; autotuned when enabled."""
    if config.autotuning():
        if block_m is not None:
            constexprs["BM"] = block_m
        return _tuned(kind)[grid](*args, **constexprs)
    meta = _meta(kind, block_m or 0, gemm)
    if block_m is not None:
        meta = {**meta, "BM": block_m}
    if kind in TILE_KERNELS:
        meta["PERSISTENT"] = config.persistent()
    return tk.GEMM_KERNELS[kind][grid](*args, **constexprs, **meta)


# -------------------------------------------------------------------------------------------- router


def route(logits: Tensor, top_k: int, score: str, renormalize: bool, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """Launch the fused router on ``logits [T, E]``; returns float32 weights and int32 experts."""
    logits = logits.contiguous()
    num_tokens, num_experts = logits.shape
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits.device)
    experts = torch.empty(num_tokens, top_k, dtype=torch.int32, device=logits.device)
    if num_tokens == 0:
        return weights, experts
    block_e = _pow2(num_experts)
    block_t = max(1, min(64, 2048 // block_e))  # at 4096 scores per program (BE=64, BT=64, k=8) ptxas spilled
    has_bias = bias is not None
    tk._router_kernel[(triton.cdiv(num_tokens, block_t),)](
        logits, bias.float().contiguous() if has_bias else logits, weights, experts,
        num_tokens, num_experts, logits.stride(0),
        K=top_k, KP=_pow2(top_k), BT=block_t, BE=block_e,
        SCORE=0 if score == "softmax" else 1, RENORM=bool(renormalize), HAS_BIAS=has_bias,
    )
    return weights, experts


class RouteFunction(torch.autograd.Function):
    """Kernel forward; backward recomputes the (tiny) ``[T, E]`` scoring in torch for the chosen experts."""

    @staticmethod
    def forward(ctx, logits, top_k, score, renormalize, bias):
        weights, experts = route(logits, top_k, score, renormalize, bias)
        ctx.save_for_backward(logits, experts)
        ctx.score, ctx.renormalize = score, renormalize
        ctx.mark_non_differentiable(experts)
        return weights, experts

    @staticmethod
    def backward(ctx, grad_weights, _grad_experts):
        logits, experts = ctx.saved_tensors
        with torch.enable_grad():
            l = logits.detach().float().requires_grad_(True)
            s = torch.softmax(l, -1) if ctx.score == "softmax" else torch.sigmoid(l)
            w = s.gather(1, experts.long())
            if ctx.renormalize:
                w = w / w.sum(-1, keepdim=True)
            (grad,) = torch.autograd.grad(w, l, grad_weights)
        return grad.to(logits.dtype), None, None, None, None


# -------------------------------------------------------------------------------------------- metadata


def schedule(counts: Tensor, block_m: int, max_tiles: int) -> tuple[Tensor, Tensor, Tensor]:
    """Offsets and tile schedule from ``counts [E]`` (int32), on the device, with no host sync."""
    num_experts = counts.shape[0]
    device = counts.device
    offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=device)
    tile_expert = torch.empty(max_tiles, dtype=torch.int32, device=device)
    tile_row = torch.empty(max_tiles, dtype=torch.int32, device=device)
    block_e = _pow2(num_experts)
    block_s = max(1, min(64, 8192 // block_e))
    tk._schedule_kernel[(triton.cdiv(max_tiles, block_s),)](
        counts, offsets, tile_expert, tile_row, num_experts, max_tiles, BM=block_m, BE=block_e, BS=block_s,
    )
    return offsets, tile_expert, tile_row


SMALL_LIMIT = 4096  # up to this many assignments, one program sorts them (decode)


def permute_metadata(experts: Tensor, num_experts: int, block_m: int, max_tiles: int,
                     small_limit: int = SMALL_LIMIT):
    """Group the assignments by expert. Up to ``small_limit`` assignments: one program sorts them and
    builds everything. Above: a counting sort in four small kernels (histogram per block → prefix over
    blocks → offsets and tile schedule → stable scatter). Returns the same tuple as
    :func:`~moe_lib.kernels.reference.permute_metadata_ref`."""
    flat = experts.reshape(-1).to(torch.int32).contiguous()
    n = flat.shape[0]
    device = flat.device
    if 0 < n <= small_limit:
        counts = torch.empty(num_experts, dtype=torch.int32, device=device)
        offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=device)
        row_assignment = torch.empty(n, dtype=torch.int32, device=device)
        tile_expert = torch.empty(max_tiles, dtype=torch.int32, device=device)
        tile_row = torch.empty(max_tiles, dtype=torch.int32, device=device)
        block_n = _pow2(n)
        block_e = _pow2(num_experts)
        tk._metadata_small_kernel[(1,)](
            flat, counts, offsets, row_assignment, tile_expert, tile_row, n, num_experts, max_tiles,
            BN=block_n, SHIFT=block_n.bit_length() - 1, BE=block_e, BM=block_m,
            BS=max(1, min(64, 8192 // block_e)), num_warps=8 if block_n >= 2048 else 4,
        )
        return counts, offsets, row_assignment, tile_expert, tile_row
    num_blocks = triton.cdiv(n, SCATTER_BLOCK)
    block_e = _pow2(num_experts)
    block_counts = torch.empty(max(num_blocks, 1), num_experts, dtype=torch.int32, device=device)
    block_prefix = torch.empty_like(block_counts)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=device)
    row_assignment = torch.empty(n, dtype=torch.int32, device=device)
    if n:
        tk._count_kernel[(num_blocks,)](flat, block_counts, n, num_experts, BN=SCATTER_BLOCK, BE=block_e)
        scan_e = min(32, block_e)
        tk._scan_kernel[(triton.cdiv(num_experts, scan_e),)](
            block_counts, block_prefix, counts, num_blocks, num_experts, BB=64, BE=scan_e,
        )
    offsets, tile_expert, tile_row = schedule(counts, block_m, max_tiles)
    if n:
        tk._scatter_kernel[(num_blocks,)](flat, block_prefix, offsets, row_assignment, n, num_experts,
                                          BN=SCATTER_BLOCK)
    return counts, offsets, row_assignment, tile_expert, tile_row


# ----------------------------------------------------------------------------------------- expert FFN


def _combine(src: Tensor, num_tokens: int, top_k: int) -> Tensor:
    if top_k == 1:  # one slot per token: the slot buffer is already y, in token order
        return src
    n_out = src.shape[1]
    y = torch.empty(num_tokens, n_out, dtype=src.dtype, device=src.device)
    bt, bn = (16, 32) if config.interpreting() else (16, 128)
    tk._combine_kernel[(triton.cdiv(num_tokens, bt), triton.cdiv(n_out, bn))](
        src, y, num_tokens, n_out, top_k, src.stride(0), y.stride(0), BT=bt, BN=bn,
    )
    return y


def _slot_buffer(meta, width: int, like: Tensor) -> Tensor:
    """``[T·k, width]`` buffer; zeros when some assignment has no row (capacity drops), else uninitialised
    (every row is written)."""
    shape = (meta.num_tokens * meta.top_k, width)
    if meta.complete:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    return torch.zeros(shape, dtype=like.dtype, device=like.device)


def _grid(meta, width: int, kind: str, gemm: tuple | None = None):
    """One program per (tile slot, column block) — at most :func:`config.persistent_programs` with a
    persistent grid; a function of the autotuner's ``BN`` when it chooses."""
    def grid(m):
        work = meta.max_tiles * triton.cdiv(width, m["BN"])
        return (min(work, config.persistent_programs()) if config.persistent() else work,)

    return grid if config.autotuning() else grid(_meta(kind, meta.block_m, gemm))


def up(x, w_gu, meta, act: str, save_gu: bool) -> tuple[Tensor, Tensor | None]:
    """``_up_kernel``: ``h [N, f]`` in grouped order (and the pre-activations ``gu [N, 2f]``, gate and up
    interleaved by column, when ``save_gu``) from the interleaved weights ``w_gu [E, d, 2f]``.
    Reference: :func:`~moe_lib.kernels.reference.up_ref`."""
    n = meta.num_assignments
    d, f = w_gu.shape[1], w_gu.shape[2] // 2
    h = torch.empty(n, f, dtype=x.dtype, device=x.device)
    gu = torch.empty(n, 2 * f, dtype=x.dtype, device=x.device) if save_gu else h
    gemm = ("up", d, f)
    _launch("up", _grid(meta, f, "up", gemm),
            x, w_gu, h, gu, meta.row_assignment, meta.tile_expert, meta.tile_row, meta.offsets,
            meta.top_k, d, f, x.stride(0), w_gu.stride(0), w_gu.stride(1), w_gu.stride(2),
            h.stride(0), gu.stride(0), meta.max_tiles, block_m=meta.block_m, gemm=gemm, ACT=ACT_CODES[act],
            SAVE_GU=save_gu)
    return h, (gu if save_gu else None)


def down(h, w_down, weights_flat, meta) -> Tensor:
    """``_down_kernel`` (forward): ``out [T·k, d_out]``, row ``a`` = ``w_a · h_r W_d[e]``.
    Reference: :func:`~moe_lib.kernels.reference.down_ref`."""
    f, d_out = w_down.shape[1], w_down.shape[2]
    out = _slot_buffer(meta, d_out, h)
    gemm = ("down", f, d_out)
    _launch("down", _grid(meta, d_out, "down", gemm),
            h, w_down, out, weights_flat, meta.row_assignment, meta.tile_expert, meta.tile_row,
            meta.offsets, f, d_out, h.stride(0), w_down.stride(0), w_down.stride(1), w_down.stride(2),
            out.stride(0), meta.max_tiles, block_m=meta.block_m, gemm=gemm, SCALE=True)
    return out


def combine(out: Tensor, meta) -> Tensor:
    """``_combine_kernel``: ``y[t] = Σ_j out[t·k + j]``. Reference: :func:`~moe_lib.kernels.reference.combine_ref`."""
    return _combine(out, meta.num_tokens, meta.top_k)


def ffn_forward(x, weights_flat, w_gu, w_down, meta, act: str, save_gu: bool):
    """``h = act(x W_g) ⊙ x W_u`` per grouped row, ``out = w · h W_d`` per assignment slot, ``y = Σ_j out``."""
    h, gu = up(x, w_gu, meta, act, save_gu)
    return h, gu, combine(down(h, w_down, weights_flat, meta), meta)


def wgrad(a: Tensor, b: Tensor, out: Tensor, weights_flat, meta, gather_a: bool, gather_b: bool, scale_a: bool,
          split_rows: int | None = None):
    """``_wgrad_kernel``: ``out[e] = Σ_{rows r of e} (w·) A_rᵀ B_r``; rows of A/B are grouped rows or, with
    ``gather_*``, their tokens.

    An expert with more than ``split_rows`` rows (default :func:`config.wgrad_split_rows`, from ``N``, ``E``
    and the output size: no count is read back) is cut into units of ``split_rows`` rows that run in parallel
    and write float32 partials, summed in a fixed order by ``_wgrad_reduce_kernel`` — a deterministic
    split-K. The grid is sized from the bound ``E + ⌊N / split_rows⌋`` on the units.
    Reference: :func:`~moe_lib.kernels.reference.wgrad_ref`."""
    m, n_out = out.shape[1], out.shape[2]
    n, num_experts = meta.num_assignments, meta.num_experts
    gemm = ("wgrad_gu" if gather_a else "wgrad_down", m, n_out)
    c = _meta("wgrad", 0, gemm)
    if split_rows is None:
        split_rows = config.wgrad_split_rows(n, num_experts, m, n_out, c)
    split = n > split_rows
    dummy = meta.offsets
    part = out
    if split:
        max_units = num_experts + n // split_rows        # Σ max(1, ⌈n_e / R⌉) ≤ E + ⌊N / R⌋
        max_split = n // (split_rows + 1)                 # a split expert holds more than R rows
        max_partials = 2 * n // split_rows                # Σ_{n_e > R} ⌈n_e / R⌉ < 2N / R
        device = out.device
        unit_expert = torch.empty(max_units, dtype=torch.int32, device=device)
        unit_rows = torch.empty(max_units, 2, dtype=torch.int32, device=device)
        unit_partial = torch.empty(max_units, dtype=torch.int32, device=device)
        split_expert = torch.empty(max_split, dtype=torch.int32, device=device)
        split_first = torch.empty_like(split_expert)
        split_count = torch.empty_like(split_expert)
        block_e = _pow2(num_experts)
        block_s = max(1, min(64, 2048 // block_e))  # several [BS, BE] temporaries: at 8192 ptxas spilled
        tk._wgrad_schedule_kernel[(triton.cdiv(max(max_units, max_split), block_s),)](
            meta.counts, meta.offsets, unit_expert, unit_rows, unit_partial, split_expert, split_first,
            split_count, num_experts, max_units, max_split, split_rows, BE=block_e, BS=block_s)
        part = torch.empty(max_partials, m, n_out, dtype=torch.float32, device=device)
        units = (unit_expert, unit_rows, unit_partial)
    else:
        max_units = num_experts
        units = (dummy, dummy, dummy)
    if config.autotuning():
        def grid(cfg):
            return (max_units * triton.cdiv(m, cfg["BM"]) * triton.cdiv(n_out, cfg["BN"]),)
    else:
        grid = (max_units * triton.cdiv(m, c["BM"]) * triton.cdiv(n_out, c["BN"]),)
    _launch("wgrad", grid, a, b, out, part, weights_flat, meta.row_assignment, meta.offsets, *units, meta.top_k,
            m, n_out, a.stride(0), b.stride(0), out.stride(0), out.stride(1), out.stride(2), m * n_out,
            gemm=gemm, GATHER_A=gather_a, GATHER_B=gather_b, SCALE_A=scale_a, SPLIT=split)
    if split:
        bm, bn = (32, 32) if config.interpreting() else (64, 128)
        tk._wgrad_reduce_kernel[(max_split * triton.cdiv(m, bm) * triton.cdiv(n_out, bn),)](
            part, out, split_expert, split_first, split_count, m, n_out, m * n_out,
            out.stride(0), out.stride(1), out.stride(2), BM=bm, BN=bn)
    return out


def dh(dy, gu, w_down, weights_flat, meta, act: str) -> tuple[Tensor, Tensor]:
    """``_dh_kernel``: ``dgu [N, 2f]`` (``dg``, ``du`` interleaved by column, like ``gu``) and the
    routing-weight gradient per grouped row ``[N]`` (its per-block partial sums added in a fixed order).
    Reference: :func:`~moe_lib.kernels.reference.dh_ref`."""
    n = meta.num_assignments
    f, d_out = w_down.shape[1], w_down.shape[2]
    dgu = torch.empty(n, 2 * f, dtype=gu.dtype, device=gu.device)
    # one partial sum per hidden block; the autotuner may pick any candidate BN, so size for the narrowest
    gemm = ("dh", d_out, f)
    candidates = config.autotune_configs("dh") if config.autotuning() else [_meta("dh", meta.block_m, gemm)]
    n_fblocks = triton.cdiv(f, min(c["BN"] for c in candidates))
    dw_partial = torch.zeros(n, n_fblocks, dtype=torch.float32, device=gu.device)
    _launch("dh", _grid(meta, f, "dh", gemm),
            dy, w_down, gu, weights_flat, dgu, dw_partial, meta.row_assignment, meta.tile_expert, meta.tile_row,
            meta.offsets, meta.top_k, d_out, f, dy.stride(0), w_down.stride(0), w_down.stride(1),
            w_down.stride(2), gu.stride(0), dgu.stride(0), dw_partial.stride(0), meta.max_tiles,
            block_m=meta.block_m, gemm=gemm, ACT=ACT_CODES[act])
    return dgu, dw_partial.sum(1)


def dx_slots(dgu, w_gu, meta) -> Tensor:
    """``_down_kernel`` (backward): ``dgu W_guᵀ`` per assignment slot ``[T·k, d]``: one GEMM over ``K = 2f``,
    the interleaved weights read transposed through their strides."""
    d, f2 = w_gu.shape[1], w_gu.shape[2]
    out = _slot_buffer(meta, d, dgu)
    gemm = ("dx", f2, d)
    _launch("down", _grid(meta, d, "down", gemm),
            dgu, w_gu, out, dgu, meta.row_assignment, meta.tile_expert, meta.tile_row, meta.offsets,
            f2, d, dgu.stride(0), w_gu.stride(0), w_gu.stride(2), w_gu.stride(1), out.stride(0), meta.max_tiles,
            block_m=meta.block_m, gemm=gemm, SCALE=False)
    return out


def ffn_backward(dy, x, weights_flat, w_gu, w_down, h, gu, meta, act: str, needs):
    """Gradients of :func:`ffn_forward` w.r.t. ``(x, weights_flat, w_gu, w_down)`` (``None`` where ``needs``
    is false); ``dW_gu`` is one GEMM in the interleaved layout."""
    dy = dy.contiguous()
    dgu, dw_row = dh(dy, gu, w_down, weights_flat, meta, act)
    dx = dweights = dwgu = dwd = None
    if needs[1]:
        dweights = torch.zeros(meta.num_tokens * meta.top_k, dtype=torch.float32, device=x.device)
        dweights[meta.row_assignment.long()] = dw_row
    if needs[0]:
        dx = combine(dx_slots(dgu, w_gu, meta), meta)
    fresh = functools.partial(torch.empty_like, memory_format=torch.contiguous_format)
    if needs[2]:
        dwgu = wgrad(x, dgu, fresh(w_gu), weights_flat, meta, True, False, False)
    if needs[3]:
        dwd = wgrad(h, dy, fresh(w_down), weights_flat, meta, False, True, True)
    return dx, dweights, dwgu, dwd


class ExpertFFNFunction(torch.autograd.Function):
    """Autograd wrapper of the fused expert FFN on interleaved gate|up weights: forward and backward are
    Triton kernels."""

    @staticmethod
    def forward(ctx, x, weights_flat, w_gu, w_down, meta, act):
        save = any(ctx.needs_input_grad[:4])
        h, gu, y = ffn_forward(x, weights_flat, w_gu, w_down, meta, act, save_gu=save)
        if save:
            ctx.save_for_backward(x, weights_flat, w_gu, w_down, h, gu)
        ctx.meta, ctx.act = meta, act
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weights_flat, w_gu, w_down, h, gu = ctx.saved_tensors
        grads = ffn_backward(dy, x, weights_flat, w_gu, w_down, h, gu, ctx.meta, ctx.act,
                             ctx.needs_input_grad[:4])
        return (*grads, None, None)
