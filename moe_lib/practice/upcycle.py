"""Sparse upcycling (Komatsuzaki et al. 2023): start a mixture of experts from a trained dense model.

Every expert of the new MoE layer is a copy of the dense FFN and the router is new (its own random init).
If the router's per-token weights sum to 1 — any token-choice router with renormalised top-k weights, or
the dense softmax — the upcycled layer computes ``Σ_e w_e(x) FFN(x) = FFN(x)``: the MoE starts exactly
where the dense model stopped, whatever the router says (tested), and training then lets the copies diverge.
"""
from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn

from .._validate import check_int
from ..layer import MoELayer
from ..models.transformer import SwiGLU, TransformerLM


def upcycle_ffn(ffn: SwiGLU, num_experts: int, top_k: int | None = None, *, router: str = "topk",
                **moe_kwargs) -> MoELayer:
    """A :class:`~moe_lib.MoELayer` of ``num_experts`` SwiGLU experts, each a copy of ``ffn``, with a new
    router (``router``, ``top_k`` and ``moe_kwargs`` as for :class:`~moe_lib.MoELayer`).

    Raises:
        TypeError: ``ffn`` is not a :class:`~moe_lib.models.SwiGLU`.
    """
    if not isinstance(ffn, SwiGLU):
        raise TypeError(f"ffn must be a moe_lib.models.SwiGLU (a dense SwiGLU FFN), got {type(ffn).__name__}")
    num_experts = check_int("num_experts", num_experts, minimum=1)
    d_model, d_ff = ffn.gate.in_features, ffn.gate.out_features
    moe_kwargs.setdefault("expert", "swiglu")
    if moe_kwargs["expert"] != "swiglu":
        raise ValueError(f"expert must be 'swiglu' to copy a SwiGLU FFN, got {moe_kwargs['expert']!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # top_k=1 with renormalised weights: every weight is 1 (see TopKRouter)
        layer = MoELayer(d_model, d_ff, num_experts, top_k, router=router, **moe_kwargs)
    with torch.no_grad():
        # nn.Linear stores [out, in]; the expert bank stores [E, in, out]
        layer.experts.w_gate.copy_(ffn.gate.weight.t().expand(num_experts, -1, -1))
        layer.experts.w_up.copy_(ffn.up.weight.t().expand(num_experts, -1, -1))
        layer.experts.w_down.copy_(ffn.down.weight.t().expand(num_experts, -1, -1))
    return layer.to(ffn.gate.weight.device)


def upcycle(dense: TransformerLM, num_experts: int = 8, top_k: int = 2, *, router: str = "topk",
            router_std: float = 0.02, **config_overrides) -> TransformerLM:
    """Sparse upcycling of a dense :class:`~moe_lib.models.TransformerLM` (Komatsuzaki et al. 2023, §3):
    the same model with every FFN replaced by ``num_experts`` copies of it behind a new ``router``
    (initialised ``N(0, router_std²)``, the LM's own init). Embeddings, attention and norms are copied.

    ``config_overrides`` change other :class:`~moe_lib.models.LMConfig` fields of the MoE (``aux_loss_coef``,
    ``z_loss_coef``, ``moe_options``, ``name``). Returns a new model on the dense model's device; the dense
    model is not modified.

    Raises:
        TypeError: ``dense`` is not a TransformerLM. ValueError: ``dense`` is not dense (``cfg.ffn != "dense"``).
    """
    if not isinstance(dense, TransformerLM):
        raise TypeError(f"dense must be a moe_lib.models.TransformerLM, got {type(dense).__name__}")
    if dense.cfg.ffn != "dense":
        raise ValueError(f"dense must have cfg.ffn='dense' to be upcycled, got ffn={dense.cfg.ffn!r}")
    num_experts = check_int("num_experts", num_experts, minimum=1)
    top_k = check_int("top_k", top_k, minimum=1, maximum=num_experts)
    fields = dict(ffn="moe", num_experts=num_experts, top_k=top_k, router=router, num_shared=0,
                  name=f"upcycled {dense.cfg.name}".strip())
    fields.update(config_overrides)
    cfg = dataclasses.replace(dense.cfg, **fields)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        moe = TransformerLM(cfg).to(dense.embed.weight.device)
    state = {k: v for k, v in dense.state_dict().items() if ".ffn." not in k}
    missing, _ = moe.load_state_dict(state, strict=False)
    assert all(".ffn." in k for k in missing), missing
    with torch.no_grad():
        for block_d, block_m in zip(dense.blocks, moe.blocks):
            up = upcycle_ffn(block_d.ffn, num_experts)
            block_m.ffn.moe.experts.load_state_dict(up.experts.state_dict())
            nn.init.normal_(block_m.ffn.moe.router.gate.weight, std=router_std)
    return moe
