"""What the routers of a trained :class:`~moe_lib.models.TransformerLM` do (chapter 9).

* :func:`routing_trace` — every MoE layer's chosen experts for a batch of sequences;
* :func:`consecutive_reuse` and :func:`reuse_by_chance` — how often token ``i`` and token ``i+1`` go to
  the same expert, against what independent routing would give (Jiang et al. 2024, §5 and Table 5);
* :func:`top_expert_change` — the fraction of tokens whose top expert differs between two snapshots of
  the routing (routing stability during training).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..layer import MoELayer


@torch.no_grad()
def routing_trace(model: nn.Module, idx: Tensor) -> list[Tensor]:
    """Run ``model`` on ``idx [B, L]`` (eval mode) and return, for each MoE layer in order, the chosen
    experts ``[B, L, k]`` ordered by decreasing gate value (column 0 = the top expert)."""
    was_training = model.training
    model.eval()
    model(idx)
    model.train(was_training)
    out = []
    for layer in (m for m in model.modules() if isinstance(m, MoELayer)):
        r = layer.last_info.routing
        order = r.weights.argsort(dim=-1, descending=True, stable=True)
        out.append(r.experts.gather(-1, order).reshape(*idx.shape, -1).cpu())
    return out


def consecutive_reuse(experts: Tensor) -> dict[str, float]:
    """Repetition of expert assignments between consecutive tokens of the same sequence.

    ``experts`` is ``[B, L, k]`` (column 0 = top expert). Returns ``first`` — the share of pairs
    ``(i, i+1)`` whose top experts are equal (Mixtral's "first choice" column) — and, for ``k ≥ 2``,
    ``any`` — the share whose chosen sets intersect (Mixtral's "first or second choice").
    """
    if not isinstance(experts, Tensor) or experts.dim() != 3 or experts.shape[1] < 2:
        raise ValueError("experts must be a [batch, length >= 2, k] tensor of expert ids")
    a, b = experts[:, :-1], experts[:, 1:]
    out = {"first": float((a[..., 0] == b[..., 0]).double().mean())}
    if experts.shape[-1] >= 2:
        overlap = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).any(-1)
        out["any"] = float(overlap.double().mean())
    return out


def reuse_by_chance(experts: Tensor, num_experts: int) -> dict[str, float]:
    """What :func:`consecutive_reuse` would be if consecutive tokens were routed independently.

    ``first_uniform`` = ``1/E`` (Mixtral's 12.5 % for ``E = 8``); ``first_marginal`` = ``Σ_e p_e²`` with
    ``p_e`` the observed share of tokens whose top expert is ``e`` (independent draws from the real,
    unbalanced load — the fairer baseline); ``any_uniform`` = ``1 − C(E−k, k)/C(E, k)`` for two
    independent uniform ``k``-sets (46.4 % for ``E = 8, k = 2``).
    """
    k = experts.shape[-1]
    p = torch.bincount(experts[..., 0].reshape(-1), minlength=num_experts).double()
    p = p / p.sum()
    out = {"first_uniform": 1.0 / num_experts, "first_marginal": float((p * p).sum())}
    if k >= 2:
        out["any_uniform"] = 1.0 - math.comb(num_experts - k, k) / math.comb(num_experts, k)
    return out


def top_expert_change(before: Tensor, after: Tensor) -> float:
    """Share of tokens whose top expert (column 0) differs between two traces of the same tokens."""
    if before.shape != after.shape:
        raise ValueError(f"traces must have the same shape, got {tuple(before.shape)} and {tuple(after.shape)}")
    return float((before[..., 0] != after[..., 0]).double().mean())


def plot_routed_text(ax, data: Tensor, experts: Tensor, *, width: int = 64, colors=None) -> None:
    """Draw bytes ``data [N]`` as characters on a grid ``width`` wide, each on a background of its
    expert's colour (``experts [N]``, e.g. the top expert of a layer) — routing made visible."""
    from ..book.plot import expert_color

    colors = colors or expert_color
    text = bytes(int(b) for b in data).decode("utf-8", errors="replace")
    row = col = 0
    for ch, e in zip(text, experts.tolist()):
        if ch == "\n":
            ax.add_patch(_cell(col, row, colors(e)))
            row, col = row + 1, 0
            continue
        ax.add_patch(_cell(col, row, colors(e)))
        if ch.strip():
            ax.text(col + 0.5, row + 0.5, ch, ha="center", va="center", family="monospace", fontsize=7)
        col += 1
        if col >= width:
            row, col = row + 1, 0
    ax.set(xlim=(0, width), ylim=(row + 1, 0), xticks=[], yticks=[])
    ax.set_aspect(1.6)


def _cell(col: int, row: int, color: str):
    from matplotlib.patches import Rectangle

    return Rectangle((col, row), 1, 1, facecolor=color, alpha=0.55, linewidth=0)


def train_with_snapshots(cfg, train_data: Tensor, probe: Tensor, *, steps: int, batch_size: int, seed: int,
                         snapshot_every: int, val_data: Tensor | None = None, device: str = "cpu"):
    """One seeded run of chapter 9: seed everything with ``seed``, build a
    :class:`~moe_lib.models.TransformerLM` from ``cfg``, train it with :func:`~moe_lib.models.train_lm`
    (batches drawn from ``seed``) and take a :func:`routing_trace` of the held-out windows ``probe
    [B, L]`` at step 0 and every ``snapshot_every`` steps. Returns ``(model, snapshots)`` with
    ``snapshots[step]`` the trace at that step."""
    from ..utils import seed_everything
    from .lm_training import train_lm
    from .transformer import TransformerLM

    seed_everything(seed)
    model = TransformerLM(cfg).to(device)
    probe = probe.to(device)
    snapshots: dict[int, list[Tensor]] = {}

    def snapshot(step: int, m: nn.Module) -> None:
        snapshots[step] = routing_trace(m, probe)

    train_lm(model, train_data.to(device), val_data=None if val_data is None else val_data.to(device),
             steps=steps, batch_size=batch_size, seed=seed, eval_every=snapshot_every, eval_windows=16,
             callback=snapshot, progress=False)
    return model, snapshots


def routing_summary(trace: list[Tensor], labels: Tensor, num_experts: int, label_names, *,
                    seed: int = 0) -> list[dict[str, float]]:
    """Chapter 9's measurements of one trained model, one dict per MoE layer of ``trace`` (from
    :func:`routing_trace`; ``labels`` the token type of every traced token, same ``[B, L]`` shape).

    Keys: ``purity`` (:func:`moe_lib.metrics.purity` of the top expert against the labels) and
    ``purity, shuffled labels`` (the same routing against the labels permuted with ``seed``: what a router
    blind to the labels scores); ``top choice repeats`` / ``either choice overlaps``
    (:func:`consecutive_reuse`) and ``chance, real load`` (:func:`reuse_by_chance`'s ``first_marginal``);
    and for each name ``n`` of ``label_names``, ``share on top expert: n`` — the share of that label's
    tokens sent to its most used expert (NaN for a label absent from the trace).
    """
    from ..metrics import purity, specialisation

    flat = labels.reshape(-1)
    g = torch.Generator().manual_seed(seed)
    shuffled = flat[torch.randperm(flat.numel(), generator=g)]
    out = []
    for experts in trace:
        top = experts[..., 0].reshape(-1)
        counts = specialisation(top, flat, num_experts, len(label_names))
        row = {"purity": purity(counts),
               "purity, shuffled labels": purity(specialisation(top, shuffled, num_experts, len(label_names)))}
        reuse = consecutive_reuse(experts)
        row["top choice repeats"] = reuse["first"]
        row["chance, real load"] = reuse_by_chance(experts, num_experts)["first_marginal"]
        if "any" in reuse:
            row["either choice overlaps"] = reuse["any"]
        totals = counts.sum(1)
        for name, best, total in zip(label_names, counts.max(1).values.tolist(), totals.tolist()):
            row[f"share on top expert: {name}"] = best / total if total else float("nan")
        out.append(row)
    return out
