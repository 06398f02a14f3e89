"""Sparse upcycling (Komatsuzaki et al. 2023): start a mixture of experts from a trained dense model.

Every expert of the new MoE layer is a copy of the dense FFN and the router is new (its own random init).
If the router's per-token weights sum to 1 — any token-choice router with renormalised top-k weights, or
the dense softmax — the upcycled layer computes ``Σ_e w_e(x) FFN(x) = FFN(x)``: the MoE starts exactly
where the dense model stopped, whatever the router says (tested), and training then lets the copies diverge.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from .._validate import check_int
from ..experts import ExpertBank, SwiGLUExperts
from ..layer import MoELayer
from ..models.transformer import SwiGLU, TransformerLM
from ..routers import Router


def _experts_from_ffns(ffns: Sequence[SwiGLU], dtype: torch.dtype | None = None) -> SwiGLUExperts:
    """A SwiGLU expert bank whose expert ``e`` is the dense FFN ``ffns[e]`` (built with
    :meth:`~moe_lib.experts.ExpertBank.from_weights`: copies, no random init; ``nn.Linear`` stores
    ``[out, in]``, the bank ``[E, in, out]``), in the FFNs' dtype unless ``dtype`` is given."""
    stacked = [torch.stack([getattr(f, name).weight.t() for f in ffns]).to(dtype=dtype)
               for name in ("gate", "up", "down")]
    return SwiGLUExperts.from_weights(*stacked)


def _rebuilt_layer(layer: MoELayer, *, router: Router | None = None, experts: ExpertBank | None = None) -> MoELayer:
    """A new :class:`~moe_lib.MoELayer` made of ``layer``'s parts — its router, dispatcher, backend and
    loss weights — with ``router`` and/or ``experts`` in place of its own (injected, not copied into).

    How a layer that a model built from its config (a :class:`~moe_lib.models.TransformerLM`'s
    ``block.ffn.moe``, a :class:`~moe_lib.book.tasks.TaskModel`'s ``moe``) gets new experts: assign the result in
    its place. The new layer has ``layer``'s train/eval mode."""
    new = MoELayer(layer.d_model, layer.d_ff, layer.num_experts, router=layer.router if router is None else router,
                   expert=layer.experts if experts is None else experts, dispatcher=layer.dispatcher,
                   backend=layer.backend, aux_loss_coef=layer.aux_loss_coef, z_loss_coef=layer.z_loss_coef,
                   importance_loss_coef=layer.importance_loss_coef, load_loss_coef=layer.load_loss_coef)
    return new.train(layer.training)


def upcycle_ffn(ffn: SwiGLU, num_experts: int, top_k: int | None = None, *, router: str = "topk",
                **moe_kwargs) -> MoELayer:
    """A :class:`~moe_lib.MoELayer` of ``num_experts`` SwiGLU experts, each a copy of ``ffn``, with a new
    router (``router``, ``top_k`` and ``moe_kwargs`` as for :class:`~moe_lib.MoELayer`; ``router`` may be a
    ready-made :class:`~moe_lib.routers.Router`). The experts are a bank built from ``ffn``'s weights
    repeated (:meth:`~moe_lib.experts.ExpertBank.from_weights`), handed to the layer as its expert bank.

    Raises:
        TypeError: ``ffn`` is not a :class:`~moe_lib.models.SwiGLU`.
        ValueError: ``moe_kwargs`` asks for an expert kind other than ``"swiglu"``.
    """
    if not isinstance(ffn, SwiGLU):
        raise TypeError(f"ffn must be a moe_lib.models.SwiGLU (a dense SwiGLU FFN), got {type(ffn).__name__}")
    num_experts = check_int("num_experts", num_experts, minimum=1)
    d_model, d_ff = ffn.gate.in_features, ffn.gate.out_features
    expert = moe_kwargs.pop("expert", "swiglu")
    if expert != "swiglu":
        raise ValueError(f"expert must be 'swiglu' to copy a SwiGLU FFN, got {expert!r}")
    experts = _experts_from_ffns([ffn] * num_experts, dtype=torch.get_default_dtype())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # top_k=1 with renormalised weights: every weight is 1 (see TopKRouter)
        layer = MoELayer(d_model, d_ff, num_experts, top_k, router=router, expert=experts, **moe_kwargs)
    # the experts used to be drawn here (after the router) and overwritten: keeps the seeded RNG stream of
    # earlier releases, so every seeded result after an upcycling (the book's chapter 16) stays where it was
    experts.consume_init_draws()
    return layer.to(ffn.gate.weight.device)


