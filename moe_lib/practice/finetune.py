"""Fine-tuning utilities: which parameters play which role, freezing by role, expert dropout, router drift.

ST-MoE (Zoph et al. 2022, §4.2–4.3) fine-tunes sparse models by updating subsets of their parameters —
all, only the non-MoE parameters, only the MoE parameters, everything but the router — and adds more
dropout inside the experts ("expert dropout", Fedus et al. 2022, §2.4 and table 4). This module names the three roles a
parameter of a mixture-of-experts model can play:

* ``"router"`` — the gate of every :class:`~moe_lib.MoELayer` (``layer.router``);
* ``"experts"`` — the routed expert banks (``layer.experts``);
* ``"non_expert"`` — everything else: embeddings, attention, norms, heads, dense FFNs and always-on shared
  experts (ST-MoE's "non-MoE parameters").

Freezing sets ``requires_grad=False``; optimisers built afterwards (or zeroing gradients with
``set_to_none=True``, as :func:`moe_lib.models.train_lm` does) then leave those parameters untouched —
AdamW skips a parameter whose gradient is ``None``, weight decay included.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from .._validate import check_choice
from ..experts import ExpertBank
from ..layer import MoELayer

PARAMETER_ROLES = ("router", "experts", "non_expert")


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """``{parameter name: role}`` for every parameter of ``model`` (roles: :data:`PARAMETER_ROLES`)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    role_of: dict[int, str] = {}
    for module in model.modules():
        if isinstance(module, MoELayer):
            for p in module.router.parameters():
                role_of[id(p)] = "router"
            for p in module.experts.parameters():
                role_of[id(p)] = "experts"
    return {name: role_of.get(id(p), "non_expert") for name, p in model.named_parameters()}


def role_counts(model: nn.Module, trainable_only: bool = False) -> dict[str, int]:
    """Number of parameters per role (only those with ``requires_grad`` when ``trainable_only``)."""
    roles = parameter_roles(model)
    counts = dict.fromkeys(PARAMETER_ROLES, 0)
    for name, p in model.named_parameters():
        if p.requires_grad or not trainable_only:
            counts[roles[name]] += p.numel()
    return counts


def freeze_roles(model: nn.Module, train: Iterable[str] = PARAMETER_ROLES) -> dict[str, int]:
    """Train only the parameters whose role is in ``train``; freeze (``requires_grad=False``) the rest.

    ST-MoE's fine-tuning ablation (Zoph et al. 2022, §4.2 and fig. 5): ``train=("non_expert",)`` updates only the non-MoE
    parameters, ``train=("experts",)`` only the MoE parameters, ``train=("experts", "non_expert")`` freezes
    the router. Returns the trainable parameter count per role.

    Raises:
        ValueError: a role is not one of :data:`PARAMETER_ROLES`.
        TypeError: ``train`` is a string rather than a collection of roles.
    """
    if isinstance(train, str):
        raise TypeError(f"train must be a collection of roles from {list(PARAMETER_ROLES)}, got the string {train!r}")
    train = {check_choice("train", r, PARAMETER_ROLES) for r in train}
    roles = parameter_roles(model)
    for name, p in model.named_parameters():
        p.requires_grad_(roles[name] in train)
    return role_counts(model, trainable_only=True)


