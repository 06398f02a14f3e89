"""Swap every sparse-MoE block of a loaded Hugging Face model for moe_lib's, and back.

:func:`patch_transformers` walks a ``transformers`` model, converts each supported block with
:func:`~moe_lib.interop.from_transformers` (the same converter, so the same family conventions: shared
experts, gating, group limits, Switch's per-sequence capacity) and puts a :class:`PatchedMoEBlock` in its
place. :func:`unpatch_transformers` puts the Hugging Face blocks back; :func:`routing_report` reads the
routing statistics the patched blocks collected.

Where the weights live. While a model is patched the moe_lib modules own the weights: they are the
parameters ``model.parameters()`` lists, the ones an optimizer updates. The original Hugging Face block is
kept beside each patched module, outside the module tree, with the tensors the moe_lib module holds moved
to the ``meta`` device (no memory), so the weights are never held twice. :func:`unpatch_transformers`
writes the moe_lib weights back into the Hugging Face layout — transposes, slices and concatenations only,
no arithmetic, so the values are the same bits — and a patched model that was trained unpatches to its
trained weights. At patch time the write-back is run once and compared bit for bit with the original
block before anything is changed; a block that would not round-trip exactly is refused.

Interface followed: transformers 5.x, where a decoder layer calls ``hidden_states = self.mlp(hidden_states)``
and the router logits behind ``output_router_logits`` are collected by forward hooks on the router classes
(``OutputRecorder`` in ``transformers.utils.output_capturing``). Each patched block therefore owns a small
*logits tap*, a subclass of the family's router class without parameters, which it calls with moe_lib's
router logits so those hooks keep seeing them (the auxiliary load-balancing and z-losses stay as before).
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from .hf import FAMILIES, SUPPORTED_BLOCKS, ConvertedMoEBlock, from_transformers, require_transformers

#: ``config.model_type`` of the models whose blocks :func:`patch_transformers` converts.
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)

def _family_of(module: nn.Module) -> str | None:
    for cls in type(module).__mro__:
        if cls.__name__ in SUPPORTED_BLOCKS and cls.__module__.startswith("transformers"):
            return SUPPORTED_BLOCKS[cls.__name__]
    return None


# ------------------------------------------------------------------------------------ logits tap
_TAPS: dict[tuple[type, int], type] = {}


def _tap_init(self):
    nn.Module.__init__(self)
    # empty stand-ins for what transformers' _init_weights touches on a router (init_weights() stays a no-op
    # here); non-persistent, so not in the state_dict
    self.register_buffer("weight", torch.empty(0), persistent=False)
    self.register_buffer("e_score_correction_bias", torch.empty(0), persistent=False)


def _tap_forward(self, logits: Tensor):
    return tuple(logits if i == self.index else None for i in range(self.index + 1))


def _logits_tap(router_cls: type, index: int) -> nn.Module:
    """A parameter-free instance of a subclass of ``router_cls`` whose forward returns the logits it is
    given at position ``index`` of a tuple (the position transformers' ``OutputRecorder`` reads)."""
    key = (router_cls, index)
    if key not in _TAPS:
        _TAPS[key] = type(f"{router_cls.__name__}LogitsTap", (router_cls,), {
            "__init__": _tap_init, "forward": _tap_forward, "__module__": __name__,
            "__doc__": "Passes moe_lib's router logits to transformers' router-logits hooks.",
            "extra_repr": lambda self: "",
        })
    tap = _TAPS[key]()
    tap.index = index
    return tap


# ------------------------------------------------------------------------------------ the module
class PatchedMoEBlock(ConvertedMoEBlock):
    """A :class:`~moe_lib.interop.ConvertedMoEBlock` standing in a Hugging Face model.

    Its forward takes and returns ``hidden_states [batch, seq, d]`` like the block it replaced, passes
    the router logits to the model's ``output_router_logits`` hooks, and adds each pass's routing to
    running statistics (read with :func:`routing_report`, cleared with :func:`reset_routing_stats`).
    The statistics are accumulated as tensors on the weights' device, without synchronising.

    Attributes (besides :class:`ConvertedMoEBlock`'s): ``original`` — the Hugging Face block it replaced
    (the tensors moved into moe_lib are on ``meta`` while patched; :func:`unpatch_transformers` restores
    them); ``record_stats`` — whether forward passes are counted (assignable).
    """

    def __init__(self, converted: ConvertedMoEBlock, original: nn.Module, record_stats: bool = True):
        super().__init__(converted.family, converted.moe, converted.shared_expert, converted.shared_expert_gate)
        family = converted.family
        router = original.router if family == "switch_transformers" else original.gate
        self.router_logits = _logits_tap(type(router), 2 if family == "switch_transformers" else 0)
        object.__setattr__(self, "original", original)  # not a submodule: not in parameters()/state_dict()
        self.record_stats = record_stats
        self._stats: dict | None = None
        self._router_hooked = False  # set by patch_transformers
        self.train(original.training)

    def extra_repr(self) -> str:
        return f"family={self.family!r}, backend={self.backend!r}"

    def forward(self, hidden_states: Tensor, return_info: bool = False):
        y, info = super().forward(hidden_states, return_info=True)
        logits = info.routing.logits
        if self.family == "switch_transformers":  # transformers' Switch router returns [batch, seq, E]
            logits = logits.reshape(*hidden_states.shape[:-1], logits.shape[-1])
        self.router_logits(logits)
        if self.record_stats:
            self._accumulate(info)
        return (y, info) if return_info else y

    @torch.no_grad()
    def _accumulate(self, info) -> None:
        from ..metrics import entropy

        routing, plan = info.routing, info.plan
        if self._stats is None:
            zero = torch.zeros((), dtype=torch.float64, device=plan.counts.device)
            self._stats = {"load": torch.zeros_like(plan.requested), "processed": torch.zeros_like(plan.counts),
                           "tokens": 0, "assignments": zero.clone(), "kept": zero.clone(),
                           "tokens_dropped": zero.clone(), "used": zero.clone(), "gate_entropy": zero.clone(),
                           "router_entropy": zero.clone(), "passes": 0}
        s = self._stats
        s["load"] += plan.requested
        s["processed"] += plan.counts
        s["tokens"] += routing.experts.shape[0]
        s["passes"] += 1
        if routing.experts.shape[0] == 0:
            return
        valid = routing.mask() if plan.valid is None else plan.valid
        s["assignments"] += valid.sum()
        s["kept"] += plan.kept.sum()
        s["tokens_dropped"] += (~plan.kept.any(dim=1)).sum()
        weights = routing.weights.detach()
        used = weights.sum(-1) > 0  # as routing_stats: entropies are means over tokens that got weight
        s["used"] += used.sum()
        s["gate_entropy"] += torch.where(used, entropy(weights), 0.0).sum()
        s["router_entropy"] += torch.where(used, entropy(routing.probs.detach()), 0.0).sum()


# ------------------------------------------------------------------------------------ write-back
def _hf_tensors(patched: ConvertedMoEBlock, original: nn.Module, get=lambda p: p) -> dict[str, Tensor]:
    """The Hugging Face block's tensors (its ``named_parameters``/``named_buffers`` names) rebuilt from the
    moe_lib module's, by transposing, slicing and concatenating only. ``get`` maps each moe_lib tensor
    first (``lambda p: p.grad`` gives the gradients in Hugging Face's layout)."""
    out: dict[str, Tensor] = {}
    moe = patched.moe
    router = moe.router
    if patched.family == "switch_transformers":
        out["router.classifier.weight"] = get(router.gate.weight)
        if router.gate.bias is not None:
            out["router.classifier.bias"] = get(router.gate.bias)
        w1, w2 = get(moe.experts.w1), get(moe.experts.w2)
        for e in range(w1.shape[0]):
            out[f"experts.expert_{e}.wi.weight"] = w1[e].t()
            out[f"experts.expert_{e}.wo.weight"] = w2[e].t()
        return out
    out["gate.weight"] = get(router.gate.weight)
    if router.gate.bias is not None:
        out["gate.bias"] = get(router.gate.bias)
    if patched.family == "deepseek_v3":
        out["gate.e_score_correction_bias"] = get(router.score_bias)
    bank = moe.experts
    w_gate, w_up, w_down = get(bank.w_gate), get(bank.w_up), get(bank.w_down)  # x @ W: [E,d,F],[E,d,F],[E,F,d]
    experts = original.experts
    if hasattr(experts, "gate_up_proj"):
        if getattr(experts, "is_concatenated", True):
            gate_up = torch.cat([w_gate, w_up], dim=-1)
        else:
            gate_up = torch.stack([w_gate, w_up], dim=-1).flatten(-2)
        transposed = getattr(experts, "is_transposed", None)
        if transposed is None:
            transposed = tuple(experts.gate_up_proj.shape) == tuple(gate_up.shape)
        out["experts.gate_up_proj"] = gate_up if transposed else gate_up.transpose(1, 2)
        out["experts.down_proj"] = w_down if transposed else w_down.transpose(1, 2)
    else:
        for e, mlp in (experts.items() if isinstance(experts, nn.ModuleDict) else enumerate(experts)):
            names = ("gate_proj", "up_proj", "down_proj") if hasattr(mlp, "gate_proj") else ("w1", "w3", "w2")
            for name, w in zip(names, (w_gate, w_up, w_down)):
                out[f"experts.{e}.{name}.weight"] = w[e].t()
    shared_name = "shared_expert" if hasattr(original, "shared_expert") else "shared_experts"
    if patched.shared_expert is not None:
        bank = patched.shared_expert
        for name, w in zip(("gate_proj", "up_proj", "down_proj"), (bank.w_gate, bank.w_up, bank.w_down)):
            out[f"{shared_name}.{name}.weight"] = get(w)[0].t()
    if patched.shared_expert_gate is not None:
        out["shared_expert_gate.weight"] = get(patched.shared_expert_gate.weight)
        if patched.shared_expert_gate.bias is not None:
            out["shared_expert_gate.bias"] = get(patched.shared_expert_gate.bias)
    return out


def _block_tensors(block: nn.Module) -> dict[str, Tensor]:
    return {**dict(block.named_parameters()), **dict(block.named_buffers())}


def _bitwise_equal(a: Tensor, b: Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.device == b.device and bool(
        torch.equal(a.detach().reshape(-1).view(torch.uint8) if a.numel() else a.detach(),
                    b.detach().reshape(-1).view(torch.uint8) if b.numel() else b.detach()))


def _set_tensor(block: nn.Module, name: str, value: Tensor) -> None:
    """Replace the parameter or buffer ``name`` of ``block`` by ``value`` (a Parameter keeps its
    ``requires_grad``)."""
    owner_name, _, leaf = name.rpartition(".")
    owner = block.get_submodule(owner_name) if owner_name else block
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        owner._buffers[leaf] = value


def _patch_block(block: nn.Module, backend: str, record_stats: bool) -> PatchedMoEBlock:
    converted = from_transformers(block, backend=backend)
    patched = PatchedMoEBlock(converted, block, record_stats)
    if patched.family == "switch_transformers":
        # Switch's experts have no biases: moe_lib's MLP bank has them, zero; freeze them so training the
        # patched model changes only what the Hugging Face block holds
        patched.moe.experts.b1.requires_grad_(False)
        patched.moe.experts.b2.requires_grad_(False)
    with torch.no_grad():
        rebuilt = _hf_tensors(patched, block)
    originals = _block_tensors(block)
    for name, value in rebuilt.items():
        if name not in originals or not _bitwise_equal(value, originals[name]):
            raise ValueError(
                f"{type(block).__name__}: tensor {name!r} would not round-trip bit for bit through moe_lib "
                f"(dtype {originals[name].dtype if name in originals else 'missing'}); the block is left as it is"
            )
    trainable = {originals[n].requires_grad for n in rebuilt if isinstance(originals[n], nn.Parameter)}
    if trainable == {False}:  # a frozen block stays frozen (a partly frozen one becomes trainable: warned)
        patched.requires_grad_(False)
    elif len(trainable) > 1:
        warnings.warn(f"{type(block).__name__}: some of its parameters are frozen; the moe_lib parameters that "
                      "replace them are all trainable (freeze them on the patched model)", stacklevel=3)
    if patched.family in ("mixtral", "switch_transformers"):
        jitter = getattr(getattr(block, "router", block), "jitter_noise", 0.0) or 0.0
        if jitter > 0:
            warnings.warn(f"{type(block).__name__}: router_jitter_noise={jitter} acts only in train() mode and "
                          "is not reproduced by moe_lib; set it to 0 to train the patched model identically",
                          stacklevel=3)
    return patched


def _release(patched: PatchedMoEBlock) -> None:
    """The moe_lib module owns the weights now: free the Hugging Face copies it replaces (their shape and
    dtype stay, on the meta device)."""
    block = patched.original
    originals = _block_tensors(block)
    for name in _hf_tensors(patched, block):
        _set_tensor(block, name, torch.empty_like(originals[name], device="meta"))


def _unpatch_block(patched: PatchedMoEBlock) -> nn.Module:
    block = patched.original
    with torch.no_grad():
        rebuilt = _hf_tensors(patched, block)
        for name, value in rebuilt.items():
            _set_tensor(block, name, value.detach().clone(memory_format=torch.contiguous_format))
    # what stayed in the block (a width-0 shared expert and its gate) follows the weights' device
    block.to(device=patched.moe.router.gate.weight.device)
    return block.train(patched.training)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


# ------------------------------------------------------------------------------------ public API
def patch_transformers(model: nn.Module, backend: str = "torch", *, record_stats: bool = True) -> nn.Module:
    """Replace, in place, every sparse-MoE block of a Hugging Face model by moe_lib's; return the model.

    Each Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3 or Switch Transformers block is converted by
    :func:`~moe_lib.interop.from_transformers` (the block converter, which follows each family's
    transformers implementation: shared experts and their gate, softmax or sigmoid scores,
    ``norm_topk_prob``, group-limited bias-corrected selection, ``routed_scaling_factor``, Switch's
    ``expert_capacity`` per sequence) and wrapped in a :class:`PatchedMoEBlock`. In evaluation mode the
    patched model computes what the original does (fp32 relative error ~1e-7); ``generate``,
    ``output_router_logits`` and training work as before. Training-only router jitter (Mixtral, Switch)
    is not reproduced: a warning says so when it is on.

    Weights are moved, not copied: see this module's docstring. Save with ``save_pretrained`` after
    :func:`unpatch_transformers`; the patched model's ``state_dict`` uses moe_lib's names.

    Args:
        model: a loaded ``transformers`` model (``...ForCausalLM``, the base model, a composite model
            holding one of them...) with at least one block of a supported family.
        backend: moe_lib backend of the routed experts: ``"loop"``, ``"torch"``, ``"grouped_mm"``,
            ``"triton"`` (:data:`moe_lib.BACKENDS`); change it later with ``block.backend = ...``.
        record_stats: accumulate routing statistics in every forward pass (for :func:`routing_report`).

    Returns:
        ``model`` itself.

    Raises:
        ImportError: transformers is not installed (or older than 5).
        ValueError: unknown ``backend``; the model is already patched; a block would not round-trip bit
            for bit (mixed dtypes inside a block).
        TypeError: ``model`` is not a module or holds no supported block (the message names its class and
            the supported families; a model of a supported family without sparse layers is told so).
    """
    from .._validate import check_bool, check_choice
    from ..backends import BACKENDS

    require_transformers("moe_lib.patch_transformers")
    check_choice("backend", backend, BACKENDS)
    check_bool("record_stats", record_stats)
    families = ", ".join(f"{v['name']} ({k})" for k, v in FAMILIES.items())
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers model (torch.nn.Module) of a supported family "
                        f"({families}); got {type(model).__module__}.{type(model).__name__}")
    blocks = [(name, m) for name, m in model.named_modules() if _family_of(m) is not None]
    if not blocks:
        if any(isinstance(m, PatchedMoEBlock) for m in model.modules()):
            raise ValueError(f"{type(model).__name__} is already patched; set each block's .backend to change "
                             "the backend, or call moe_lib.unpatch_transformers first")
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type in FAMILIES:
            raise TypeError(f"{type(model).__name__} (model_type {model_type!r}) has no sparse MoE block to patch "
                            "(all its layers are dense); nothing was changed")
        raise TypeError(f"unsupported model class {type(model).__name__}: no sparse MoE block of a supported "
                        f"family ({families}) in it; nothing was changed")
    hooked = _hooked(model)
    # convert and check every block first: a block that fails leaves the whole model as it was
    converted = [(name, _patch_block(block, backend, record_stats)) for name, block in blocks]
    for name, patched in converted:
        _release(patched)
        _replace(model, name, patched)
        patched._router_hooked = _under(name, hooked)  # the original router has transformers' hook
        if patched._router_hooked:
            _install_router_hook(patched.router_logits, patched.router_logits.index)
    return model


def _hooked(model: nn.Module) -> list[str]:
    """Names of the (sub)models on which transformers has installed its output-capturing hooks."""
    return [name for name, m in model.named_modules() if getattr(m, "_output_capturing_hooks_installed", False)]


def _under(name: str, prefixes: list[str]) -> bool:
    return any(p == "" or name.startswith(p + ".") for p in prefixes)


def _install_router_hook(module: nn.Module, index: int) -> None:
    """transformers installs its output hooks once per model, on its first ``output_*`` call; a router
    module that enters the model later gets the ``router_logits`` hook it would have had."""
    from transformers.utils.output_capturing import install_output_capuring_hook

    install_output_capuring_hook(module, "router_logits", index)


def unpatch_transformers(model: nn.Module) -> nn.Module:
    """Put back, in place, the Hugging Face blocks that :func:`patch_transformers` replaced; return the model.

    The blocks get the current moe_lib weights in their own layout (the same bits: a patched model that
    was trained unpatches to its trained weights), on the moe_lib weights' device and dtype, contiguous, in
    the patched module's train/eval mode; ``save_pretrained`` then writes the original format.

    Raises:
        TypeError: ``model`` is not a module. ValueError: it holds no patched block.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module patched by moe_lib.patch_transformers; "
                        f"got {type(model).__name__}")
    patched = [(name, m) for name, m in model.named_modules() if isinstance(m, PatchedMoEBlock)]
    if not patched:
        raise ValueError(f"{type(model).__name__} has no block patched by moe_lib.patch_transformers")
    hooked = _hooked(model)
    for name, m in patched:
        block = _unpatch_block(m)
        _replace(model, name, block)
        if _under(name, hooked) and not m._router_hooked:  # hooks installed while it was patched
            _install_router_hook(block.router if m.family == "switch_transformers" else block.gate,
                                 m.router_logits.index)
    return model


def patched_blocks(model: nn.Module) -> list[tuple[str, PatchedMoEBlock]]:
    """``(module name, PatchedMoEBlock)`` of every patched block of ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PatchedMoEBlock)]


