"""Hugging Face ``transformers`` sparse-MoE blocks -> moe_lib modules with the same outputs.

:func:`from_transformers` reads an *instantiated* block (a random small config or a loaded checkpoint —
this module never downloads anything), copies its weights into a :class:`moe_lib.MoELayer` (router ->
dispatch -> expert bank -> combine) plus the family's shared expert, and returns a
:class:`ConvertedMoEBlock` whose ``forward(hidden_states)`` equals the block's in evaluation mode.

How each family's routing maps onto moe_lib (``FAMILIES`` holds the same table as data):

============== ========= ====================== ===================== ==============================
family          scores    selection              gate value            extra
============== ========= ====================== ===================== ==============================
Mixtral         softmax   top-k                  renormalised          —
Qwen2-MoE       softmax   top-k                  ``norm_topk_prob``    shared expert · σ(x W_sg)
Qwen3-MoE       softmax   top-k                  ``norm_topk_prob``    —
OLMoE           softmax   top-k                  ``norm_topk_prob``    —
DeepSeek-V3     sigmoid   top-k of s + b within  ``norm_topk_prob``,   shared experts (ungated)
                          ``topk_group`` groups  × scaling factor
Switch          softmax   top-1, capacity per    raw probability       overflow dropped (zero output)
                          sequence
============== ========= ====================== ===================== ==============================

Weight layouts: the installed transformers (5.x) stores experts fused, ``gate_up_proj [E, 2F, d]`` and
``down_proj [E, d, F]`` applied with ``F.linear``; older releases (4.x) use a ``ModuleList`` of per-expert
MLPs (``w1``/``w3``/``w2`` for Mixtral, ``gate_proj``/``up_proj``/``down_proj`` for the others). Both are
read. Switch Transformers keeps one ``wi``/``wo`` MLP per expert in every release.

Training-only behaviour is not reproduced: Mixtral's and Switch's input jitter
(``router_jitter_noise``) and Switch's expert dropout act only in ``train()`` mode, so equivalence is
an evaluation-mode property.
"""
from __future__ import annotations

import math
import statistics
import warnings

import torch
from torch import Tensor, nn

from ..experts import ACTIVATIONS, GLUExperts, MLPExperts, SwiGLUExperts
from ..layer import MoEInfo, MoELayer
from ..utils import relative_norm_error

#: Hugging Face block class name -> family key of :data:`FAMILIES`.
SUPPORTED_BLOCKS: dict[str, str] = {
    "MixtralSparseMoeBlock": "mixtral",
    "Qwen2MoeSparseMoeBlock": "qwen2_moe",
    "Qwen3MoeSparseMoeBlock": "qwen3_moe",
    "OlmoeSparseMoeBlock": "olmoe",
    "DeepseekV3MoE": "deepseek_v3",
    "SwitchTransformersSparseMLP": "switch_transformers",
}

#: How each family routes, in moe_lib's terms (the chapter 10 table).
FAMILIES: dict[str, dict[str, str]] = {
    "mixtral": {"name": "Mixtral", "scores": "softmax", "top_k": "num_experts_per_tok",
                "normalisation": "always", "shared experts": "none", "group limit": "none",
                "selection bias": "none", "scaling": "none", "moe_lib router": "topk"},
    "qwen2_moe": {"name": "Qwen2-MoE", "scores": "softmax", "top_k": "num_experts_per_tok",
                  "normalisation": "norm_topk_prob", "shared experts": "1, gated by sigmoid(x W)",
                  "group limit": "none", "selection bias": "none", "scaling": "none", "moe_lib router": "topk"},
    "qwen3_moe": {"name": "Qwen3-MoE", "scores": "softmax", "top_k": "num_experts_per_tok",
                  "normalisation": "norm_topk_prob", "shared experts": "none", "group limit": "none",
                  "selection bias": "none", "scaling": "none", "moe_lib router": "topk"},
    "olmoe": {"name": "OLMoE", "scores": "softmax", "top_k": "num_experts_per_tok",
              "normalisation": "norm_topk_prob", "shared experts": "none", "group limit": "none",
              "selection bias": "none", "scaling": "none", "moe_lib router": "topk"},
    "deepseek_v3": {"name": "DeepSeek-V3", "scores": "sigmoid", "top_k": "num_experts_per_tok",
                    "normalisation": "norm_topk_prob", "shared experts": "n_shared_experts, ungated",
                    "group limit": "topk_group of n_group", "selection bias": "e_score_correction_bias",
                    "scaling": "routed_scaling_factor", "moe_lib router": "group_limited"},
    "switch_transformers": {"name": "Switch", "scores": "softmax", "top_k": "1",
                            "normalisation": "none (raw probability)", "shared experts": "none",
                            "group limit": "none", "selection bias": "none",
                            "scaling": "none; expert_capacity per sequence", "moe_lib router": "group_capacity"},
}


