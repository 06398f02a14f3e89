"""Routers (gating networks): score every expert for every token, then choose which experts run.

A router maps tokens ``x [T, d_model]`` to a :class:`Routing`: the raw scores, the full softmax over the
``E`` experts, and for each token the experts it is assigned to with their combine weights. Everything
after the router (dispatch, experts, combine) only reads the ``Routing``, so routers are interchangeable.

The routers of :data:`ROUTERS` (``MoELayer(router=name)``):

* ``"dense"`` — the classical softmax gate of Jacobs et al. (1991, eq. 1–3): every expert is weighted,
  ``f(x) = Σ_i w_i(x) h_i(x)`` with ``w = softmax(x W_g)``. ``k = E``.
* ``"topk"`` — keep the ``k`` largest gate probabilities per token (Shazeer et al. 2017, eq. 3–5 without
  the noise; Mixtral with ``k = 2``). ``normalize=True`` renormalises the kept probabilities.
* ``"noisy_topk"`` — Shazeer et al. (2017, eq. 3–5): ``H(x) = x W_g + N(0, 1) · softplus(x W_noise)``
  (noise in training only), ``G(x) = softmax(KeepTopK(H(x), k))``. Exposes what the smooth load
  estimator of eq. 8–10 (:func:`moe_lib.losses.shazeer_load`) needs.
* ``"switch"`` — top-1 with the raw probability as the gate value (Fedus et al. 2022, eq. 1–2).
* ``"gshard"`` — top-2 with GShard's random second expert (Lepikhin et al. 2021, Algorithm 1): the two
  gate values are renormalised, ``g1 + g2 = 1``, and in training the second expert is dispatched only if
  ``2 · g2 > U(0, 1)``.
* ``"expert_choice"`` — Zhou et al. (2022, eq. 1): ``S = softmax(X W_g)``; *each expert* takes its top-``C``
  tokens, ``C = ceil(capacity_factor · T · k / E)``; ``k`` is the *average* number of experts per token.
  A token may get several experts or none. Not causal: whether token ``t`` is chosen depends on the
  other tokens of the batch, later ones included.
* ``"hash"`` — Roller et al. (2021): no learned gate; the expert is a fixed random hash of the token id
  (pass ``token_ids`` to the layer) or, without ids, of the input's sign pattern under a fixed random
  projection (a locality-sensitive hash of the content). Deterministic; weight 1.
* ``"base"`` — BASE layers (Lewis et al. 2021, eq. 1–2): in training, a *balanced* assignment of the
  ``T`` tokens to the ``E`` experts (each takes at most ``ceil(T/E)``) maximising the total score
  ``Σ_t h_t · w_{a_t}``; at evaluation each token goes to its best expert. Output weight
  ``σ(h_t · w_{a_t})`` (eq. 3).
* ``"soft"`` — Soft MoE (Puigcerver et al. 2024, eq. 1–3): ``E · p`` slots; slot inputs are convex
  combinations of all tokens (``D = softmax`` over tokens, per slot) and each token's output a convex
  combination of all slot outputs (``C = softmax`` over slots, per token). Never drops; not causal.
* ``"auxfree"`` — auxiliary-loss-free balancing (Wang et al. 2024, eq. 3–4): a per-expert bias ``b`` is
  added to the scores for the top-``k`` *selection* only; the gate values are the unbiased scores. Every
  training forward pass moves it, ``b_i ← b_i + u · sign(mean load − load_i)``, ``u = 0.001``
  (:func:`balance_bias`: the router owns the update, no training loop has to call anything).
* ``"group_limited"`` — DeepSeek-V3 (2024, eq. 12–16): sigmoid scores, a correction bias for the
  selection only, top-k restricted to the ``topk_group`` best of ``n_group`` expert groups, gate values
  renormalised and multiplied by a scaling factor. Used by :func:`moe_lib.from_transformers`.
* ``"group_capacity"`` — top-k (Switch: top-1, raw probability) with a fixed expert capacity per group
  of tokens (one sequence), the overflow dropped: Switch Transformer as Hugging Face runs it.

Router arithmetic is done in float32 whatever the input dtype ("selective precision", Fedus et al. 2022,
§2.4); ``router_dtype="bfloat16"`` exists only to show why (chapter 6).

How routers that do not pick ``k`` experts per token fit the data path: ``Routing.valid`` (``[T, k]``
bool, optional) marks which of a row's ``k`` entries are real assignments. Expert choice returns all
``E`` experts per token with ``valid`` marking the (token, expert) pairs the experts chose; GShard marks
a second expert that lost its coin flip. Soft MoE is not an assignment at all: its ``Routing`` carries
``dispatch`` and ``combine`` matrices ``[T, E·p]`` and :class:`moe_lib.MoELayer` runs the experts on the
slots (see :func:`moe_lib.dispatch.slot_plan`).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor, nn

from ._validate import check_bool, check_choice, check_int, check_nonnegative_float, check_positive_float

ROUTER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """``ceil(capacity_factor · T · k / E)``: the most assignments one expert may process (Fedus et al.
    2022, eq. 3 — "expert capacity"; Lepikhin et al. 2021 for top-2).

    Computed exactly on the factor as written — its shortest decimal form, so ``1.1`` is 11/10 — so that a
    product that is a whole number is not pushed up by one by binary rounding (``1.1 · 50 = 55``, where
    float arithmetic gives 55.000000000000007 and a ceiling of 56).
    """
    factor = Fraction(repr(float(capacity_factor)))
    return math.ceil(factor * num_tokens * top_k / num_experts)


@dataclass
class Routing:
    """What a router decided for ``T`` tokens over ``E`` experts, up to ``k`` assignments per token.

    Attributes:
        logits: ``[T, E]`` router scores ``x W_g`` before any softmax (noisy in training for
            ``noisy_topk``; ``[T, E·p]`` slot logits for Soft MoE).
        probs: ``[T, E]`` float32 softmax over *all* experts. Auxiliary losses use these (the Switch
            load-balancing loss needs the full softmax, not the top-k-masked one).
        experts: ``[T, k]`` int64 ids of the chosen experts, distinct within a row.
        weights: ``[T, k]`` float32 combine weights (``>= 0``; 0 where ``valid`` is false).
        valid: optional ``[T, k]`` bool, which entries are real assignments (``None``: all of them).

    What only one router produces lives in that router's subclass of ``Routing``: :class:`NoisyRouting`
    (the noisy top-k router's clean logits and noise scale) and :class:`SoftRouting` (Soft MoE's dispatch
    and combine weights), so a new router adds its own subclass instead of a field every router carries.
    """

    logits: Tensor
    probs: Tensor
    experts: Tensor
    weights: Tensor
    valid: Tensor | None = None

    #: tokens reach the experts through mixtures (Soft MoE's slots), not by assignment
    is_soft = False

    @property
    def num_tokens(self) -> int:
        return self.experts.shape[0]

    @property
    def top_k(self) -> int:
        return self.experts.shape[1]

    @property
    def num_experts(self) -> int:
        return self.probs.shape[1]

    def mask(self) -> Tensor:
        """``[T, k]`` bool: which entries of ``experts`` are assignments (all true unless ``valid`` says)."""
        if self.valid is None:
            return torch.ones_like(self.experts, dtype=torch.bool)
        return self.valid

    def dense_weights(self) -> Tensor:
        """The combine weights scattered into a ``[T, E]`` matrix (zeros for experts not chosen)."""
        out = torch.zeros_like(self.probs)
        return out.scatter(1, self.experts, self.weights * self.mask().to(self.weights.dtype))


@dataclass
class NoisyRouting(Routing):
    """The noisy top-k router's decision (Shazeer et al. 2017, eq. 3–5), with what its smooth load
    estimator needs (eq. 9–10).

    Attributes:
        clean_logits: ``[T, E]`` ``x W_g`` before the noise (``logits`` are the noisy ones in training).
        noise_std: ``[T, E]`` ``softplus(x W_noise)``, the scale of the Gaussian noise.
    """

    clean_logits: Tensor | None = None
    noise_std: Tensor | None = None


@dataclass
class SoftRouting(Routing):
    """Soft MoE's decision (Puigcerver et al. 2024, eq. 1–3): every token reaches every expert's slots.

    Attributes:
        dispatch: ``[T, E·p]``; column ``s`` sums to 1 over tokens (slot ``s`` is a mixture of the tokens).
        combine: ``[T, E·p]``; row ``t`` sums to 1 over slots (token ``t``'s output mixes the slot outputs).
        slots_per_expert: ``p``.
    """

    dispatch: Tensor | None = None
    combine: Tensor | None = None
    slots_per_expert: int = 1
    is_soft = True


def _every_expert(router: str, what: str, top_k: int | None, num_experts: int, hint: str) -> int:
    """``top_k`` of a router that uses all ``E`` experts: ``None`` or ``E``, anything else is an error."""
    top_k = num_experts if top_k is None else top_k
    if top_k != num_experts:
        raise ValueError(
            f"router={router!r} {what}, so top_k must equal num_experts ({num_experts}) or be None, "
            f"got top_k={top_k}; {hint}"
        )
    return top_k


class Router(nn.Module):
    """Base class: a linear gate ``x W_g (+ b)`` scored in float32. Subclasses choose the experts.

    Args:
        d_model: token width.
        num_experts: ``E``.
        top_k: experts chosen per token.
        bias: add a learned bias to the gate scores. Modern sparse routers have none; a 1-D regression
            gate needs one to place its boundaries (chapter 1).
        router_dtype: ``"float32"`` (default) or ``"bfloat16"`` — the precision of the router's logits and
            softmax. bfloat16 exists to demonstrate the instability selective precision avoids.
    """

    name = "abstract"  # subclasses set the name MoELayer(router=...) accepts
    #: the router enforces its own capacity (the layer must not apply ``capacity_factor`` again)
    owns_capacity = False
    #: a capacity can drop this router's assignments (False: ``capacity_factor`` has no meaning for it)
    uses_capacity = True
    #: the routing carries Shazeer's smooth load estimate (the load loss, ``load_loss_coef``, needs it)
    smooth_load = False
    #: the Switch load-balancing loss weight a layer uses unless told (Fedus et al. 2022: 0.01); 0 for routers
    #: the loss cannot balance (every expert used, or no learned gate) or that balance otherwise
    default_aux_loss_coef = 0.01

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, bias: bool = False,
                 router_dtype: str = "float32"):
        super().__init__()
        self.d_model = check_int("d_model", d_model, minimum=1)
        self.num_experts = check_int("num_experts", num_experts, minimum=1)
        self.top_k = check_int("top_k", top_k, minimum=1, maximum=self.num_experts)
        self.router_dtype = check_choice("router_dtype", router_dtype, ROUTER_DTYPES)
        self.gate = nn.Linear(self.d_model, self.num_experts, bias=check_bool("router_bias", bias))

    @classmethod
    def default_top_k(cls, num_experts: int) -> int:
        return min(2, num_experts)

    def _linear(self, x: Tensor, layer: nn.Linear) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        bias = None if layer.bias is None else layer.bias.to(dtype)
        out = nn.functional.linear(x.to(dtype), layer.weight.to(dtype), bias)
        if self.router_dtype != "float32" and dtype == torch.float32:
            out = out.to(ROUTER_DTYPES[self.router_dtype])  # deliberately low precision (chapter 6)
        return out

    def scores(self, x: Tensor) -> Tensor:
        """Router logits ``[T, E]``, computed in float32 at least (float64 inputs stay float64)."""
        return self._linear(x, self.gate)

    @staticmethod
    def _softmax(logits: Tensor) -> Tensor:
        """Softmax in the logits' precision, returned as float32 (float64 stays float64)."""
        probs = logits.softmax(dim=-1)
        return probs if probs.dtype == torch.float64 else probs.float()

    def flops_per_token(self) -> int:
        """Matmul FLOPs of the router for one token (2 per multiply-add)."""
        return 2 * self.d_model * self.gate.out_features

    def expert_passes_per_token(self, num_tokens: int | None = None) -> float:
        """Expert FFN passes one token costs on average: ``k`` (``num_tokens`` is used only by routers whose
        experts are shared by the batch, Soft MoE)."""
        return self.top_k

    def make_dispatcher(self, capacity_factor: float | None = None):
        """The :class:`~moe_lib.dispatch.Dispatcher` a layer uses with this router by default: token
        dispatch with ``capacity_factor`` (``None`` when the router enforces its own capacity)."""
        from .dispatch import TokenDispatcher

        return TokenDispatcher(None if self.owns_capacity else capacity_factor)


    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Routing:  # pragma: no cover
        raise NotImplementedError


class DenseRouter(Router):
    """Softmax gate over every expert: ``w = softmax(x W_g)``, ``k = E`` (Jacobs et al. 1991)."""

    name = "dense"
    default_aux_loss_coef = 0.0

    def __init__(self, d_model: int, num_experts: int, top_k: int | None = None, *, bias: bool = False,
                 router_dtype: str = "float32"):
        top_k = _every_expert("dense", "weights every expert", top_k, num_experts,
                              "use router='topk' to keep only k experts")
        super().__init__(d_model, num_experts, top_k, bias=bias, router_dtype=router_dtype)

    @classmethod
    def default_top_k(cls, num_experts: int) -> int:
        return num_experts

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Routing:
        logits = self.scores(x)
        probs = self._softmax(logits)
        experts = torch.arange(self.num_experts, device=x.device).expand(x.shape[0], -1)
        return Routing(logits=logits, probs=probs, experts=experts, weights=probs)


class TopKRouter(Router):
    """Keep the ``k`` most probable experts per token (Shazeer et al. 2017, eq. 3–5, noise-free).

    Args:
        normalize: renormalise the ``k`` kept probabilities to sum to 1 (Mixtral, DeepSeek-V3's
            ``norm_topk_prob``). ``False`` keeps the raw softmax probabilities (Switch Transformer).

    With ``k = 1`` and ``normalize=True`` every weight is exactly 1, so the task loss sends the gate no
    gradient (only auxiliary losses train it). Switch scales by the raw probability for that reason; the
    router warns once if it is trained that way.
    """

    name = "topk"
    _warned_no_gradient = False

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, bias: bool = False, normalize: bool = True,
                 router_dtype: str = "float32"):
        super().__init__(d_model, num_experts, top_k, bias=bias, router_dtype=router_dtype)
        self.normalize = check_bool("normalize_weights", normalize)

    def _weights(self, top_p: Tensor) -> Tensor:
        if not self.normalize:
            return top_p
        if top_p.shape[-1] == 1 and self.training and torch.is_grad_enabled() and not self._warned_no_gradient:
            self._warned_no_gradient = True
            warnings.warn(
                f"router={self.name!r} with top_k=1 and normalize_weights=True gives every token weight 1, "
                "so the router gets no gradient from the task loss; use router='switch' or "
                "normalize_weights=False to scale by the gate probability (Fedus et al. 2022)",
                stacklevel=3,
            )
        return top_p / top_p.sum(dim=-1, keepdim=True)

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Routing:
        logits = self.scores(x)
        probs = self._softmax(logits)
        top_p, experts = probs.topk(self.top_k, dim=-1)
        return Routing(logits=logits, probs=probs, experts=experts, weights=self._weights(top_p))


