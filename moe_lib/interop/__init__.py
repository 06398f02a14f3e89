"""Interoperability with other MoE implementations.

* :func:`from_transformers` — an instantiated Hugging Face ``transformers`` sparse-MoE block (Mixtral,
  Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, Switch Transformers) rebuilt on :class:`moe_lib.MoELayer`
  with the same outputs; :func:`equivalence` measures how close the two are.

``transformers`` is an optional dependency (``pip install moe-lib[interop]``); this package imports it
never — it reads the block it is given.
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
    relative_error,
    time_implementations,
)

__all__ = ["FAMILIES", "SUPPORTED_BLOCKS", "ConvertedMoEBlock", "block_family", "equivalence",
           "from_transformers", "hf_routing", "random_block", "relative_error",
           "time_implementations"]
