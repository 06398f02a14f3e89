"""When does an MoE pay off? A serving calculator: memory, latency and cost per token, dense vs MoE.

The model of one decode step at batch ``B`` (per model replica, weights in ``bytes_per_param``):

* **memory** — all parameters must be resident: ``total_params · bytes_per_param`` (+ KV cache, ignored);
  the number of GPUs is the smallest that holds them at ``usable_memory_fraction``.
* **bytes read per step** — the non-expert (shared) weights once, plus the experts touched by ``B``
  tokens, ``E·(1 − (1 − k/E)^B)`` per MoE layer (:func:`moe_lib.book.serving.expected_experts_touched`).
* **FLOPs per step** — ``2 · active_params · B``.
* **step time** — ``max(bytes / (GPUs · bandwidth · bw_efficiency), FLOPs / (GPUs · peak · mfu))``
  (a roofline; communication between GPUs is ignored).
* **throughput** — ``B / step time`` tokens/s; **cost per million tokens** — GPU price per hour × GPUs ÷
  tokens per hour.

Inputs the book measured itself: the H200's copy bandwidth and matmul peak, and the share of copy
bandwidth reached by a decode step (``bw_efficiency``) from ``benchmarks/anchors/`` (chapter 14).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .._validate import check_int, check_positive_float
from .serving import expected_experts_touched


@dataclass
class ModelShape:
    """A model for the calculator. ``num_experts=1, top_k=1`` and ``expert_params=0`` is a dense model.

    Attributes:
        name: label.
        total_params: every parameter.
        expert_params: parameters of *one* expert, summed over all MoE layers (so ``E · expert_params``
            is all expert weights).
        num_experts, top_k: ``E`` and ``k``.
    """

    name: str
    total_params: float
    expert_params: float = 0.0
    num_experts: int = 1
    top_k: int = 1

    def __post_init__(self):
        check_positive_float("total_params", self.total_params)
        check_int("num_experts", self.num_experts, minimum=1)
        check_int("top_k", self.top_k, minimum=1, maximum=self.num_experts)
        if self.expert_params < 0 or self.num_experts * self.expert_params > self.total_params:
            raise ValueError(f"expert_params must be >= 0 and num_experts * expert_params <= total_params, got "
                             f"{self.num_experts} x {self.expert_params:.3g} > {self.total_params:.3g}")

    @property
    def shared_params(self) -> float:
        return self.total_params - self.num_experts * self.expert_params

    @property
    def active_params(self) -> float:
        return self.shared_params + self.top_k * self.expert_params

    @classmethod
    def moe(cls, name: str, total_params: float, active_params: float, num_experts: int, top_k: int) -> "ModelShape":
        """From the published total and active counts: ``total = S + E·x``, ``active = S + k·x``."""
        expert = (total_params - active_params) / (num_experts - top_k)
        return cls(name, total_params, expert, num_experts, top_k)

    @classmethod
    def from_architecture(cls, name: str, *, d_model: int, n_layers: int, d_ff: int, n_heads: int, n_kv_heads: int,
                          head_dim: int, vocab_size: int, num_experts: int = 1, top_k: int = 1,
                          tied_embeddings: bool = False) -> "ModelShape":
        """Count the parameters of a decoder-only Transformer with SwiGLU FFNs (three ``d_model × d_ff``
        matrices per expert; ``num_experts = 1`` is dense), grouped-query attention (``q`` and ``o``:
        ``d_model × n_heads·head_dim``; ``k`` and ``v``: ``d_model × n_kv_heads·head_dim``), a router
        ``d_model × E`` per layer when ``E > 1``, two RMSNorm weights per layer and a final one, and the
        input embedding plus an output head unless ``tied_embeddings``. No biases. This is the layout of
        Mistral/Mixtral, whose published architecture table is enough to count them.
        """
        for f, v in (("d_model", d_model), ("n_layers", n_layers), ("d_ff", d_ff), ("n_heads", n_heads),
                     ("n_kv_heads", n_kv_heads), ("head_dim", head_dim), ("vocab_size", vocab_size)):
            check_int(f, v, minimum=1)
        check_int("num_experts", num_experts, minimum=1)
        check_int("top_k", top_k, minimum=1, maximum=num_experts)
        expert = 3 * d_model * d_ff
        attn = 2 * d_model * n_heads * head_dim + 2 * d_model * n_kv_heads * head_dim
        router = d_model * num_experts if num_experts > 1 else 0
        per_layer_shared = attn + router + 2 * d_model
        embeddings = vocab_size * d_model * (1 if tied_embeddings else 2)
        shared = n_layers * per_layer_shared + d_model + embeddings
        total = shared + n_layers * num_experts * expert
        if num_experts == 1:
            return cls(name, float(total))
        return cls(name, float(total), float(n_layers * expert), num_experts, top_k)


@dataclass
class Hardware:
    """One accelerator. ``bw_efficiency`` and ``mfu`` are the shares of bandwidth and peak actually reached."""

    name: str
    memory_GB: float
    bandwidth_TBps: float
    peak_tflops: float
    price_per_hour: float
    bw_efficiency: float = 0.5
    mfu: float = 0.5
    usable_memory_fraction: float = 0.8

    def __post_init__(self):
        for f in ("memory_GB", "bandwidth_TBps", "peak_tflops", "price_per_hour", "bw_efficiency", "mfu",
                  "usable_memory_fraction"):
            check_positive_float(f, getattr(self, f))


def serve(model: ModelShape, hw: Hardware, batch: int, bytes_per_param: float = 2.0) -> dict:
    """Memory, step latency, throughput and cost per million tokens of one replica decoding ``batch``
    sequences (see the module docstring for the model)."""
    batch = check_int("batch", batch, minimum=1)
    check_positive_float("bytes_per_param", bytes_per_param)
    weights_GB = model.total_params * bytes_per_param / 1e9
    gpus = max(1, math.ceil(weights_GB / (hw.memory_GB * hw.usable_memory_fraction)))
    touched = expected_experts_touched(model.num_experts, model.top_k, batch) if model.expert_params else 0.0
    read_GB = (model.shared_params + touched * model.expert_params) * bytes_per_param / 1e9
    flops = 2.0 * model.active_params * batch
    t_mem = read_GB / (gpus * hw.bandwidth_TBps * 1e3 * hw.bw_efficiency)
    t_flop = flops / (gpus * hw.peak_tflops * 1e12 * hw.mfu)
    step = max(t_mem, t_flop)
    tps = batch / step
    return {
        "model": model.name, "batch": batch, "weights GB": weights_GB, "GPUs": gpus,
        "GB read / step": read_GB, "ms / token (latency)": 1e3 * step, "tokens / s": tps,
        "bound": "memory" if t_mem >= t_flop else "compute",
        "$ / M tokens": hw.price_per_hour * gpus / (tps * 3600) * 1e6,
    }


def breakeven_batch(moe: ModelShape, dense: ModelShape, hw: Hardware, max_batch: int = 4096,
                    decimals: int | None = None) -> int | None:
    """Smallest batch (power of two) from which the MoE costs less per token than ``dense``; ``None`` if never.

    With ``decimals``, the two costs ($ per million tokens) are compared rounded to that many digits — the
    digits a table prints — so that a tie (two models reading the same bytes) is a tie and not a verdict
    decided by the last bit of a float.
    """
    b = 1
    while b <= max_batch:
        a, d = serve(moe, hw, b)["$ / M tokens"], serve(dense, hw, b)["$ / M tokens"]
        if decimals is not None:
            a, d = round(a, decimals), round(d, decimals)
        if a < d:
            return b
        b *= 2
    return None
