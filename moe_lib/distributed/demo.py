"""The chapter-13 job: ``torchrun --nproc-per-node W -m moe_lib.distributed.demo --out result.json``.

Every rank joins the process group (gloo on the CPU, NCCL on GPUs: :func:`init_distributed`), checks the
expert-parallel layer against one process for a few routers (:func:`~moe_lib.distributed.check.run_cases`)
and measures the all-to-all traffic for several local batch sizes and ``k``. Rank 0 gathers everything
and writes one JSON file. ``--seeds 0 1 2`` repeats both for several seeds in the same process group (each
row then carries its ``seed``; the default is the single ``--seed``), so the spread of the measured
traffic over seeds costs one job start-up, not one per seed.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist

from . import check
from .comm import init_distributed

EQUALITY_CASES = [
    {"d_model": 32, "d_ff": 64, "num_experts": 8, "top_k": 1, "router": "topk"},
    {"d_model": 32, "d_ff": 64, "num_experts": 8, "top_k": 2, "router": "topk"},
    {"d_model": 32, "d_ff": 64, "num_experts": 8, "router": "switch", "capacity_factor": 1.0},
]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="JSON file written by rank 0")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--top-k", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="run the checks and the traffic measurement for each of these seeds (overrides --seed)")
    parser.add_argument("--timeout-s", type=float, default=60.0)
    parser.add_argument("--backend", choices=("gloo", "nccl"), default=None,
                        help="process-group backend: gloo (CPU tensors) or nccl (one GPU per rank); "
                             "default: nccl when CUDA is available, else gloo")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    init_distributed(backend=args.backend, timeout_s=args.timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    seeds = [args.seed] if args.seeds is None else list(args.seeds)
    if len(set(seeds)) != len(seeds):
        parser.error(f"--seeds must be distinct, got {seeds}")
    equality, traffic = [], []
    for seed in seeds:
        equality += [dict(e, seed=seed) for e in check.run_cases(rank, world, EQUALITY_CASES, tokens=48, seed=seed)]
        for k in args.top_k:
            kw = {"d_model": args.d_model, "d_ff": 2 * args.d_model, "num_experts": args.num_experts, "top_k": k}
            traffic += [dict(t, seed=seed) for t in check.measure_traffic(rank, world, kw, args.tokens, seed=seed)]
    gathered = [None] * world
    dist.all_gather_object(gathered, {"equality": equality, "traffic": traffic})
    if rank == 0:
        result = {"world_size": world, "backend": dist.get_backend(), "cases": EQUALITY_CASES,
                  "d_model": args.d_model, "num_experts": args.num_experts, "bytes_per_elem": 4, "seeds": seeds,
                  "equality": [e for g in gathered for e in g["equality"]],
                  "traffic": [t for g in gathered for t in g["traffic"]],
                  "seconds": time.perf_counter() - start}
        with open(args.out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
