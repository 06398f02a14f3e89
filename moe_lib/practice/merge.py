"""Merging dense models into one mixture of experts, with gates from each domain's hidden states.

The recipe of mergekit's ``mergekit-moe`` (the tool behind Phixtral, several fine-tuned Phi-2 models, whose
model card lists ``gate_mode: cheap_embed`` with empty prompts) with ``gate_mode: hidden``, also the idea of
SegMoE (Stable Diffusion models): take ``E`` dense models that share
an architecture (ideally fine-tuned from one base), make each one's FFN an expert of an MoE layer, keep one
copy of everything else, and set the router's gate vector for expert ``i`` at each layer to the mean hidden
state, at that layer's FFN input, of prompts from domain ``i``. A token is then sent to the expert whose
domain's mean hidden state it resembles most. No router training is needed.

Here "everything else" is the element-wise mean of the sources' non-FFN parameters (or a given ``base``'s):
when the sources were fine-tuned with their non-FFN parameters frozen, that mean is the shared base, and a
merged model routed entirely to expert ``i`` computes exactly source model ``i`` (tested).

Source models can be dense :class:`~moe_lib.models.TransformerLM` (every block's FFN becomes an expert
bank) or single-expert :class:`~moe_lib.book.tasks.TaskModel` (``num_experts=1``; its one expert becomes one of
``E``): the SegMoE analogue on a non-language model.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Sequence

import torch
from torch import Tensor, nn

from .._validate import check_int
from ..experts import ExpertBank
from ..layer import MoELayer
from ..models.transformer import TransformerLM
from ..book.tasks import TaskModel
from .upcycle import _experts_from_ffns, _rebuilt_layer


def _ffn_slots(model: nn.Module) -> list[nn.Module]:
    if isinstance(model, TransformerLM):
        return [block.ffn for block in model.blocks]
    if isinstance(model, TaskModel):
        return [model.moe]
    raise TypeError(f"model must be a moe_lib.models.TransformerLM or a moe_lib.book.tasks.TaskModel, got {type(model).__name__}")


@torch.no_grad()
def ffn_inputs(model: nn.Module, inputs: Tensor) -> list[Tensor]:
    """The hidden states entering each FFN (the normalised residual stream) of ``model`` on ``inputs``:
    one ``[tokens, d_model]`` tensor per layer (eval mode)."""
    captured: list[Tensor] = []
    hooks = [slot.register_forward_hook(lambda m, args, out: captured.append(args[0].reshape(-1, args[0].shape[-1])))
             for slot in _ffn_slots(model)]
    was_training = model.training
    model.eval()
    try:
        model(inputs)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return captured


def gate_vectors_from_hidden(hidden_by_domain: Sequence[Tensor], *, center: bool = True,
                             normalize: bool = True, scale: float = 1.0) -> Tensor:
    """Gate vectors ``[E, d]`` from each domain's hidden states (``E`` tensors ``[n_i, d]``): the mean
    hidden state of domain ``i`` (mergekit's ``gate_mode: hidden``), optionally minus the mean over domains
    (``center``: removes the direction every domain shares, which otherwise dominates the dot product) and
    scaled to norm ``scale`` (``normalize``: each expert then wins by cosine similarity, not by the length of
    its mean). With top-1 routing only the direction matters; ``scale`` sets how sharp the softmax is."""
    if isinstance(hidden_by_domain, Tensor) or not hidden_by_domain:
        raise TypeError("hidden_by_domain must be a non-empty list of [n_i, d] tensors, one per domain")
    means = torch.stack([h.reshape(-1, h.shape[-1]).double().mean(0) for h in hidden_by_domain])
    if center:
        means = means - means.mean(0, keepdim=True)
    if normalize:
        means = scale * means / means.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return means.float()


def _mean_state(models: Sequence[nn.Module], skip) -> dict[str, Tensor]:
    states = [m.state_dict() for m in models]
    return {k: torch.stack([s[k].float() for s in states]).mean(0).to(states[0][k].dtype)
            for k in states[0] if not skip(k)}


def merge_into_moe(models: Sequence[nn.Module], gate_vectors, *, top_k: int = 1, router: str = "topk",
                   base: nn.Module | None = None) -> nn.Module:
    """Merge ``E`` dense models into one MoE model whose expert ``i`` is model ``i``'s FFN.

    Args:
        models: ``E ≥ 2`` dense :class:`~moe_lib.models.TransformerLM` with equal configs, or ``E``
            :class:`~moe_lib.book.tasks.TaskModel` with ``num_experts=1`` and equal sizes.
        gate_vectors: ``[E, d_model]`` (one MoE layer, or the same gates at every layer) or
            ``[n_layers, E, d_model]`` — typically :func:`gate_vectors_from_hidden` of :func:`ffn_inputs`.
            They become the router's gate weights: ``logits = x · g_iᵀ``.
        top_k, router: the routing of the merged model (top-1 by default: each token runs one source FFN).
        base: take the non-FFN parameters from this model instead of the sources' element-wise mean.

    Returns:
        A new model (``TransformerLM`` with ``ffn="moe"`` or ``TaskModel`` with ``E`` experts).
    """
    if isinstance(models, nn.Module) or len(models) < 2:
        raise TypeError("models must be a list of at least 2 models to merge")
    kinds = {type(m) for m in models}
    if len(kinds) != 1:
        raise TypeError(f"models must all have the same type, got {sorted(k.__name__ for k in kinds)}")
    first = models[0]
    E = len(models)
    top_k = check_int("top_k", top_k, minimum=1, maximum=E)
    slots = _ffn_slots(first)
    gates = torch.as_tensor(gate_vectors, dtype=torch.float32)
    if gates.dim() == 2:
        gates = gates.unsqueeze(0).expand(len(slots), -1, -1)
    d_model = first.cfg.d_model if isinstance(first, TransformerLM) else first.moe.d_model
    if gates.shape != (len(slots), E, d_model):
        raise ValueError(f"gate_vectors must have shape [{E}, {d_model}] or [{len(slots)}, {E}, {d_model}], "
                         f"got {tuple(torch.as_tensor(gate_vectors).shape)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # top-1 with renormalised weights: every weight is 1, by design here
        if isinstance(first, TransformerLM):
            if any(m.cfg != first.cfg for m in models) or first.cfg.ffn != "dense":
                raise ValueError("models must be dense TransformerLMs (cfg.ffn='dense') with identical configs")
            cfg = dataclasses.replace(first.cfg, ffn="moe", num_experts=E, top_k=top_k, router=router, num_shared=0,
                                      name="merged")
            merged = TransformerLM(cfg)
            skip = lambda k: ".ffn." in k  # noqa: E731
        else:
            if any(m.moe.num_experts != 1 for m in models):
                raise ValueError("TaskModel sources must have num_experts=1 (one dense FFN each)")
            layer = first.moe
            merged = TaskModel(first.embed.in_features, first.head.out_features, d_model=layer.d_model,
                               d_ff=layer.d_ff, num_experts=E, top_k=top_k, router=router,
                               expert=layer.experts.kind)
            skip = lambda k: k.startswith("moe.")  # noqa: E731
    merged = merged.to(first_param_device(first))
    state = _mean_state([base] if base is not None else models, skip)
    merged.load_state_dict(state, strict=False)
    for layer_index, slot in enumerate(_ffn_slots(merged)):
        built: MoELayer = slot.moe if not isinstance(slot, MoELayer) else slot  # the config's layer
        experts = _merged_experts([_ffn_slots(source)[layer_index] for source in models])
        like = next(built.experts.parameters())
        router = built.router  # the config's router, given the gate vectors before it is injected
        with torch.no_grad():
            router.gate.weight.copy_(gates[layer_index])
            if router.gate.bias is not None:
                router.gate.bias.zero_()
        layer = _rebuilt_layer(built, router=router, experts=experts.to(device=like.device, dtype=like.dtype))
        if isinstance(slot, MoELayer):
            merged.moe = layer
        else:
            slot.moe = layer
    return merged.eval()


def _merged_experts(sources: Sequence[nn.Module]) -> ExpertBank:
    """The bank whose expert ``i`` is source ``i``'s FFN: a dense SwiGLU FFN, or a single-expert
    :class:`~moe_lib.MoELayer` (its bank's expert 0, any kind), built from their weights."""
    if not isinstance(sources[0], MoELayer):
        return _experts_from_ffns(sources)
    banks = [s.experts for s in sources]
    kinds = sorted({f"{b.kind} ({b.activation})" if "activation" in vars(b) else b.kind for b in banks})
    if len(kinds) != 1:
        raise ValueError(f"the sources' experts must all be of one kind and activation, got {kinds}")
    cls = type(banks[0])
    options = {"activation": banks[0].activation} if "activation" in vars(banks[0]) else {}
    return cls.from_weights(*(torch.cat([getattr(b, name) for b in banks]) for name in cls.stacked), **options)


def first_param_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def domain_subset(data, domains: Sequence[int]):
    """The examples of a :class:`~moe_lib.book.tasks.TaskData` whose domain is in ``domains`` (in their order in
    ``data``): the training set of a source model fine-tuned on a group of domains, or the test set of one
    group."""
    from ..book.tasks import TaskData

    if not isinstance(data, TaskData):
        raise TypeError(f"data must be a moe_lib.book.tasks.TaskData, got {type(data).__name__}")
    if isinstance(domains, (int, str)) or len(domains) == 0:
        raise ValueError(f"domains must be a non-empty sequence of domain ids, got {domains!r}")
    keep = torch.isin(data.domain, torch.as_tensor(list(domains), dtype=data.domain.dtype, device=data.domain.device))
    return TaskData(data.x[keep], data.y[keep], data.domain[keep], data.token_ids[keep])


def merge_finetunes(base: TransformerLM, domains: dict, *, steps: int = 60, batch_size: int = 8, lr: float = 1e-3,
                    seed: int = 0, gate_windows: int = 16) -> dict:
    """The mergekit-moe recipe (``gate_mode: hidden``) on language models, for one seed: fine-tune a copy of ``base`` on each domain, then
    merge the fine-tunes into a top-1 MoE whose gates are each domain's mean hidden state in ``base``.

    ``domains`` maps a domain name to ``(train tokens, val tokens)``. Each source is
    :func:`~moe_lib.practice.finetune_lm` (all parameters, ``steps``, ``batch_size``, ``lr``, ``seed``; the
    global RNGs re-seeded before each); the gate vectors of each layer are :func:`gate_vectors_from_hidden`
    of :func:`ffn_inputs` of ``base`` on the first ``gate_windows`` training windows of each domain. Returns
    ``{"base", "<domain> fine-tune" for each domain, "merged (base non-FFN)", "merged (mean non-FFN)"}`` →
    model: the two merges keep the base's or the sources' element-wise mean non-FFN parameters.
    """
    from ..models.windows import fixed_windows
    from ..utils import seed_everything
    from .finetune import finetune_lm

    if not isinstance(domains, dict) or len(domains) < 2:
        raise ValueError("domains must map at least two domain names to (train, val) token tensors")
    sources = {}
    for name, (train, val) in domains.items():
        seed_everything(seed)
        sources[name] = finetune_lm(base, train, val, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                    eval_windows=32)["model"]
    seq_len = base.cfg.seq_len
    hidden = [ffn_inputs(base, fixed_windows(train, seq_len, gate_windows)[0]) for train, _ in domains.values()]
    gates = torch.stack([gate_vectors_from_hidden([h[layer] for h in hidden]) for layer in range(base.cfg.n_layers)])
    return {"base": base, **{f"{name} fine-tune": m for name, m in sources.items()},
            "merged (base non-FFN)": merge_into_moe(list(sources.values()), gates, base=base),
            "merged (mean non-FFN)": merge_into_moe(list(sources.values()), gates)}


def merge_task_experts(train, groups: Sequence[Sequence[int]], make_model, *, steps: int = 300, lr: float = 3e-3,
                       seed: int = 0) -> dict:
    """The SegMoE analogue on a :class:`~moe_lib.book.tasks.TaskModel`, for one seed: train a single-expert
    ``base = make_model()`` on all of ``train``; fine-tune a copy on each group of domains with only its FFN
    trainable (:func:`~moe_lib.practice.freeze_roles`), so the sources share everything else; merge their
    FFNs into one top-1 MoE whose gates are each group's mean hidden state in ``base``.

    Returns ``{"base": model, "sources": [model per group], "merged": model}``.
    """
    from ..training import fit_classifier
    from ..utils import seed_everything
    from .finetune import freeze_roles

    seed_everything(seed)
    base = make_model()
    fit_classifier(base, train.x, train.y, steps=steps, lr=lr, seed=seed)
    sources = []
    for g in groups:
        model = make_model()
        model.load_state_dict(base.state_dict())  # a copy of the trained base
        freeze_roles(model, ["experts"])
        part = domain_subset(train, g)
        fit_classifier(model, part.x, part.y, steps=steps, lr=lr, seed=seed)
        sources.append(model)
    gates = gate_vectors_from_hidden([ffn_inputs(base, domain_subset(train, g).x)[0] for g in groups])
    return {"base": base, "sources": sources, "merged": merge_into_moe(sources, gates)}
