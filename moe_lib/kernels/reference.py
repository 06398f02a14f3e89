"""Torch references for every kernel in :mod:`moe_lib.kernels`.

Each function here computes, with plain PyTorch ops, exactly what one Triton kernel (or one small chain of
them) computes. They define correctness: the kernel tests compare against them, and ``impl="torch"`` in the
public functions runs them, so the whole fused path also works where Triton does not.

Conventions shared with the kernels:

* An *assignment* is one of a token's ``k`` choices; assignment ``a = t·k + j`` is token ``t``'s ``j``-th
  choice. There are ``N = T·k`` of them.
* A *grouped row* is an assignment's position after a stable sort by expert: expert ``e`` owns rows
  ``offsets[e]:offsets[e+1]``, in increasing assignment order (so the order is deterministic).
* A *tile* is ``block_m`` consecutive grouped rows of one expert; the tile schedule lists, for a fixed
  upper bound of tile slots, each tile's expert (``-1`` for an unused slot) and first row. A GEMM grid over
  tile slots needs no host synchronisation: its size depends on ``N``, ``E`` and ``block_m`` only.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..experts import ACTIVATIONS  # noqa: F401  (one activation table: the expert banks')


def route_ref(logits: Tensor, top_k: int, score: str = "softmax", renormalize: bool = True,
              bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Router scores → top-k → renormalise, in float32.

    ``score="softmax"`` is Shazeer et al. (2017, eq. 3–5) / Mixtral (Jiang et al. 2024, eq. 1) when
    ``renormalize`` is true (softmax over the chosen logits); ``score="sigmoid"`` with a selection-only
    ``bias`` is DeepSeek-V3's router (Liu et al. 2024, eq. 15–16; Wang et al. 2024 for the bias). Ties are
    broken towards the lower expert index. Returns ``weights [T, k]`` (float32) and ``experts [T, k]``
    (int32).
    """
    logits = logits.float()
    scores = torch.softmax(logits, dim=-1) if score == "softmax" else torch.sigmoid(logits)
    select = scores if bias is None else scores + bias.float()
    experts = torch.sort(select, dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = scores.gather(1, experts)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, experts.to(torch.int32)


def tile_schedule_ref(counts: Tensor, offsets: Tensor, block_m: int, max_tiles: int) -> tuple[Tensor, Tensor]:
    """Tile slots → (expert or -1, first grouped row). Expert ``e`` gets ``ceil(counts[e] / block_m)``
    consecutive slots; slots past the last tile are unused."""
    tiles = (counts.long() + block_m - 1) // block_m
    ends = torch.cumsum(tiles, 0)
    starts = ends - tiles
    slot = torch.arange(max_tiles, device=counts.device)
    expert = torch.searchsorted(ends, slot, right=True)
    used = slot < ends[-1] if counts.numel() else torch.zeros_like(slot, dtype=torch.bool)
    expert = expert.clamp(max=max(counts.numel() - 1, 0))
    row = offsets[:-1].long()[expert] + (slot - starts[expert]) * block_m
    tile_expert = torch.where(used, expert, torch.full_like(expert, -1)).to(torch.int32)
    tile_row = torch.where(used, row, torch.zeros_like(row)).to(torch.int32)
    return tile_expert, tile_row


def permute_metadata_ref(experts: Tensor, num_experts: int, block_m: int, max_tiles: int):
    """Counts, offsets, grouped order and tile schedule of ``experts [T, k]``.

    Returns ``(counts [E] int32, offsets [E+1] int32, row_assignment [T·k] int32, tile_expert, tile_row)``.
    """
    flat = experts.reshape(-1).long()
    row_assignment = torch.sort(flat, stable=True).indices.to(torch.int32)
    counts = torch.bincount(flat, minlength=num_experts)[:num_experts]
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0)
    tile_expert, tile_row = tile_schedule_ref(counts, offsets, block_m, max_tiles)
    return counts.to(torch.int32), offsets.to(torch.int32), row_assignment, tile_expert, tile_row


def interleave_gate_up(w_gate: Tensor, w_up: Tensor) -> Tensor:
    """``[E, d, f]`` gate and up weights → ``[E, d, 2f]`` with columns alternating gate/up: column ``2j`` is
    gate unit ``j``, ``2j + 1`` is up unit ``j``. One ``tl.dot`` over a ``2·BN``-wide block of it then yields
    ``BN`` gate and ``BN`` up columns of the same hidden units (the layout of Triton's ``triton_kernels``
    SwiGLU matmul and of SonicMoE). A copy; differentiable (its backward splits the gradient)."""
    return torch.stack((w_gate, w_up), dim=-1).reshape(*w_gate.shape[:-1], 2 * w_gate.shape[-1])