def block_family(block) -> str:
    """The :data:`FAMILIES` key of a Hugging Face block (its class or a base class, by name)."""
    if isinstance(block, nn.Module):
        for cls in type(block).__mro__:
            if cls.__name__ in SUPPORTED_BLOCKS and cls.__module__.startswith("transformers"):
                return SUPPORTED_BLOCKS[cls.__name__]
    raise TypeError(
        "block must be an instantiated Hugging Face sparse-MoE block, one of "
        f"{', '.join(sorted(SUPPORTED_BLOCKS))}; got {type(block).__module__}.{type(block).__name__}"
    )


class ConvertedMoEBlock(nn.Module):
    """A Hugging Face MoE block rebuilt on :class:`moe_lib.MoELayer`.

    ``y = MoELayer(x) + g(x) · shared(x)``: the routed experts through moe_lib's router -> dispatch ->
    expert bank -> combine path, plus the family's shared expert (``g(x) = σ(x W_sg)`` for Qwen2-MoE,
    ``g = 1`` for DeepSeek-V3; absent elsewhere).

    Attributes:
        family: key of :data:`FAMILIES`.
        moe: the :class:`~moe_lib.MoELayer` of the routed experts (``moe.router``, ``moe.experts``).
        shared_expert: a one-expert bank (``None`` when the family or config has none).
        shared_expert_gate: ``nn.Linear(d, 1)`` of Qwen2-MoE's sigmoid gate, else ``None``.
        last_info: the :class:`~moe_lib.MoEInfo` of the last forward pass (router logits, routing, plan).
    """

    def __init__(self, family: str, moe: MoELayer, shared_expert: nn.Module | None = None,
                 shared_expert_gate: nn.Linear | None = None):
        super().__init__()
        self.family = family
        self.moe = moe
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate

    @property
    def backend(self) -> str:
        """The moe_lib backend the routed experts run on (``"loop"``, ``"torch"``); assignable."""
        return self.moe.backend

    @backend.setter
    def backend(self, value: str) -> None:
        from .._validate import check_choice
        from ..backends import BACKENDS

        self.moe.backend = check_choice("backend", value, BACKENDS)

    @property
    def last_info(self) -> MoEInfo | None:
        return self.moe.last_info

    def extra_repr(self) -> str:
        return f"family={self.family!r}"

    def forward(self, hidden_states: Tensor, return_info: bool = False):
        """``hidden_states [..., d]`` (Switch: ``[batch, seq, d]``, capacity is per sequence) -> same shape.

        With ``return_info=True`` also returns the :class:`~moe_lib.MoEInfo`: ``info.routing.logits`` are
        the router logits the Hugging Face router computes, ``info.routing.experts``/``weights`` its
        choices and gate values.
        """
        if not isinstance(hidden_states, Tensor):
            raise TypeError(f"hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}")
        router = self.moe.router
        if hasattr(router, "group_size") and router.owns_capacity:
            router.group_size = hidden_states.shape[-2] if hidden_states.dim() >= 2 else None
        y, info = self.moe(hidden_states, return_info=True)
        if self.shared_expert is not None:
            tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
            shared = self.shared_expert.forward_expert(0, tokens)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(tokens)) * shared
            y = y + shared.reshape(y.shape)
        return (y, info) if return_info else y


