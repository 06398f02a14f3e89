"""Serving MoEs: which experts a decode step touches, what it costs, expert caching, and generation.

* :func:`expected_experts_touched` — ``E·(1 − (1 − k/E)^B)``: distinct experts a batch of ``B`` tokens
  needs if each token picks ``k`` of ``E`` uniformly (a token misses a given expert with probability
  ``1 − k/E``; ``B`` independent tokens all miss it with probability ``(1 − k/E)^B``).
* :func:`measure_experts_touched` — the same count from a real routing (``[T, k]`` expert ids).
* :func:`decode_bytes` — weight bytes one decode step must read, dense vs MoE.
* :func:`time_decode` — latency and throughput of a layer against batch size, measured here.
* :class:`LRUExpertCache` / :func:`cache_hit_rates` — an expert cache (offloading) simulated on a trace.
* :func:`generate` — greedy decoding with any ``idx -> logits`` model, recording the experts of each step.
* :func:`load_anchor` — the committed H200 measurements (``benchmarks/anchors/``).
* :func:`random_trace`, :func:`touched_experiment`, :func:`cache_experiment` — chapter 14's experiments
  for one seed, to run over seeds with :func:`moe_lib.stats.over_seeds`.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from .._validate import check_int
from ..utils import book_file


def expected_experts_touched(num_experts: int, top_k: int, batch: int | Tensor) -> float | Tensor:
    """``E·(1 − (1 − k/E)^B)`` distinct experts for ``B`` tokens routed uniformly at random, top-``k``.

    Exact for uniform, independent routing when a token's ``k`` experts are distinct (each expert is in a
    token's set with probability ``k/E``). Real routers are skewed and correlated, which lowers it.
    """
    check_int("num_experts", num_experts, minimum=1)
    check_int("top_k", top_k, minimum=1, maximum=num_experts)
    miss = 1.0 - top_k / num_experts
    return num_experts * (1.0 - miss ** batch)


def measure_experts_touched(experts: Tensor, num_experts: int, batch_sizes: Sequence[int], trials: int = 50,
                            generator: torch.Generator | None = None) -> list[float]:
    """Mean number of distinct experts used by ``B`` tokens drawn at random from a routing ``[T, k]``."""
    if not isinstance(experts, Tensor) or experts.dim() != 2:
        raise TypeError("experts must be an integer tensor [T, k] of expert ids (Routing.experts)")
    check_int("trials", trials, minimum=1)
    out = []
    for b in batch_sizes:
        b = check_int("batch size", b, minimum=1, maximum=experts.shape[0])
        counts = []
        for _ in range(trials):
            rows = torch.randperm(experts.shape[0], generator=generator)[:b]
            counts.append(torch.unique(experts[rows]).numel())
        out.append(sum(counts) / trials)
    return out


def decode_bytes(*, shared_params: float, expert_params: float, num_experts: int, top_k: int, batch: int,
                 bytes_per_param: float = 2.0) -> float:
    """Weight bytes one decode step reads: the shared (non-expert) weights once, plus every touched expert
    once (uniform routing, :func:`expected_experts_touched`). ``expert_params`` is one expert's size."""
    touched = expected_experts_touched(num_experts, top_k, batch)
    return bytes_per_param * (shared_params + touched * expert_params)


