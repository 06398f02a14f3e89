"""The fused kernels as parts of :class:`~moe_lib.MoELayer`: a router and a dispatcher.

``MoELayer.forward`` is the library's one MoE forward (router → dispatcher → experts → combine); the kernels
plug into it rather than beside it::

    layer = MoELayer(d, f, E, k, router=FusedTopKRouter(d, E, k), dispatcher=KernelDispatcher(),
                     backend="triton")

* :class:`FusedTopKRouter` — :class:`~moe_lib.routers.TopKRouter` whose selection (softmax → top-k →
  renormalise) is the router kernel :func:`~moe_lib.kernels.route`.
* :class:`KernelDispatcher` — groups the assignments on the device with
  :func:`~moe_lib.kernels.permute_metadata` (no host synchronisation with ``impl="triton"``) and runs the gathered grouped GEMMs
  and the combine of :func:`~moe_lib.kernels.expert_ffn`. The :class:`~moe_lib.dispatch.DispatchPlan` that
  :class:`~moe_lib.MoEInfo` reports is deferred: made (by :func:`~moe_lib.dispatch.make_plan`) only if read.

Together they are what :func:`~moe_lib.kernels.fused_moe` computes from raw tensors (tested equal). The
``triton`` backend with the default :class:`~moe_lib.dispatch.TokenDispatcher` is the other configuration:
the plan is made in PyTorch (which allows a capacity with counted drops) and converted by
:func:`~moe_lib.kernels.metadata_from_plan`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._validate import check_choice
from ..dispatch import Dispatcher, DispatchPlan, make_plan
from ..routers import Routing, TopKRouter

#: Expert kinds the kernels run: gated FFNs without biases (SwiGLU, Shazeer 2020, eq. 6; GLU variants).
TRITON_EXPERTS = ("swiglu", "glu")


def run_bank(experts, x: Tensor, weights: Tensor, meta, impl: str = "triton") -> Tensor:
    """:func:`~moe_lib.kernels.expert_ffn` on a gated expert bank's weights: ``y[t] = Σ_j weights[t, j] ·
    FFN_{e(t,j)}(x_t)`` for the assignments described by ``meta``. The gate and up weights are interleaved
    for the kernels' wide GEMM (:func:`~moe_lib.kernels.gate_up_operand`: cached for inference, per call
    through autograd in training)."""
    from . import expert_ffn, gate_up_operand

    if experts.kind not in TRITON_EXPERTS or experts.d_out is None:
        raise ValueError(f"backend='triton' supports expert kinds {TRITON_EXPERTS} (gated FFNs without biases), "
                         f"got expert={experts.kind!r}; use backend='torch' or 'grouped_mm'")
    activation = getattr(experts, "activation", "silu")
    w_gu = gate_up_operand(experts.w_gate, experts.w_up, dtype=x.dtype)
    return expert_ffn(x, weights, meta, w_gu, None, experts.w_down.to(x.dtype), activation, impl=impl)


class FusedTopKRouter(TopKRouter):
    """:class:`~moe_lib.routers.TopKRouter` (Shazeer et al. 2017, eq. 3–5 without noise; Mixtral with
    ``k = 2``, Jiang et al. 2024, eq. 1) whose softmax → top-k → renormalise runs in the router kernel
    :func:`~moe_lib.kernels.route` (ties to the lower expert index). The gate, its init and the
    :class:`~moe_lib.routers.Routing` it returns are TopKRouter's, so everything downstream (auxiliary
    losses, metrics, any dispatcher) is unchanged. The arguments are :class:`~moe_lib.routers.TopKRouter`'s,
    and one more.

    Args:
        impl: ``"triton"`` (the kernel; Triton's interpreter on a machine without CUDA) or ``"torch"`` (its
            reference, :func:`~moe_lib.kernels.reference.route_ref`).
    """

    name = "fused_topk"

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, bias: bool = False, normalize: bool = True,
                 router_dtype: str = "float32", impl: str = "triton"):
        from . import IMPLS

        super().__init__(d_model, num_experts, top_k, bias=bias, normalize=normalize, router_dtype=router_dtype)
        self.impl = check_choice("impl", impl, IMPLS)

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Routing:
        from . import route

        logits = self.scores(x)
        weights, experts = route(logits, self.top_k, "softmax", self.normalize, impl=self.impl)
        return Routing(logits=logits, probs=self._softmax(logits), experts=experts.long(), weights=weights)

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}"


class KernelDispatcher(Dispatcher):
    """Dropless token dispatch by the kernels: :func:`~moe_lib.kernels.permute_metadata` groups the ``T·k``
    assignments by expert on the device (counts, offsets, a stable order and the tile schedule; with
    ``impl="triton"`` no host synchronisation — the torch reference reads the offsets back), and :func:`~moe_lib.kernels.expert_ffn` gathers the rows inside its first GEMM,
    applies the routing weight in the second's epilogue and sums each token's ``k`` rows in a fixed order.

    It runs the experts itself, so the layer's backend must be ``"triton"``. It takes routings with ``k``
    real assignments per token and no capacity: a routing that marks entries invalid (expert choice,
    GShard's second expert) or mixes tokens into slots (Soft MoE) is refused by name — use the layer's
    default dispatcher for those, or a capacity (``TokenDispatcher`` + ``backend="triton"``).

    Args:
        block_m: rows per tile, one of :data:`~moe_lib.kernels.config.BLOCK_M_CHOICES`; ``None`` picks from
            ``T·k / E``.
        impl: ``"triton"`` or ``"torch"`` (the kernels' references, same results).
    """

    name = "kernels"
    backends = ("triton",)

    def __init__(self, block_m: int | None = None, impl: str = "triton"):
        from . import IMPLS, _check_block_m

        super().__init__()
        if block_m is not None:
            _check_block_m(block_m, 0, 1)
        self.block_m = block_m
        self.impl = check_choice("impl", impl, IMPLS)

    def forward(self, experts, tokens, routing, backend):
        from . import permute_metadata

        if routing.is_soft or routing.valid is not None:
            kind = "Soft MoE slots" if routing.is_soft else "entries marked invalid (expert choice, GShard)"
            raise ValueError(f"KernelDispatcher dispatches k assignments per token; this routing has {kind}: "
                             "use the router's default dispatcher (MoELayer(dispatcher=None))")
        meta = permute_metadata(routing.experts, routing.num_experts, self.block_m, impl=self.impl)
        y = run_bank(experts, tokens, routing.weights.to(torch.float32), meta, impl=self.impl)
        return y, DispatchPlan.deferred(lambda: make_plan(routing))

    def extra_repr(self) -> str:
        return f"dropless, block_m={self.block_m}, impl={self.impl!r}"