# ------------------------------------------------------------------------------------ weight reading
def _activation_name(act) -> str:
    """Which of moe_lib's :data:`~moe_lib.experts.ACTIVATIONS` a Hugging Face activation module computes,
    decided by evaluating both on a probe grid (robust to class renames across releases)."""
    probe = torch.linspace(-6, 6, 241, dtype=torch.float64)
    with torch.no_grad():
        out = act(probe)
    for name, fn in ACTIVATIONS.items():
        if torch.allclose(out, fn(probe), rtol=0, atol=1e-7):
            return name
    raise ValueError(
        f"the block's expert activation {type(act).__name__} is not one moe_lib supports; accepted: "
        f"{', '.join(sorted(ACTIVATIONS))}"
    )


def _mlp_weights(mlp: nn.Module) -> tuple[Tensor, Tensor, Tensor, nn.Module]:
    """``(W_gate [d, F], W_up [d, F], W_down [F, d], act)`` of one gated MLP module (``x @ W`` layout)."""
    for gate, up, down in (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")):
        if all(hasattr(mlp, n) for n in (gate, up, down)):
            act = getattr(mlp, "act_fn", None) or getattr(mlp, "act", None)
            return (getattr(mlp, gate).weight.t(), getattr(mlp, up).weight.t(), getattr(mlp, down).weight.t(), act)
    raise TypeError(f"unrecognised expert MLP {type(mlp).__name__}: expected gate_proj/up_proj/down_proj or w1/w3/w2")


def _gated_expert_weights(experts: nn.Module, d_model: int) -> tuple[Tensor, Tensor, Tensor, str]:
    """Stacked ``(W_gate [E, d, F], W_up [E, d, F], W_down [E, F, d], activation)`` of a routed-expert
    container, fused (``gate_up_proj``/``down_proj`` parameters) or a ``ModuleList`` of MLPs."""
    if hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj"):
        gate_up, down = experts.gate_up_proj, experts.down_proj
        if gate_up.dim() != 3 or down.dim() != 3:
            raise TypeError(f"expected 3-D fused expert weights, got {tuple(gate_up.shape)} and {tuple(down.shape)}")
        if getattr(experts, "has_bias", False) or not getattr(experts, "has_gate", True):
            raise TypeError(f"{type(experts).__name__}: experts with biases or without a gate are not supported")
        # transformers >= 5 flags the layout; before that the F.linear layout [E, out, in] was the only one
        transposed = getattr(experts, "is_transposed", None)
        if transposed is None:
            transposed = not (gate_up.shape[2] == d_model and down.shape[1] == d_model)
        if not transposed:
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)  # -> x @ W layout [E, in, out]
        if gate_up.shape[1] != d_model or down.shape[2] != d_model or gate_up.shape[2] != 2 * down.shape[1]:
            raise TypeError(f"unrecognised fused expert layout gate_up_proj {tuple(experts.gate_up_proj.shape)}, "
                            f"down_proj {tuple(experts.down_proj.shape)} for d_model={d_model}")
        d_ff = down.shape[1]
        if getattr(experts, "is_concatenated", True):
            w_gate, w_up = gate_up[..., :d_ff], gate_up[..., d_ff:]
        else:  # interleaved [g0, u0, g1, u1, ...]
            w_gate, w_up = gate_up[..., 0::2], gate_up[..., 1::2]
        return w_gate, w_up, down, _activation_name(experts.act_fn)
    if isinstance(experts, (nn.ModuleList, nn.ModuleDict)):
        mlps = list(experts.values() if isinstance(experts, nn.ModuleDict) else experts)
        parts = [_mlp_weights(m) for m in mlps]
        stack = [torch.stack([p[i] for p in parts]) for i in range(3)]
        return stack[0], stack[1], stack[2], _activation_name(parts[0][3])
    raise TypeError(f"unrecognised expert container {type(experts).__name__}")


def _gated_bank(w_gate: Tensor, w_up: Tensor, w_down: Tensor, activation: str) -> SwiGLUExperts:
    options = {} if activation == "silu" else {"activation": activation}
    bank = (SwiGLUExperts if activation == "silu" else GLUExperts).from_weights(w_gate, w_up, w_down, **options)
    bank.consume_init_draws()  # keeps the seeded RNG stream of earlier releases, which drew an init here
    return bank