class SwitchRouter(TopKRouter):
    """Switch Transformer top-1 (Fedus et al. 2022, eq. 1–2): ``p_i(x) = softmax(x W_r)_i``; the one
    chosen expert's output is scaled by its raw probability ``p_i(x)`` (no renormalisation)."""

    name = "switch"

    def __init__(self, d_model: int, num_experts: int, top_k: int = 1, *, bias: bool = False,
                 normalize: bool = False, router_dtype: str = "float32"):
        if top_k != 1:
            raise ValueError(f"router='switch' routes each token to one expert, so top_k must be 1, got {top_k}")
        super().__init__(d_model, num_experts, 1, bias=bias, normalize=normalize, router_dtype=router_dtype)

    @classmethod
    def default_top_k(cls, num_experts: int) -> int:
        return 1


class NoisyTopKRouter(TopKRouter):
    """Noisy top-k gating (Shazeer et al. 2017, eq. 3–5).

    ``H(x)_i = (x W_g)_i + StandardNormal() · softplus((x W_noise)_i)`` in training (eq. 4), ``H = x W_g``
    in evaluation; ``G(x) = softmax(KeepTopK(H(x), k))`` (eq. 3, 5), i.e. the kept weights are a softmax
    over the ``k`` kept noisy logits. ``W_g`` and ``W_noise`` start at zero (the paper's Appendix A: equal
    load and some noise at the start). The noise is *learned* per token and expert — adding noise to the
    input instead is a different method.
    """

    name = "noisy_topk"
    smooth_load = True

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, bias: bool = False, normalize: bool = True,
                 router_dtype: str = "float32"):
        if not normalize:
            raise ValueError("router='noisy_topk' computes softmax(KeepTopK(H, k)), so normalize_weights must be True")
        super().__init__(d_model, num_experts, top_k, bias=bias, normalize=True, router_dtype=router_dtype)
        self.noise = nn.Linear(self.d_model, self.num_experts, bias=False)
        with torch.no_grad():
            self.gate.weight.zero_()
            self.noise.weight.zero_()
            if self.gate.bias is not None:
                self.gate.bias.zero_()

    def flops_per_token(self) -> int:
        return 2 * 2 * self.d_model * self.num_experts

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Routing:
        clean = self.scores(x)
        noise_std = nn.functional.softplus(self._linear(x, self.noise))
        noisy = clean + torch.randn_like(clean) * noise_std if self.training else clean
        probs = self._softmax(noisy)
        top_logits, experts = noisy.topk(self.top_k, dim=-1)
        weights = self._softmax(top_logits)  # softmax(KeepTopK(H, k)) restricted to the kept entries
        return NoisyRouting(logits=noisy, probs=probs, experts=experts, weights=weights,
                            clean_logits=clean, noise_std=noise_std)


