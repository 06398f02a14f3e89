"""A small decoder-only Transformer language model whose FFN is dense or a mixture of experts.

``TransformerLM(LMConfig(...))``: byte (or token) embedding + learned positions → ``n_layers`` pre-norm
blocks ``h = h + Attn(RMSNorm(h)); h = h + FFN(RMSNorm(h))`` → RMSNorm → tied output head. The FFN is

* ``ffn="dense"`` — one SwiGLU FFN of width ``d_ff`` (Shazeer 2020);
* ``ffn="moe"`` — a :class:`moe_lib.MoELayer` (any router of :data:`moe_lib.routers.ROUTERS`), plus
  ``num_shared`` always-on *shared experts* (DeepSeekMoE, Dai et al. 2024, eq. 9–11):
  ``h_t = u_t + Σ_{i ≤ K_s} FFN_i(u_t) + Σ_{routed} g_{i,t} FFN_i(u_t)``. The shared experts are computed
  as one SwiGLU of width ``num_shared · d_expert`` — the same function as ``num_shared`` separate
  experts whose outputs are summed.

*Fine-grained* experts (DeepSeekMoE §3.1) are a configuration, not a module: split each of ``N`` experts
of width ``d_ff`` into ``m`` experts of width ``d_ff/m`` and route each token to ``m·k`` of the ``m·N``;
:func:`lm_variants` builds the book's four models at equal active parameters.

Attention is causal (``scaled_dot_product_attention(is_causal=True)``) and every token-choice router
routes each token on its own, so a future token never changes a past logit (tested).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from .._validate import check_choice, check_int, check_nonnegative_float
from ..layer import MoELayer
from ..routers import ROUTERS

FFN_KINDS = ("dense", "moe")


@dataclass
class LMConfig:
    """Hyper-parameters of :class:`TransformerLM`.

    Attributes:
        vocab_size: 256 for bytes.
        seq_len: longest context (size of the learned position table).
        d_model, n_layers, n_heads: width, depth, attention heads (``d_model % n_heads == 0``).
        ffn: ``"dense"`` or ``"moe"``.
        d_ff: hidden width of the dense FFN, or of **one** routed expert for ``ffn="moe"``.
        num_experts, top_k, router: the routed experts (``top_k=None``: the router's default).
        num_shared: always-on shared experts (DeepSeekMoE), each of width ``d_shared``
            (``None``: ``d_ff``).
        aux_loss_coef, z_loss_coef: weights of each layer's load-balancing and z losses.
        moe_options: further keyword arguments for :class:`moe_lib.MoELayer` (``capacity_factor``,
            ``backend``, ``router_options``, ...).
        name: a label for tables and plots.
    """

    vocab_size: int = 256
    seq_len: int = 64
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    ffn: str = "dense"
    d_ff: int = 128
    num_experts: int = 8
    top_k: int | None = None
    router: str = "topk"
    num_shared: int = 0
    d_shared: int | None = None
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    moe_options: dict = field(default_factory=dict)
    name: str = ""

    def __post_init__(self):
        for key in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "d_ff", "num_experts"):
            check_int(key, getattr(self, key), minimum=1)
        check_int("num_shared", self.num_shared, minimum=0)
        if self.d_shared is not None:
            check_int("d_shared", self.d_shared, minimum=1)
        check_choice("ffn", self.ffn, FFN_KINDS)
        check_choice("router", self.router, ROUTERS)
        check_nonnegative_float("aux_loss_coef", self.aux_loss_coef)
        check_nonnegative_float("z_loss_coef", self.z_loss_coef)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if not isinstance(self.moe_options, dict):
            raise TypeError(f"moe_options must be a dict, got {type(self.moe_options).__name__}")

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x²) + eps) · g`` (Zhang & Sennrich 2019)."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: ``softmax(QKᵀ/√d_h + mask) V`` (Vaswani et al. 2017, eq. 1)."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    """Dense gated FFN ``(silu(x W_g) ⊙ x W_u) W_d`` (Shazeer 2020, eq. 6)."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=False)
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


class MoEFFN(nn.Module):
    """Routed experts (:class:`moe_lib.MoELayer`) plus optional always-on shared experts (DeepSeekMoE).

    ``forward(x) = shared(x) + moe(x)``; the layer's routing and auxiliary losses are in
    ``self.moe.last_info``.
    """

    def __init__(self, cfg: LMConfig):
        super().__init__()
        opts = dict(cfg.moe_options)
        opts.setdefault("expert", "swiglu")
        self.moe = MoELayer(cfg.d_model, cfg.d_ff, cfg.num_experts, cfg.top_k, router=cfg.router,
                            aux_loss_coef=cfg.aux_loss_coef, z_loss_coef=cfg.z_loss_coef, **opts)
        d_shared = cfg.d_ff if cfg.d_shared is None else cfg.d_shared
        self.shared = SwiGLU(cfg.d_model, cfg.num_shared * d_shared) if cfg.num_shared else None

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Tensor:
        y = self.moe(x, token_ids=token_ids)
        return y if self.shared is None else y + self.shared(x)


class Block(nn.Module):
    """Pre-norm Transformer block: ``h + Attn(RMSNorm(h))`` then ``h + FFN(RMSNorm(h))``."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads)
        self.norm2 = RMSNorm(cfg.d_model)
        self.ffn = SwiGLU(cfg.d_model, cfg.d_ff) if cfg.ffn == "dense" else MoEFFN(cfg)

    def forward(self, h: Tensor, token_ids: Tensor | None = None) -> Tensor:
        h = h + self.attn(self.norm1(h))
        u = self.norm2(h)
        return h + (self.ffn(u) if isinstance(self.ffn, SwiGLU) else self.ffn(u, token_ids=token_ids))


class TransformerLM(nn.Module):
    """Decoder-only language model; ``forward(idx [B, L]) -> logits [B, L, vocab]``.

    ``aux_losses()`` returns the auxiliary loss of each MoE layer from the last forward pass, one entry
    per layer (each computed on that layer's own routing — never pooled across layers);
    ``moe_layers()`` lists the :class:`moe_lib.MoELayer` modules from first to last.
    """

    def __init__(self, cfg: LMConfig):
        super().__init__()
        if not isinstance(cfg, LMConfig):
            raise TypeError(f"cfg must be an LMConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)
        self.apply(self._init)
        # scaled init of the residual projections (GPT-2): keeps the residual stream's variance flat
        for name, p in self.named_parameters():
            if name.endswith(("attn.out.weight", "down.weight", "w_down")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        elif hasattr(module, "w_gate") and hasattr(module, "w_up"):  # SwiGLU expert bank
            for p in (module.w_gate, module.w_up, module.w_down):
                nn.init.normal_(p, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        if not isinstance(idx, Tensor) or idx.is_floating_point() or idx.dim() != 2:
            raise TypeError("idx must be an integer tensor of shape [batch, length]")
        if idx.shape[1] > self.cfg.seq_len:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds seq_len={self.cfg.seq_len}")
        pos = torch.arange(idx.shape[1], device=idx.device)
        h = self.embed(idx) + self.pos(pos)
        for block in self.blocks:
            h = block(h, token_ids=idx)
        return self.norm(h) @ self.embed.weight.t()  # tied output head

    def moe_layers(self) -> list[MoELayer]:
        return [m for m in self.modules() if isinstance(m, MoELayer)]

    def aux_losses(self) -> list[Tensor]:
        """Weighted auxiliary loss of each MoE layer in the last forward pass (``[]`` for a dense model)."""
        return [m.last_info.aux_loss for m in self.moe_layers() if m.last_info is not None]

    def aux_loss(self) -> Tensor:
        """Sum over layers of :meth:`aux_losses` (each layer balanced on its own routing)."""
        losses = self.aux_losses()
        return torch.stack(losses).sum() if losses else torch.zeros((), device=self.embed.weight.device)


def lm_variants(*, d_model: int = 64, n_layers: int = 2, n_heads: int = 4, seq_len: int = 64,
                d_ff: int = 128, num_experts: int = 8, granularity: int = 4, aux_loss_coef: float = 0.01,
                backend: str = "torch") -> dict[str, LMConfig]:
    """The four models of chapter 8 at **equal active FFN parameters** (``d_ff`` per token) and, for the
    three MoE models, equal total routed-expert parameters (``num_experts · d_ff``):

    * ``dense`` — one SwiGLU FFN of width ``d_ff``;
    * ``switch`` — ``num_experts`` experts of width ``d_ff``, top-1, raw gate value (Fedus et al. 2022);
    * ``top-2`` — ``2·num_experts`` experts of width ``d_ff/2``, top-2, renormalised (Mixtral's router,
      Jiang et al. 2024; GShard-style top-2 at equal active compute);
    * ``fine+shared`` — DeepSeekMoE (Dai et al. 2024): each expert split into ``m = granularity`` experts
      of width ``d_ff/m``; one of the ``m·num_experts`` slots is a shared expert, and the router picks
      ``m − 1`` of the remaining ``m·num_experts − 1`` — active ``m · d_ff/m = d_ff``.
    """
    check_int("granularity", granularity, minimum=2)
    if d_ff % granularity or d_ff % 2:
        raise ValueError(f"d_ff ({d_ff}) must be divisible by 2 and by granularity ({granularity})")
    common = dict(d_model=d_model, n_layers=n_layers, n_heads=n_heads, seq_len=seq_len,
                  aux_loss_coef=aux_loss_coef, moe_options={"backend": backend})
    m = granularity
    return {
        "dense": LMConfig(ffn="dense", d_ff=d_ff, name="dense", **common),
        "switch": LMConfig(ffn="moe", d_ff=d_ff, num_experts=num_experts, top_k=1, router="switch",
                           name="switch", **common),
        "top-2": LMConfig(ffn="moe", d_ff=d_ff // 2, num_experts=2 * num_experts, top_k=2, router="topk",
                          name="top-2", **common),
        "fine+shared": LMConfig(ffn="moe", d_ff=d_ff // m, num_experts=m * num_experts - 1, top_k=m - 1,
                                router="topk", num_shared=1, name="fine+shared", **common),
    }
