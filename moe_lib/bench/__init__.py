"""Benchmarks of one MoE FFN layer: the harness (``python -m moe_lib.bench``), its shapes, a roofline
model, and the tables and figures of chapter 12.

* :mod:`moe_lib.bench.shapes` — the five production shapes (Mixtral-8x7B, Qwen3-30B-A3B, DeepSeek-V3,
  OLMoE-1B-7B, GPT-OSS-120B) and the smoke shapes.
* :mod:`moe_lib.bench.harness` — cases, routings, implementations, fp32 reference, timing, JSON.
* :mod:`moe_lib.bench.roofline` — FLOPs, bytes, arithmetic intensity, tile and wave quantisation.
* :mod:`moe_lib.bench.report` — console tables; anchors and results as one DataFrame; targets; figures.
"""
from .harness import SCHEMA, Case, impl_registry, make_cases, make_routing, ratio, reference, relative_norm_error, run
from .shapes import DECODE_T, PREFILL_T, SHAPES, SMOKE_SHAPES, Shape, get_shape

__all__ = ["SCHEMA", "Case", "Shape", "SHAPES", "SMOKE_SHAPES", "PREFILL_T", "DECODE_T", "get_shape", "impl_registry",
           "make_cases", "make_routing", "ratio", "reference", "relative_norm_error", "run"]