def upcycle(dense: TransformerLM, num_experts: int = 8, top_k: int = 2, *, router: str = "topk",
            router_std: float = 0.02, **config_overrides) -> TransformerLM:
    """Sparse upcycling of a dense :class:`~moe_lib.models.TransformerLM` (Komatsuzaki et al. 2023, §3):
    the same model with every FFN replaced by ``num_experts`` copies of it behind a new ``router``
    (initialised ``N(0, router_std²)``, the LM's own init). Embeddings, attention and norms are copied.

    ``config_overrides`` change other :class:`~moe_lib.models.LMConfig` fields of the MoE (``aux_loss_coef``,
    ``z_loss_coef``, ``moe_options``, ``name``). Returns a new model on the dense model's device; the dense
    model is not modified. Each MoE layer is built from parts: the config's router (initialised before it is
    injected), dispatcher and options, and a bank of the dense FFN's copies
    (:meth:`~moe_lib.experts.ExpertBank.from_weights`).

    Raises:
        TypeError: ``dense`` is not a TransformerLM. ValueError: ``dense`` is not dense (``cfg.ffn != "dense"``),
            or ``moe_options`` asks for experts other than ``"swiglu"``.
    """
    if not isinstance(dense, TransformerLM):
        raise TypeError(f"dense must be a moe_lib.models.TransformerLM, got {type(dense).__name__}")
    if dense.cfg.ffn != "dense":
        raise ValueError(f"dense must have cfg.ffn='dense' to be upcycled, got ffn={dense.cfg.ffn!r}")
    num_experts = check_int("num_experts", num_experts, minimum=1)
    top_k = check_int("top_k", top_k, minimum=1, maximum=num_experts)
    fields = dict(ffn="moe", num_experts=num_experts, top_k=top_k, router=router, num_shared=0,
                  name=f"upcycled {dense.cfg.name}".strip())
    fields.update(config_overrides)
    cfg = dataclasses.replace(dense.cfg, **fields)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        moe = TransformerLM(cfg).to(dense.embed.weight.device)
    state = {k: v for k, v in dense.state_dict().items() if ".ffn." not in k}
    missing, _ = moe.load_state_dict(state, strict=False)
    assert all(".ffn." in k for k in missing), missing
    if moe.blocks[0].ffn.moe.experts.kind != "swiglu":
        raise ValueError(f"moe_options must leave expert='swiglu' to copy the dense SwiGLU FFNs, got expert="
                         f"{moe.blocks[0].ffn.moe.experts.kind!r}")
    for block_d, block_m in zip(dense.blocks, moe.blocks):
        built = block_m.ffn.moe  # the config's layer: its router, dispatcher and options are kept
        experts = _experts_from_ffns([block_d.ffn] * num_experts, dtype=built.experts.w_gate.dtype)
        # earlier releases drew a spare router's gate and the experts' init here (upcycle_ffn's), then
        # overwrote them: the same draws keep the seeded RNG stream, so the book's chapter 16 does not move
        torch.empty(num_experts, cfg.d_model).uniform_()
        experts.consume_init_draws()
        with torch.no_grad():
            nn.init.normal_(built.router.gate.weight, std=router_std)  # the new router's init, before injection
        block_m.ffn.moe = _rebuilt_layer(built, experts=experts)
    return moe


@dataclasses.dataclass
class UpcyclingRun:
    """One training run of :func:`upcycling_comparison`: the trained ``model``, its validation-loss curve
    (``losses`` at cumulative training FLOPs ``flops``, both NumPy arrays, the first point at the run's
    start) and its number of training ``steps``."""

    model: TransformerLM
    flops: "np.ndarray"
    losses: "np.ndarray"
    steps: int


