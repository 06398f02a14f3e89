"""Backends: run an expert bank over a dispatch plan and combine the results.

All backends compute the same function, ``y[t] = Σ_{kept (t, e)} w_{t,e} · h_e(x_t)``; they differ in
how the expert matmuls are batched. The ``loop`` backend is the reference that defines correctness and
is kept forever for readability; every faster backend is tested against it.

* ``loop`` — one Python iteration per expert over that expert's contiguous rows.
* ``torch`` (the default) — the grouped rows gathered once and cut into one block per expert (views, no
  copy); each block runs through its expert (:meth:`~moe_lib.experts.ExpertBank.forward_blocks`) and its
  weighted rows are added to the output (``index_add_``) while they are still in the cache. No padding, no
  ``[E, C, ·]`` intermediates. On the CPU this is faster than one batched matmul over a padded batch: the
  FLOPs are the useful ones, and every intermediate of one expert fits in the cache where the padded
  ``[E, C, f]`` ones go through memory (issue 16 measured the padded version slower than the loop).
  Forward values equal the ``loop`` backend's bit for bit (the same matmuls on the same rows, the same
  additions in the same order).
* ``grouped_mm`` — the grouped rows as they are, through ``torch._grouped_mm`` (one GEMM per expert
  inside one call, no padding). CPU: float32 with widths that are multiples of 4; CUDA: bfloat16.
* ``triton`` — the fused Triton kernels of :mod:`moe_lib.kernels` (gated experts: ``swiglu``/``glu``):
  gather fused into the grouped GEMM, activation and routing weight in the epilogues, a deterministic
  combine and a Triton backward. Without CUDA they run in Triton's interpreter (correct, slow).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .dispatch import DispatchPlan, combine
from .experts import ExpertBank


def loop_backend(experts: ExpertBank, x: Tensor, plan: DispatchPlan) -> Tensor:
    """Reference: each expert runs on its own block of rows, one after another."""
    offsets = plan.offsets.tolist()
    outputs = []
    for e in range(experts.num_experts):
        rows = plan.token_index[offsets[e] : offsets[e + 1]]
        if rows.numel():
            outputs.append(experts.forward_expert(e, x[rows]))
    expert_out = torch.cat(outputs) if outputs else x.new_zeros(0, experts.d_out)
    return combine(expert_out, plan, x.shape[0])


def torch_backend(experts: ExpertBank, x: Tensor, plan: DispatchPlan) -> Tensor:
    """Blocked: gather the grouped rows once, run each expert on its block, add its weighted rows at once.

    The combine of :func:`~moe_lib.dispatch.combine` done block by block: the plan's rows are in expert
    order, so adding expert 0's block, then expert 1's, ... performs the same additions in the same order.
    """
    if plan.token_index.shape[0] == 0:
        return x.new_zeros(x.shape[0], experts.d_out)
    counts = plan.counts.tolist()
    rows = x.index_select(0, plan.token_index).split(counts)  # one gather (x[index] is ~3x slower), then views
    tokens = plan.token_index.split(counts)
    weights = plan.weights.split(counts)
    used = [e for e, n in enumerate(counts) if n]
    out = None
    for e, h in zip(used, experts.forward_blocks([(e, rows[e]) for e in used])):
        if out is None:
            out = h.new_zeros(x.shape[0], h.shape[-1])
        out.index_add_(0, tokens[e], h * weights[e].to(h.dtype).unsqueeze(-1))
    return out


def padded_backend(experts: ExpertBank, x: Tensor, plan: DispatchPlan) -> Tensor:
    """Chapter 11's step 2 (the ``torch`` backend until issue 16): every expert in one batched matmul over a
    zero-padded ``[E, C, d]`` batch, ``C`` the largest expert's row count (at most the capacity). Padding
    costs FLOPs when the load is skewed, and the padded intermediates go through memory."""
    num_rows = plan.token_index.shape[0]
    if num_rows == 0:
        return x.new_zeros(x.shape[0], experts.d_out)
    width = int(plan.counts.max())  # never more than the capacity, often less
    position = plan.position_in_expert()
    padded = x.new_zeros(experts.num_experts, width, x.shape[-1])
    padded = padded.index_put((plan.expert_index, position), x[plan.token_index])
    expert_out = experts.forward_padded(padded)[plan.expert_index, position]
    return combine(expert_out, plan, x.shape[0])


def grouped_mm_backend(experts: ExpertBank, x: Tensor, plan: DispatchPlan) -> Tensor:
    """No padding: every expert's GEMM runs on exactly its rows, in one ``torch._grouped_mm`` per matmul."""
    if plan.token_index.shape[0] == 0:
        return x.new_zeros(x.shape[0], experts.d_out)
    expert_out = experts.forward_grouped(x[plan.token_index], plan.offsets, plan.expert_index)
    return combine(expert_out, plan, x.shape[0])


def triton_backend(experts: ExpertBank, x: Tensor, plan: DispatchPlan) -> Tensor:
    """The fused Triton path (:func:`moe_lib.kernels.expert_ffn`) on the plan's grouped rows: the plan (made
    in PyTorch, with any capacity drops) becomes the kernels' metadata (:func:`moe_lib.kernels.metadata_from_plan`).
    For the path that groups the rows on the device too, see :class:`moe_lib.kernels.KernelDispatcher`.

    The kernels read the gate and up weights interleaved by column (one wide GEMM). For inference (no
    gradient needed) the interleaved copy is made once and cached on the parameters' identity, storage and
    ``_version`` (:func:`moe_lib.kernels.gate_up_operand`); in training it is made per call through
    autograd, which costs ``4·E·d·f`` elements of traffic each way (see :func:`~moe_lib.kernels.expert_ffn`)."""
    from . import kernels
    from .kernels.parts import run_bank

    meta = kernels.metadata_from_plan(plan)
    weights = x.new_zeros(meta.num_tokens * meta.top_k, dtype=torch.float32)
    weights = weights.index_put((meta.row_assignment.long(),), plan.weights.float())
    return run_bank(experts, x, weights.view(meta.num_tokens, meta.top_k), meta)


#: Backend name -> function ``(experts, x [T, d], plan) -> y [T, d_out]``.
BACKENDS: dict[str, Callable[[ExpertBank, Tensor, DispatchPlan], Tensor]] = {
    "loop": loop_backend,
    "torch": torch_backend,
    "grouped_mm": grouped_mm_backend,
    "triton": triton_backend,
}
