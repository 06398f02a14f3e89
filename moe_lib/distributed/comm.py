"""Collectives and process launching for expert parallelism.

* :func:`all_to_all` — ``torch.distributed.all_to_all_single`` with uneven splits, differentiable: the
  backward of an all-to-all is the all-to-all with the splits swapped (each gradient row goes back to the
  rank that sent the row).
* :func:`init_distributed` — join the process group that ``torchrun`` describes in the environment, with
  gloo on the CPU and NCCL on GPUs, and a bounded timeout so a dead rank makes the others fail.
* :func:`launch` — start ``world_size`` local CPU ranks (``spawn``), run a function on each and collect
  what it returns; a rank that dies or hangs is reported instead of hanging the caller. Tests and
  notebooks use it; real jobs use ``torchrun``.
"""
from __future__ import annotations

import datetime
import os
import pickle
import tempfile
import time
import traceback
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .._validate import check_choice, check_int, check_positive_float

#: Default process-group timeout (seconds): a collective waiting on a rank that died fails after this.
DEFAULT_TIMEOUT_S = 60.0


class _AllToAll(torch.autograd.Function):
    """``out = all_to_all(x)`` with row splits; backward sends gradients back along the same routes."""

    @staticmethod
    def forward(ctx, x: Tensor, output_splits: list[int], input_splits: list[int], group):
        ctx.splits = (output_splits, input_splits)
        ctx.group = group
        out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        output_splits, input_splits = ctx.splits
        grad_in = grad.new_empty((sum(input_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(grad_in, grad.contiguous(), input_splits, output_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: Tensor, output_splits: Sequence[int], input_splits: Sequence[int], group=None) -> Tensor:
    """Differentiable uneven all-to-all over dim 0.

    Rank ``r`` sends rows ``x[sum(input_splits[:j]) : sum(input_splits[:j+1])]`` to rank ``j`` and receives
    ``output_splits[j]`` rows from rank ``j``, stacked in rank order. Every rank must call it (and, when a
    loss depends on the result, run backward) with matching splits.
    """
    return _AllToAll.apply(x, [int(s) for s in output_splits], [int(s) for s in input_splits], group)


def exchange_counts(send_counts: Tensor, group=None) -> Tensor:
    """All-to-all of per-destination counts: ``send_counts`` is ``[W·m]`` (``m`` numbers for each rank);
    returns ``[W·m]``: the ``m`` numbers each rank sent to this one, in rank order."""
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts.contiguous(), group=group)
    return recv


def default_backend() -> str:
    """``"nccl"`` when CUDA is available, else ``"gloo"``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.device:
    """Join the process group described by ``torchrun``'s environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``) and return this rank's device.

    ``backend=None`` picks NCCL with one GPU per rank when CUDA is available, gloo on the CPU otherwise —
    the model code is the same. ``timeout_s`` bounds every collective: a rank that dies makes the others
    raise instead of waiting forever.
    """
    backend = default_backend() if backend is None else check_choice("backend", backend, ("gloo", "nccl"))
    timeout_s = check_positive_float("timeout_s", timeout_s)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return device


def _entry(rank: int, world_size: int, init_file: str, result_dir: str, timeout_s: float,
           fn: Callable, args: tuple) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    outcome: tuple[str, object]
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        outcome = ("ok", fn(rank, world_size, *args))
    except BaseException as exc:  # reported to the launcher, which re-raises
        outcome = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    with open(os.path.join(result_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(outcome, f)
    if dist.is_initialized() and outcome[0] == "ok":
        dist.destroy_process_group()
    # Leave without waiting on a peer that may be gone (a dead rank must not make us hang at exit).
    os._exit(0)


class LaunchError(RuntimeError):
    """One or more ranks of :func:`launch` raised, died or did not finish; ``.outcomes`` has the details."""

    def __init__(self, message: str, outcomes: list):
        super().__init__(message)
        self.outcomes = outcomes


def launch(fn: Callable, world_size: int, args: tuple = (), *, timeout_s: float = DEFAULT_TIMEOUT_S,
           join_timeout_s: float = 170.0) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` local CPU processes joined by gloo.

    ``fn`` must be importable (a module-level function) because the processes are spawned. Returns the
    list of values ``fn`` returned, by rank. Raises :class:`LaunchError` if a rank raised (with its
    traceback), exited without a result (e.g. killed), or was still running after ``join_timeout_s``
    (it is then terminated). ``timeout_s`` is the process-group timeout inside the ranks.
    """
    import torch.multiprocessing as mp

    world_size = check_int("world_size", world_size, minimum=1)
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="moe_lib_launch_") as tmp:
        init_file = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_entry, args=(r, world_size, init_file, tmp, timeout_s, fn, tuple(args)))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + join_timeout_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        outcomes = []
        for r, p in enumerate(procs):
            if p.is_alive():
                p.terminate()
                p.join()
                outcomes.append(("hung", f"rank {r} still running after {join_timeout_s} s; terminated"))
                continue
            path = os.path.join(tmp, f"rank{r}.pkl")
            if os.path.exists(path):
                with open(path, "rb") as f:
                    outcomes.append(pickle.load(f))
            else:
                outcomes.append(("died", f"rank {r} exited with code {p.exitcode} and no result"))
    bad = [(r, o) for r, o in enumerate(outcomes) if o[0] != "ok"]
    if bad:
        lines = [f"rank {r}: {kind}: {msg}" for r, (kind, msg) in bad]
        raise LaunchError("distributed launch failed:\n" + "\n".join(lines), outcomes)
    return [o[1] for o in outcomes]


def free_port() -> int:
    """A TCP port that was free a moment ago (for ``torchrun --master-port``)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(module: str, nproc: int, args: Sequence[str] = (), timeout_s: float = 120.0) -> str:
    """Run ``python -m torch.distributed.run --nproc-per-node nproc -m module args`` on this machine (a
    free port, one thread per rank) and return its output; raises ``RuntimeError`` with the output if it
    fails or runs past ``timeout_s``."""
    import subprocess
    import sys

    nproc = check_int("nproc", nproc, minimum=1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", module, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"torchrun did not finish in {timeout_s} s: {' '.join(cmd)}") from exc
    if proc.returncode:
        raise RuntimeError(f"torchrun failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr
