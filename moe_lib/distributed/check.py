"""Equality of :class:`ExpertParallelMoE` with a single-process :class:`~moe_lib.MoELayer`.

:func:`compare_with_single_process` runs on every rank (under :func:`~moe_lib.distributed.launch` or
``torchrun``). Every rank builds the same layer from ``seed`` and knows every rank's inputs (each drawn
from ``seed + 1000 + rank``), so it can compute the single-process reference itself: the layer on its own
tokens (outputs and input gradients) and the sum of the losses over all ranks' tokens (parameter
gradients). It returns the largest deviations; the tests assert them, the chapter prints them.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from ..layer import MoELayer
from .layer import ExpertParallelMoE


def _inputs(seed: int, rank: int, tokens: int, d_model: int, d_out: int):
    g = torch.Generator().manual_seed(seed + 1000 + rank)
    n = tokens + 3 * rank  # uneven token counts across ranks
    return torch.randn(n, d_model, generator=g), torch.randn(n, d_out, generator=g)


def compare_with_single_process(rank: int, world_size: int, layer_kwargs: dict, tokens: int = 32,
                                seed: int = 0) -> dict:
    """Max |difference| between the expert-parallel layer and ``MoELayer(**layer_kwargs)`` on one process.

    Returns ``{"out", "grad_x", "grad_experts", "grad_router"}`` (max abs differences), the dropped
    assignments on this rank and this rank's all-to-all traffic.
    """
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    torch.manual_seed(seed)
    ref = MoELayer(**layer_kwargs).to(device)
    ep = ExpertParallelMoE.from_layer(ref)
    d_model, d_out = ref.d_model, ref.d_out
    inputs = [tuple(t.to(device) for t in _inputs(seed, r, tokens, d_model, d_out)) for r in range(world_size)]

    # Reference: each rank's batch through the whole layer, losses summed over ranks.
    ref.zero_grad()
    x_ref = inputs[rank][0].clone().requires_grad_(True)
    ref_total = 0.0
    for r, (x, g) in enumerate(inputs):
        xr = x_ref if r == rank else x
        y = ref(xr)
        if r == rank:
            y_ref = y.detach()
        ref_total = ref_total + (y * g).sum()
    ref_total.backward()

    # Expert parallel: this rank's batch only.
    x = inputs[rank][0].clone().requires_grad_(True)
    start = time.perf_counter()
    y = ep(x)
    (y * inputs[rank][1]).sum().backward()
    ep.sync_router_grads()
    elapsed = time.perf_counter() - start

    lo, hi = ep.expert_offset, ep.expert_offset + ep.local_experts
    grad_experts = max(
        (p.grad - dict(ref.experts.named_parameters())[n].grad[lo:hi]).abs().max().item()
        for n, p in ep.experts.named_parameters()
    )
    grad_router = max(
        ((p.grad - q.grad).abs().max().item() if q.grad is not None else 0.0)
        for p, q in zip(ep.router.parameters(), ref.router.parameters())
    ) if any(True for _ in ref.router.parameters()) else 0.0
    return {
        "rank": rank,
        "tokens": x.shape[0],
        "out": (y.detach() - y_ref).abs().max().item(),
        "grad_x": (x.grad - x_ref.grad).abs().max().item(),
        "grad_experts": grad_experts,
        "grad_router": grad_router,
        "ref_scale": max(y_ref.abs().max().item(), x_ref.grad.abs().max().item()),
        "router_grad_norm": sum(float(q.grad.norm()) for q in ref.router.parameters() if q.grad is not None),
        "dropped": ep.last_plan.dropped_assignments,
        "traffic": ep.last_traffic,
        "seconds": elapsed,
    }


def run_cases(rank: int, world_size: int, cases: list[dict], tokens: int = 32, seed: int = 0) -> list[dict]:
    """:func:`compare_with_single_process` for several layer configurations, in one process group."""
    return [dict(compare_with_single_process(rank, world_size, kw, tokens, seed), case=i) for i, kw in enumerate(cases)]


def expect_config_error(rank: int, world_size: int, layer_kwargs_by_rank: list[dict]) -> str:
    """Try to shard a layer whose configuration is invalid or differs between ranks; return the message
    of the ``ValueError`` raised (every rank must raise one; raises ``AssertionError`` otherwise)."""
    torch.manual_seed(0)
    try:
        ExpertParallelMoE.from_layer(MoELayer(**layer_kwargs_by_rank[rank]))
    except ValueError as exc:
        return str(exc)
    raise AssertionError("no ValueError for an invalid expert-parallel configuration")


def survive_dead_peer(rank: int, world_size: int, dead_rank: int = 1) -> dict:
    """Rank ``dead_rank`` exits abruptly after joining; the others run a forward pass and must fail
    (not hang): returns the exception type and the seconds it took to surface."""
    import os

    torch.manual_seed(0)
    ep = ExpertParallelMoE.from_layer(MoELayer(d_model=8, d_ff=16, num_experts=world_size, top_k=1))
    if rank == dead_rank:
        os._exit(3)
    start = time.perf_counter()
    try:
        ep(torch.randn(16, 8))
    except Exception as exc:  # gloo: connection closed by peer, or the process-group timeout
        return {"rank": rank, "error": type(exc).__name__, "seconds": time.perf_counter() - start}
    return {"rank": rank, "error": None, "seconds": time.perf_counter() - start}


def measure_traffic(rank: int, world_size: int, layer_kwargs: dict, token_counts: list[int], seed: int = 0) -> list[dict]:
    """Forward passes of the expert-parallel layer for several local batch sizes; this rank's traffic."""
    torch.manual_seed(seed)
    ep = ExpertParallelMoE.from_layer(MoELayer(**layer_kwargs))
    out = []
    for t in token_counts:
        g = torch.Generator().manual_seed(seed + 7 * rank + t)
        with torch.no_grad():
            ep(torch.randn(t, ep.d_model, generator=g))
        out.append({"rank": rank, "tokens": t, "top_k": ep.top_k, **{k: v for k, v in ep.last_traffic.items()
                                                                     if k.endswith("bytes")}})
    return out
