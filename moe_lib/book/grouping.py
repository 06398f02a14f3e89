"""What each way of grouping expert computation costs (chapter 11): the chapter's cost models.

Every backend computes the same function; they differ in how the ``N = Σ_e n_e`` rows of the
expert-grouped batch are laid out for the matrix multiplications, and therefore in how many rows they
multiply, how many bytes they move through memory and how many kernels they launch. This module holds
the bookkeeping the chapter measures:

* :func:`padding_stats` — the rows a padded ``[E, C, d]`` batched matmul multiplies versus the real ones;
* :func:`tile_stats` — the ``BLOCK_M``-row tiles of a grouped-GEMM kernel and the rows masked at the end of
  each expert's last tile (the schedule itself is :func:`moe_lib.dispatch.tile_schedule`, the grid's slot
  bound :func:`moe_lib.dispatch.max_tiles`);
* :func:`traffic_ops`, :func:`memory_traffic` — an analytic model of the bytes each implementation reads
  and writes (materialised permuted copy, padded batch, intermediate activations, combine), and
  :func:`count_traffic`, which applies the same rule to the operations torch really runs;
* :func:`grouped_flops` — useful versus executed FLOPs of the expert FFN.

The loads it is run on come from :func:`moe_lib.routers.synthetic_routing` (balanced, uniform or
Zipf-skewed routings); the times beside it from :mod:`moe_lib.bench.timing`.
Counts are per-expert row counts ``n_e`` (``DispatchPlan.counts``), as a tensor or any sequence of ints.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from .._validate import check_choice, check_counts, check_int
from ..dispatch import max_tiles


# --------------------------------------------------------------------------------------------------
# Padding and tiles
# --------------------------------------------------------------------------------------------------

def padding_stats(counts, capacity: int | None = None) -> dict[str, float]:
    """Rows of the padded ``[E, C, d]`` batch that a padded batched matmul multiplies
    (:func:`moe_lib.backends.padded_backend`, chapter 11's step 2).

    ``C = max_e n_e`` (at most ``capacity`` when given; the plan has already dropped the rest).
    Returns ``real_rows = Σ n_e``, ``padded_rows = E·C`` (all rows the batched matmul multiplies),
    ``waste = (E·C − N)/N`` (padding rows per real row) and ``max_over_mean = C / mean(n_e)``.
    With top-``k`` routing no expert can get more than ``T`` rows, so ``waste ≤ E/k − 1``.
    """
    c = check_counts("counts", counts)
    if capacity is not None:
        capacity = check_int("capacity", capacity, minimum=0)
        c = [min(v, capacity) for v in c]
    real = sum(c)
    width = max(c)
    padded = len(c) * width
    return {
        "real_rows": real,
        "padded_rows": padded,
        "waste": (padded - real) / real if real else 0.0,
        "max_over_mean": width * len(c) / real if real else 0.0,
    }


def tile_stats(counts, block_m: int) -> dict[str, float]:
    """Tiles of a grouped-GEMM kernel: ``tiles = Σ ceil(n_e/M)``, ``tile_rows = M·tiles`` (rows the tiles
    span, masked ones included), ``waste = (tile_rows − N)/N`` (masked rows per real row; at most
    ``E·(M−1)/N``) and ``max_tiles`` (the tile slots the kernel grid launches, :func:`max_tiles`)."""
    c = check_counts("counts", counts)
    block_m = check_int("block_m", block_m, minimum=1)
    real = sum(c)
    tiles = sum(math.ceil(n / block_m) for n in c)
    rows = tiles * block_m
    return {
        "real_rows": real,
        "tiles": tiles,
        "tile_rows": rows,
        "waste": (rows - real) / real if real else 0.0,
        "max_tiles": max_tiles(real, len(c), block_m),
    }


# --------------------------------------------------------------------------------------------------
# FLOPs and memory traffic
# --------------------------------------------------------------------------------------------------

#: The implementations the traffic model knows, in the order of the chapter.
VARIANTS = ("loop", "padded", "grouped", "fused")


def grouped_flops(counts, d_model: int, d_ff: int, variant: str, *, d_out: int | None = None,
                  block_m: int = 64) -> int:
    """FLOPs (2 per multiply-add) of a SwiGLU expert FFN, ``2·rows·f·(2d + d_out)``, over the rows a variant
    multiplies: ``N`` for ``loop``/``grouped`` (only real rows), ``E·max n_e`` for ``padded``, the tile rows
    for ``fused`` (a tile's ``tl.dot`` multiplies its masked rows too, with zeros). ``loop`` is the useful
    amount."""
    check_choice("variant", variant, VARIANTS)
    d_model = check_int("d_model", d_model, minimum=1)
    d_ff = check_int("d_ff", d_ff, minimum=1)
    d_out = d_model if d_out is None else check_int("d_out", d_out, minimum=1)
    c = check_counts("counts", counts)
    rows = {"loop": sum(c), "grouped": sum(c), "padded": padding_stats(c)["padded_rows"],
            "fused": tile_stats(c, block_m)["tile_rows"]}[variant]
    return 2 * rows * d_ff * (2 * d_model + d_out)


@dataclass(frozen=True)
class TrafficOp:
    """One step of an implementation that reads and writes whole tensors in memory (elements)."""

    name: str
    category: str
    read: int
    written: int


def traffic_ops(counts, num_tokens: int, d_model: int, d_ff: int, variant: str, *,
                d_out: int | None = None) -> list[TrafficOp]:
    """The memory operations of one forward pass of a SwiGLU expert bank, in elements.

    Model: every operation reads each of its input tensors once from memory and writes its output once;
    nothing stays in cache between operations; integer index tensors are not counted. ``N = Σ n_e`` real
    rows, ``P = E·max n_e`` padded rows, ``E'`` experts with at least one row (all ``E`` for ``padded``, a
    batched matmul reads every expert's weights). Categories: ``weights``; ``permuted copy`` (the gathered
    ``x[token_index]``); ``padding`` (zero-filled batch, scatter into it, unpadding the outputs);
    ``activations`` (GEMM inputs and outputs and the SwiGLU intermediates, excluding weights);
    ``combine`` (weighting and scattering back to ``[T, d_out]``).

    Variants:

    * ``loop`` — ``moe_lib.backends.loop_backend``: per expert ``x[rows]``, gate and up matmuls, ``silu``,
      multiply, down matmul; ``torch.cat`` of the outputs; eager combine.
    * ``padded`` — ``torch_backend``: gather, zero-filled ``[E, C, d]`` batch, ``index_put`` (out of place:
      it reads and writes the whole batch), three ``bmm`` over padded rows, SwiGLU on padded rows, unpad,
      eager combine.
    * ``grouped`` — ``torch._grouped_mm`` on the permuted copy: like ``loop`` without the ``cat``.
    * ``fused`` — the Triton path: the gate/up kernel loads ``x`` rows through the row map (no permuted
      copy) and applies SwiGLU in its epilogue (writes only ``h``); the down kernel multiplies by the
      routing weight in its epilogue and writes ``N`` weighted rows; a combine kernel sums each token's
      ``k`` rows (reads ``N·d_out``, writes ``T·d_out``; no atomics).
    """
    check_choice("variant", variant, VARIANTS)
    T = check_int("num_tokens", num_tokens, minimum=0)
    d = check_int("d_model", d_model, minimum=1)
    f = check_int("d_ff", d_ff, minimum=1)
    o = d if d_out is None else check_int("d_out", d_out, minimum=1)
    c = check_counts("counts", counts)
    N = sum(c)
    E = len(c)
    touched = sum(1 for n in c if n > 0)
    ops: list[TrafficOp] = []
    add = lambda name, cat, r, w: ops.append(TrafficOp(name, cat, int(r), int(w)))  # noqa: E731

    eager_combine = [
        ("weight multiply", "combine", N * o + N, N * o),
        ("zeros [T, d_out]", "combine", 0, T * o),
        ("index_add", "combine", T * o + N * o, T * o),
    ]
    if variant == "fused":
        add("gate+up GEMM, gather in load, SwiGLU epilogue (weights)", "weights", 2 * touched * d * f, 0)
        add("gate+up GEMM, gather in load, SwiGLU epilogue", "activations", N * d, N * f)
        add("down GEMM, routing weight in epilogue (weights)", "weights", touched * f * o, 0)
        add("down GEMM, routing weight in epilogue", "activations", N * f + N, N * o)
        add("combine k rows per token", "combine", N * o, T * o)
        return ops

    rows = N
    weight_experts = touched
    add("gather x[token_index]", "permuted copy", N * d, N * d)
    if variant == "padded":
        P = padding_stats(c)["padded_rows"]
        rows, weight_experts = P, E
        add("zero-filled batch [E, C, d]", "padding", 0, P * d)
        add("index_put into the batch (out of place)", "padding", P * d + N * d, P * d)
    add("gate GEMM (weights)", "weights", weight_experts * d * f, 0)
    add("gate GEMM", "activations", rows * d, rows * f)
    add("up GEMM (weights)", "weights", weight_experts * d * f, 0)
    add("up GEMM", "activations", rows * d, rows * f)
    add("silu", "activations", rows * f, rows * f)
    add("multiply", "activations", 2 * rows * f, rows * f)
    add("down GEMM (weights)", "weights", weight_experts * f * o, 0)
    add("down GEMM", "activations", rows * f, rows * o)
    if variant == "padded":
        add("unpad outputs", "padding", N * o, N * o)
    if variant == "loop":
        add("torch.cat of expert outputs", "activations", N * o, N * o)
    for name, cat, r, w in eager_combine:
        add(name, cat, r, w)
    return ops


def memory_traffic(counts, num_tokens: int, d_model: int, d_ff: int, variant: str, *,
                   d_out: int | None = None, bytes_per_elem: int = 4) -> dict[str, int]:
    """Bytes read plus written per category of :func:`traffic_ops`, and their ``total``."""
    bytes_per_elem = check_int("bytes_per_elem", bytes_per_elem, minimum=1)
    out = {"weights": 0, "permuted copy": 0, "padding": 0, "activations": 0, "combine": 0}
    for op in traffic_ops(counts, num_tokens, d_model, d_ff, variant, d_out=d_out):
        out[op.category] += (op.read + op.written) * bytes_per_elem
    out["total"] = sum(out.values())
    return out


def compulsory_traffic(counts, num_tokens: int, d_model: int, d_ff: int, *, d_out: int | None = None,
                       bytes_per_elem: int = 4) -> int:
    """The bytes no implementation can avoid: read ``x`` and the touched experts' weights, write ``y``."""
    c = check_counts("counts", counts)
    o = d_model if d_out is None else d_out
    touched = sum(1 for n in c if n > 0)
    return bytes_per_elem * (num_tokens * d_model + touched * d_ff * (2 * d_model + o) + num_tokens * o)


_FACTORIES = {"new_zeros", "new_empty", "new_ones", "new_full", "zeros_like", "empty_like", "ones_like",
              "full_like", "zeros", "empty", "ones", "full"}
_GATHERS = {"index", "index_select", "gather", "embedding"}


def count_traffic(fn: Callable[..., object], *args, **kwargs) -> dict:
    """Run ``fn(*args, **kwargs)`` and count the floating-point bytes its ATen operations read and write.

    The same rule as :func:`traffic_ops`, applied to the operations torch really runs (a
    ``TorchDispatchMode`` sees each one): an operation reads each floating-point input tensor whole and
    writes its floating-point outputs; views (``select``, ``view``, ``t``, ...) move nothing; factories
    (``new_zeros``, ...) read nothing; gathers (``index``, ``index_select``, ...) read only the rows they
    return. Integer tensors (indices, counts) are not counted. Triton kernels are invisible to it, so it
    checks the model of the eager implementations only.

    Returns ``{"read": bytes, "written": bytes, "total": bytes, "ops": [(name, read, written), ...]}``.
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    def nbytes(values) -> int:
        return sum(v.numel() * v.element_size() for v in tree_leaves(values)
                   if isinstance(v, Tensor) and v.is_floating_point())

    ops: list[tuple[str, int, int]] = []

    class _Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, f_args=(), f_kwargs=None):
            f_kwargs = f_kwargs or {}
            out = func(*f_args, **f_kwargs)
            name = func.overloadpacket.__name__
            if func.is_view or name in ("detach", "alias", "lift_fresh"):
                return out
            written = nbytes(out)
            if name in _FACTORIES:
                read = 0
            elif name in _GATHERS:
                read = written
            else:
                read = nbytes((f_args, f_kwargs))
            if read or written:
                ops.append((name, read, written))
            return out

    with _Counter():
        fn(*args, **kwargs)
    read = sum(r for _, r, _ in ops)
    written = sum(w for _, _, w in ops)
    return {"read": read, "written": written, "total": read + written, "ops": ops}
