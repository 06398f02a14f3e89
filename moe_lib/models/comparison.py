"""Several language models trained over the same seeds and measured on one fixed validation set (chapter 8).

:func:`train_over_seeds` trains every configuration once per seed — seed ``s`` fixes both the initial weights
(``seed_everything(s)`` before the model is built) and the batches (``train_lm(seed=s)``) — so seed ``s`` of one
model is paired with seed ``s`` of another (:func:`moe_lib.stats.compare`). The validation loss is measured on
**one** window set, ``spread_windows(val_data, seq_len, eval_windows)``, at every ``eval_every``-th step and at
the end; the last point of each curve *is* the final loss, so a table of final losses and a figure of curves
cannot disagree. :func:`speedups` is the step-basis speed-up of Fedus et al. (2022, Figure 4 right).
"""
from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .._validate import check_int
from .windows import spread_windows
from ..utils import seed_everything
from .lm_training import LMHistory, loss_on_windows, steps_to_reach, train_lm
from .transformer import LMConfig, TransformerLM

__all__ = ["SeedRun", "loss_on_windows", "train_over_seeds", "speedups"]


@dataclass
class SeedRun:
    """One training run: ``history`` (its ``eval_step``/``val_loss`` measured on the fixed window set, no
    step-0 point), ``final_loss`` (= ``history.val_loss[-1]``, nats/byte) and ``train_seconds`` (wall time
    of the training steps, evaluations excluded)."""

    name: str
    seed: int
    history: LMHistory
    final_loss: float
    train_seconds: float


def train_over_seeds(configs: Mapping[str, LMConfig], train_data: Tensor, val_data: Tensor, *,
                     seeds: Sequence[int], steps: int, batch_size: int = 16, eval_every: int = 25,
                     eval_windows: int | None = None, lr: float = 3e-3, warmup: int = 20,
                     device: str | torch.device = "cpu") -> dict[str, list[SeedRun]]:
    """Train each of ``configs`` once per seed of ``seeds``; returns ``{name: [SeedRun per seed, in seed order]}``.

    ``eval_windows``: how many windows of ``spread_windows`` form the validation set (``None``: the whole
    of ``val_data``). Models are built and trained one at a time (seed outer, configuration inner), so
    memory holds one model.
    """
    if not isinstance(configs, Mapping) or not configs:
        raise ValueError("configs must be a non-empty mapping of name -> LMConfig")
    seeds = [check_int("seed", s, minimum=0) for s in seeds]
    if len(seeds) < 1 or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct non-negative ints, got {seeds}")
    eval_every = check_int("eval_every", eval_every, minimum=1)
    seq_lens = {cfg.seq_len for cfg in configs.values()}
    if len(seq_lens) != 1:
        raise ValueError(f"all configs must share one seq_len (one validation set), got {sorted(seq_lens)}")
    x_val, y_val = spread_windows(val_data, seq_lens.pop(), eval_windows)
    train_data = train_data.to(device)
    runs: dict[str, list[SeedRun]] = {name: [] for name in configs}
    for seed in seeds:
        for name, cfg in configs.items():
            seed_everything(seed)
            model = TransformerLM(cfg).to(device)
            eval_step: list[int] = []
            val_loss: list[float] = []
            eval_time = [0.0]

            def record(step: int, m: TransformerLM) -> None:
                if step == 0:
                    return
                start = time.perf_counter()
                eval_step.append(step)
                val_loss.append(loss_on_windows(m, x_val, y_val))
                eval_time[0] += time.perf_counter() - start

            start = time.perf_counter()
            history = train_lm(model, train_data, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup,
                               seed=seed, eval_every=eval_every, callback=record, progress=False)
            seconds = time.perf_counter() - start - eval_time[0]
            history.eval_step, history.val_loss = eval_step, val_loss
            runs[name].append(SeedRun(name, seed, history, val_loss[-1] if val_loss else math.nan, seconds))
    return runs


def speedups(runs: Mapping[str, Sequence[SeedRun]], reference: str = "dense") -> dict[str, list[float]]:
    """Per seed, the steps ``reference`` needs to reach its own final loss divided by the steps each model
    needs to reach that loss (interpolated between evaluations, :func:`steps_to_reach`); ``nan`` where a
    model never reaches it. This is the step-basis speed-up of Fedus et al. (2022, Figure 4 right: a
    64-expert Switch-Base reaches T5-Base's step-450k quality at step 60k, "7.5x")."""
    if reference not in runs:
        raise ValueError(f"reference must be one of {list(runs)}, got {reference!r}")
    ref = runs[reference]
    out = {}
    for name, seed_runs in runs.items():
        if len(seed_runs) != len(ref):
            raise ValueError(f"{name} has {len(seed_runs)} runs but {reference} has {len(ref)}; pair them by seed")
        values = []
        for run, base in zip(seed_runs, ref):
            target = base.history.val_loss[-1]
            values.append(steps_to_reach(base.history, target) / steps_to_reach(run.history, target))
        out[name] = values
    return out
