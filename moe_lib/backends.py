"""Backends: run an expert bank over a dispatch plan and combine the results.

All backends compute the same function, ``y[t] = Σ_{kept (t, e)} w_{t,e} · h_e(x_t)``; they differ in
how the expert matmuls are batched. The ``loop`` backend is the reference that defines correctness and
is kept forever for readability; every faster backend is tested against it.

* ``loop`` — one Python iteration per expert over that expert's contiguous rows.
* ``torch`` — scatter the grouped rows into a zero-padded ``[E, C, d]`` batch (``C`` = the largest
  expert's row count, at most the capacity) and run every expert in one batched matmul. Padding costs FLOPs
  when the load is skewed; grouped-GEMM kernels (Part IV) remove it.
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
    """Vectorised: one zero-padded batched matmul over all experts."""
    num_rows = plan.token_index.shape[0]
    if num_rows == 0:
        return x.new_zeros(x.shape[0], experts.d_out)
    width = int(plan.counts.max())  # never more than the capacity, often less
    position = plan.position_in_expert()
    padded = x.new_zeros(experts.num_experts, width, x.shape[-1])
    padded = padded.index_put((plan.expert_index, position), x[plan.token_index])
    expert_out = experts.forward_padded(padded)[plan.expert_index, position]
    return combine(expert_out, plan, x.shape[0])


#: Backend name -> function ``(experts, x [T, d], plan) -> y [T, d_out]``.
BACKENDS: dict[str, Callable[[ExpertBank, Tensor, DispatchPlan], Tensor]] = {
    "loop": loop_backend,
    "torch": torch_backend,
}
