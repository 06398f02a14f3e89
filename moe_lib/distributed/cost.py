"""A cost model of expert parallelism: all-to-all volume, compute and memory per GPU.

It is a *model*, with these assumptions (chapter 13 checks the first two against measured runs):

1. Routing is uniform and independent of the rank: each of a token's ``k`` assignments lands on any of the
   ``W`` ranks with probability ``1/W``, so a fraction ``1 − 1/W`` leaves the rank.
2. No capacity drops (dropless) — with a capacity factor ``c`` at most ``c·T·k/E`` rows per expert move.
3. Dispatch and combine each move one ``d_model`` vector per remote assignment; the backward pass
   moves the same volume again (gradients of both all-to-alls).
4. Time is ``max``-free and additive: compute at ``mfu × peak`` FLOP/s, all-to-all at ``link_GBps`` per
   GPU plus ``latency_us`` per collective, nothing overlapped.
5. Memory per GPU counts the weights (experts ``E/W``, router and non-MoE parameters replicated), not
   activations or optimiser states unless ``optimizer_bytes_per_param`` is given.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .._validate import check_int, check_nonnegative_float, check_positive_float


@dataclass
class EPCost:
    """One layer's cost per GPU under :func:`ep_cost` (bytes, FLOPs, seconds)."""

    world_size: int
    experts_per_gpu: int
    a2a_bytes_per_gpu: float      # sent by one GPU, dispatch + combine, forward only
    expert_flops_per_gpu: float   # forward
    weight_bytes_per_gpu: float
    a2a_seconds: float
    compute_seconds: float

    @property
    def comm_fraction(self) -> float:
        """Share of the layer's (forward) time spent in all-to-all under assumption 4."""
        total = self.a2a_seconds + self.compute_seconds
        return self.a2a_seconds / total if total else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "comm_fraction": self.comm_fraction}


def a2a_bytes(tokens_per_gpu: int, top_k: int, d_model: int, world_size: int, bytes_per_elem: int = 2,
              capacity_factor: float | None = None, num_experts: int | None = None) -> float:
    """Bytes one GPU sends in one *dispatch* all-to-all: ``T·k·(1 − 1/W)·d·b`` (assumption 1), capped
    at ``c·T·k/E`` rows per expert when a capacity factor is given. Combine sends the same again."""
    rows = tokens_per_gpu * top_k
    if capacity_factor is not None and num_experts:
        rows = min(rows, capacity_factor * tokens_per_gpu * top_k)  # uniform: each expert gets T·k/E ≤ cap
    return rows * (1.0 - 1.0 / world_size) * d_model * bytes_per_elem


def ep_cost(*, tokens_per_gpu: int, d_model: int, d_ff: int, num_experts: int, top_k: int, world_size: int,
            bytes_per_elem: int = 2, expert_matrices: int = 3, peak_tflops: float = 989.0, mfu: float = 0.5,
            link_GBps: float = 50.0, latency_us: float = 20.0) -> EPCost:
    """Cost per GPU of one expert-parallel MoE layer's forward pass (see the module's assumptions).

    ``expert_matrices`` is 3 for SwiGLU experts (``d×f``, ``d×f``, ``f×d``), 2 for a plain MLP. Expert
    FLOPs: ``2·T·k·m·d·f`` per GPU (each GPU serves, on average, as many assignments as it sends,
    assumption 1). Defaults are illustrative (an H100/H200-class GPU with an inter-node link of 50 GB/s
    per GPU); pass your own or the book's measured ones.
    """
    for name, v in (("tokens_per_gpu", tokens_per_gpu), ("d_model", d_model), ("d_ff", d_ff),
                    ("num_experts", num_experts), ("top_k", top_k), ("world_size", world_size),
                    ("bytes_per_elem", bytes_per_elem), ("expert_matrices", expert_matrices)):
        check_int(name, v, minimum=1)
    for name, v in (("peak_tflops", peak_tflops), ("mfu", mfu), ("link_GBps", link_GBps)):
        check_positive_float(name, v)
    check_nonnegative_float("latency_us", latency_us)
    if num_experts % world_size:
        raise ValueError(f"num_experts={num_experts} must be divisible by world_size={world_size}")
    send = 2 * a2a_bytes(tokens_per_gpu, top_k, d_model, world_size, bytes_per_elem)
    flops = 2.0 * tokens_per_gpu * top_k * expert_matrices * d_model * d_ff
    experts_per_gpu = num_experts // world_size
    weights = experts_per_gpu * expert_matrices * d_model * d_ff * bytes_per_elem + d_model * num_experts * bytes_per_elem
    a2a_s = (send / (link_GBps * 1e9) + 2 * latency_us * 1e-6) if world_size > 1 else 0.0
    compute_s = flops / (peak_tflops * 1e12 * mfu)
    return EPCost(world_size, experts_per_gpu, send, flops, weights, a2a_s, compute_s)


def traffic_summary(traffic, d_model: int, world_size: int, bytes_per_elem: int = 4):
    """Measured dispatch volume against :func:`a2a_bytes`, over seeds: a pandas table with one row per
    ``(top_k, tokens)``.

    ``traffic`` holds the rows of :func:`moe_lib.distributed.check.measure_traffic` tagged with their
    ``seed`` (``python -m moe_lib.distributed.demo --seeds ...``; at least 2 seeds). Per seed, the bytes a
    rank sent are averaged over the ranks; over the seeds :func:`moe_lib.stats.summarize` gives the mean and
    95 % interval of that volume (``measured_KB``, ``± KB``) and of its ratio to the model
    (``measured / model``, ``± ratio``, ``std ratio``), and ``model in CI`` says whether the model's volume
    lies inside the measured interval.
    """
    import pandas as pd

    from ..stats import summarize

    df = pd.DataFrame(list(traffic))
    need = {"top_k", "tokens", "seed", "sent_remote_bytes"}
    if df.empty or not need <= set(df.columns):
        raise ValueError(f"traffic rows must hold {sorted(need)} (run the demo with --seeds), got {sorted(df.columns)}")
    per_seed = df.groupby(["top_k", "tokens", "seed"]).sent_remote_bytes.mean().reset_index()
    rows = []
    for (k, t), g in per_seed.groupby(["top_k", "tokens"]):
        if len(g) < 2:
            raise ValueError(f"top_k={k}, tokens={t}: {len(g)} seed(s); a spread needs at least 2")
        model = a2a_bytes(int(t), int(k), d_model, world_size, bytes_per_elem)
        vol, ratio = summarize(g.sent_remote_bytes / 1e3), summarize(g.sent_remote_bytes / model)
        rows.append({"top_k": int(k), "tokens": int(t), "measured_KB": vol.mean, "± KB": vol.half_width,
                     "model_KB": model / 1e3, "measured / model": ratio.mean, "± ratio": ratio.half_width,
                     "std ratio": ratio.std, "seeds": ratio.n, "model in CI": bool(ratio.low <= 1.0 <= ratio.high)})
    return pd.DataFrame(rows)
