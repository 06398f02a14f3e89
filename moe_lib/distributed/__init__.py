"""Expert parallelism over ``torch.distributed``: experts sharded across ranks, tokens moved by all-to-all.

* :class:`AllToAllDispatcher` — the dispatcher that moves planned rows to the ranks owning their experts
  and back; plugged into :class:`~moe_lib.MoELayer` it makes the layer expert parallel.
* :class:`ExpertParallelMoE` — that layer, built from a single-process :class:`~moe_lib.MoELayer` with
  :meth:`ExpertParallelMoE.from_layer`; same router, same dispatch plan, same combine, same forward.
* :func:`all_to_all` — differentiable uneven ``all_to_all_single``.
* :func:`init_distributed` — gloo on the CPU, NCCL on GPUs, bounded timeout; run under ``torchrun``.
* :func:`launch` — local CPU ranks for tests and notebooks.
* :mod:`moe_lib.distributed.cost` — a cost model of all-to-all volume, compute and memory per GPU.
"""
from . import check, cost
from .comm import (DEFAULT_TIMEOUT_S, LaunchError, all_to_all, default_backend, exchange_counts, free_port,
                   init_distributed, launch, run_torchrun)
from .cost import EPCost, ep_cost, traffic_summary
from .layer import AllToAllDispatcher, ExpertParallelMoE, expected_remote_fraction, shard_range

__all__ = [
    "AllToAllDispatcher", "ExpertParallelMoE", "all_to_all", "exchange_counts", "init_distributed", "launch", "LaunchError",
    "default_backend", "free_port", "run_torchrun", "shard_range", "expected_remote_fraction", "EPCost", "ep_cost",
    "DEFAULT_TIMEOUT_S", "check", "cost", "traffic_summary",
]
