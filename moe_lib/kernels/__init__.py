"""Fused MoE kernels in Triton, each beside a torch reference (chapter 11; timed in chapter 12).

The path of one MoE FFN layer, as kernels::

    route            logits [T, E] → weights [T, k], experts [T, k]      (softmax|sigmoid → top-k → renorm)
    permute_metadata experts → counts, offsets, grouped order, tile schedule   (on the device, no host sync)
    expert_ffn       x → Σ_j w_j · FFN_{e_j}(x)   (gathered grouped GEMM over interleaved gate|up weights +
                     SwiGLU epilogue; down projection with the routing weight in its epilogue; deterministic
                     combine; Triton backward)
    fused_moe        all three, from x and the router weight

The same path as parts of the library's one forward (:mod:`.parts`)::

    MoELayer(d, f, E, k, router=FusedTopKRouter(d, E, k), dispatcher=KernelDispatcher(), backend="triton")

Every function takes ``impl="triton"`` (the kernels) or ``impl="torch"`` (:mod:`.reference`, plain PyTorch
with the same results). On a machine without CUDA, ``import moe_lib`` (which always runs before this
package) sets ``TRITON_INTERPRET=1`` unless already set, so the kernels run in Triton's interpreter on the CPU: exact enough to test, far too
slow to time. ``MoELayer(..., backend="triton")`` runs its experts through :func:`expert_ffn`.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from .._validate import check_bool, check_choice, check_int
from ..dispatch import max_tiles
from . import reference
from .config import BLOCK_M_CHOICES, block_m_for, interpreting

# Only a missing triton package makes the kernels unavailable. Any other ImportError (one raised inside
# triton, or by moe_lib's own kernel modules) propagates: it is a bug or a broken install, not an option.
try:
    import triton  # noqa: F401
    import triton.language.standard as _tl_standard
    from triton.runtime.interpreter import InterpretedFunction as _Interpreted
except ModuleNotFoundError as _err:  # pragma: no cover - exercised only without triton
    if _err.name is None or _err.name.partition(".")[0] != "triton":
        raise
    _ops = None
    _IMPORT_ERROR = _err
else:
    if isinstance(_tl_standard.max, _Interpreted) != interpreting():
        raise ImportError("triton was imported before TRITON_INTERPRET was set; on a machine without CUDA set "
                          "TRITON_INTERPRET=1 before importing torch or triton (importing moe_lib first does it)")
    from . import ops as _ops

    _IMPORT_ERROR = None
    from .features import feature_error as _feature_error  # an old triton: say which feature, keep impl='torch'
    if (_IMPORT_ERROR := _feature_error()) is not None:
        _ops = None

IMPLS = ("triton", "torch")
SCORES = ("softmax", "sigmoid")
ACTIVATIONS = tuple(reference.ACTIVATIONS)
MAX_EXPERTS = 1024  # the router and schedule kernels hold one row of E scores in registers

__all__ = [
    "Metadata", "available", "interpreting", "route", "permute_metadata", "metadata_from_plan", "expert_ffn",
    "fused_moe", "block_m_for", "reference", "IMPLS", "SCORES", "ACTIVATIONS", "interleave_gate_up",
    "split_gate_up", "interleaved_gate_up", "clear_interleave_cache", "gate_up_operand", "FusedTopKRouter",
    "KernelDispatcher",
]

interleave_gate_up = reference.interleave_gate_up
split_gate_up = reference.split_gate_up
_INTERLEAVED: dict = {}


def interleaved_gate_up(w_gate: Tensor, w_up: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """:func:`interleave_gate_up` of two weights, converted once and cached for inference (no autograd).

    The copy is reused while both tensors are the same live objects with the same storage and the same
    ``_version`` (any in-place update — an optimizer step, ``load_state_dict``, ``copy_`` — bumps it), and is
    dropped when either dies. Writes through ``.data`` bypass the version counter: call
    :func:`clear_interleave_cache` after them. The cache holds one interleaved copy per weight pair (the
    gate and up bytes again); pass interleaved weights to :func:`expert_ffn` yourself to avoid it.
    ``dtype``: convert to this dtype too (the copy is made once either way)."""
    dtype = dtype or w_gate.dtype
    stamp = (w_gate.data_ptr(), w_up.data_ptr(), w_gate._version, w_up._version, tuple(w_gate.shape),
             w_gate.stride(), w_up.stride(), w_gate.dtype, w_up.dtype, w_gate.device)
    key = (id(w_gate), id(w_up), dtype)
    hit = _INTERLEAVED.get(key)
    if hit is not None and hit[0]() is w_gate and hit[1]() is w_up and hit[2] == stamp:
        return hit[3]
    for k in [k for k, v in _INTERLEAVED.items() if v[0]() is None or v[1]() is None]:
        del _INTERLEAVED[k]
    with torch.no_grad():
        w_gu = interleave_gate_up(w_gate.to(dtype), w_up.to(dtype)).contiguous()
    _INTERLEAVED[key] = (weakref.ref(w_gate), weakref.ref(w_up), stamp, w_gu)
    return w_gu


def clear_interleave_cache() -> None:
    """Drop every copy :func:`interleaved_gate_up` holds."""
    _INTERLEAVED.clear()


def gate_up_operand(w_gate: Tensor, w_up: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """The interleaved gate|up weights the kernels read, from two weights (in ``dtype``, default theirs):
    made per call through autograd when a gradient is needed, else once and cached
    (:func:`interleaved_gate_up`)."""
    if torch.is_grad_enabled() and (w_gate.requires_grad or w_up.requires_grad):
        dtype = dtype or w_gate.dtype
        return interleave_gate_up(w_gate.to(dtype), w_up.to(dtype))
    return interleaved_gate_up(w_gate, w_up, dtype=dtype)


def available() -> bool:
    """True when Triton is importable (the ``triton`` implementation can run, compiled or interpreted)."""
    return _ops is not None


def _check_impl(impl: str) -> str:
    impl = check_choice("impl", impl, IMPLS)
    if impl == "triton" and _ops is None:
        raise RuntimeError(f"impl='triton' needs the triton package ({_IMPORT_ERROR}); install moe-lib[kernels] "
                           "or pass impl='torch'")
    return impl


def _check_tensor(name: str, value, dims: int, what: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {what}, got {type(value).__name__}")
    if value.dim() != dims:
        raise ValueError(f"{name} must have shape {what}, got {tuple(value.shape)}")
    return value


@dataclass
class Metadata:
    """Where each assignment goes, computed once per layer call and shared by forward and backward.

    Attributes:
        counts: ``[E]`` int32, rows per expert.
        offsets: ``[E + 1]`` int32; expert ``e`` owns grouped rows ``offsets[e]:offsets[e+1]``.
        row_assignment: ``[N]`` int32, the assignment ``t·k + j`` of each grouped row (stable by assignment).
        tile_expert: ``[max_tiles]`` int32, the expert of each tile slot, ``-1`` for an unused slot.
        tile_row: ``[max_tiles]`` int32, the first grouped row of each tile.
        block_m: rows per tile.
        num_tokens, top_k: ``T`` and ``k`` (``E`` is :attr:`num_experts`, the length of ``counts``).
        complete: every one of the ``T·k`` assignments has a row (dropless); ``False`` when a capacity limit
            dropped some (their slots then contribute zero).
    """

    counts: Tensor
    offsets: Tensor
    row_assignment: Tensor
    tile_expert: Tensor
    tile_row: Tensor
    block_m: int
    num_tokens: int
    top_k: int
    complete: bool = True

    @property
    def num_experts(self) -> int:
        """``E``."""
        return self.counts.shape[0]

    @property
    def num_assignments(self) -> int:
        """Rows the experts process (``N``; ``T·k`` when dropless)."""
        return self.row_assignment.shape[0]

    @property
    def max_tiles(self) -> int:
        """Tile slots in the schedule: an upper bound known without reading the counts."""
        return self.tile_expert.shape[0]

    def tiles_used(self) -> int:
        """Tiles that hold rows (reads the device: for reports, not for launching)."""
        return int((self.tile_expert >= 0).sum())

    def padded_rows(self) -> int:
        """Rows the GEMMs compute including tile padding: ``tiles_used · block_m``."""
        return self.tiles_used() * self.block_m


#: ``m + ⌊(N − m) / block_m⌋`` with ``m = min(E, N)``: the most tiles (``Σ_e ⌈n_e / block_m⌉``) any split of
#: ``N`` rows over ``E`` experts can need (tight; see :func:`moe_lib.dispatch.max_tiles`).
max_tiles_for = max_tiles


def _check_block_m(block_m, num_rows: int, num_experts: int) -> int:
    if block_m is None:
        return block_m_for(num_rows, num_experts)
    if block_m not in BLOCK_M_CHOICES:
        raise ValueError(f"block_m must be one of {BLOCK_M_CHOICES} or None, got {block_m!r}")
    return block_m


def route(logits: Tensor, top_k: int, score: str = "softmax", renormalize: bool = True,
          bias: Tensor | None = None, impl: str = "triton") -> tuple[Tensor, Tensor]:
    """Fused router: ``score`` (softmax or sigmoid over the ``E`` logits) → top-``k`` (``bias`` added for the
    selection only) → gather the unbiased scores → renormalise to sum 1 (``renormalize``).

    Softmax + renormalise is Mixtral's gate (Jiang et al. 2024, eq. 1–2; Shazeer et al. 2017, eq. 3–5
    without noise); sigmoid + bias + renormalise is DeepSeek-V3's (Liu et al. 2024, eq. 15–16).

    Args:
        logits: ``[T, E]`` router logits (any float dtype; scored in float32).
        top_k: experts per token, ``1 ≤ k ≤ E``.
        score: ``"softmax"`` or ``"sigmoid"``.
        renormalize: divide the chosen weights by their sum.
        bias: ``[E]`` selection bias (aux-loss-free balancing), or ``None``.
        impl: ``"triton"`` or ``"torch"``.

    Returns:
        ``weights [T, k]`` float32 (differentiable w.r.t. ``logits``) and ``experts [T, k]`` int32, the
        highest-scoring first, ties to the lower index.
    """
    impl = _check_impl(impl)
    _check_tensor("logits", logits, 2, "[T, E]")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    num_experts = logits.shape[1]
    top_k = check_int("top_k", top_k, minimum=1, maximum=max(num_experts, 1))
    score = check_choice("score", score, SCORES)
    renormalize = check_bool("renormalize", renormalize)
    if bias is not None:
        _check_tensor("bias", bias, 1, f"[E={num_experts}]")
        if bias.shape[0] != num_experts:
            raise ValueError(f"bias must have shape [E={num_experts}], got {tuple(bias.shape)}")
    if impl == "torch":
        return reference.route_ref(logits, top_k, score, renormalize, bias)
    if num_experts > MAX_EXPERTS:
        raise ValueError(f"the triton router supports at most {MAX_EXPERTS} experts, got E={num_experts}; "
                         "use impl='torch'")
    return _ops.RouteFunction.apply(logits, top_k, score, renormalize, bias)


def permute_metadata(experts: Tensor, num_experts: int, block_m: int | None = None,
                     impl: str = "triton") -> Metadata:
    """Group the ``T·k`` assignments by expert: counts, offsets, a stable grouped order and the tile
    schedule, all on the device (the triton path never reads a count back to the host).

    Args:
        experts: ``[T, k]`` integer expert of each assignment, values in ``[0, num_experts)``.
        num_experts: ``E``.
        block_m: rows per tile, one of 16, 32, 64, 128; ``None`` picks from ``T·k / E``.
        impl: ``"triton"`` or ``"torch"``.
    """
    impl = _check_impl(impl)
    _check_tensor("experts", experts, 2, "[T, k]")
    if experts.is_floating_point() or experts.is_complex() or experts.dtype == torch.bool:
        raise TypeError(f"experts must be an integer tensor, got dtype {experts.dtype}")
    num_experts = check_int("num_experts", num_experts, minimum=1)
    num_tokens, top_k = experts.shape
    n = num_tokens * top_k
    if n >= 2**31:
        raise ValueError(f"T·k must be < 2**31 (int32 row indices), got {n}")
    block_m = _check_block_m(block_m, n, num_experts)
    max_tiles = max_tiles_for(n, num_experts, block_m)
    if impl == "torch":
        parts = reference.permute_metadata_ref(experts, num_experts, block_m, max_tiles)
    else:
        if num_experts > MAX_EXPERTS:
            raise ValueError(f"the triton metadata kernels support at most {MAX_EXPERTS} experts, got "
                             f"num_experts={num_experts}; use impl='torch'")
        parts = _ops.permute_metadata(experts, num_experts, block_m, max_tiles)
    return Metadata(*parts, block_m=block_m, num_tokens=num_tokens, top_k=top_k)


def metadata_from_plan(plan, block_m: int | None = None, impl: str = "triton") -> Metadata:
    """:class:`Metadata` for a :class:`~moe_lib.dispatch.DispatchPlan` (rows already grouped by expert,
    possibly with capacity drops): what ``MoELayer(backend="triton")`` uses."""
    impl = _check_impl(impl)
    num_tokens, top_k = plan.kept.shape
    n = plan.token_index.shape[0]
    num_experts = plan.num_experts
    block_m = _check_block_m(block_m, n, num_experts)
    max_tiles = max_tiles_for(n, num_experts, block_m)
    counts = plan.counts.to(torch.int32).contiguous()
    row_assignment = (plan.token_index * top_k + plan.slot_index).to(torch.int32).contiguous()
    if impl == "torch" or num_experts > MAX_EXPERTS:
        offsets = plan.offsets.to(torch.int32)
        tile_expert, tile_row = reference.tile_schedule_ref(counts, offsets, block_m, max_tiles)
    else:
        offsets, tile_expert, tile_row = _ops.schedule(counts, block_m, max_tiles)
    return Metadata(counts, offsets, row_assignment, tile_expert, tile_row, block_m, num_tokens, top_k,
                    complete=n == num_tokens * top_k)


def _check_ffn_args(x, weights, meta, w_gate, w_up, w_down, activation):
    _check_tensor("x", x, 2, "[T, d_model]")
    _check_tensor("weights", weights, 2, "[T, k]")
    if not isinstance(meta, Metadata):
        raise TypeError(f"meta must be a moe_lib.kernels.Metadata (from permute_metadata), got {type(meta).__name__}")
    if weights.shape != (meta.num_tokens, meta.top_k) or x.shape[0] != meta.num_tokens:
        raise ValueError(f"x [T, d] and weights [T, k] must match meta (T={meta.num_tokens}, k={meta.top_k}), "
                         f"got x {tuple(x.shape)} and weights {tuple(weights.shape)}")
    num_experts, d = meta.num_experts, x.shape[1]
    _check_tensor("w_down", w_down, 3, "[E, d_ff, d_out]")
    if w_up is None:  # interleaved gate|up
        _check_tensor("w_gate", w_gate, 3, "[E, d_model, 2·d_ff] (interleaved, w_up=None)")
        f2 = w_gate.shape[2]
        if w_gate.shape[:2] != (num_experts, d) or f2 % 2:
            raise ValueError(f"with w_up=None, w_gate must be the interleaved [E={num_experts}, d_model={d}, 2·d_ff] "
                             f"from interleave_gate_up, got {tuple(w_gate.shape)}")
        f = f2 // 2
        tensors = (x, w_gate, w_down)
    else:
        _check_tensor("w_gate", w_gate, 3, "[E, d_model, d_ff]")
        _check_tensor("w_up", w_up, 3, "[E, d_model, d_ff]")
        f = w_gate.shape[2]
        if w_gate.shape != (num_experts, d, f) or w_up.shape != w_gate.shape:
            raise ValueError(f"w_gate and w_up must have shape [E={num_experts}, d_model={d}, d_ff], got "
                             f"{tuple(w_gate.shape)} and {tuple(w_up.shape)}")
        tensors = (x, w_gate, w_up, w_down)
    if w_down.shape[:2] != (num_experts, f):
        raise ValueError(f"w_down must have shape [E={num_experts}, d_ff={f}, d_out], got {tuple(w_down.shape)}")
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1:
        raise TypeError(f"x, w_gate, w_up and w_down must share one dtype, got {sorted(map(str, dtypes))}")
    return check_choice("activation", activation, ACTIVATIONS)


def expert_ffn(x: Tensor, weights: Tensor, meta: Metadata, w_gate: Tensor, w_up: Tensor | None, w_down: Tensor,
               activation: str = "silu", impl: str = "triton") -> Tensor:
    """``y[t] = Σ_j weights[t, j] · (act(x_t W_g[e]) ⊙ x_t W_u[e]) W_d[e]`` with ``e = e(t, j)``: the gated
    FFN experts (SwiGLU for ``"silu"``; Shazeer 2020, eq. 6) combined with the routing weights.

    The triton path is two grouped GEMMs (gather fused into the first's loads, one wide GEMM over the gate
    and up weights interleaved by column, activation in its epilogue; routing weight in the second's
    epilogue, written to the assignment's slot) and a combine that sums the ``k`` slots in a fixed order.
    Its backward is Triton too: gradients w.r.t. ``x``, ``weights`` and the three expert weights. Accumulation is float32; on a GPU, float32 inputs go through
    the tensor cores as TF32 (Triton's default for ``tl.dot``, relative error near 1e-3) — use bfloat16 or
    float16 there, or ``impl="torch"`` for full float32.

    Args:
        x: ``[T, d_model]``.
        weights: ``[T, k]`` routing weights (float32 recommended).
        meta: :class:`Metadata` of the same routing.
        w_gate, w_up: ``[E, d_model, d_ff]``; or ``w_gate`` = the interleaved ``[E, d_model, 2·d_ff]`` of
            :func:`interleave_gate_up` and ``w_up=None`` (no conversion: the layout the kernels read).
            Two weights are interleaved here: once, cached (:func:`interleaved_gate_up`), when no gradient
            is needed; per call, through autograd, when one is — ``4·E·d·f`` elements moved in the forward
            (read both, write the copy) and as many in the backward (the gradient split back): for
            Mixtral-8x7B's layer in bfloat16, 3.8 GB each way (≈ 0.8 ms each at 4.8 TB/s). A training loop
            that keeps its weights interleaved (``w_up=None``) avoids both.
        w_down: ``[E, d_ff, d_out]`` (one dtype with ``x``).
        activation: ``"silu"``, ``"gelu"``, ``"relu"`` or ``"tanh"``.
        impl: ``"triton"`` or ``"torch"``.
    """
    impl = _check_impl(impl)
    activation = _check_ffn_args(x, weights, meta, w_gate, w_up, w_down, activation)
    if impl == "torch":
        if w_up is None:
            w_gate, w_up = split_gate_up(w_gate)
        return reference.expert_ffn_ref(x, weights, meta.row_assignment, meta.offsets, w_gate, w_up, w_down,
                                        activation)
    if meta.num_tokens == 0:
        return x.new_zeros(0, w_down.shape[2])
    x = x.contiguous()
    w_gu = w_gate if w_up is None else gate_up_operand(w_gate, w_up)
    if w_gu.stride(2) != 1:  # the wide B tile is loaded as contiguous rows of 2·BN columns
        w_gu = w_gu.contiguous()
    weights_flat = weights.float().reshape(-1).contiguous()
    return _ops.ExpertFFNFunction.apply(x, weights_flat, w_gu, w_down, meta, activation)


def fused_moe(x: Tensor, router_weight: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, top_k: int,
              score: str = "softmax", renormalize: bool = True, bias: Tensor | None = None,
              activation: str = "silu", impl: str = "triton", block_m: int | None = None,
              return_routing: bool = False):
    """One MoE FFN layer from ``x [T, d]``: logits ``x W_rᵀ`` (``router_weight [E, d]``, the layout of
    ``nn.Linear`` and of Hugging Face's ``gate.weight``) → :func:`route` → :func:`permute_metadata` →
    :func:`expert_ffn`. With ``return_routing`` also returns ``(weights, experts, meta)``.

    The functional form, on raw tensors (as vLLM's ``fused_moe``); as a module with auxiliary losses and
    metrics it is ``MoELayer(router=FusedTopKRouter(...), dispatcher=KernelDispatcher(), backend="triton")``
    (:mod:`.parts`; equal bit for bit when the logits are the same: that router scores in float32)."""
    _check_tensor("x", x, 2, "[T, d_model]")
    _check_tensor("router_weight", router_weight, 2, "[E, d_model]")
    if router_weight.shape[1] != x.shape[1]:
        raise ValueError(f"router_weight must have shape [E, d_model={x.shape[1]}], got {tuple(router_weight.shape)}")
    num_experts = router_weight.shape[0]
    logits = x @ router_weight.t()
    weights, experts = route(logits, top_k, score, renormalize, bias, impl=impl)
    meta = permute_metadata(experts, num_experts, block_m, impl=impl)
    y = expert_ffn(x, weights.to(torch.float32), meta, w_gate, w_up, w_down, activation, impl=impl)
    return (y, (weights, experts, meta)) if return_routing else y


from .parts import FusedTopKRouter, KernelDispatcher  # noqa: E402  (parts call back into this module)