def split_gate_up(w_gu: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`interleave_gate_up`: the gate (even columns) and up (odd columns) halves, as strided
    views (no copy; ``.contiguous()`` them to store)."""
    return w_gu[..., 0::2], w_gu[..., 1::2]


def up_ref(x: Tensor, row_assignment: Tensor, offsets: Tensor, top_k: int, w_gate: Tensor, w_up: Tensor,
           activation: str = "silu") -> tuple[Tensor, Tensor]:
    """Gather each grouped row's token and apply its expert's gated up projection.

    Returns ``h [N, f] = act(x_t W_g) ⊙ (x_t W_u)`` and the pre-activations ``gu [N, 2f]`` (``g`` and ``u``
    interleaved by column, as :func:`interleave_gate_up`), both in grouped row order — what the first grouped
    GEMM with its fused epilogue writes.
    """
    rows = x[row_assignment.long() // top_k]
    f = w_gate.shape[-1]
    gu = rows.new_empty(rows.shape[0], 2 * f)
    bounds = offsets.tolist()
    for e in range(w_gate.shape[0]):
        r0, r1 = bounds[e], bounds[e + 1]
        if r1 > r0:
            gu[r0:r1, :f] = rows[r0:r1] @ w_gate[e]
            gu[r0:r1, f:] = rows[r0:r1] @ w_up[e]
    h = ACTIVATIONS[activation](gu[:, :f]) * gu[:, f:]
    return h, interleave_gate_up(gu[:, :f], gu[:, f:])


def down_ref(h: Tensor, row_assignment: Tensor, offsets: Tensor, w_down: Tensor, weights_flat: Tensor | None,
             num_assignments: int) -> Tensor:
    """The second grouped GEMM: ``out[a] = w_a · h_r W_d[e]`` for the grouped row ``r`` of assignment ``a``,
    written in assignment order ``[T·k, d_out]`` (rows of assignments no expert processed stay zero)."""
    out = h.new_zeros(num_assignments, w_down.shape[-1])
    bounds = offsets.tolist()
    rows = row_assignment.long()
    for e in range(w_down.shape[0]):
        r0, r1 = bounds[e], bounds[e + 1]
        if r1 > r0:
            out[rows[r0:r1]] = h[r0:r1] @ w_down[e]
    if weights_flat is not None:
        out = out * weights_flat.to(out.dtype).unsqueeze(-1)
    return out


def combine_ref(out_assign: Tensor, num_tokens: int, top_k: int) -> Tensor:
    """``y[t] = Σ_j out[t·k + j]``, summed in float32 in a fixed order (no atomics: deterministic)."""
    return out_assign.float().reshape(num_tokens, top_k, -1).sum(1).to(out_assign.dtype)


def expert_ffn_ref(x: Tensor, weights: Tensor, row_assignment: Tensor, offsets: Tensor, w_gate: Tensor,
                   w_up: Tensor, w_down: Tensor, activation: str = "silu") -> Tensor:
    """``y[t] = Σ_j w[t, j] · FFN_{e(t, j)}(x[t])`` through up → down → combine; differentiable."""
    num_tokens, top_k = weights.shape
    h, _ = up_ref(x, row_assignment, offsets, top_k, w_gate, w_up, activation)
    out = down_ref(h, row_assignment, offsets, w_down, weights.reshape(-1), num_tokens * top_k)
    return combine_ref(out, num_tokens, top_k)


def dh_ref(dy: Tensor, gu: Tensor, row_assignment: Tensor, offsets: Tensor, top_k: int, w_down: Tensor,
           weights_flat: Tensor, activation: str = "silu") -> tuple[Tensor, Tensor]:
    """Backward through the down projection and the gated activation, per grouped row ``r`` of assignment
    ``a`` (token ``t``, expert ``e``): ``G = dy_t W_d[e]ᵀ``; the routing-weight gradient
    ``∂L/∂w_a = ⟨G, h_r⟩`` (= ⟨dy_t, h_r W_d[e]⟩); ``dh = w_a G``; ``dg = dh ⊙ u ⊙ act'(g)``,
    ``du = dh ⊙ act(g)``. ``gu`` and the returned ``dgu [N, 2f]`` are interleaved by column (as
    :func:`up_ref`); also returns ``dw_row [N]`` (float32)."""
    rows = row_assignment.long()
    dy_rows = dy[rows // top_k]
    f = w_down.shape[1]
    grad = dy_rows.new_zeros(rows.shape[0], f).float()
    bounds = offsets.tolist()
    for e in range(w_down.shape[0]):
        r0, r1 = bounds[e], bounds[e + 1]
        if r1 > r0:
            grad[r0:r1] = (dy_rows[r0:r1] @ w_down[e].t()).float()
    g, u = (t.float() for t in split_gate_up(gu))
    g_req = g.detach().requires_grad_(True)
    with torch.enable_grad():
        a = ACTIVATIONS[activation](g_req)
        (act_grad,) = torch.autograd.grad(a.sum(), g_req)
    a = a.detach()
    dw_row = (grad * a * u).sum(-1)
    dh = grad * weights_flat.float()[rows].unsqueeze(-1)
    dgu = interleave_gate_up(dh * u * act_grad, dh * a).to(gu.dtype)
    return dgu, dw_row


def wgrad_ref(a_rows: Tensor, b_rows: Tensor, offsets: Tensor) -> Tensor:
    """``dW[e] = A[rows of e]ᵀ B[rows of e]`` for every expert (zeros for an empty expert)."""
    num_experts = offsets.shape[0] - 1
    out = a_rows.new_zeros(num_experts, a_rows.shape[1], b_rows.shape[1])
    bounds = offsets.tolist()
    for e in range(num_experts):
        r0, r1 = bounds[e], bounds[e + 1]
        if r1 > r0:
            out[e] = a_rows[r0:r1].t() @ b_rows[r0:r1]
    return out