def reset_routing_stats(model: nn.Module) -> None:
    """Clear the routing statistics every patched block of ``model`` has accumulated."""
    for _, m in patched_blocks(model):
        m._stats = None


def routing_report(model: nn.Module, last: bool = False) -> list[dict]:
    """Routing statistics of every patched block, one dict per layer, as plain Python numbers.

    ``last=False`` (default): accumulated over every forward pass since :func:`patch_transformers` or
    :func:`reset_routing_stats` — a whole ``generate`` call, prefill and every decode step. Keys:
    ``layer`` (index), ``name`` (module name), ``family``, ``passes`` (forward calls), ``tokens``,
    ``assignments``, ``load`` (assignments per expert, before capacity), ``processed`` (after),
    ``load_cv`` (coefficient of variation of ``load``, Shazeer et al. 2017), ``max_violation`` (Wang et
    al. 2024), ``experts_used_fraction``, ``assignments_dropped``, ``tokens_dropped``,
    ``dropped_fraction``, ``gate_entropy`` and ``router_entropy`` (mean nats per token, over the tokens
    that received a weight) — the definitions of :func:`moe_lib.metrics.routing_stats`, whose helpers
    compute them. ``last=True``: :func:`moe_lib.metrics.routing_stats` of each block's last forward pass
    (its keys, plus ``layer``, ``name``, ``family``).

    A layer that has seen no token has ``tokens = 0`` and ``nan`` balance and entropy values.

    Raises:
        ValueError: ``model`` holds no patched block.
    """
    from .._validate import check_bool
    from ..metrics import coefficient_of_variation, max_violation, routing_stats

    check_bool("last", last)
    blocks = patched_blocks(model) if isinstance(model, nn.Module) else []
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no block patched by moe_lib.patch_transformers")
    rows = []
    for layer, (name, m) in enumerate(blocks):
        head = {"layer": layer, "name": name, "family": m.family}
        if last:
            info = m.last_info
            if info is None:
                raise ValueError(f"block {name!r} has not run a forward pass yet")
            rows.append({**head, **routing_stats(info.routing, info.plan)})
            continue
        s = m._stats
        if s is None:
            nan = float("nan")
            rows.append({**head, "passes": 0, "tokens": 0, "assignments": 0, "load": [], "processed": [],
                         "load_cv": nan, "max_violation": nan, "experts_used_fraction": nan,
                         "assignments_dropped": 0, "tokens_dropped": 0, "dropped_fraction": 0.0,
                         "gate_entropy": nan, "router_entropy": nan})
            continue
        load = s["load"].cpu()
        assignments, used = int(s["assignments"]), int(s["used"])
        dropped = assignments - int(s["kept"])
        rows.append({
            **head, "passes": s["passes"], "tokens": s["tokens"], "assignments": assignments,
            "load": load.tolist(), "processed": s["processed"].cpu().tolist(),
            "load_cv": coefficient_of_variation(load), "max_violation": max_violation(load),
            "experts_used_fraction": float((load > 0).double().mean()),
            "assignments_dropped": dropped, "tokens_dropped": int(s["tokens_dropped"]),
            "dropped_fraction": dropped / assignments if assignments else 0.0,
            "gate_entropy": float(s["gate_entropy"]) / used if used else float("nan"),
            "router_entropy": float(s["router_entropy"]) / used if used else float("nan"),
        })
    return rows