def _shared_bank(mlp: nn.Module | None) -> SwiGLUExperts | None:
    """A one-expert bank holding a shared-expert MLP, or ``None`` when absent or of width 0."""
    if mlp is None:
        return None
    w_gate, w_up, w_down, act = _mlp_weights(mlp)
    if w_gate.shape[1] == 0:
        return None
    return _gated_bank(w_gate.unsqueeze(0), w_up.unsqueeze(0), w_down.unsqueeze(0), _activation_name(act))


def _attr(obj, *names, default=None):
    for n in names:
        if hasattr(obj, n):
            return getattr(obj, n)
    return default


# ------------------------------------------------------------------------------------ conversion
def from_transformers(block: nn.Module, backend: str = "torch") -> ConvertedMoEBlock:
    """Rebuild a Hugging Face sparse-MoE block on moe_lib, with the same outputs.

    Args:
        block: an instantiated ``MixtralSparseMoeBlock``, ``Qwen2MoeSparseMoeBlock`` (routed experts +
            shared expert with its sigmoid gate), ``Qwen3MoeSparseMoeBlock``, ``OlmoeSparseMoeBlock``,
            ``DeepseekV3MoE`` (routed + shared experts; sigmoid scores, group-limited, bias-corrected
            selection, ``routed_scaling_factor``, ``norm_topk_prob``) or ``SwitchTransformersSparseMLP``
            (top-1, ``expert_capacity`` per sequence). Weights are copied; the block is not modified.
        backend: moe_lib backend for the routed experts, ``"loop"`` or ``"torch"``.

    Returns:
        a :class:`ConvertedMoEBlock` on the block's device and dtype, in the block's train/eval mode,
        whose ``forward(hidden_states)`` returns the block's output (fp32 relative error ~1e-7).

    Raises:
        TypeError: ``block`` is not one of the supported classes (the message lists them) or its weight
            layout is not recognised.
        ValueError: its activation or router precision has no moe_lib equivalent.

    Example (random weights, nothing downloaded)::

        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        block = MixtralSparseMoeBlock(MixtralConfig(hidden_size=32, intermediate_size=64)).eval()
        layer = moe_lib.from_transformers(block)   # layer(x) == block(x)
    """
    family = block_family(block)
    ref = next(block.parameters())
    if family == "switch_transformers":
        converted = _convert_switch(block, backend)
    else:
        converted = _convert_gated(block, family, backend)
    return converted.to(device=ref.device, dtype=ref.dtype).train(block.training)


def _convert_gated(block: nn.Module, family: str, backend: str) -> ConvertedMoEBlock:
    gate = block.gate
    router_weight = gate.weight  # [E, d]: a parameter of the router module, or of an nn.Linear (4.x)
    num_experts, d_model = router_weight.shape
    w_gate, w_up, w_down, activation = _gated_expert_weights(block.experts, d_model)
    if w_gate.shape[0] != num_experts:
        raise TypeError(f"router has {num_experts} experts but the expert weights hold {w_gate.shape[0]}")
    top_k = int(_attr(gate, "top_k", default=_attr(block, "top_k", "num_experts_per_tok")))
    normalize = bool(_attr(gate, "norm_topk_prob", default=_attr(block, "norm_topk_prob", default=True)))
    from ..routers import ROUTERS

    experts = _gated_bank(w_gate, w_up, w_down, activation)
    has_bias = getattr(gate, "bias", None) is not None
    if family == "deepseek_v3":
        router = ROUTERS["group_limited"](d_model, num_experts, top_k, bias=has_bias, normalize=normalize,
                                          score="sigmoid", n_group=int(_attr(gate, "num_group", "n_group")),
                                          topk_group=int(gate.topk_group),
                                          scaling_factor=float(gate.routed_scaling_factor))
    else:
        router = ROUTERS["topk"](d_model, num_experts, top_k, bias=has_bias, normalize=normalize)
    router.to(router_weight.dtype)
    with torch.no_grad():  # the new router takes the block's weights before it is injected
        router.gate.weight.copy_(router_weight)
        if has_bias:
            router.gate.bias.copy_(gate.bias)
        if family == "deepseek_v3":
            router.score_bias.copy_(gate.e_score_correction_bias)
    moe = MoELayer(d_model, w_gate.shape[2], num_experts, router=router, expert=experts, backend=backend,
                   aux_loss_coef=0.0)
    shared = _shared_bank(_attr(block, "shared_expert", "shared_experts"))
    shared_gate = None
    if shared is not None and getattr(block, "shared_expert_gate", None) is not None:
        src = block.shared_expert_gate
        shared_gate = nn.Linear(d_model, 1, bias=src.bias is not None)
        shared_gate.load_state_dict(src.state_dict())
    return ConvertedMoEBlock(family, moe, shared, shared_gate)


