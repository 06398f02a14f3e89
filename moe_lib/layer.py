"""``MoELayer``: router → dispatch → expert bank → weighted combine, as one ``nn.Module``."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ._validate import check_choice, check_int, check_nonnegative_float, check_positive_float
from .backends import BACKENDS
from .dispatch import DispatchPlan, make_plan
from .experts import ACTIVATIONS, EXPERTS, MLPExperts
from .losses import load_balancing_loss, router_z_loss
from .metrics import routing_stats
from .routers import ROUTERS, DenseRouter, Routing


@dataclass
class MoEInfo:
    """Everything a forward pass of :class:`MoELayer` decided, for losses, metrics and plots.

    Attributes:
        routing: the router's :class:`~moe_lib.routers.Routing` (logits, full softmax, chosen experts and
            their weights, per token of the flattened input).
        plan: the :class:`~moe_lib.dispatch.DispatchPlan` (rows grouped by expert, counts, drops).
        aux_losses: unweighted auxiliary losses by name: ``"load_balance"`` (Switch, eq. 4) and
            ``"z_loss"`` (ST-MoE, eq. 5). They carry gradients.
        aux_loss: their sum weighted by the layer's ``aux_loss_coef`` and ``z_loss_coef``; add it to the
            training loss.
    """

    routing: Routing
    plan: DispatchPlan
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    aux_loss: Tensor | None = None

    def stats(self) -> dict:
        """Load, its CV, entropy, active fraction, drops... — see :func:`moe_lib.metrics.routing_stats`."""
        return routing_stats(self.routing, self.plan)


class MoELayer(nn.Module):
    """A mixture-of-experts layer: ``y = Σ_{e ∈ chosen(x)} w_e(x) · h_e(x)`` for every token ``x``.

    Args:
        d_model: width of the input tokens (the last dimension of ``x``).
        d_ff: hidden width of each expert (``mlp``/``swiglu``; unused by ``linear`` experts).
        num_experts: number of experts ``E``.
        top_k: experts per token. ``None`` means ``E`` for ``router="dense"`` and ``min(2, E)`` for
            ``router="topk"``. The dense router requires ``top_k == num_experts``.
        router: ``"dense"`` (softmax over every expert, Jacobs et al. 1991) or ``"topk"`` (Shazeer et al.
            2017; Switch with ``top_k=1``; Mixtral with ``top_k=2``); see :data:`moe_lib.routers.ROUTERS`.
        expert: ``"linear"``, ``"mlp"`` or ``"swiglu"``; see :data:`moe_lib.experts.EXPERTS`.
        backend: ``"loop"`` (reference) or ``"torch"`` (batched); see :data:`moe_lib.backends.BACKENDS`.
        capacity_factor: ``None`` for dropless, else each expert processes at most
            ``ceil(capacity_factor · T · k / E)`` assignments and the rest are dropped and counted.
        normalize_weights: renormalise the top-k weights to sum to 1 (``router="topk"`` only).
        router_bias: give the gate a bias term.
        activation: hidden activation of ``mlp`` experts (``"relu"``, ``"gelu"``, ``"silu"``, ``"tanh"``).
        d_out: output width; ``None`` (default) keeps ``d_model`` so the output has the input's shape.
        aux_loss_coef: weight of the load-balancing loss in ``info.aux_loss`` (Switch uses 0.01).
        z_loss_coef: weight of the router z-loss in ``info.aux_loss`` (ST-MoE uses 0.001).

    ``forward(x)`` takes ``[..., d_model]`` and returns ``[..., d_out]``. Routing details are reachable two
    ways: ``y, info = layer(x, return_info=True)`` returns a :class:`MoEInfo`, and ``layer.last_info``
    holds the most recent one. ``info.aux_loss`` is the weighted auxiliary loss to add to a training
    loss; ``info.stats()`` gives the metrics.

    Example:
        >>> layer = MoELayer(d_model=16, d_ff=32, num_experts=4, top_k=2)
        >>> y, info = layer(torch.randn(2, 5, 16), return_info=True)
        >>> y.shape, info.routing.experts.shape
        (torch.Size([2, 5, 16]), torch.Size([10, 2]))
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        top_k: int | None = None,
        *,
        router: str = "topk",
        expert: str = "swiglu",
        backend: str = "torch",
        capacity_factor: float | None = None,
        normalize_weights: bool = True,
        router_bias: bool = False,
        activation: str = "gelu",
        d_out: int | None = None,
        aux_loss_coef: float = 0.01,
        z_loss_coef: float = 0.0,
    ):
        super().__init__()
        self.d_model = check_int("d_model", d_model, minimum=1)
        self.d_ff = check_int("d_ff", d_ff, minimum=1)
        self.num_experts = check_int("num_experts", num_experts, minimum=1)
        router = check_choice("router", router, ROUTERS)
        expert = check_choice("expert", expert, EXPERTS)
        self.backend = check_choice("backend", backend, BACKENDS)
        if top_k is None:
            top_k = self.num_experts if router == DenseRouter.name else min(2, self.num_experts)
        self.top_k = check_int("top_k", top_k, minimum=1, maximum=self.num_experts)
        self.capacity_factor = check_positive_float("capacity_factor", capacity_factor, allow_none=True)
        self.aux_loss_coef = check_nonnegative_float("aux_loss_coef", aux_loss_coef)
        self.z_loss_coef = check_nonnegative_float("z_loss_coef", z_loss_coef)
        check_choice("activation", activation, ACTIVATIONS)

        router_kwargs = {"bias": router_bias}
        if router != DenseRouter.name:
            router_kwargs["normalize"] = normalize_weights
        self.router = ROUTERS[router](self.d_model, self.num_experts, self.top_k, **router_kwargs)
        expert_kwargs = {"activation": activation} if EXPERTS[expert] is MLPExperts else {}
        self.experts = EXPERTS[expert](self.num_experts, self.d_model, self.d_ff, d_out, **expert_kwargs)
        self.d_out = self.experts.d_out
        self.last_info: MoEInfo | None = None

    def extra_repr(self) -> str:
        cap = "dropless" if self.capacity_factor is None else f"capacity_factor={self.capacity_factor}"
        return (
            f"d_model={self.d_model}, d_ff={self.d_ff}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"router={self.router.name!r}, expert={self.experts.kind!r}, backend={self.backend!r}, {cap}"
        )

    def forward(self, x: Tensor, return_info: bool = False):
        """Route, dispatch, run the experts and combine.

        Args:
            x: ``[..., d_model]``; any number of leading dimensions, including zero tokens.
            return_info: also return the :class:`MoEInfo` of this pass.

        Returns:
            ``y`` of shape ``[..., d_out]``, or ``(y, info)`` when ``return_info`` is true.

        Raises:
            TypeError: ``x`` is not a tensor.
            ValueError: the last dimension of ``x`` is not ``d_model``.
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape [..., d_model={self.d_model}], got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"x must have last dimension d_model={self.d_model}, got shape {tuple(x.shape)}"
            )
        leading = x.shape[:-1]
        tokens = x.reshape(-1, self.d_model)
        routing = self.router(tokens)
        plan = make_plan(routing, self.capacity_factor)
        y = BACKENDS[self.backend](self.experts, tokens, plan)
        aux_losses = {
            "load_balance": load_balancing_loss(routing.probs, routing.experts),
            "z_loss": router_z_loss(routing.logits),
        }
        aux_loss = self.aux_loss_coef * aux_losses["load_balance"] + self.z_loss_coef * aux_losses["z_loss"]
        info = MoEInfo(routing=routing, plan=plan, aux_losses=aux_losses, aux_loss=aux_loss)
        self.last_info = info
        y = y.reshape(*leading, self.d_out)
        return (y, info) if return_info else y

    def expert_outputs(self, x: Tensor) -> Tensor:
        """Every expert on every token, ignoring the router: ``[..., d_model]`` -> ``[..., E, d_out]``.

        This is the ``h_i(x)`` of ``f(x) = Σ_i w_i(x) h_i(x)`` for all ``i`` — what an ensemble computes,
        used for plots and for losses that score each expert separately (Jacobs et al. 1991, eq. 3).
        """
        tokens = x.reshape(-1, self.d_model)
        stacked = tokens.unsqueeze(0).expand(self.num_experts, -1, -1)
        out = self.experts.forward_padded(stacked).transpose(0, 1)
        return out.reshape(*x.shape[:-1], self.num_experts, self.d_out)

    def active_flops_per_token(self) -> int:
        """FLOPs one token costs: the gate plus ``k`` experts (matmuls only, 2 per multiply-add)."""
        return 2 * self.d_model * self.num_experts + self.top_k * self.experts.flops_per_token()

    def num_parameters(self) -> dict[str, int]:
        """Total parameters and those one token uses (gate + ``k`` of the ``E`` experts)."""
        gate = sum(p.numel() for p in self.router.parameters())
        experts = sum(p.numel() for p in self.experts.parameters())
        return {"total": gate + experts, "active": gate + experts * self.top_k // self.num_experts}
