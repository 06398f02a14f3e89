"""Dispatch: group the router's (token, expert) assignments by expert, apply capacity, and combine back.

The router gives each of ``T`` tokens ``k`` experts, i.e. ``T·k`` *assignments*. Dispatch sorts them by
expert so that each expert sees one contiguous block of rows — the layout every grouped-GEMM kernel
wants — and records where each row came from so the combine step can put the weighted expert outputs
back in token order.

Capacity (Lepikhin et al. 2021, §2.2; Fedus et al. 2022, eq. 3): with a ``capacity_factor`` ``c`` each
expert processes at most ``C = ceil(c · T · k / E)`` assignments. Assignments are served in priority
order — every token's first choice before any token's second choice, and earlier tokens first within a
choice — and the rest are *dropped*: they contribute nothing to that token's output (in a Transformer
block the token still flows through the residual connection). Drops are never silent: the plan counts
dropped assignments and tokens whose every choice was dropped. ``capacity_factor=None`` is dropless.
Because every first choice outranks every second choice, a *later* token's first choice can displace an
*earlier* token's second choice: with ``k > 1`` a capacity limit is not causal (chapter 7). With ``k = 1``
earlier tokens always win and it is.

Entries of the routing that are not assignments (``Routing.valid`` false: an expert-choice pair no expert
chose, a GShard second expert that lost its coin flip) are neither requested nor kept nor dropped.
Routers that enforce their own capacity (expert choice) are planned with ``capacity_factor=None``.
Soft MoE has no assignments: :func:`slot_plan` is the plan of its ``E·p`` slots.

The stage between router and experts is a :class:`Dispatcher`, one interface for every way of moving
tokens to experts and back: :class:`TokenDispatcher` (token choice and expert choice on one process, with
capacity and counted drops), :class:`SlotDispatcher` (Soft MoE's slots) and
:class:`moe_lib.distributed.AllToAllDispatcher` (expert parallelism: it wraps a local one and moves the
rows between ranks). :class:`~moe_lib.MoELayer` calls whichever it holds, so its forward is the only MoE
forward; a new way of dispatching is a new class here, not a second copy of the layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ._validate import check_counts, check_int, check_positive_float
from .routers import Routing, expert_capacity  # noqa: F401  (expert_capacity: re-exported)


@dataclass
class DispatchPlan:
    """Kept assignments grouped by expert (expert 0's rows first, then expert 1's, ...).

    Attributes:
        token_index: ``[N]`` source token of each kept assignment.
        expert_index: ``[N]`` expert of each kept assignment (non-decreasing).
        slot_index: ``[N]`` which of the token's ``k`` choices it is (0 = the router's first choice).
        weights: ``[N]`` combine weight of each kept assignment.
        counts: ``[E]`` kept assignments per expert (int64); ``counts.sum() == N``.
        offsets: ``[E + 1]`` start of each expert's block; expert ``e`` owns rows
            ``offsets[e]:offsets[e+1]``.
        requested: ``[E]`` assignments the router sent to each expert before capacity.
        kept: ``[T, k]`` bool, whether each of a token's choices was processed.
        capacity: per-expert capacity, or ``None`` when dropless.
        valid: ``[T, k]`` bool, which routing entries are assignments (``None``: all).
    """

    token_index: Tensor
    expert_index: Tensor
    slot_index: Tensor
    weights: Tensor
    counts: Tensor
    offsets: Tensor
    requested: Tensor
    kept: Tensor
    capacity: int | None
    valid: Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.counts.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.kept.shape[0]

    @property
    def dropped_assignments(self) -> int:
        """Assignments the router made that no expert processed (capacity overflow)."""
        requested = self.kept.numel() if self.valid is None else int(self.valid.sum())
        return int(requested - self.kept.sum())

    @property
    def dropped_tokens(self) -> int:
        """Tokens none of whose choices was processed: the layer's output for them is zero. Includes
        tokens that no expert chose (expert choice)."""
        if self.kept.numel() == 0:
            return 0
        return int((~self.kept.any(dim=1)).sum())

    def position_in_expert(self) -> Tensor:
        """``[N]`` row of each kept assignment inside its expert's block (0-based)."""
        n = self.token_index.shape[0]
        return torch.arange(n, device=self.token_index.device) - self.offsets[self.expert_index]

    @staticmethod
    def deferred(build: Callable[[], DispatchPlan]) -> DispatchPlan:
        """A plan that ``build()`` makes the first time one of its fields is read, for a dispatcher whose
        hot path never needs it: :class:`moe_lib.kernels.KernelDispatcher` groups the rows on the device
        without a host synchronisation, so the plan that :class:`~moe_lib.MoEInfo` reports (counts, drops)
        is made only if someone reads it."""
        return _DeferredPlan(build)


