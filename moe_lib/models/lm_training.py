"""Training, evaluation and exact checkpoint/resume for :class:`~moe_lib.models.TransformerLM`.

:func:`train_lm` minimises next-token cross-entropy plus the sum of the per-layer auxiliary losses with
AdamW and a warm-up + cosine learning rate. Batches are random windows drawn from a generator of their
own. A checkpoint (:func:`save_checkpoint`) holds the model, the optimiser, that generator's state,
torch's global RNG state, the step and the history so far; it is written with ``torch.save`` and read
with ``torch.load(..., weights_only=True)`` (no pickled code), and a run resumed from it reproduces the
uninterrupted run bit for bit (on the same machine and thread count).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from .._validate import check_int, check_positive_float
from .windows import fixed_windows, random_windows
from .transformer import LMConfig, TransformerLM

LN2 = math.log(2.0)


@dataclass
class LMHistory:
    """Per step: ``step``, ``train_loss`` (cross-entropy, nats/byte), ``aux_loss`` (summed over layers)
    and ``aux_per_layer``; at each evaluation: ``eval_step`` and ``val_loss``."""

    step: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    aux_loss: list[float] = field(default_factory=list)
    aux_per_layer: list[list[float]] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``lr/10`` at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def loss_on_windows(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    """Mean next-token cross-entropy (nats) of ``model`` on the windows ``x`` → ``y`` (``[W, L]`` each), in
    evaluation mode, ``batch_size`` windows per forward pass."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, x.shape[0], batch_size):
        logits = model(x[i:i + batch_size].to(device))
        total += float(nn.functional.cross_entropy(logits.flatten(0, 1), y[i:i + batch_size].to(device).flatten(),
                                                   reduction="sum"))
    model.train(was_training)
    return total / y.numel()


def evaluate_lm(model: nn.Module, data: Tensor, *, seq_len: int | None = None, batch_size: int = 32,
             max_windows: int | None = 64) -> dict[str, float]:
    """Mean next-byte cross-entropy (``loss``, nats) and ``bits_per_byte`` (= loss / ln 2 for a
    byte-level model) on the first ``max_windows`` non-overlapping windows of ``data``."""
    seq_len = model.cfg.seq_len if seq_len is None else seq_len
    x, y = fixed_windows(data, seq_len, max_windows)
    loss = loss_on_windows(model, x, y, batch_size=batch_size)
    return {"loss": loss, "bits_per_byte": loss / LN2}