class GShardRouter(TopKRouter):
    """Top-2 with GShard's random second expert (Lepikhin et al. 2021, Algorithm 1).

    ``g1, g2`` are the two largest softmax probabilities renormalised to ``g1 + g2 = 1``. In training the
    second expert is dispatched only when ``2 · g2 > U(0, 1)`` (so a token whose second choice is weak
    usually goes to one expert); otherwise its entry is marked not ``valid`` and carries weight 0. The
    first expert's weight stays ``g1`` (no renormalisation). In evaluation both are kept.
    """

    name = "gshard"

    def __init__(self, d_model: int, num_experts: int, top_k: int = 2, *, bias: bool = False, normalize: bool = True,
                 router_dtype: str = "float32"):
        if top_k != 2:
            raise ValueError(f"router='gshard' is a top-2 router, so top_k must be 2, got {top_k}")
        if check_int("num_experts", num_experts, minimum=1) < 2:
            raise ValueError(f"router='gshard' needs num_experts >= 2, got {num_experts}")
        if not check_bool("normalize_weights", normalize):
            raise ValueError("router='gshard' renormalises its two gate values (Lepikhin et al. 2021, Algorithm 1), "
                             "so normalize_weights must be True")
        super().__init__(d_model, num_experts, 2, bias=bias, normalize=True, router_dtype=router_dtype)

    @classmethod
    def default_top_k(cls, num_experts: int) -> int:
        return 2

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Routing:
        routing = super().forward(x)
        valid = torch.ones_like(routing.experts, dtype=torch.bool)
        if self.training:
            u = torch.rand(routing.weights.shape[0], device=x.device, dtype=routing.weights.dtype)
            valid[:, 1] = 2 * routing.weights[:, 1].detach() > u
        routing.weights = routing.weights * valid.to(routing.weights.dtype)
        routing.valid = valid
        return routing