class _DeferredPlan(DispatchPlan):
    """:meth:`DispatchPlan.deferred`: no field is set until one is read; then the built plan's fields are
    copied in, once, and every read after that is a plain attribute."""

    def __init__(self, build: Callable[[], DispatchPlan]):  # the dataclass __init__ is skipped on purpose
        self.__dict__["_build"] = build

    def __getattr__(self, name: str):  # called only for attributes not set yet: the plan's fields
        if name.startswith("__") or "_build" not in self.__dict__:
            raise AttributeError(name)
        build = self.__dict__.pop("_build")
        plan = build()
        if not isinstance(plan, DispatchPlan):
            raise TypeError(f"a deferred plan's build() must return a DispatchPlan, got {type(plan).__name__}")
        self.__dict__.update(vars(plan))
        return getattr(self, name)


def make_plan(routing: Routing, capacity_factor: float | None = None) -> DispatchPlan:
    """Group ``routing``'s assignments by expert, dropping those over capacity.

    Works on the device of the routing tensors; the only host synchronisation is the capacity mask's
    size, which a dropless or fixed-capacity kernel can avoid (Part IV).
    """
    experts, weights = routing.experts, routing.weights
    num_tokens, top_k = experts.shape
    num_experts = routing.num_experts
    device = experts.device
    valid = routing.mask()
    # Slot-major flattening: index j*T + t is token t's j-th choice. A stable sort by expert then orders
    # each expert's rows by (choice, token), which is exactly the capacity priority.
    flat_expert = experts.t().reshape(-1)
    flat_weight = weights.t().reshape(-1)
    flat_valid = valid.t().reshape(-1)
    flat_token = torch.arange(num_tokens, device=device).repeat(top_k)
    flat_slot = torch.arange(top_k, device=device).repeat_interleave(num_tokens)
    candidates = flat_valid.nonzero().squeeze(1)  # the assignments, still in slot-major order
    order = candidates[torch.sort(flat_expert[candidates], stable=True).indices]
    requested = torch.bincount(flat_expert[candidates], minlength=num_experts)

    capacity = None
    kept_flat = torch.zeros_like(flat_expert, dtype=torch.bool)
    kept_flat[order] = True
    if capacity_factor is not None:
        capacity = expert_capacity(num_tokens, top_k, num_experts, capacity_factor)
        starts = torch.cumsum(requested, 0) - requested
        rank = torch.arange(order.shape[0], device=device) - starts[flat_expert[order]]
        keep_sorted = rank < capacity
        kept_flat[order[~keep_sorted]] = False
        order = order[keep_sorted]

    counts = torch.bincount(flat_expert[order], minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=device)
    offsets[1:] = torch.cumsum(counts, 0)
    return DispatchPlan(
        token_index=flat_token[order],
        expert_index=flat_expert[order],
        slot_index=flat_slot[order],
        weights=flat_weight[order],
        counts=counts,
        offsets=offsets,
        requested=requested,
        kept=kept_flat.reshape(top_k, num_tokens).t(),
        capacity=capacity,
        valid=routing.valid,
    )