def _convert_switch(block: nn.Module, backend: str) -> ConvertedMoEBlock:
    from ..routers import ROUTERS

    classifier = block.router.classifier
    num_experts, d_model = classifier.weight.shape
    mlps = [block.experts[f"expert_{e}"] for e in range(num_experts)]
    d_ff = mlps[0].wi.weight.shape[0]
    activation = _activation_name(mlps[0].act)
    dtype = getattr(block.router, "dtype", torch.float32)
    router_dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(dtype)
    if router_dtype is None:
        raise ValueError(f"Switch router_dtype {dtype} has no moe_lib equivalent; accepted: float32, bfloat16")
    w1, w2 = torch.stack([m.wi.weight.t() for m in mlps]), torch.stack([m.wo.weight.t() for m in mlps])
    experts = MLPExperts.from_weights(w1, w1.new_zeros(num_experts, d_ff), w2, w2.new_zeros(num_experts, d_model),
                                      activation=activation)
    experts.consume_init_draws()  # keeps the seeded RNG stream of earlier releases, which drew an init here
    router = ROUTERS["group_capacity"](d_model, num_experts, 1, bias=classifier.bias is not None,
                                       router_dtype=router_dtype, expert_capacity=int(block.router.expert_capacity))
    router.to(classifier.weight.dtype)
    with torch.no_grad():  # the new router takes the block's weights before it is injected
        router.gate.weight.copy_(classifier.weight)
        if classifier.bias is not None:
            router.gate.bias.copy_(classifier.bias)
    moe = MoELayer(d_model, d_ff, num_experts, router=router, expert=experts, backend=backend, aux_loss_coef=0.0)
    return ConvertedMoEBlock("switch_transformers", moe)


# ------------------------------------------------------------------------------------ random blocks
#: family -> (transformers module, config class, block class, small default config).
_RANDOM = {
    "mixtral": ("mixtral", "MixtralConfig", "MixtralSparseMoeBlock",
                {"hidden_size": 32, "intermediate_size": 48, "num_local_experts": 8, "num_experts_per_tok": 2}),
    "qwen2_moe": ("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeSparseMoeBlock",
                  {"hidden_size": 32, "moe_intermediate_size": 24, "shared_expert_intermediate_size": 48,
                   "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": False}),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeSparseMoeBlock",
                  {"hidden_size": 32, "moe_intermediate_size": 24, "num_experts": 16, "num_experts_per_tok": 4,
                   "norm_topk_prob": True}),
    "olmoe": ("olmoe", "OlmoeConfig", "OlmoeSparseMoeBlock",
              {"hidden_size": 32, "intermediate_size": 24, "num_experts": 16, "num_experts_per_tok": 4,
               "norm_topk_prob": False}),
    "deepseek_v3": ("deepseek_v3", "DeepseekV3Config", "DeepseekV3MoE",
                    {"hidden_size": 32, "moe_intermediate_size": 16, "n_routed_experts": 16,
                     "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2, "n_shared_experts": 1,
                     "routed_scaling_factor": 2.5, "norm_topk_prob": True}),
    "switch_transformers": ("switch_transformers", "SwitchTransformersConfig", "SwitchTransformersSparseMLP",
                            {"d_model": 32, "d_ff": 48, "num_experts": 8, "expert_capacity": 4}),
}


INSTALL_HINT = "pip install moe-lib[interop]"


