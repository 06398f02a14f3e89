"""``MoELayer``: router → dispatch → expert bank → weighted combine, as one ``nn.Module``."""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ._validate import check_choice, check_int, check_nonnegative_float, check_positive_float
from .backends import BACKENDS
from .dispatch import Dispatcher, DispatchPlan
from .experts import ACTIVATIONS, EXPERTS, ExpertBank
from .losses import auxiliary_losses
from .metrics import routing_stats
from .routers import ROUTERS, Router, Routing


@dataclass
class MoEInfo:
    """Everything a forward pass of :class:`MoELayer` decided, for losses, metrics and plots.

    Attributes:
        routing: the router's :class:`~moe_lib.routers.Routing` (logits, full softmax, chosen experts and
            their weights, per token of the flattened input).
        plan: the :class:`~moe_lib.dispatch.DispatchPlan` (rows grouped by expert, counts, drops; for Soft
            MoE the plan of the slots, :func:`~moe_lib.dispatch.slot_plan`).
        aux_losses: unweighted auxiliary losses by name (:class:`~moe_lib.losses.AuxTerms`):
            ``"load_balance"`` (Switch, eq. 4), ``"z_loss"`` (ST-MoE, eq. 5), ``"importance"`` (Shazeer 2017,
            eq. 6) and, for the noisy top-k router, ``"load"`` (Shazeer 2017, eq. 11). They carry gradients.
            The configured ones (coefficient > 0) were computed in the forward pass; the others are
            computed when read.
        aux_loss: their sum weighted by the layer's ``aux_loss_coef``, ``z_loss_coef``,
            ``importance_loss_coef`` and ``load_loss_coef``; add it to the training loss.
    """

    routing: Routing
    plan: DispatchPlan
    aux_losses: Mapping[str, Tensor] = field(default_factory=dict)
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
        top_k: experts per token (for ``"expert_choice"`` the average). ``None`` means the router's default:
            ``E`` for ``"dense"`` and ``"soft"``, 1 for ``"switch"``, ``"hash"`` and ``"base"``, 2 otherwise.
        router: ``"dense"`` (softmax over every expert, Jacobs et al. 1991), ``"topk"`` (Shazeer et al.
            2017 without noise; Mixtral with ``top_k=2``), ``"noisy_topk"`` (Shazeer et al. 2017),
            ``"switch"`` (Fedus et al. 2022), ``"gshard"`` (Lepikhin et al. 2021), ``"expert_choice"`` (Zhou
            et al. 2022), ``"hash"`` (Roller et al. 2021), ``"base"`` (Lewis et al. 2021), ``"soft"``
            (Puigcerver et al. 2024) or ``"auxfree"`` (Wang et al. 2024); see
            :mod:`moe_lib.routers`. Or a ready-made :class:`~moe_lib.routers.Router` (its ``d_model`` and
            ``num_experts`` must be the layer's; ``top_k`` and a capacity it owns come from it, and the
            options that configure a router — ``normalize_weights``, ``router_bias``, ``router_dtype``,
            ``router_options`` — are refused: set them on the router).
        expert: ``"linear"``, ``"mlp"`` or ``"swiglu"``; see :data:`moe_lib.experts.EXPERTS`. Or a
            ready-made :class:`~moe_lib.experts.ExpertBank` of the layer's sizes (``activation`` refused),
            e.g. experts upcycled from a dense FFN or merged from other layers.
        backend: ``"loop"`` (reference), ``"torch"`` (the default: each expert on its block of the grouped
            rows, no padding; faster than the loop on the CPU), ``"grouped_mm"``
            (``torch._grouped_mm``, no padding) or ``"triton"`` (the fused kernels of :mod:`moe_lib.kernels`,
            gated experts only); see :mod:`moe_lib.backends`.
        capacity_factor: ``None`` for dropless, else each expert processes at most
            ``ceil(capacity_factor · T · k / E)`` assignments and the rest are dropped and counted. For
            ``"expert_choice"`` it scales the number of tokens each expert takes (``None`` = 1). Soft MoE
            drops nothing, so a capacity for ``"soft"`` is an error. With a ready-made ``dispatcher`` it
            is the dispatcher's and is refused here.
        normalize_weights: renormalise the top-k weights to sum to 1 (``True``, Mixtral) or keep the raw
            gate probabilities (``False``, Switch). ``None`` (default) keeps the router's own convention:
            raw for ``"switch"``, renormalised for the other top-k routers. A router without that choice
            (dense, expert choice, hash, BASE, Soft MoE) refuses it, as ``"noisy_topk"`` and ``"gshard"``
            refuse ``False``: an option that would be ignored is an error.
        router_bias: give the gate a bias term (not for ``"hash"`` and ``"soft"``, which have no such gate).
        activation: hidden activation of ``mlp`` and ``glu`` experts (``"relu"``, ``"gelu"``, ``"silu"``,
            ``"tanh"``); ``None`` keeps the expert's default (GELU for ``mlp``, SiLU for ``glu``). Giving one
            to an expert kind without a free activation (``linear``, ``swiglu``) is an error.
        d_out: output width; ``None`` (default) keeps ``d_model`` so the output has the input's shape.
        aux_loss_coef: weight of the Switch load-balancing loss in ``info.aux_loss`` (Fedus et al. 2022 use
            0.01). ``None`` (default) takes the router's own default
            (:attr:`~moe_lib.routers.Router.default_aux_loss_coef`): 0.01 for the top-k routers whose choice
            the loss can balance, 0 for those it cannot or need not — ``"dense"`` (every expert is used: the
            loss is the constant 1), ``"expert_choice"``, ``"base"`` (balanced by construction),
            ``"hash"``, ``"soft"``, ``"auxfree"`` and ``"group_limited"`` (balanced by their bias).
        z_loss_coef: weight of the router z-loss in ``info.aux_loss`` (ST-MoE uses 0.001).
        importance_loss_coef: weight of Shazeer's importance loss ``CV(Importance)²`` (0.1 in the paper).
        load_loss_coef: weight of Shazeer's load loss ``CV(Load)²`` (0.1 in the paper); needs
            ``router="noisy_topk"``, whose noise defines the smooth load.
        router_dtype: ``"float32"`` (default, selective precision) or ``"bfloat16"`` for the router's
            logits and softmax.
        router_options: extra keyword arguments for the router class (e.g. ``{"slots_per_expert": 2}``
            for ``"soft"``, ``{"update_rate": 0.001}`` for ``"auxfree"``, ``{"hash_bits": 8}`` for ``"hash"``).
        dispatcher: ``None`` (default) takes the router's own (:meth:`~moe_lib.routers.Router.make_dispatcher`:
            token dispatch with ``capacity_factor``, or Soft MoE's slots), or a ready-made
            :class:`~moe_lib.dispatch.Dispatcher` — e.g. :class:`moe_lib.distributed.AllToAllDispatcher` for
            expert parallelism, where the expert bank holds this process's share of the experts.

    The forward pass is router → dispatcher (dispatch, experts through the backend, combine) → output; every
    variant in the library (Soft MoE, expert parallelism, the Triton kernels) is a part plugged into it.

    ``forward(x)`` takes ``[..., d_model]`` and returns ``[..., d_out]``. Routing details are reachable two
    ways: ``y, info = layer(x, return_info=True)`` returns a :class:`MoEInfo`, and ``layer.last_info``
    holds the most recent one. ``forward(x, token_ids=ids)`` passes integer token ids (shape
    ``x.shape[:-1]``) to routers that use them (``"hash"``). ``info.aux_loss`` is the weighted auxiliary loss to add to a training
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
        normalize_weights: bool | None = None,
        router_bias: bool = False,
        activation: str | None = None,
        d_out: int | None = None,
        aux_loss_coef: float | None = None,
        z_loss_coef: float = 0.0,
        importance_loss_coef: float = 0.0,
        load_loss_coef: float = 0.0,
        router_dtype: str = "float32",
        router_options: dict | None = None,
        dispatcher: Dispatcher | None = None,
    ):
        super().__init__()
        self.d_model = check_int("d_model", d_model, minimum=1)
        self.d_ff = check_int("d_ff", d_ff, minimum=1)
        self.num_experts = check_int("num_experts", num_experts, minimum=1)
        ready_router = router if isinstance(router, Router) else None
        ready_experts = expert if isinstance(expert, ExpertBank) else None
        if ready_router is not None:
            self._check_ready_router(ready_router, top_k, capacity_factor, normalize_weights=normalize_weights,
                                     router_bias=router_bias, router_dtype=router_dtype,
                                     router_options=router_options)
            router, router_cls = ready_router.name, type(ready_router)
            top_k = ready_router.top_k
            if ready_router.owns_capacity:
                capacity_factor = getattr(ready_router, "capacity_factor", None)
        else:
            router = check_choice("router", router, ROUTERS)
            router_cls = ROUTERS[router]
        if ready_experts is not None:
            self._check_ready_experts(ready_experts, d_out, activation)
            expert = ready_experts.kind
        else:
            expert = check_choice("expert", expert, EXPERTS)
        self._backend = check_choice("backend", backend, BACKENDS)
        if top_k is None:
            top_k = router_cls.default_top_k(self.num_experts)
        self.top_k = check_int("top_k", top_k, minimum=1, maximum=self.num_experts)
        capacity_factor = check_positive_float("capacity_factor", capacity_factor, allow_none=True)
        if dispatcher is not None:
            if not isinstance(dispatcher, Dispatcher):
                raise TypeError(f"dispatcher must be a moe_lib.dispatch.Dispatcher or None, got "
                                f"{type(dispatcher).__name__}")
            if capacity_factor is not None and ready_router is None:
                raise ValueError(f"capacity_factor={capacity_factor!r} configures the dispatcher the layer builds; "
                                 f"dispatcher= is a ready-made {type(dispatcher).__name__}: set it there")
        if aux_loss_coef is None:
            aux_loss_coef = router_cls.default_aux_loss_coef
        self.aux_loss_coef = check_nonnegative_float("aux_loss_coef", aux_loss_coef)
        self.z_loss_coef = check_nonnegative_float("z_loss_coef", z_loss_coef)
        self.importance_loss_coef = check_nonnegative_float("importance_loss_coef", importance_loss_coef)
        self.load_loss_coef = check_nonnegative_float("load_loss_coef", load_loss_coef)
        if self.load_loss_coef > 0 and not router_cls.smooth_load:
            takes = sorted(name for name, cls in ROUTERS.items() if cls.smooth_load)
            raise ValueError(
                f"load_loss_coef > 0 needs a router with Shazeer's smooth load (defined by the router noise): "
                f"router in {takes}, got router={router!r}; use aux_loss_coef for other routers"
            )
        expert_accepts = {} if ready_experts is not None else inspect.signature(EXPERTS[expert].__init__).parameters
        if activation is not None and ready_experts is None:
            check_choice("activation", activation, ACTIVATIONS)
            if "activation" not in expert_accepts:
                takes = sorted(k for k, c in EXPERTS.items() if "activation" in inspect.signature(c.__init__).parameters)
                raise ValueError(
                    f"activation={activation!r} has no effect on expert={expert!r}; it applies to expert in {takes}"
                )
        if router_options is not None and not isinstance(router_options, dict):
            raise TypeError(f"router_options must be a dict or None, got {type(router_options).__name__}")

        accepted = inspect.signature(router_cls.__init__).parameters
        router_kwargs = {"bias": router_bias, "router_dtype": router_dtype}
        if normalize_weights is not None and ready_router is None:  # an option the router would ignore is an error, never dropped
            if "normalize" not in accepted:
                takes = sorted(k for k, c in ROUTERS.items() if "normalize" in inspect.signature(c.__init__).parameters)
                raise ValueError(
                    f"normalize_weights has no effect on router={router!r}; it applies to router in {takes}"
                )
            router_kwargs["normalize"] = normalize_weights
        if capacity_factor is not None and not router_cls.uses_capacity:
            raise ValueError(
                f"capacity_factor has no effect on router={router!r} (it drops nothing); leave it None"
            )
        if "capacity_factor" in accepted:
            router_kwargs["capacity_factor"] = capacity_factor
        for key in (router_options or {}) if ready_router is None else ():
            if key not in accepted or key in ("self", "d_model", "num_experts", "top_k"):
                options = sorted(k for k in accepted if k not in ("self", "d_model", "num_experts", "top_k"))
                raise ValueError(f"router_options key {key!r} is not accepted by router={router!r}; accepted: {options}")
        router_kwargs.update(router_options or {})
        if ready_router is not None:
            self.router = ready_router
        else:
            self.router = router_cls(self.d_model, self.num_experts, self.top_k, **router_kwargs)
        # registered in the order of the data path (router, dispatcher, experts), as print(layer) shows it
        self.dispatcher = dispatcher if dispatcher is not None else self.router.make_dispatcher(capacity_factor)
        if ready_experts is not None:
            self.experts = ready_experts
        else:
            expert_kwargs = {"activation": activation} if activation is not None else {}
            self.experts = EXPERTS[expert](self.num_experts, self.d_model, self.d_ff, d_out, **expert_kwargs)
        held = self.dispatcher.num_local_experts(self.num_experts)
        if self.experts.num_experts != held:
            needs = (f"the layer num_experts={held}" if held == self.num_experts else
                     f"the {type(self.dispatcher).__name__} needs {held} of the layer's num_experts={self.num_experts}")
            raise ValueError(f"expert bank has num_experts={self.experts.num_experts}, {needs}")
        self.d_out = self.experts.d_out
        self._check_backend()
        self.last_info: MoEInfo | None = None

    def _check_ready_router(self, router, top_k, capacity_factor, **configuring) -> None:
        """A ready-made router must fit the layer, and options that would configure a router built by name
        are refused rather than silently ignored."""
        for name, value in (("d_model", self.d_model), ("num_experts", self.num_experts)):
            if getattr(router, name) != value:
                raise ValueError(f"router has {name}={getattr(router, name)}, the layer {name}={value}")
        if top_k is not None and top_k != router.top_k:
            raise ValueError(f"top_k={top_k} differs from the ready-made router's top_k={router.top_k}; "
                             "leave top_k None")
        signature = inspect.signature(MoELayer.__init__).parameters  # the defaults: nothing to configure
        for name, value in configuring.items():
            if value != signature[name].default:
                raise ValueError(f"{name}={value!r} configures a router built by name; router= is a ready-made "
                                 f"{type(router).__name__}: set it there")
        if router.owns_capacity and capacity_factor is not None and \
                capacity_factor != getattr(router, "capacity_factor", None):
            raise ValueError(f"capacity_factor={capacity_factor!r}: the ready-made {type(router).__name__} "
                             f"enforces its own (capacity_factor={getattr(router, 'capacity_factor', None)!r})")

    def _check_ready_experts(self, experts, d_out, activation) -> None:
        """A ready-made expert bank must fit the layer; ``activation`` would configure one built by name.
        (Its expert count is checked against the dispatcher, which may shard the experts.)"""
        sizes = [("d_model", self.d_model)]
        if experts.kind != "linear":  # linear experts have no hidden layer
            sizes.append(("d_ff", self.d_ff))
        if d_out is not None:
            sizes.append(("d_out", d_out))
        for name, value in sizes:
            if getattr(experts, name) != value:
                raise ValueError(f"expert bank has {name}={getattr(experts, name)}, the layer {name}={value}")
        if activation is not None:
            raise ValueError(f"activation={activation!r} configures experts built by name; expert= is a "
                             f"ready-made {type(experts).__name__}: set it there")

    @property
    def capacity_factor(self) -> float | None:
        """The capacity in force: the router's when it enforces its own (expert choice), else the
        dispatcher's (``None``: dropless)."""
        if self.router.owns_capacity:
            return getattr(self.router, "capacity_factor", None)
        return self.dispatcher.capacity_factor

    @property
    def backend(self) -> str:
        """How the experts run (:data:`moe_lib.backends.BACKENDS`); assigning a name checks it at once."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        value = check_choice("backend", value, BACKENDS)
        if "experts" in self._modules:
            self._check_backend(value)
        self._backend = value  # only once accepted: a refused assignment leaves the layer as it was

    def _check_backend(self, backend: str | None = None) -> None:
        """The expert bank and the dispatcher can run on ``backend`` (default: the layer's); each lists the
        backends it implements."""
        backend = self._backend if backend is None else backend
        supported = getattr(self.experts, "backends", None)
        if supported is not None and backend not in supported:
            raise ValueError(
                f"backend={backend!r} cannot run {type(self.experts).__name__} (expert="
                f"{self.experts.kind!r}); it runs on backend in {list(supported)}"
            )
        supported = self.dispatcher.backends
        if supported is not None and backend not in supported:
            raise ValueError(f"backend={backend!r} cannot run with dispatcher={type(self.dispatcher).__name__}, "
                             f"which runs the experts itself: it runs on backend in {list(supported)}")

    def __getstate__(self) -> dict:
        """Copies and pickles leave ``last_info`` out: it holds the last pass's autograd graph, which
        ``copy.deepcopy`` cannot copy (a layer could not be copied after a training step)."""
        state = super().__getstate__()
        return {**state, "last_info": None}

    def extra_repr(self) -> str:
        cap = "dropless" if self.capacity_factor is None else f"capacity_factor={self.capacity_factor}"
        return (
            f"d_model={self.d_model}, d_ff={self.d_ff}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"router={self.router.name!r}, expert={self.experts.kind!r}, backend={self.backend!r}, {cap}"
        )

    def forward(self, x: Tensor, return_info: bool = False, token_ids: Tensor | None = None):
        """Route, dispatch, run the experts and combine.

        Args:
            x: ``[..., d_model]``; any number of leading dimensions, including zero tokens.
            return_info: also return the :class:`MoEInfo` of this pass.
            token_ids: optional integer tensor of shape ``x.shape[:-1]`` for routers that route by token
                id (``"hash"``); ignored by the others.

        Returns:
            ``y`` of shape ``[..., d_out]``, or ``(y, info)`` when ``return_info`` is true.

        Raises:
            TypeError: ``x`` is not a floating-point tensor, ``token_ids`` is not an integer tensor.
            ValueError: the last dimension of ``x`` is not ``d_model``, or ``token_ids`` has the wrong shape.
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape [..., d_model={self.d_model}], got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(
                f"x must be a floating-point tensor of features [..., d_model={self.d_model}], got dtype "
                f"{x.dtype}; token ids go through an embedding first (hash routing takes them as token_ids=)"
            )
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"x must have last dimension d_model={self.d_model}, got shape {tuple(x.shape)}"
            )
        leading = x.shape[:-1]
        if token_ids is not None:
            if not isinstance(token_ids, Tensor) or token_ids.is_floating_point() or token_ids.is_complex():
                raise TypeError(f"token_ids must be an integer torch.Tensor of shape {tuple(leading)} or None")
            if token_ids.shape != leading:
                raise ValueError(f"token_ids must have shape x.shape[:-1] = {tuple(leading)}, got {tuple(token_ids.shape)}")
            token_ids = token_ids.reshape(-1)
        self._check_backend()  # the expert bank may have been replaced since the backend was chosen
        tokens = x.reshape(-1, self.d_model)
        routing = self.router(tokens, token_ids=token_ids)
        y, plan = self.dispatcher(self.experts, tokens, routing, BACKENDS[self._backend])
        aux_losses, aux_loss = self.auxiliary_losses(routing)
        info = MoEInfo(routing=routing, plan=plan, aux_losses=aux_losses, aux_loss=aux_loss)
        self.last_info = info
        y = y.reshape(*leading, self.d_out)
        return (y, info) if return_info else y

    def auxiliary_losses(self, routing: Routing) -> tuple[dict[str, Tensor], Tensor]:
        """The auxiliary terms of ``routing`` by name and their sum weighted by this layer's coefficients
        (:func:`moe_lib.losses.auxiliary_losses`)."""
        return auxiliary_losses(routing, aux_loss_coef=self.aux_loss_coef, z_loss_coef=self.z_loss_coef,
                                importance_loss_coef=self.importance_loss_coef, load_loss_coef=self.load_loss_coef)

    def expert_outputs(self, x: Tensor) -> Tensor:
        """Every expert on every token, ignoring the router: ``[..., d_model]`` -> ``[..., E, d_out]``.

        This is the ``h_i(x)`` of ``f(x) = Σ_i w_i(x) h_i(x)`` for all ``i`` — what an ensemble computes,
        used for plots and for losses that score each expert separately (Jacobs et al. 1991, eq. 3).
        """
        tokens = x.reshape(-1, self.d_model)
        stacked = tokens.unsqueeze(0).expand(self.num_experts, -1, -1)
        out = self.experts.forward_padded(stacked).transpose(0, 1)
        return out.reshape(*x.shape[:-1], self.num_experts, self.d_out)

    def active_flops_per_token(self, num_tokens: int | None = None) -> float:
        """FLOPs one token costs: the gate plus ``k`` experts (matmuls only, 2 per multiply-add).

        Soft MoE has no per-token expert count: its ``S = E·p`` slots are shared by the batch, so the cost
        per token depends on ``num_tokens`` ``T`` (required there): the router's slot logits, dispatch and
        combine matmuls, and ``S/T`` expert passes (Puigcerver et al. 2024)."""
        passes = self.router.expert_passes_per_token(num_tokens)
        return self.router.flops_per_token() + passes * self.experts.flops_per_token()

    def num_parameters(self) -> dict[str, int]:
        """Total parameters and those one token uses (gate + ``k`` of the ``E`` experts)."""
        gate = sum(p.numel() for p in self.router.parameters())
        experts = sum(p.numel() for p in self.experts.parameters())
        return {"total": gate + experts, "active": gate + experts * self.top_k // self.num_experts}