def slot_plan(num_experts: int, slots_per_expert: int, device=None) -> DispatchPlan:
    """The plan of Soft MoE's ``S = E·p`` slots: slot ``s`` is row ``s``, processed by expert ``s // p``
    with weight 1 (Puigcerver et al. 2024, eq. 2). The backends run it like any plan; the layer mixes
    tokens into slots before and slot outputs into tokens after."""
    num_slots = num_experts * slots_per_expert
    rows = torch.arange(num_slots, device=device)
    counts = torch.full((num_experts,), slots_per_expert, dtype=torch.long, device=device)
    offsets = torch.arange(0, num_slots + 1, slots_per_expert, device=device)
    return DispatchPlan(
        token_index=rows, expert_index=rows // slots_per_expert, slot_index=torch.zeros_like(rows),
        weights=torch.ones(num_slots, device=device), counts=counts, offsets=offsets, requested=counts.clone(),
        kept=torch.ones(num_slots, 1, dtype=torch.bool, device=device), capacity=None,
    )


def combine(expert_out: Tensor, plan: DispatchPlan, num_tokens: int) -> Tensor:
    """Weighted scatter back to token order: ``y[t] = Σ_{kept (t, e)} w_{t,e} · expert_out[row(t, e)]``.

    ``expert_out`` is ``[N, d_out]`` in the plan's (grouped) row order. Uses ``index_add_``, which is
    deterministic on the CPU; tokens with no kept assignment get zeros.
    """
    out = expert_out.new_zeros(num_tokens, expert_out.shape[-1])
    weighted = expert_out * plan.weights.to(expert_out.dtype).unsqueeze(-1)
    return out.index_add(0, plan.token_index, weighted)


#: A backend (:data:`moe_lib.backends.BACKENDS`): ``(experts, x [R, d], plan) -> y [R_out, d_out]``.
Backend = Callable[[nn.Module, Tensor, DispatchPlan], Tensor]


class Dispatcher(nn.Module):
    """The stage between the router and the experts: dispatch the tokens for a routing, run the experts
    on what was dispatched (through a backend), combine the outputs back into token order.

    ``dispatcher(experts, tokens, routing, backend)`` returns ``(y [T, d_out], plan)``; the plan is the one
    :class:`~moe_lib.MoEInfo` reports (drops, counts). A dispatcher holds no parameters: it only moves rows,
    so swapping one never changes a checkpoint. Subclasses implement :meth:`forward`.
    """

    name = "abstract"
    #: The layer backends (:data:`moe_lib.backends.BACKENDS`) this dispatcher runs with; ``None``: any. A
    #: dispatcher that runs the experts itself (the fused kernels) lists the one it implements.
    backends: tuple[str, ...] | None = None

    def num_local_experts(self, num_experts: int) -> int:
        """Experts the bank beside this dispatcher must hold for a router over ``num_experts`` (all of them,
        unless the dispatcher shards them across processes)."""
        return num_experts

    @property
    def capacity_factor(self) -> float | None:
        """The capacity this dispatcher applies (``None``: it drops nothing)."""
        return None

    def expert_inputs(self, tokens: Tensor, routing: Routing) -> Tensor:
        """The rows the experts see before grouping: the tokens themselves (Soft MoE: its slots)."""
        return tokens

    def forward(self, experts: nn.Module, tokens: Tensor, routing: Routing,
                backend: Backend) -> tuple[Tensor, DispatchPlan]:  # pragma: no cover - abstract
        raise NotImplementedError


class TokenDispatcher(Dispatcher):
    """Token choice and expert choice on one process: :func:`make_plan` (group by expert, capacity with
    counted drops), the backend on the grouped rows, the weighted combine (the backend's last step).

    Args:
        capacity_factor: ``None`` (dropless) or the factor ``c`` of ``C = ceil(c · T · k / E)`` (Lepikhin et
            al. 2021, §2.2; Fedus et al. 2022, eq. 3). Routers that enforce their own capacity (expert
            choice) get ``None`` here: their routing marks what they dropped.
    """

    name = "token"

    def __init__(self, capacity_factor: float | None = None):
        super().__init__()
        self._capacity_factor = check_positive_float("capacity_factor", capacity_factor, allow_none=True)

    @property
    def capacity_factor(self) -> float | None:
        return self._capacity_factor

    def plan(self, routing: Routing) -> DispatchPlan:
        """The rows each expert processes, grouped by expert (:func:`make_plan`)."""
        return make_plan(routing, self._capacity_factor)

    def forward(self, experts, tokens, routing, backend):
        plan = self.plan(routing)
        return backend(experts, tokens, plan), plan

    def extra_repr(self) -> str:
        return "dropless" if self._capacity_factor is None else f"capacity_factor={self._capacity_factor}"