def require_transformers(caller: str):
    """Import ``transformers`` (>= 5) for ``caller`` or raise an ImportError that names the extra."""
    try:
        import transformers
    except ImportError:
        raise ImportError(f"{caller} needs Hugging Face transformers; install it with `{INSTALL_HINT}`") from None
    major = int(str(transformers.__version__).split(".")[0])
    if major < 5:
        raise ImportError(
            f"{caller} follows the transformers 5 block interface; installed transformers "
            f"{transformers.__version__}; upgrade with `{INSTALL_HINT}`"
        )
    return transformers


def random_block(family: str, *, seed: int = 0, bias_std: float = 0.1, experts_implementation: str = "eager",
                 **config) -> nn.Module:
    """A Hugging Face block of ``family`` with a small random config, in eval mode — nothing downloaded.

    ``config`` overrides the small defaults (e.g. ``num_experts_per_tok=3``, ``norm_topk_prob=True``,
    ``n_shared_experts=0``). Every parameter is drawn ``N(0, 1/fan_in)`` from ``seed`` (the blocks'
    own initialisers leave fused expert weights uninitialised and Qwen/OLMoE routers at zero, which would
    make top-k ties); DeepSeek-V3's ``e_score_correction_bias`` is drawn ``N(0, bias_std²)`` so the
    bias-corrected selection differs from the plain one. ``experts_implementation`` picks Hugging Face's
    expert kernel (``"eager"``: its per-expert loop; ``"batched_mm"``, ``"grouped_mm"``). Needs
    ``transformers``.
    """
    from .._validate import check_choice

    check_choice("family", family, _RANDOM)
    require_transformers("moe_lib.interop.random_block")
    import importlib

    module_name, config_name, block_name, defaults = _RANDOM[family]
    module = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    config_cls = getattr(importlib.import_module(f"transformers.models.{module_name}"), config_name)
    cfg = config_cls(**{**defaults, **config})
    cfg._experts_implementation = experts_implementation
    with warnings.catch_warnings():  # a shared expert of width 0 ("off") makes empty nn.Linear layers
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        block = getattr(module, block_name)(cfg)
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for name, p in sorted(block.named_parameters()):
            fan_in = p.shape[-1] if p.dim() > 1 else p.shape[0]
            p.copy_(torch.randn(p.shape, generator=gen) / max(fan_in, 1) ** 0.5)
        for name, buf in sorted(block.named_buffers()):
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=gen) * bias_std)
    return block.eval()


# ------------------------------------------------------------------------------------ checking
@torch.no_grad()
def hf_routing(block: nn.Module, hidden_states: Tensor) -> dict[str, Tensor]:
    """What the Hugging Face block's own router decides for ``hidden_states [batch, seq, d]``:
    ``logits [T, E]``, ``experts [T, k]`` (sorted ids), ``weights [T, k]`` (gate values in the same
    order), ``kept [T, k]`` (False where Switch's capacity dropped the token)."""
    family = block_family(block)
    d = hidden_states.shape[-1]
    if family == "switch_transformers":
        one_hot, top_p, logits = block.router(hidden_states)
        logits = logits.reshape(-1, logits.shape[-1])
        experts = logits.argmax(-1, keepdim=True)
        kept = one_hot.reshape(-1, logits.shape[-1]).sum(-1, keepdim=True) > 0
        return {"logits": logits, "experts": experts, "weights": top_p.reshape(-1, 1) * kept, "kept": kept}
    logits, weights, experts = block.gate(hidden_states.reshape(-1, d))
    experts, order = experts.sort(dim=-1)
    return {"logits": logits, "experts": experts, "weights": weights.gather(1, order),
            "kept": torch.ones_like(experts, dtype=torch.bool)}