# ------------------------------------------------------------------------------------ random models
_COMMON = {"vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "max_position_embeddings": 128, "bos_token_id": 0, "pad_token_id": 0,
           "eos_token_id": 1}
#: family -> (config class, model class, small default config: 2 layers, width 32, every layer sparse).
_RANDOM_MODELS = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                {**_COMMON, "intermediate_size": 48, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  {**_COMMON, "intermediate_size": 48, "moe_intermediate_size": 24,
                   "shared_expert_intermediate_size": 48, "num_experts": 4, "num_experts_per_tok": 2,
                   "decoder_sparse_step": 1, "mlp_only_layers": []}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  {**_COMMON, "head_dim": 8, "intermediate_size": 48, "moe_intermediate_size": 24,
                   "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True,
                   "decoder_sparse_step": 1, "mlp_only_layers": []}),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              {**_COMMON, "intermediate_size": 24, "num_experts": 8, "num_experts_per_tok": 2}),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    {**_COMMON, "intermediate_size": 48, "moe_intermediate_size": 16, "n_routed_experts": 8,
                     "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "n_shared_experts": 1,
                     "routed_scaling_factor": 2.5, "first_k_dense_replace": 0, "num_key_value_heads": 4,
                     "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
                     "v_head_dim": 8}),
    "switch_transformers": ("SwitchTransformersConfig", "SwitchTransformersForConditionalGeneration",
                            {"vocab_size": 96, "d_model": 32, "d_ff": 48, "d_kv": 8, "num_heads": 4,
                             "num_layers": 4, "num_decoder_layers": 4, "num_experts": 4, "expert_capacity": 8,
                             "encoder_sparse_step": 2, "decoder_sparse_step": 2, "dropout_rate": 0.0,
                             "router_jitter_noise": 0.0, "decoder_start_token_id": 0, "pad_token_id": 0,
                             "eos_token_id": 1}),
}