class SlotDispatcher(Dispatcher):
    """Soft MoE (Puigcerver et al. 2024, eq. 1–3): the slots are convex mixtures of the tokens
    (``routing.dispatch``), expert ``e`` runs on its ``p`` slots (:func:`slot_plan`), and each token's output
    is a convex mixture of the slot outputs (``routing.combine``). Nothing is dropped."""

    name = "slots"

    def expert_inputs(self, tokens, routing):
        """The slots: ``Dᵀ X`` (each a convex mixture of the tokens)."""
        return routing.dispatch.t().to(tokens.dtype) @ tokens

    def forward(self, experts, tokens, routing, backend):
        plan = slot_plan(routing.num_experts, routing.slots_per_expert, tokens.device)
        slots_out = backend(experts, self.expert_inputs(tokens, routing), plan)
        return routing.combine.to(slots_out.dtype) @ slots_out, plan


# --------------------------------------------------------------------------------------------------
# Tiles of a grouped-GEMM kernel over the expert-grouped rows (moe_lib.kernels sizes its grid by max_tiles)
# --------------------------------------------------------------------------------------------------

def max_tiles(num_rows: int, num_experts: int, block_m: int) -> int:
    """Tile slots a grouped-GEMM grid launches before it knows the counts: the most tiles any split of
    ``N`` rows over ``E`` experts can need, ``m + ⌊(N − m) / M⌋`` with ``m = min(E, N)`` (at least 1).

    Derivation: an expert with ``n ≥ 1`` rows needs ``⌈n / M⌉ = 1 + ⌊(n − 1) / M⌋`` tiles, so ``m'``
    non-empty experts need ``m' + Σ ⌊(n_e − 1) / M⌋ ≤ m' + ⌊(N − m') / M⌋`` tiles; that grows with ``m'``,
    and at most ``min(E, N)`` experts can be non-empty (each holds a row). The bound is reached (``m − 1``
    experts with one row, the rest on one expert), so it is tight; it is also ``≤ min(N, ⌈N / M⌉ + E)``.
    At decode it matters: DeepSeek-V3 at ``T = 1`` (``N = 8``, ``E = 256``, ``M = 16``) needs 8 slots where
    ``⌈N / M⌉ + E`` gives 257. Slots past the last tile exit at once; sizing the grid this way needs no host
    synchronisation. One slot is kept when ``N = 0`` so that every launch over the slots has a program (the
    schedule kernel's first program also writes the offsets)."""
    num_rows = check_int("num_rows", num_rows, minimum=0)
    num_experts = check_int("num_experts", num_experts, minimum=1)
    block_m = check_int("block_m", block_m, minimum=1)
    live = min(num_experts, num_rows)
    return max(1, live + (num_rows - live) // block_m)


def tile_schedule(counts, block_m: int) -> tuple[Tensor, Tensor]:
    """The ``BLOCK_M``-row tiles of a grouped GEMM over expert-grouped rows.

    Expert ``e`` owns rows ``offsets[e] : offsets[e] + n_e`` of the (unpadded) grouped batch and gets
    ``ceil(n_e / M)`` tiles; tile ``i`` covers rows ``tile_row[i] : tile_row[i] + M`` of expert
    ``tile_expert[i]``, the rows past the expert's end masked. Returns ``(tile_expert, tile_row)``, int64,
    for the used tiles only, in order (the same semantics as ``moe_lib.kernels.Metadata``, whose arrays
    are padded to :func:`max_tiles` with ``-1``).
    """
    c = check_counts("counts", counts)
    block_m = check_int("block_m", block_m, minimum=1)
    tile_expert, tile_row, start = [], [], 0
    for e, n in enumerate(c):
        for i in range(math.ceil(n / block_m)):
            tile_expert.append(e)
            tile_row.append(start + i * block_m)
        start += n
    return torch.tensor(tile_expert, dtype=torch.long), torch.tensor(tile_row, dtype=torch.long)
