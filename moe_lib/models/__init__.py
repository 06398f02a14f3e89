"""Transformer language models with dense or mixture-of-experts FFNs (Part III of the book).

* :class:`TransformerLM`, :class:`LMConfig`, :func:`lm_variants` — the model and the four
  configurations of chapter 8 (dense, Switch, top-2, fine-grained + shared) at equal active parameters;
* :func:`train_lm`, :func:`evaluate_lm`, :func:`save_checkpoint`, :func:`load_checkpoint`,
  :func:`model_from_checkpoint` — training with exact resume, validation loss and bits per byte;
* :func:`parameter_counts`, :func:`flops_per_token` — total vs active parameters, counted FLOPs;
* :mod:`moe_lib.models.analysis` — what the routers of a trained model do (chapter 9).
"""
from . import analysis
from .accounting import flops_per_token, parameter_counts
from .lm_training import (LMHistory, evaluate_lm, load_checkpoint, lr_at, model_from_checkpoint, save_checkpoint,
                       steps_to_reach, train_lm)
from .transformer import (FFN_KINDS, Block, CausalSelfAttention, LMConfig, MoEFFN, RMSNorm, SwiGLU,
                          TransformerLM, lm_variants)

__all__ = [
    "LMConfig", "TransformerLM", "lm_variants", "Block", "CausalSelfAttention", "MoEFFN", "RMSNorm", "SwiGLU",
    "FFN_KINDS", "train_lm", "evaluate_lm", "save_checkpoint", "load_checkpoint", "model_from_checkpoint",
    "LMHistory", "lr_at", "steps_to_reach", "parameter_counts", "flops_per_token", "analysis",
]