def random_model(family: str, *, seed: int = 0, bias_std: float = 0.1, **config) -> nn.Module:
    """A small Hugging Face model of ``family`` with random weights, in eval mode — nothing downloaded.

    Two layers of width 32, both sparse (4–8 experts, top-2; Switch: an encoder–decoder of 4 + 4 layers,
    every second one sparse — with every layer sparse transformers computes no auxiliary loss for Switch —
    top-1, ``expert_capacity=8``, no dropout or jitter); ``config`` overrides these defaults. The model's own
    initialiser runs under ``torch.manual_seed(seed)``, then every MoE block's tensors are redrawn as
    :func:`~moe_lib.interop.random_block` draws them (``N(0, 1/fan_in)``, DeepSeek-V3's correction bias
    ``N(0, bias_std²)``), so routers are not near-uniform. Needs ``transformers``.
    """
    from .._validate import check_choice

    check_choice("family", family, _RANDOM_MODELS)
    transformers = require_transformers("moe_lib.interop.random_model")
    config_name, model_name, defaults = _RANDOM_MODELS[family]
    cfg = getattr(transformers, config_name)(**{**defaults, **config})
    torch.manual_seed(int(seed))
    model = getattr(transformers, model_name)(cfg)
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for _, block in ((n, m) for n, m in model.named_modules() if _family_of(m) is not None):
            for name, p in block.named_parameters():
                fan_in = p.shape[-1] if p.dim() > 1 else p.shape[0]
                p.copy_(torch.randn(p.shape, generator=gen) / max(fan_in, 1) ** 0.5)
            for name, buf in block.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    buf.copy_(torch.randn(buf.shape, generator=gen) * bias_std)
    return model.eval()


__all__ = ["SUPPORTED_MODEL_TYPES", "PatchedMoEBlock", "patch_transformers", "unpatch_transformers",
           "patched_blocks", "random_model", "reset_routing_stats", "routing_report"]