def save_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, *, step: int,
                    generator: torch.Generator, history: LMHistory | None = None) -> None:
    """Write everything a bit-exact resume needs (see the module docstring) to ``path``."""
    state = {
        "config": model.cfg.to_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": int(step),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "history": asdict(history or LMHistory()),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(state, path)


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint with ``weights_only=True``; returns the dict :func:`save_checkpoint` wrote."""
    return torch.load(path, map_location=map_location, weights_only=True)


def model_from_checkpoint(path: str, map_location: str | torch.device = "cpu") -> TransformerLM:
    """Rebuild the :class:`TransformerLM` of a checkpoint with its trained weights (eval mode)."""
    state = load_checkpoint(path, map_location)
    model = TransformerLM(LMConfig(**state["config"]))
    model.load_state_dict(state["model"])
    return model.to(map_location).eval()


def train_lm(
    model: TransformerLM,
    train_data: Tensor,
    *,
    steps: int = 300,
    batch_size: int = 16,
    lr: float = 3e-3,
    warmup: int = 20,
    weight_decay: float = 0.0,
    seed: int = 0,
    val_data: Tensor | None = None,
    eval_every: int = 50,
    eval_windows: int = 32,
    checkpoint_path: str | None = None,
    checkpoint_every: int | None = None,
    resume_from: str | None = None,
    stop_at: int | None = None,
    callback: Callable[[int, TransformerLM], None] | None = None,
    progress: bool = True,
    description: str | None = None,
) -> LMHistory:
    """Train ``model`` for ``steps`` steps of ``batch_size`` random windows of ``model.cfg.seq_len`` bytes.

    Args:
        train_data, val_data: 1-D integer token tensors (e.g. :class:`moe_lib.book.corpus.Corpus` splits).
        lr, warmup, weight_decay: AdamW and its schedule (:func:`lr_at`; the schedule depends on
            ``steps``, so a resumed run must pass the same ``steps``).
        seed: seeds the batch generator (the model's initial weights come from the caller's seeding).
        eval_every: evaluate on ``val_data`` (first ``eval_windows`` windows) every so many steps and at
            the end; ignored without ``val_data``.
        checkpoint_path, checkpoint_every: save a checkpoint there every so many steps and at the end.
        resume_from: a checkpoint to continue from (model, optimiser, RNGs, step, history).
        stop_at: stop after this step (simulates an interruption; the schedule still spans ``steps``).
        callback: ``callback(step, model)`` after every ``eval_every``-th step (and at step 0, before
            training) — e.g. to record routing snapshots.
        progress: show a tqdm bar (on stderr).

    Returns:
        The :class:`LMHistory` (including the steps before a resume).
    """
    from tqdm import tqdm

    steps = check_int("steps", steps, minimum=0)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    lr = check_positive_float("lr", lr)
    warmup = check_int("warmup", warmup, minimum=1)
    eval_every = check_int("eval_every", eval_every, minimum=1)
    if checkpoint_every is not None:
        checkpoint_every = check_int("checkpoint_every", checkpoint_every, minimum=1)
    end = steps if stop_at is None else min(steps, check_int("stop_at", stop_at, minimum=0))
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    history, start = LMHistory(), 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history = LMHistory(**state["history"])
        start = state["step"]

    def run_eval(step: int) -> None:
        if val_data is not None and (not history.eval_step or history.eval_step[-1] != step):
            history.eval_step.append(step)
            history.val_loss.append(evaluate_lm(model, val_data, max_windows=eval_windows)["loss"])

    if start == 0:
        run_eval(0)
        if callback is not None:
            callback(0, model)
    model.train()
    bar = tqdm(range(start, end), desc=description, disable=not progress, mininterval=1.0, leave=True)
    for step in bar:
        x, y = random_windows(train_data, batch_size, model.cfg.seq_len, generator)
        x, y = x.to(device), y.to(device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        logits = model(x)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        per_layer = model.aux_losses()
        aux = torch.stack(per_layer).sum() if per_layer else torch.zeros((), device=device)
        optimizer.zero_grad(set_to_none=True)
        (loss + aux).backward()
        optimizer.step()
        done = step + 1
        history.step.append(done)
        history.train_loss.append(float(loss.detach()))
        history.aux_loss.append(float(aux.detach()))
        history.aux_per_layer.append([float(a.detach()) for a in per_layer])
        if done % eval_every == 0 or done == steps:
            run_eval(done)
            if callback is not None:
                callback(done, model)
            model.train()
        if checkpoint_path is not None and checkpoint_every is not None and done % checkpoint_every == 0:
            save_checkpoint(checkpoint_path, model, optimizer, step=done, generator=generator, history=history)
    if checkpoint_path is not None:
        save_checkpoint(checkpoint_path, model, optimizer, step=end, generator=generator, history=history)
    model.eval()
    return history


def steps_to_reach(history: LMHistory, target: float) -> float:
    """Training steps until the validation loss first reaches ``target``, linearly interpolated between the
    two evaluations that straddle it; ``nan`` if it never does.

    This is the step-basis speed-up of Fedus et al. (2022, Figure 4 right; their Figure 5 is the wall-clock
    version): the steps a baseline needs to reach its own final loss divided by the steps another model
    needs to reach the same loss.
    """
    steps = [float(s) for s in history.eval_step]
    losses = [float(v) for v in history.val_loss]
    for i, loss in enumerate(losses):
        if loss <= target:
            if i == 0:
                return steps[0]
            frac = (losses[i - 1] - target) / (losses[i - 1] - loss)
            return steps[i - 1] + frac * (steps[i] - steps[i - 1])
    return float("nan")