@torch.no_grad()
def equivalence(block: nn.Module, hidden_states: Tensor, converted: ConvertedMoEBlock | None = None) -> dict:
    """Run the Hugging Face ``block`` and its conversion on the same input and compare.

    Returns a dict: ``output_rel_error`` (``‖y − y_hf‖/‖y_hf‖``), ``logits_max_abs_error``,
    ``expert_agreement`` (fraction of tokens whose set of chosen experts is the same),
    ``weights_max_abs_error`` (gate values of the chosen experts), ``kept_agreement`` (fraction of
    (token, choice) pairs dropped/kept alike), ``tokens`` and ``top_k``.
    """
    converted = from_transformers(block) if converted is None else converted
    y_hf = block(hidden_states)
    y_hf = y_hf[0] if isinstance(y_hf, tuple) else y_hf
    y, info = converted(hidden_states, return_info=True)
    hf = hf_routing(block, hidden_states)
    experts, order = info.routing.experts.sort(dim=-1)
    weights = info.routing.weights.gather(1, order)
    kept = info.plan.kept.gather(1, order)
    same_set = (experts == hf["experts"]).all(dim=-1)
    return {
        "output_rel_error": relative_norm_error(y, y_hf),
        "logits_max_abs_error": float((info.routing.logits - hf["logits"].to(info.routing.logits.dtype)).abs().max()),
        "expert_agreement": float(same_set.double().mean()),
        "weights_max_abs_error": float((weights - hf["weights"].to(weights.dtype)).abs().max()),
        "kept_agreement": float((kept == hf["kept"]).double().mean()),
        "tokens": int(experts.shape[0]),
        "top_k": int(experts.shape[1]),
    }


@torch.no_grad()
def time_implementations(block: nn.Module, hidden_states: Tensor, backends=("loop", "torch"),
                         hf_implementations=("eager", "batched_mm", "grouped_mm"), repeats: int = 5,
                         quartiles: bool = False) -> list[dict]:
    """Median wall time of one forward pass of the Hugging Face ``block`` (each of its
    ``experts_implementation`` kernels that runs here) and of its conversion on each moe_lib backend.

    Returns one dict per implementation: ``implementation``, ``median_ms``, ``rel_error`` (output vs the
    block's eager output). An implementation that raises on this machine is reported with
    ``median_ms = nan`` and the error's type in ``note``. One warm-up call precedes the timed ones.
    With ``quartiles=True`` each row also holds ``q1_ms`` and ``q3_ms``, the first and third quartiles of
    the ``repeats`` calls (their difference is the interquartile range, the spread to show beside a median).
    """
    from ..bench.timing import median_iqr, wall_times

    last: list[float] = []                      # the samples of the latest timed() call

    def timed(fn) -> float:  # on a GPU, timed between device synchronisations
        last[:] = wall_times(fn, repeats=repeats, warmup=1, device=hidden_states.device)
        return 1e3 * statistics.median(last)

    def spread(row: dict) -> dict:
        if quartiles:
            if math.isnan(row["median_ms"]) or not last:
                row.update(q1_ms=float("nan"), q3_ms=float("nan"))
            else:
                _, q1, q3 = median_iqr(last)
                row.update(q1_ms=1e3 * q1, q3_ms=1e3 * q3)
        return row

    rows = []
    experts_config = getattr(block.experts, "config", None)
    original = getattr(experts_config, "_experts_implementation", None)
    reference = None
    try:
        for impl in hf_implementations if experts_config is not None else ("eager",):
            if experts_config is not None:
                experts_config._experts_implementation = impl
            try:
                out = block(hidden_states)
                out = out[0] if isinstance(out, tuple) else out
                reference = out if reference is None else reference
                rows.append(spread({"implementation": f"HF {impl}", "median_ms": timed(lambda: block(hidden_states)),
                                    "rel_error": relative_norm_error(out, reference), "note": ""}))
            except Exception as exc:  # noqa: BLE001 - a kernel this CPU/torch build lacks
                rows.append(spread({"implementation": f"HF {impl}", "median_ms": float("nan"),
                                    "rel_error": float("nan"), "note": type(exc).__name__}))
    finally:
        if experts_config is not None:
            experts_config._experts_implementation = original
    converted = from_transformers(block)
    for backend in backends:
        converted.backend = backend
        out = converted(hidden_states)
        rows.append(spread({"implementation": f"moe_lib {backend}", "median_ms": timed(lambda: converted(hidden_states)),
                            "rel_error": relative_norm_error(out, reference), "note": ""}))
    return rows


__all__ = ["SUPPORTED_BLOCKS", "FAMILIES", "ConvertedMoEBlock", "block_family", "from_transformers",
           "hf_routing", "equivalence", "relative_norm_error", "random_block",
           "time_implementations"]