class ExpertChoiceRouter(Router):
    """Expert choice (Zhou et al. 2022, §3.1, eq. 1): experts pick tokens.

    ``S = softmax(X W_g)`` ``[T, E]``; ``G, I = TopK(Sᵀ, C)``: expert ``e`` processes its ``C`` highest-
    scoring tokens with gate value ``S[t, e]``, where ``C = ceil(capacity_factor · T · k / E)`` (at most
    ``T``) and ``k`` is the average number of experts per token (the paper's capacity factor ``c``).
    Every expert is exactly full; a token can be chosen by ``0..E`` experts. The returned ``Routing``
    lists all ``E`` experts per token, ``valid`` marking the chosen pairs.
    """

    name = "expert_choice"
    default_aux_loss_coef = 0.0
    owns_capacity = True

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, bias: bool = False,
                 capacity_factor: float | None = None, router_dtype: str = "float32"):
        super().__init__(d_model, num_experts, top_k, bias=bias, router_dtype=router_dtype)
        self.capacity_factor = check_positive_float("capacity_factor", capacity_factor, allow_none=True)

    def capacity(self, num_tokens: int) -> int:
        factor = 1.0 if self.capacity_factor is None else self.capacity_factor
        return min(num_tokens, expert_capacity(num_tokens, self.top_k, self.num_experts, factor))

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Routing:
        logits = self.scores(x)
        probs = self._softmax(logits)
        num_tokens = x.shape[0]
        valid = torch.zeros_like(probs, dtype=torch.bool)
        cap = self.capacity(num_tokens)
        if cap > 0:
            chosen = probs.t().topk(cap, dim=-1).indices  # [E, C] tokens each expert takes
            valid[chosen, torch.arange(self.num_experts, device=x.device).unsqueeze(1)] = True
        experts = torch.arange(self.num_experts, device=x.device).expand(num_tokens, -1)
        weights = probs * valid.to(probs.dtype)
        return Routing(logits=logits, probs=probs, experts=experts, weights=weights, valid=valid)


_HASH_PRIME = 2_147_483_647  # 2^31 - 1


def hash_to_expert(ids: Tensor, num_experts: int, seed: int = 0) -> Tensor:
    """A fixed random hash of integer ids into ``[0, E)``: ``((a · id + b) mod p) mod E``, ``p = 2³¹ − 1``,
    with ``a, b`` drawn once from ``seed`` (a universal hash family: distinct ids land on uniformly random,
    independent-looking experts, the "random hash" of Roller et al. 2021, §3)."""
    g = torch.Generator().manual_seed(int(seed))  # a CPU generator, drawn on the CPU whatever the default device
    a = int(torch.randint(1, _HASH_PRIME, (1,), generator=g, device="cpu"))
    b = int(torch.randint(0, _HASH_PRIME, (1,), generator=g, device="cpu"))
    ids = ids.long() % _HASH_PRIME
    return ((ids * a + b) % _HASH_PRIME) % num_experts


