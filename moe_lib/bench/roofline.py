"""A roofline for one MoE FFN layer: FLOPs, bytes, arithmetic intensity and the time bounds they set,
plus the two quantisation effects that make many small experts slower than one big GEMM.

All functions take a :class:`~moe_lib.bench.shapes.Shape` and a token count ``T`` and count what the layer
must do, not what an implementation happens to do:

* FLOPs: ``6·T·k·d·f`` forward (three GEMMs of ``2·rows·in·out`` each over ``T·k`` rows).
* Bytes, ``traffic="min"``: the weights of the experts the batch touches (``3·d·f`` each, expected
  ``E·(1 − (1 − k/E)^T)`` of them under uniform routing) plus reading ``x`` and writing ``y`` once —
  what a perfectly fused kernel moves.
* Bytes, ``traffic="unfused"``: plus what an unfused grouped-GEMM pipeline moves between its kernels —
  the gather of ``x`` into expert order and the scatter back (:func:`permutation_bytes`), and the
  hidden activations written and read around the SwiGLU (:func:`intermediate_bytes`).

Ceilings are the H200's measured ones (``benchmarks/anchors``: dense bf16 matmul and device copy), so
``roofline_tflops`` is ``min(peak, intensity × bandwidth)`` in TFLOP/s.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..book.grouping import tile_stats
from ..book.serving import expected_experts_touched
from .shapes import Shape


def moe_flops(shape: Shape, T, backward: bool = False):
    """Useful FLOPs: ``6·T·k·d·f`` (times 3 with the backward). ``T`` may be an array."""
    return (18 if backward else 6) * np.asarray(T, dtype=float) * shape.k * shape.d * shape.f


def experts_touched(shape: Shape, T):
    """Expected distinct experts ``E·(1 − (1 − k/E)^T)`` for ``T`` uniformly routed tokens."""
    return expected_experts_touched(shape.E, shape.k, np.asarray(T, dtype=float))


def weight_bytes(shape: Shape, T, bytes_per_element: float = 2.0):
    """Bytes of the touched experts' weights (each read once)."""
    return experts_touched(shape, T) * shape.expert_params() * bytes_per_element


def permutation_bytes(shape: Shape, T, bytes_per_element: float = 2.0):
    """Gather ``x`` into expert order (read + write ``T·k·d``) and combine the expert outputs back (write +
    read ``T·k·d``): ``4·T·k·d`` elements that a fused kernel keeps on chip."""
    return 4 * np.asarray(T, dtype=float) * shape.k * shape.d * bytes_per_element


def intermediate_bytes(shape: Shape, T, bytes_per_element: float = 2.0):
    """The hidden activations of an unfused SwiGLU (eager PyTorch): the up GEMM writes ``[T·k, 2f]``,
    ``silu`` reads and writes ``f`` per row, the product reads ``2f`` and writes ``f``, the down GEMM
    reads ``f``: ``8·T·k·f`` elements. A dense FFN of equal FLOPs pays the same."""
    return 8 * np.asarray(T, dtype=float) * shape.k * shape.f * bytes_per_element


def moe_bytes(shape: Shape, T, bytes_per_element: float = 2.0, traffic: str = "min"):
    """Bytes the layer moves on ``T`` tokens (``traffic`` = ``"min"`` or ``"unfused"``, see the module)."""
    if traffic not in ("min", "unfused"):
        raise ValueError(f"traffic must be 'min' or 'unfused', got {traffic!r}")
    T = np.asarray(T, dtype=float)
    total = weight_bytes(shape, T, bytes_per_element) + 2 * T * shape.d * bytes_per_element
    if traffic == "unfused":
        total = total + permutation_bytes(shape, T, bytes_per_element) + intermediate_bytes(shape, T, bytes_per_element)
    return total


def arithmetic_intensity(shape: Shape, T, bytes_per_element: float = 2.0, traffic: str = "min"):
    """FLOPs per byte of the forward pass."""
    return moe_flops(shape, T) / moe_bytes(shape, T, bytes_per_element, traffic)


def ridge_point(peak_tflops: float, bandwidth_TBps: float) -> float:
    """Intensity (FLOP/byte) where the bandwidth roof meets the compute roof."""
    return peak_tflops / bandwidth_TBps


def roofline_tflops(intensity, peak_tflops: float, bandwidth_TBps: float):
    """Attainable TFLOP/s: ``min(peak, intensity × bandwidth)``."""
    return np.minimum(peak_tflops, np.asarray(intensity, dtype=float) * bandwidth_TBps)


def roofline_time_ms(shape: Shape, T, peak_tflops: float, bandwidth_TBps: float, bytes_per_element: float = 2.0,
                     traffic: str = "min"):
    """Lower bound on the forward time: ``max(FLOPs / peak, bytes / bandwidth)`` in ms."""
    compute = moe_flops(shape, T) / (peak_tflops * 1e9)
    memory = moe_bytes(shape, T, bytes_per_element, traffic) / (bandwidth_TBps * 1e9)
    return np.maximum(compute, memory)


def rows_per_expert(shape: Shape, T):
    """Mean rows (``M``) of one expert's GEMM: ``T·k/E``."""
    return np.asarray(T, dtype=float) * shape.k / shape.E


def tile_efficiency(counts: Sequence[int], block_m: int = 128) -> float:
    """Useful rows over computed rows when each expert's rows are cut into tiles of ``block_m``:
    ``Σ c / Σ ceil(c / block_m)·block_m`` (1.0 when every count is a multiple of the tile)."""
    if len(counts) == 0:
        return 1.0
    stats = tile_stats(counts, block_m)
    return stats["real_rows"] / stats["tile_rows"] if stats["tile_rows"] else 1.0


