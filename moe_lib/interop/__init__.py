"""Interoperability with other MoE implementations.

* :func:`from_transformers` — an instantiated Hugging Face ``transformers`` sparse-MoE block (Mixtral,
  Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, Switch Transformers) rebuilt on :class:`moe_lib.MoELayer`
  with the same outputs; :func:`equivalence` measures how close the two are.
* :func:`patch_transformers` / :func:`unpatch_transformers` — every such block of a loaded model swapped
  for moe_lib's in place, and back bit for bit; :func:`routing_report` — the patched layers' routing
  statistics.

``transformers`` is an optional dependency (``pip install moe-lib[interop]``). Importing this package
never imports it: :func:`from_transformers` reads the block it is given; :func:`patch_transformers`,
:func:`random_model` and :func:`random_block` import it when called (and raise an ImportError that
names the extra when it is missing).
"""
from .hf import (
    FAMILIES,
    SUPPORTED_BLOCKS,
    ConvertedMoEBlock,
    block_family,
    equivalence,
    from_transformers,
    hf_routing,
    random_block,
    relative_norm_error,
    time_implementations,
)
from .patch import (
    SUPPORTED_MODEL_TYPES,
    PatchedMoEBlock,
    patch_transformers,
    patched_blocks,
    random_model,
    reset_routing_stats,
    routing_report,
    unpatch_transformers,
)

__all__ = ["FAMILIES", "SUPPORTED_BLOCKS", "ConvertedMoEBlock", "block_family", "equivalence",
           "from_transformers", "hf_routing", "random_block", "relative_norm_error",
           "time_implementations", "SUPPORTED_MODEL_TYPES", "PatchedMoEBlock", "patch_transformers",
           "patched_blocks", "random_model", "reset_routing_stats", "routing_report",
           "unpatch_transformers"]
