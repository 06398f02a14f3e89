"""Parameters and FLOPs of a :class:`~moe_lib.models.TransformerLM`: total vs what one token uses."""
from __future__ import annotations

import torch
from torch import nn

from ..layer import MoELayer
from ..utils import count_flops


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """``total``, ``active`` (what one token touches: every MoE layer counts its gate plus ``k`` of its
    ``E`` experts, shared experts always) and ``embedding`` (token + position tables, included in both).
    """
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for m in model.modules():
        if isinstance(m, MoELayer):
            counts = m.num_parameters()
            inactive += counts["total"] - counts["active"]
    embedding = sum(p.numel() for name, p in model.named_parameters() if name.startswith(("embed.", "pos.")))
    return {"total": total, "active": total - inactive, "embedding": embedding}


def flops_per_token(model: nn.Module, seq_len: int | None = None, batch_size: int = 1, seed: int = 0) -> float:
    """Forward FLOPs per token, **counted** by ``torch.utils.flop_counter`` on random byte sequences.

    MoE layers are switched to the ``loop`` backend for the count, so only the rows each expert really
    processes are counted (the padded ``torch`` backend would also count its padding). Includes
    attention (at ``seq_len``, default the model's) and the output head. Training costs about 3× this.
    """
    cfg = model.cfg
    seq_len = cfg.seq_len if seq_len is None else seq_len
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=g)
    idx = idx.to(next(model.parameters()).device)
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    saved = [m.backend for m in layers]
    was_training = model.training
    model.eval()
    try:
        for m in layers:
            m.backend = "loop"
        total = count_flops(model, idx)
    finally:
        for m, b in zip(layers, saved):
            m.backend = b
        model.train(was_training)
    return total / (batch_size * seq_len)