def wave_efficiency(num_tiles: int, num_sms: int = 132) -> float:
    """Share of the GPU's multiprocessors busy over the waves of ``num_tiles`` equal tiles."""
    if num_tiles <= 0:
        return 0.0
    return num_tiles / (math.ceil(num_tiles / num_sms) * num_sms)


def uniform_counts(shape: Shape, T: int, seed: int = 0) -> np.ndarray:
    """Assignments per expert when each of ``T`` tokens picks ``k`` distinct experts uniformly."""
    rng = np.random.default_rng(seed)
    picks = np.argsort(rng.random((T, shape.E)), axis=1)[:, : shape.k]
    return np.bincount(picks.ravel(), minlength=shape.E)


def grouped_gemm_model(shape: Shape, T: int, peak_tflops: float, bandwidth_TBps: float, block_m: int = 128,
                       block_n: int = 128, num_sms: int = 132, bytes_per_element: float = 2.0, seed: int = 0) -> dict:
    """A back-of-the-envelope model of an *unfused* grouped-GEMM forward against the dense FFN of equal
    FLOPs, both built from the measured ceilings.

    * dense: the GEMMs at the compute ceiling, plus the SwiGLU's intermediate traffic
      (:func:`intermediate_bytes`) at the copy bandwidth — what the harness's dense baseline also does;
    * MoE: each GEMM (up: ``N = 2f``, two thirds of the FLOPs; down: ``N = d``) at
      ``row_tile_eff × col_tile_eff × wave_eff`` of the ceiling — rows lost to each expert's partial
      last tile (uniform random routing), columns lost to a partial last column tile, multiprocessors idle
      in the last wave — or the time to read the touched experts' weights if longer; plus the same
      SwiGLU traffic; plus the permutation traffic (:func:`permutation_bytes`), none of it overlapped.

    Returns the ingredients (ms) and ``ratio_bound`` = dense ms / MoE ms: an optimistic bound for such a
    pipeline (it assumes every GEMM tile runs at the dense ceiling). A fused kernel removes the traffic
    terms; nothing removes the quantisation terms but choosing the tiles.
    """
    counts = uniform_counts(shape, T, seed)
    row_eff = tile_efficiency(counts, block_m)
    row_tiles = tile_stats(counts, block_m)["tiles"]
    gemm_ms = float(moe_flops(shape, T)) / (peak_tflops * 1e9)
    parts = {}
    for name, n, share in (("up", 2 * shape.f, 2 / 3), ("down", shape.d, 1 / 3)):
        col_tiles = math.ceil(n / block_n)
        parts[name] = {"col_eff": n / (col_tiles * block_n), "wave_eff": wave_efficiency(row_tiles * col_tiles, num_sms),
                       "ms": share * gemm_ms}
    compute_ms = sum(q["ms"] / (row_eff * q["col_eff"] * q["wave_eff"]) for q in parts.values())
    to_ms = 1 / (bandwidth_TBps * 1e9)
    swiglu_ms = float(intermediate_bytes(shape, T, bytes_per_element)) * to_ms
    permutation_ms = float(permutation_bytes(shape, T, bytes_per_element)) * to_ms
    weights_ms = float(weight_bytes(shape, T, bytes_per_element)) * to_ms
    dense_ms = gemm_ms + swiglu_ms
    model_ms = max(compute_ms, weights_ms) + swiglu_ms + permutation_ms
    return {"rows_per_expert": float(rows_per_expert(shape, T)), "gemms": 2 * shape.E, "row_tile_eff": row_eff,
            "col_tile_eff": (2 * parts["up"]["col_eff"] + parts["down"]["col_eff"]) / 3,
            "wave_eff": (2 * parts["up"]["wave_eff"] + parts["down"]["wave_eff"]) / 3,
            "gemm_ms": gemm_ms, "compute_ms": compute_ms, "weights_ms": weights_ms, "swiglu_ms": swiglu_ms,
            "permutation_ms": permutation_ms, "dense_ms": dense_ms, "model_ms": model_ms,
            "ratio_bound": dense_ms / model_ms}


def permutation_overhead(shape: Shape, peak_tflops: float, bandwidth_TBps: float, bytes_per_element: float = 2.0) -> float:
    """Time of the permutation traffic over the time of the GEMMs, both at their ceilings:
    ``(4·T·k·d·b / BW) / (6·T·k·d·f / peak) = (2b / 3f) · ridge`` — independent of ``T``, ``k``, ``d``
    and ``E``: only a small expert width ``f`` makes moving tokens cost as much as multiplying them."""
    return 2 * bytes_per_element * ridge_point(peak_tflops, bandwidth_TBps) / (3 * shape.f)


def ridge_tokens(shape: Shape, peak_tflops: float, bandwidth_TBps: float, bytes_per_element: float = 2.0,
                 T_max: int = 1 << 20) -> int | None:
    """Smallest ``T`` whose minimum-traffic intensity reaches the ridge point (the layer turns from
    bandwidth-bound to compute-bound), by bisection on the monotone intensity; ``None`` if not by ``T_max``."""
    ridge = ridge_point(peak_tflops, bandwidth_TBps)
    if float(arithmetic_intensity(shape, T_max, bytes_per_element)) < ridge:
        return None
    lo, hi = 1, T_max
    while lo < hi:
        mid = (lo + hi) // 2
        if float(arithmetic_intensity(shape, mid, bytes_per_element)) >= ridge:
            hi = mid
        else:
            lo = mid + 1
    return lo