class HashRouter(Router):
    """Hash layers (Roller et al. 2021): a fixed, untrained hash decides the expert; weight 1.

    With ``token_ids`` (``[T]`` ints, passed through ``MoELayer.forward(x, token_ids=...)``) the expert is
    :func:`hash_to_expert` of the id — the paper's random hash of the vocabulary. Without ids the router
    hashes the *content*: the sign pattern of ``x`` under a fixed random projection to ``hash_bits`` bits
    (a locality-sensitive hash), read as an integer and hashed the same way. Both are deterministic and
    have no trainable parameter. ``logits`` are zeros, so ``probs`` is uniform.
    """

    name = "hash"
    default_aux_loss_coef = 0.0

    def __init__(self, d_model: int, num_experts: int, top_k: int = 1, *, bias: bool = False,
                 hash_bits: int = 8, hash_seed: int = 0, router_dtype: str = "float32"):
        if top_k != 1:
            raise ValueError(f"router='hash' sends each token to one expert, so top_k must be 1, got {top_k}")
        if bias:
            raise ValueError("router='hash' has no gate (a fixed hash decides), so router_bias must be False")
        super().__init__(d_model, num_experts, 1, bias=False, router_dtype=router_dtype)
        del self.gate
        self.gate = None
        self.hash_bits = check_int("hash_bits", hash_bits, minimum=1, maximum=30)
        self.hash_seed = check_int("hash_seed", hash_seed, minimum=0)
        g = torch.Generator().manual_seed(self.hash_seed)
        self.register_buffer("projection", torch.randn(self.d_model, self.hash_bits, generator=g))

    @classmethod
    def default_top_k(cls, num_experts: int) -> int:
        return 1

    def flops_per_token(self) -> int:
        return 2 * self.d_model * self.hash_bits

    def content_ids(self, x: Tensor) -> Tensor:
        """``[T]`` integer code of each token: the bits ``x · R > 0`` of a fixed random projection ``R``."""
        bits = (x.float() @ self.projection.float() > 0).long()  # float32 whatever the model's dtype
        return (bits << torch.arange(self.hash_bits, device=x.device)).sum(-1)

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Routing:
        num_tokens = x.shape[0]
        ids = self.content_ids(x) if token_ids is None else token_ids.reshape(-1).to(x.device)
        experts = hash_to_expert(ids, self.num_experts, self.hash_seed).unsqueeze(1)
        dtype = torch.promote_types(x.dtype, torch.float32)
        logits = torch.zeros(num_tokens, self.num_experts, dtype=dtype, device=x.device)
        return Routing(logits=logits, probs=self._softmax(logits), experts=experts,
                       weights=torch.ones(num_tokens, 1, dtype=dtype, device=x.device))


def balanced_assignment(scores: Tensor, capacity: int | None = None) -> Tensor:
    """Assign each of ``T`` tokens to one of ``E`` experts, at most ``capacity`` per expert
    (default ``ceil(T / E)``), preferring high ``scores [T, E]``.

    Greedy auction rounds: every unassigned token bids for its best expert that still has room; each
    expert accepts its highest bids up to its remaining room; repeat. Each round fills at least one
    expert or assigns every bidder, so it ends after at most ``E`` rounds with every token assigned. It
    approximates the linear assignment BASE solves with an auction algorithm (Lewis et al. 2021, §3.1);
    when every token's favourite expert has room it returns exactly the argmax. Returns ``[T]`` int64.
    """
    num_tokens, num_experts = scores.shape
    if capacity is None:
        capacity = math.ceil(num_tokens / num_experts)
    if capacity * num_experts < num_tokens:
        raise ValueError(f"capacity must be >= ceil(T / E) = {math.ceil(num_tokens / num_experts)}, got {capacity}")
    scores = scores.detach()
    assign = torch.full((num_tokens,), -1, dtype=torch.long, device=scores.device)
    load = torch.zeros(num_experts, dtype=torch.long, device=scores.device)
    while True:
        pending = (assign < 0).nonzero().squeeze(1)
        if pending.numel() == 0:
            return assign
        room = capacity - load
        bids = scores[pending].masked_fill((room <= 0).unsqueeze(0), float("-inf"))
        best, choice = bids.max(dim=1)
        order = torch.sort(best, descending=True, stable=True).indices
        order = order[torch.sort(choice[order], stable=True).indices]  # by expert, best bid first
        counts = torch.bincount(choice, minlength=num_experts)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=scores.device) - starts[choice[order]]
        accept = rank < room[choice]
        assign[pending[accept]] = choice[accept]
        load += torch.bincount(choice[accept], minlength=num_experts)


class BaseRouter(Router):
    """BASE layers (Lewis et al. 2021): balanced assignment in training, greedy at evaluation.

    Training (§3.1, eq. 1): ``a = argmax_a Σ_t h_t · w_{a_t}`` subject to every expert receiving at most
    ``ceil(T / E)`` tokens, solved approximately by :func:`balanced_assignment`. Evaluation (§3.2): each
    token goes to its highest-scoring expert. The expert's output is scaled by ``σ(h_t · w_{a_t})``
    (eq. 3), which is what trains the expert embeddings ``w``. Top-1 only; no auxiliary loss is needed.
    """

    name = "base"
    default_aux_loss_coef = 0.0

    def __init__(self, d_model: int, num_experts: int, top_k: int = 1, *, bias: bool = False,
                 router_dtype: str = "float32"):
        if top_k != 1:
            raise ValueError(f"router='base' assigns each token to one expert, so top_k must be 1, got {top_k}")
        super().__init__(d_model, num_experts, 1, bias=bias, router_dtype=router_dtype)

    @classmethod
    def default_top_k(cls, num_experts: int) -> int:
        return 1

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Routing:
        logits = self.scores(x)
        if self.training:
            experts = balanced_assignment(logits).unsqueeze(1)
        else:
            experts = logits.argmax(dim=-1, keepdim=True)
        weights = torch.sigmoid(logits.gather(1, experts))
        weights = weights if weights.dtype == torch.float64 else weights.float()
        return Routing(logits=logits, probs=self._softmax(logits), experts=experts, weights=weights)