def upcycling_comparison(train_data: torch.Tensor, val_data: torch.Tensor, dense_cfg, *, dense_steps: int,
                         extra_steps: int, num_experts: int = 4, top_k: int = 2, batch_size: int = 16,
                         extra_lr: float = 1e-3, seed: int = 0, eval_every: int = 20,
                         eval_windows: int = 32) -> dict:
    """Sparse upcycling against its two baselines **at matched training FLOPs**, for one seed.

    A dense :class:`~moe_lib.models.TransformerLM` (``dense_cfg``) is pre-trained for ``dense_steps`` steps;
    then, from it,

    * ``"upcycled"``: :func:`upcycle` (``num_experts``, ``top_k``) trained ``extra_steps`` more steps;
    * ``"dense continued"``: a copy of the dense model trained for as many steps as cost the upcycled run's
      extra FLOPs (``round(extra_steps · F_moe / F_dense)``, with the same schedule and peak ``extra_lr``);
    * ``"from scratch"``: an MoE of the upcycled model's shape from random weights, trained for as many steps
      as cost the upcycled run's **total** FLOPs, dense pre-training included
      (``round((dense_steps · F_dense + extra_steps · F_moe) / F_moe)``, the default peak learning rate).

    ``F`` is forward FLOPs per token counted by :func:`moe_lib.models.flops_per_token`; a training step costs
    ``3 · F · batch_size · seq_len`` (forward plus a backward of about twice the forward). Matching the FLOPs
    to the step makes the three runs differ by at most half a step's cost. ``seed`` seeds the weights, the
    batches and (``seed + 1``) the new routers. Every run's curve is evaluated every ``eval_every`` steps on
    the first ``eval_windows`` validation windows (``train_lm``), so its last point is the final loss on them.

    Returns ``{"dense", "dense continued", "upcycled", "from scratch"}`` → :class:`UpcyclingRun` (the
    ``"dense"`` run is the pre-training all others but ``"from scratch"`` start from), plus ``"flops per
    token"``: ``{"dense": F_dense, "moe": F_moe}``.
    """
    import copy

    import numpy as np

    from ..models import flops_per_token, train_lm
    from ..utils import seed_everything

    dense_steps = check_int("dense_steps", dense_steps, minimum=1)
    extra_steps = check_int("extra_steps", extra_steps, minimum=1)
    device = train_data.device
    seed_everything(seed)
    dense = TransformerLM(dense_cfg).to(device)
    hist = train_lm(dense, train_data, steps=dense_steps, batch_size=batch_size, seed=seed, val_data=val_data,
                    eval_every=eval_every, eval_windows=eval_windows, progress=False)
    seed_everything(seed + 1)
    upcycled = upcycle(dense, num_experts, top_k)
    f = {"dense": flops_per_token(dense), "moe": flops_per_token(upcycled)}
    per_step = {k: 3 * v * batch_size * dense_cfg.seq_len for k, v in f.items()}
    pre_flops = dense_steps * per_step["dense"]
    runs = {"dense": UpcyclingRun(dense, np.asarray(hist.eval_step) * per_step["dense"], np.asarray(hist.val_loss),
                                  dense_steps)}
    continued_steps = round(extra_steps * f["moe"] / f["dense"])
    for name, start, steps, kind in [("dense continued", dense, continued_steps, "dense"),
                                     ("upcycled", upcycled, extra_steps, "moe")]:
        model = copy.deepcopy(start)
        h = train_lm(model, train_data, steps=steps, batch_size=batch_size, lr=extra_lr, seed=seed + 1,
                     val_data=val_data, eval_every=eval_every, eval_windows=eval_windows, progress=False)
        runs[name] = UpcyclingRun(model, pre_flops + np.asarray(h.eval_step) * per_step[kind],
                                  np.asarray(h.val_loss), steps)
    scratch_steps = round((pre_flops + extra_steps * per_step["moe"]) / per_step["moe"])
    seed_everything(seed)
    scratch = TransformerLM(dataclasses.replace(upcycled.cfg, name="MoE from scratch")).to(device)
    h = train_lm(scratch, train_data, steps=scratch_steps, batch_size=batch_size, seed=seed, val_data=val_data,
                 eval_every=eval_every, eval_windows=eval_windows, progress=False)
    runs["from scratch"] = UpcyclingRun(scratch, np.asarray(h.eval_step) * per_step["moe"], np.asarray(h.val_loss),
                                        scratch_steps)
    runs["flops per token"] = f
    return runs