@torch.no_grad()
def time_decode(layer: nn.Module, d_model: int, batch_sizes: Iterable[int], repeats: int = 5,
                generator: torch.Generator | None = None, spread: bool = False) -> list[dict]:
    """Median wall time of ``layer`` on ``B`` tokens (one decode step of a batch of ``B`` sequences).

    Returns ``[{"batch", "ms", "tokens_per_s"}]``; with ``spread=True`` also ``"ms_p25"`` and ``"ms_p75"``,
    the quartiles of the ``repeats`` times (their gap is the interquartile range: the timing noise).
    The tokens are drawn on the CPU (``generator``) and moved to the layer's device; on a GPU each call is
    timed between device synchronisations. Wall-clock: tag notebook cells that print it
    ``nbval-ignore-output``.
    """
    from ..bench.timing import median_iqr, wall_times

    check_int("repeats", repeats, minimum=1)
    param = next(layer.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    rows = []
    for b in batch_sizes:
        x = torch.randn(check_int("batch size", b, minimum=1), d_model, generator=generator).to(device)
        # on a GPU the clock starts and stops on a synchronised device (kernels run asynchronously)
        times = wall_times(lambda: layer(x), repeats=repeats, warmup=1, device=device)
        median, q1, q3 = median_iqr(times)  # one definition: with an even count the median interpolates
        ms = 1e3 * median
        row = {"batch": b, "ms": ms, "tokens_per_s": b / (ms / 1e3)}
        if spread:
            row.update(ms_p25=1e3 * q1, ms_p75=1e3 * q3)
        rows.append(row)
    return rows


class LRUExpertCache:
    """A cache of ``capacity`` experts in fast memory (GPU), the rest offloaded (CPU/disk).

    :meth:`access` returns whether the expert was resident; a miss loads it and evicts the least
    recently used one.
    """

    def __init__(self, capacity: int):
        self.capacity = check_int("capacity", capacity, minimum=0)
        self._lru: OrderedDict = OrderedDict()
        self.hits = self.misses = 0

    def access(self, key) -> bool:
        if key in self._lru:
            self._lru.move_to_end(key)
            self.hits += 1
            return True
        self.misses += 1
        if self.capacity:
            self._lru[key] = None
            if len(self._lru) > self.capacity:
                self._lru.popitem(last=False)
        return False

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def cache_hit_rates(trace: Sequence[Sequence[int]], capacities: Iterable[int]) -> list[float]:
    """LRU hit rate on a routing trace (one list of expert ids per decode step), for each cache size."""
    rates = []
    for c in capacities:
        cache = LRUExpertCache(c)
        for step in trace:
            for e in dict.fromkeys(int(x) for x in step):  # distinct experts of the step, in order
                cache.access(e)
        rates.append(cache.hit_rate)
    return rates


@torch.no_grad()
def generate(model: nn.Module, prompt: Tensor, steps: int, max_len: int | None = None) -> tuple[Tensor, list[list[list[int]]]]:
    """Greedy decoding: append the most likely next token ``steps`` times (the whole window is recomputed
    each step; no KV cache, kept readable). ``prompt`` is ``[B, L]`` int64.

    Returns the tokens ``[B, L + steps]`` and the trace: for every step, for every MoE layer of the model
    (modules with a ``last_info``), the distinct experts the step's last tokens were routed to.
    """
    if not isinstance(prompt, Tensor) or prompt.dim() != 2 or prompt.is_floating_point():
        raise TypeError("prompt must be an integer tensor of shape [batch, length]")
    check_int("steps", steps, minimum=0)
    moe = [m for m in model.modules() if hasattr(m, "last_info")]  # MoELayer and look-alikes
    idx, trace = prompt, []
    for _ in range(steps):
        window = idx if max_len is None else idx[:, -max_len:]
        logits = model(window)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        idx = torch.cat([idx, nxt], dim=1)
        step = []
        for m in moe:
            info = m.last_info
            last = info.routing.experts.view(window.shape[0], window.shape[1], -1)[:, -1]
            step.append(sorted(set(last.reshape(-1).tolist())))
        trace.append(step)
    return idx, trace


def load_anchor(name: str = "h200_2026-11-28.json") -> dict | list:
    """Read a committed measurement from ``benchmarks/anchors/`` of the book's checkout, whatever the
    working directory (:func:`moe_lib.utils.book_file`)."""
    return json.loads(book_file("benchmarks", "anchors", name).read_text())


def random_trace(num_experts: int, top_k: int, batch: int, steps: int,
                 generator: torch.Generator | None = None) -> list[list[int]]:
    """A decode trace under uniform routing: for each of ``steps`` steps, the sorted distinct experts of
    ``batch`` tokens that each draw ``top_k`` distinct experts of ``num_experts`` uniformly."""
    check_int("num_experts", num_experts, minimum=1)
    check_int("top_k", top_k, minimum=1, maximum=num_experts)
    check_int("batch", batch, minimum=1)
    check_int("steps", steps, minimum=0)
    return [sorted({e for _ in range(batch) for e in torch.randperm(num_experts, generator=generator)[:top_k].tolist()})
            for _ in range(steps)]


def touched_experiment(seed: int, batch_sizes: Sequence[int], lm_config, trials: int = 40,
                       big: tuple[int, int] = (64, 8), tokens: int = 4096) -> dict:
    """Chapter 14's distinct-experts count for one seed: the mean number of distinct experts ``B`` tokens
    touch, for each ``B`` in ``batch_sizes``, on two routings — an untrained ``MoELayer`` with
    ``big = (E, k)`` on ``tokens`` random inputs (``d_model = 64``), and the first MoE layer of an untrained
    ``TransformerLM(lm_config)`` on 16 random sequences. The seed draws the weights, the inputs and the
    sampled batches. Returns ``{(routing, B): mean distinct experts}`` with routings ``"E=..,k=.."`` and
    ``"LM E=..,k=.."``.
    """
    from ..layer import MoELayer
    from ..models import TransformerLM
    from ..utils import seed_everything

    gen = seed_everything(seed)
    num_experts, top_k = big
    layer = MoELayer(d_model=64, d_ff=32, num_experts=num_experts, top_k=top_k)
    model = TransformerLM(lm_config).eval()
    with torch.no_grad():
        _, info = layer(torch.randn(tokens, 64, generator=gen), return_info=True)
        model(torch.randint(0, lm_config.vocab_size, (16, lm_config.seq_len), generator=gen))
    out = {}
    for b, v in zip(batch_sizes, measure_experts_touched(info.routing.experts, num_experts, batch_sizes, trials, gen)):
        out[(f"E={num_experts},k={top_k}", b)] = v
    lm_layer = model.moe_layers()[0]
    name = f"LM E={lm_config.num_experts},k={lm_config.top_k}"
    for b, v in zip(batch_sizes, measure_experts_touched(lm_layer.last_info.routing.experts, lm_config.num_experts,
                                                        batch_sizes, trials, gen)):
        out[(name, b)] = v
    return out


def cache_experiment(seed: int, lm_config, prompt: Tensor, steps: int, capacities: Sequence[int],
                     layer: int = 0) -> dict:
    """Chapter 14's expert-cache experiment for one seed: LRU hit rates (:func:`cache_hit_rates`) on the
    decode trace of an untrained ``TransformerLM(lm_config)`` (weights drawn from ``seed``) generating
    ``steps`` tokens greedily from ``prompt`` (MoE layer ``layer``), and on a uniform :func:`random_trace`
    with the same ``E``, ``k``, batch and steps (drawn from ``seed``). Returns ``{(trace, capacity): hit
    rate}`` with traces ``"LM"`` and ``"random"``, and ``{(trace, "distinct per step"): mean number of
    distinct experts a step touches}``.
    """
    from ..models import TransformerLM
    from ..utils import seed_everything

    gen = seed_everything(seed)
    model = TransformerLM(lm_config).eval()
    _, trace = generate(model, prompt, steps=steps)
    lm_trace = [s[layer] for s in trace]
    rnd = random_trace(lm_config.num_experts, lm_config.top_k, prompt.shape[0], len(lm_trace), gen)
    out = {("LM", c): h for c, h in zip(capacities, cache_hit_rates(lm_trace, capacities))}
    out.update({("random", c): h for c, h in zip(capacities, cache_hit_rates(rnd, capacities))})
    out[("LM", "distinct per step")] = sum(map(len, lm_trace)) / max(1, len(lm_trace))
    out[("random", "distinct per step")] = sum(map(len, rnd)) / max(1, len(rnd))
    return out