class SoftMoERouter(Router):
    """Soft MoE (Puigcerver et al. 2024, §2.1, eq. 1–3): slots instead of assignments.

    ``Φ`` ``[d, E·p]`` scores every token for every slot: ``logits = X Φ`` ``[T, E·p]``.
    ``D = softmax(logits, dim=tokens)`` (each slot's input ``X̃_s = Σ_t D[t, s] x_t`` is a convex
    combination of the tokens, eq. 1) and ``C = softmax(logits, dim=slots)`` (each token's output
    ``y_t = Σ_s C[t, s] Ỹ_s`` a convex combination of the slot outputs, eq. 3). Expert ``e`` processes slots
    ``e·p .. e·p + p − 1``. Nothing is dropped; every token depends on every other token of the batch.
    ``probs``/``weights`` ``[T, E]`` are the combine weight each token gives each expert (``C`` summed over
    the expert's slots). The paper's ℓ2 normalisation of ``X`` and ``Φ`` is omitted at this scale.
    ``top_k`` must be ``E`` (every expert contributes to every token).
    """

    name = "soft"
    default_aux_loss_coef = 0.0
    uses_capacity = False  # every slot is processed; nothing can be dropped

    def __init__(self, d_model: int, num_experts: int, top_k: int | None = None, *, bias: bool = False,
                 slots_per_expert: int = 1, router_dtype: str = "float32"):
        top_k = _every_expert("soft", "mixes every expert into every token", top_k, num_experts,
                              "set slots_per_expert instead")
        if bias:
            raise ValueError("router='soft' has no gate bias (Puigcerver et al. 2023): router_bias must be False")
        super().__init__(d_model, num_experts, top_k, bias=False, router_dtype=router_dtype)
        self.slots_per_expert = check_int("slots_per_expert", slots_per_expert, minimum=1)
        self.gate = nn.Linear(self.d_model, self.num_experts * self.slots_per_expert, bias=False)

    @classmethod
    def default_top_k(cls, num_experts: int) -> int:
        return num_experts

    def flops_per_token(self) -> int:
        """Slot logits, plus the dispatch and combine matmuls (each ``2 · d · E·p`` per token)."""
        return 3 * 2 * self.d_model * self.gate.out_features

    def expert_passes_per_token(self, num_tokens: int | None = None) -> float:
        """``S / T``: the ``S = E·p`` slots are shared by the batch of ``num_tokens`` tokens (required)."""
        if num_tokens is None:
            raise ValueError("router='soft' shares its slots across the batch: pass num_tokens (T) to "
                             "active_flops_per_token")
        num_tokens = check_int("num_tokens", num_tokens, minimum=1)
        return self.num_experts * self.slots_per_expert / num_tokens

    def make_dispatcher(self, capacity_factor: float | None = None):
        """Soft MoE mixes tokens into slots: a :class:`~moe_lib.dispatch.SlotDispatcher` (no capacity)."""
        from .dispatch import SlotDispatcher

        return SlotDispatcher()

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Routing:
        logits = self.scores(x)
        num_tokens = x.shape[0]
        dispatch = logits.softmax(dim=0)  # over the tokens (an empty batch stays empty)
        combine = logits.softmax(dim=1)
        if combine.dtype != torch.float64:
            dispatch, combine = dispatch.float(), combine.float()
        probs = combine.reshape(num_tokens, self.num_experts, self.slots_per_expert).sum(-1)
        experts = torch.arange(self.num_experts, device=x.device).expand(num_tokens, -1)
        return SoftRouting(logits=logits, probs=probs, experts=experts, weights=probs, dispatch=dispatch,
                           combine=combine, slots_per_expert=self.slots_per_expert)


def balance_bias(router: Router, bias: Tensor, experts: Tensor, update_rate: float) -> None:
    """Aux-loss-free balancing (Wang et al. 2024, eq. 3–4): ``b_i ← b_i + u · sign(mean load − load_i)``,
    with the load of the batch just routed, in place.

    The router owns the update, so no training loop can forget it: it happens in every forward pass that
    trains — training mode with gradients enabled — right after the experts were chosen with the old bias
    (so the next batch sees the new one, as an update after the optimiser step would give). Evaluation
    passes and passes under ``torch.no_grad()`` leave the bias alone. With gradient accumulation the bias
    moves once per micro-batch; scale ``update_rate`` accordingly. Under expert parallelism each rank
    updates its replica from its own tokens' load."""
    if update_rate == 0 or not (router.training and torch.is_grad_enabled()):
        return
    with torch.no_grad():
        load = torch.bincount(experts.reshape(-1), minlength=router.num_experts).to(bias.dtype)
        bias += update_rate * torch.sign(load.mean() - load)


class AuxFreeRouter(TopKRouter):
    """Auxiliary-loss-free load balancing (Wang et al. 2024, eq. 3–4).

    Gate scores ``s = softmax(x W_g)``; selection ``TopK(s_i + b_i)`` uses a per-expert bias buffer ``b``,
    but the gate values are the *unbiased* ``s_i`` of the selected experts (renormalised when
    ``normalize``). Every training forward pass then moves the bias against the load of its batch
    (:func:`balance_bias`): ``b_i ← b_i + u · sign(mean load − load_i)`` (``u = update_rate``, 0.001 in the
    paper). The bias receives no gradient.
    """

    name = "auxfree"
    default_aux_loss_coef = 0.0

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, bias: bool = False, normalize: bool = True,
                 update_rate: float = 0.001, router_dtype: str = "float32"):
        super().__init__(d_model, num_experts, top_k, bias=bias, normalize=normalize, router_dtype=router_dtype)
        self.update_rate = check_nonnegative_float("update_rate", update_rate)
        self.register_buffer("expert_bias", torch.zeros(self.num_experts))

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Routing:
        logits = self.scores(x)
        probs = self._softmax(logits)
        experts = (probs.detach() + self.expert_bias.to(probs.dtype)).topk(self.top_k, dim=-1).indices
        top_p = probs.gather(1, experts)
        balance_bias(self, self.expert_bias, experts, self.update_rate)
        return Routing(logits=logits, probs=probs, experts=experts, weights=self._weights(top_p))