class DropoutExperts(ExpertBank):
    """An expert bank with dropout on each expert's hidden activations during training ("expert
    dropout": Fedus et al. 2022, §2.4 and table 4 fine-tune with dropout 0.1 outside and 0.4 inside the experts;
    ST-MoE, Zoph et al. 2022, fig. 4).

    Wraps a ``swiglu``, ``glu`` or ``mlp`` bank **without copying it**: the wrapped bank's parameters are the
    parameters (``self.bank``), so an optimiser keeps updating the same tensors. Every view runs the wrapped
    bank's own formula with the dropout as its ``hidden_hook`` (:meth:`~moe_lib.experts.ExpertBank.forward_expert`),
    so in evaluation mode the output is exactly the wrapped bank's.
    """

    # the views that take a hidden_hook: forward_expert (loop), forward_blocks (torch) and forward_padded; the
    # grouped_mm view takes one too but is not offered (its mask would be drawn over all rows at once, a different
    # random stream from the loop's); the fused triton kernels have no hook
    backends = ("loop", "torch")

    def __init__(self, bank: ExpertBank, p: float):
        kind = getattr(bank, "kind", None)
        if kind not in ("swiglu", "glu", "mlp"):
            raise ValueError(f"bank must be an expert bank of kind 'swiglu', 'glu' or 'mlp', got kind={kind!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ValueError(f"p must be a dropout probability in [0, 1), got {p!r}")
        super().__init__(bank.num_experts, bank.d_model, bank.d_ff, bank.d_out)
        self.bank, self.p, self.kind = bank, float(p), kind

    def _drop(self, h: Tensor) -> Tensor:
        return nn.functional.dropout(h, self.p, self.training)

    def forward_expert(self, e: int, x: Tensor) -> Tensor:
        return self.bank.forward_expert(e, x, hidden_hook=self._drop)

    def forward_blocks(self, blocks) -> list[Tensor]:
        return self.bank.forward_blocks(blocks, hidden_hook=self._drop)

    def forward_padded(self, x: Tensor) -> Tensor:
        return self.bank.forward_padded(x, hidden_hook=self._drop)

    def flops_per_token(self) -> int:
        return self.bank.flops_per_token()


def add_expert_dropout(model: nn.Module, p: float) -> int:
    """Wrap the expert bank of every :class:`~moe_lib.MoELayer` in ``model`` in :class:`DropoutExperts`
    with probability ``p`` (in place; a bank already wrapped gets the new ``p``). Returns the number of
    layers changed. Parameter roles are unchanged (the wrapped bank still counts as ``"experts"``)."""
    changed = 0
    for module in model.modules():
        if isinstance(module, MoELayer):
            if isinstance(module.experts, DropoutExperts):
                DropoutExperts(module.experts.bank, p)  # validates p
                module.experts.p = float(p)
            else:
                module.experts = DropoutExperts(module.experts, p)
            changed += 1
    return changed


@torch.no_grad()
def top_expert_assignments(model: nn.Module, idx: Tensor) -> Tensor:
    """Highest-weight expert of every token at every MoE layer: ``[num_moe_layers, tokens]`` (eval mode).

    ``idx`` is whatever ``model`` takes (token ids ``[B, L]`` for a language model, inputs for a task model).
    """
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not layers:
        raise ValueError("model has no MoELayer: nothing is routed")
    was_training = model.training
    model.eval()
    model(idx)
    model.train(was_training)
    return torch.stack([m.last_info.routing.dense_weights().argmax(dim=1) for m in layers])


def router_drift(before: Tensor, after: Tensor) -> Tensor:
    """Fraction of tokens whose top expert changed, per layer: ``before``/``after`` are
    :func:`top_expert_assignments` of the same inputs at two moments (``[layers, tokens]`` → ``[layers]``)."""
    if not isinstance(before, Tensor) or not isinstance(after, Tensor):
        raise TypeError("before and after must be tensors from top_expert_assignments")
    if before.shape != after.shape:
        raise ValueError(f"before and after must have the same shape, got {tuple(before.shape)} and {tuple(after.shape)}")
    return (before != after).double().mean(dim=-1)


@torch.no_grad()
def expert_utilisation(model: nn.Module, idx: Tensor) -> Tensor:
    """Share of the top-1 assignments each expert receives, per MoE layer: ``[layers, E]`` (rows sum to 1)."""
    top = top_expert_assignments(model, idx)
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    num_experts = layers[0].num_experts
    counts = torch.stack([torch.bincount(t, minlength=num_experts) for t in top]).double()
    return counts / counts.sum(dim=1, keepdim=True)


def finetune_lm(pretrained: nn.Module, train_data: Tensor, val_data: Tensor, *, train=PARAMETER_ROLES,
                expert_dropout: float = 0.0, z_loss_coef: float | None = None, lr: float = 1e-3,
                steps: int = 60, batch_size: int = 8, seed: int = 0, probe: Tensor | None = None,
                eval_windows: int | None = None, eval_every: int = 50, callback=None) -> dict:
    """Fine-tune a **copy** of a pre-trained :class:`~moe_lib.models.TransformerLM` with one of ST-MoE's
    recipes (Zoph et al. 2022, §4.3) and measure what the article worries about.

    Args:
        train: roles to update (:func:`freeze_roles`); expert_dropout: :func:`add_expert_dropout`'s ``p``;
        z_loss_coef: set every MoE layer's router z-loss weight (ST-MoE eq. 5; ``None`` keeps it);
        lr, steps, batch_size, seed: :func:`moe_lib.models.train_lm` (AdamW, warm-up + cosine);
        probe: token ids ``[B, L]`` on which router drift and expert utilisation are measured.
        callback, eval_every: :func:`~moe_lib.models.train_lm`'s ``callback(step, model)``, called every
            ``eval_every`` steps (e.g. to record the training and held-out loss as fine-tuning goes on).

    Returns:
        ``{"model", "history", "train_loss", "val_loss", "gap", "trainable", "drift", "utilisation"}`` —
        losses in nats/byte on the first ``eval_windows`` windows of each split (``None``: all of them) (``gap = val − train``),
        ``drift`` the mean over layers of :func:`router_drift` between the pre-trained and the fine-tuned
        routing of ``probe``, ``utilisation`` the fine-tuned model's :func:`expert_utilisation` ``[L, E]``.
    """
    import copy

    from ..models.lm_training import evaluate_lm, train_lm

    model = copy.deepcopy(pretrained)
    has_moe = any(isinstance(m, MoELayer) for m in model.modules())
    before = top_expert_assignments(model, probe) if (has_moe and probe is not None) else None
    if z_loss_coef is not None:
        for m in model.modules():
            if isinstance(m, MoELayer):
                m.z_loss_coef = float(z_loss_coef)
    if expert_dropout and has_moe:
        add_expert_dropout(model, expert_dropout)
    trainable = freeze_roles(model, train)
    history = train_lm(model, train_data, steps=steps, batch_size=batch_size, lr=lr, warmup=max(1, steps // 10),
                       seed=seed, eval_every=eval_every, callback=callback, progress=False)
    for p in model.parameters():
        p.requires_grad_(True)
    tr = evaluate_lm(model, train_data, max_windows=eval_windows)["loss"]
    va = evaluate_lm(model, val_data, max_windows=eval_windows)["loss"]
    out = {"model": model, "history": history, "train_loss": tr, "val_loss": va, "gap": va - tr,
           "trainable": sum(trainable.values()), "drift": float("nan"), "utilisation": None}
    if before is not None:
        out["drift"] = float(router_drift(before, top_expert_assignments(model, probe)).mean())
        out["utilisation"] = expert_utilisation(model, probe)
    return out


def finetune_recipes(pretrained: dict, recipes: dict, train_data: Tensor, val_data: Tensor, *, seed: int = 0,
                     **common) -> dict[str, dict]:
    """Run several fine-tuning recipes, each from a copy of a pre-trained model, with the same seed.

    ``pretrained`` maps a model name to a pre-trained :class:`~moe_lib.models.TransformerLM`; ``recipes``
    maps a recipe name to ``(model name, finetune_lm keyword arguments)``; ``common`` holds keyword arguments
    shared by every recipe (``steps``, ``batch_size``, ``probe``, ...; a recipe's own arguments win). Each
    recipe re-seeds the global RNGs (:func:`moe_lib.seed_everything`) and passes ``seed`` to
    :func:`finetune_lm`, so every recipe sees the same batches: recipes differ only in what they change,
    and a recipe's result does not depend on which recipes ran before it.

    Returns ``{recipe name: finetune_lm result}`` in ``recipes``' order.
    """
    from ..utils import seed_everything

    if not isinstance(recipes, dict) or not recipes:
        raise ValueError("recipes must be a non-empty dict: name -> (model name, finetune_lm kwargs)")
    out = {}
    for name, (base, kwargs) in recipes.items():
        if base not in pretrained:
            raise KeyError(f"recipe {name!r} names model {base!r}, not one of {list(pretrained)}")
        seed_everything(seed)
        out[name] = finetune_lm(pretrained[base], train_data, val_data, seed=seed, **{**common, **kwargs})
    return out


def per_seed_values(runs_by_seed: list[dict], key: str) -> dict[str, list[float]]:
    """``{recipe: [runs[recipe][key] for each seed]}`` from a list (one entry per seed, same recipes) of
    :func:`finetune_recipes` results: the per-seed values that :mod:`moe_lib.stats` summarises and compares
    (paired: entry ``i`` of every recipe comes from seed ``i``)."""
    if not runs_by_seed:
        raise ValueError("runs_by_seed must hold one finetune_recipes result per seed")
    names = list(runs_by_seed[0])
    for i, runs in enumerate(runs_by_seed):
        if list(runs) != names:
            raise ValueError(f"seed entry {i} has recipes {list(runs)}, entry 0 has {names}")
    return {name: [float(runs[name][key]) for runs in runs_by_seed] for name in names}