class GroupLimitedRouter(Router):
    """DeepSeek-V3's router (DeepSeek-AI 2024, §2.1.1–2.1.2, eq. 12–16): sigmoid scores, group-limited,
    bias-corrected top-k selection, normalised and scaled gate values.

    ``s = σ(x W_g)`` ``[T, E]`` (``score="sigmoid"``; ``"softmax"`` for DeepSeek-V2-style routers). For
    the *selection only*, a per-expert correction bias ``b`` (buffer ``score_bias``, DeepSeek-V3's
    ``e_score_correction_bias``; aux-loss-free balancing, Wang et al. 2024, eq. 3) is added:
    ``s' = s + b``. The ``E`` experts form ``n_group`` equal groups; each group is scored by the sum of
    its two largest ``s'`` (group limited routing: only the ``topk_group`` best groups are eligible), and
    the ``k`` largest ``s'`` among the eligible experts are chosen. The gate values are the *uncorrected*
    ``s`` of the chosen experts, renormalised to sum to 1 when ``normalize`` (``norm_topk_prob``;
    eq. 13), then multiplied by ``scaling_factor`` (``routed_scaling_factor``, 2.5 in DeepSeek-V3).

    ``Routing.probs`` is ``s / Σ s`` — the sigmoid scores normalised over the experts (DeepSeek-V3's
    sequence-wise balance loss uses these, eq. 18–20); for ``score="softmax"`` it is the softmax.

    Args:
        n_group, topk_group: number of expert groups and how many of them a token may use
            (``n_group=1`` disables the group limit). ``top_k <= topk_group · E / n_group``.
        scaling_factor: multiplies every gate value after normalisation.
        update_rate: ``u`` of the aux-loss-free bias update ``b_i ← b_i + u · sign(mean load − load_i)``
            applied in every training forward pass by :func:`balance_bias` (0, the default, keeps the bias
            fixed, as at inference).
    """

    name = "group_limited"
    default_aux_loss_coef = 0.0

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, bias: bool = False, normalize: bool = True,
                 score: str = "sigmoid", n_group: int = 1, topk_group: int = 1, scaling_factor: float = 1.0,
                 update_rate: float = 0.0, router_dtype: str = "float32"):
        super().__init__(d_model, num_experts, top_k, bias=bias, router_dtype=router_dtype)
        self.normalize = check_bool("normalize_weights", normalize)
        self.score = check_choice("score", score, ("sigmoid", "softmax"))
        self.n_group = check_int("n_group", n_group, minimum=1, maximum=self.num_experts)
        if self.num_experts % self.n_group:
            raise ValueError(f"n_group must divide num_experts={self.num_experts}, got n_group={self.n_group}")
        self.topk_group = check_int("topk_group", topk_group, minimum=1, maximum=self.n_group)
        eligible = self.topk_group * (self.num_experts // self.n_group)
        if self.top_k > eligible:
            raise ValueError(
                f"top_k must be <= topk_group * num_experts / n_group = {eligible} (the experts a token may "
                f"reach), got top_k={self.top_k}"
            )
        self.scaling_factor = check_positive_float("scaling_factor", scaling_factor)
        self.update_rate = check_nonnegative_float("update_rate", update_rate)
        self.register_buffer("score_bias", torch.zeros(self.num_experts))

    def gate_scores(self, logits: Tensor) -> Tensor:
        """``σ(logits)`` (or their softmax), float32 at least."""
        s = logits.sigmoid() if self.score == "sigmoid" else logits.softmax(dim=-1)
        return s if s.dtype == torch.float64 else s.float()

    def select(self, scores: Tensor) -> Tensor:
        """``[T, k]`` experts: top-k of ``scores + score_bias`` within the ``topk_group`` best groups."""
        choice = scores.detach() + self.score_bias.to(scores.dtype)
        if self.n_group > 1:
            per_group = self.num_experts // self.n_group
            grouped = choice.view(-1, self.n_group, per_group)
            group_score = grouped.topk(min(2, per_group), dim=-1).values.sum(-1)  # [T, n_group]
            keep = group_score.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter(1, keep, True)
            choice = choice.masked_fill(~group_mask.repeat_interleave(per_group, dim=1), float("-inf"))
        return choice.topk(self.top_k, dim=-1).indices

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Routing:
        logits = self.scores(x)
        s = self.gate_scores(logits)
        experts = self.select(s)
        weights = s.gather(1, experts)
        if self.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.scaling_factor
        balance_bias(self, self.score_bias, experts, self.update_rate)
        probs = s / s.sum(dim=-1, keepdim=True).clamp_min(1e-20) if self.score == "sigmoid" else s
        return Routing(logits=logits, probs=probs, experts=experts, weights=weights)


class GroupCapacityRouter(TopKRouter):
    """Top-k with a fixed expert capacity *per group of tokens* — Switch Transformer as Mesh TensorFlow
    and Hugging Face run it (Fedus et al. 2022, eq. 3; one group = one sequence).

    Selection and gate values are those of :class:`TopKRouter` (``normalize=False``, the default, keeps
    the raw probability, Switch eq. 2). The ``T`` tokens are cut into consecutive groups of
    ``group_size`` (``None``: one group). Inside a group each expert serves at most ``expert_capacity``
    assignments — or ``ceil(capacity_factor · G · k / E)`` for a group of ``G`` tokens — in priority
    order: every first choice before any second choice, earlier tokens first. The overflow is marked
    ``valid = False`` with weight 0: those tokens get no expert output (the residual carries them) and
    show up in ``plan.dropped_tokens`` / ``stats()["tokens_dropped"]``. With neither limit set it is
    dropless. ``group_size`` is an attribute a caller may set per batch (the sequence length).
    """

    name = "group_capacity"
    owns_capacity = True

    def __init__(self, d_model: int, num_experts: int, top_k: int = 1, *, bias: bool = False,
                 normalize: bool = False, expert_capacity: int | None = None, group_size: int | None = None,
                 capacity_factor: float | None = None, router_dtype: str = "float32"):
        super().__init__(d_model, num_experts, top_k, bias=bias, normalize=normalize, router_dtype=router_dtype)
        if expert_capacity is not None:
            expert_capacity = check_int("expert_capacity", expert_capacity, minimum=0)
        self.expert_capacity = expert_capacity
        self.capacity_factor = check_positive_float("capacity_factor", capacity_factor, allow_none=True)
        self.group_size = None if group_size is None else check_int("group_size", group_size, minimum=1)

    @classmethod
    def default_top_k(cls, num_experts: int) -> int:
        return 1

    def capacity(self, group_tokens: int) -> int | None:
        """Assignments one expert may serve in a group of ``group_tokens`` tokens (``None``: unlimited)."""
        if self.expert_capacity is not None:
            return self.expert_capacity
        if self.capacity_factor is not None:
            return expert_capacity(group_tokens, self.top_k, self.num_experts, self.capacity_factor)
        return None

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Routing:
        routing = super().forward(x)
        num_tokens = x.shape[0]
        group = num_tokens if self.group_size is None else self.group_size
        if num_tokens == 0 or self.capacity(min(group, num_tokens)) is None:
            return routing
        if num_tokens % group:
            raise ValueError(f"the number of tokens ({num_tokens}) must be a multiple of group_size={group}")
        num_groups = num_tokens // group
        # [groups, k, G, E] one-hot in priority order (choice-major, then token), cumulative count per expert
        one_hot = nn.functional.one_hot(routing.experts, self.num_experts)  # [T, k, E]
        ordered = one_hot.view(num_groups, group, self.top_k, self.num_experts).transpose(1, 2)
        priority = ordered.reshape(num_groups, self.top_k * group, self.num_experts).cumsum(dim=1)
        position = (priority * ordered.reshape(num_groups, self.top_k * group, self.num_experts)).sum(-1)
        valid = (position <= self.capacity(group)).view(num_groups, self.top_k, group).transpose(1, 2)
        valid = valid.reshape(num_tokens, self.top_k)
        routing.valid = valid
        routing.weights = routing.weights * valid.to(routing.weights.dtype)
        return routing


#: Router name -> class. ``MoELayer(router=name)`` looks names up here.
ROUTERS: dict[str, type[Router]] = {
    c.name: c
    for c in (DenseRouter, TopKRouter, NoisyTopKRouter, SwitchRouter, GShardRouter, ExpertChoiceRouter,
              HashRouter, BaseRouter, SoftMoERouter, AuxFreeRouter, GroupLimitedRouter, GroupCapacityRouter)
}


# --------------------------------------------------------------------------------------------------
# Synthetic routings with a controlled skew (no router: benchmarks and the book's cost models)
# --------------------------------------------------------------------------------------------------

def zipf_popularity(num_experts: int, exponent: float) -> Tensor:
    """``p_e ∝ (e + 1)^(-exponent)``: expert 0 is the most popular; ``exponent = 0`` is uniform."""
    check_int("num_experts", num_experts, minimum=1)
    exponent = check_nonnegative_float("exponent", exponent)
    p = torch.arange(1, num_experts + 1, dtype=torch.float64).pow(-exponent)
    return (p / p.sum()).float()


def synthetic_routing(num_tokens: int, num_experts: int, top_k: int, *, zipf: float = 0.0,
                      balanced: bool = False, generator: torch.Generator | None = None,
                      device=None) -> Routing:
    """A top-``k`` routing of ``num_tokens`` tokens with a chosen load skew, independent of any input.

    * ``balanced=True``: token ``t``'s ``j``-th expert is ``(t·k + j) mod E`` — every expert gets
      ``T·k/E`` rows exactly when ``E`` divides ``T·k`` (the best case for padding).
    * otherwise each token draws ``k`` distinct experts without replacement from the Zipf popularity
      :func:`zipf_popularity` (``zipf = 0``: uniformly random; larger: a few experts take most tokens).
      The draw is the Gumbel top-k trick: ``logits = log p + Gumbel``, experts = top-k of the logits,
      which is exactly sampling without replacement proportionally to ``p``.

    The returned :class:`~moe_lib.routers.Routing` is that of a real softmax top-k router on those logits:
    ``probs = softmax(logits)``, weights = the chosen probabilities renormalised to sum to one. It is drawn
    on the CPU (with ``generator``) and moved to ``device``.
    """
    num_tokens = check_int("num_tokens", num_tokens, minimum=0)
    num_experts = check_int("num_experts", num_experts, minimum=1)
    top_k = check_int("top_k", top_k, minimum=1, maximum=num_experts)
    check_bool("balanced", balanced)
    u = torch.rand(num_tokens, num_experts, generator=generator).clamp_(1e-12, 1 - 1e-7)
    gumbel = -torch.log(-torch.log(u))
    if balanced:
        assigned = (torch.arange(num_tokens).unsqueeze(1) * top_k + torch.arange(top_k)) % num_experts
        # the bonus (30) exceeds the Gumbel noise's range, so the top-k set is exactly the assigned one
        logits = gumbel + torch.zeros(num_tokens, num_experts).scatter_(1, assigned, 30.0)
    else:
        logits = zipf_popularity(num_experts, zipf).log() + gumbel
    experts = logits.topk(top_k, dim=-1).indices
    probs = torch.softmax(logits, dim=-1)
    chosen = probs.gather(1, experts)
    weights = chosen / chosen.sum(-1, keepdim=True).clamp_min(1e-20)
    return Routing(logits=logits.to(device), probs=probs.to(device), experts=experts.to(device),
                   weights=weights.to(device))
