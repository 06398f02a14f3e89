"""How to train a mixture (chapter 4): the two-stage recipe, an ensemble, and a sparse copy for inference.

The article the book answers describes training in two stages: first train experts on subsets of the
data, then fit a gating network that learns which expert to trust for which input. Here:

* :func:`kmeans` splits the inputs into ``E`` clusters (Lloyd's algorithm, deterministic from a seed);
* :func:`fit_experts_on_subsets` trains expert ``e`` of a bank on cluster ``e`` only (all experts at once);
* :func:`fit_gate` freezes the experts and trains only the router of the :class:`~moe_lib.MoELayer`;
* :func:`fit_ensemble` trains every expert on all the data (an ensemble), and :class:`EnsembleMean`
  averages them;
* :func:`sparse_copy` turns a dense-router layer into a top-``k`` one with the same weights, for
  inference that runs only ``k`` experts per input.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .._validate import check_int, check_positive_float
from ..experts import MLPExperts, ExpertBank
from ..layer import MoELayer


def kmeans(x: Tensor, k: int, *, iters: int = 50, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means on ``x [T, d]`` with k-means++ seeding. Returns ``(centres [k, d], assign [T])``."""
    k = check_int("k", k, minimum=1, maximum=x.shape[0])
    iters = check_int("iters", iters, minimum=1)
    g = torch.Generator().manual_seed(check_int("seed", seed))
    centres = x[torch.randint(0, x.shape[0], (1,), generator=g)]
    for _ in range(1, k):
        d2 = torch.cdist(x, centres).square().min(dim=1).values
        centres = torch.cat([centres, x[torch.multinomial(d2 / d2.sum(), 1, generator=g)]])
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(dim=1)
        new = torch.stack([x[assign == j].mean(0) if (assign == j).any() else centres[j] for j in range(k)])
        if torch.equal(new, centres):
            break
        centres = new
    return centres, torch.cdist(x, centres).argmin(dim=1)


def _all_experts(bank: ExpertBank, x: Tensor) -> Tensor:
    """Every expert of ``bank`` on every row: ``[T, d]`` -> ``[E, T, d_out]``."""
    return bank.forward_padded(x.unsqueeze(0).expand(bank.num_experts, -1, -1))


def fit_experts_on_subsets(bank: ExpertBank, x: Tensor, y: Tensor, assign: Tensor, *, steps: int = 1000,
                           lr: float = 1e-2) -> list[float]:
    """Stage 1: train expert ``e`` on the rows with ``assign == e`` only (MSE, full-batch Adam), all
    experts in one batched pass. Returns the loss per step (sum over experts of their own MSE)."""
    steps, lr = check_int("steps", steps, minimum=0), check_positive_float("lr", lr)
    if assign.shape != (x.shape[0],) or int(assign.max()) >= bank.num_experts or int(assign.min()) < 0:
        raise ValueError(f"assign must be [T={x.shape[0]}] expert ids in [0, {bank.num_experts}), got shape {tuple(assign.shape)}")
    mask = nn.functional.one_hot(assign, bank.num_experts).T.to(x.dtype)      # [E, T]
    per_expert = mask.sum(1).clamp_min(1)
    opt = torch.optim.Adam(bank.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        err = (_all_experts(bank, x) - y.unsqueeze(0)).square().mean(-1)      # [E, T]
        loss = ((err * mask).sum(1) / per_expert).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def fit_gate(layer: MoELayer, x: Tensor, y: Tensor, *, steps: int = 1000, lr: float = 1e-2) -> list[float]:
    """Stage 2: train only ``layer.router`` (experts frozen) to minimise the MSE of the blend
    ``Σ_i p_i(x) h_i(x)`` — ``layer(x)`` for a dense router. The frozen experts' outputs are computed once.
    Returns the loss per step."""
    steps, lr = check_int("steps", steps, minimum=0), check_positive_float("lr", lr)
    if layer.router.name != "dense":
        raise TypeError(f"fit_gate needs a MoELayer with router='dense', got router={layer.router.name!r}")
    with torch.no_grad():
        experts_out = layer.expert_outputs(x)                                  # [T, E, D]
    opt = torch.optim.Adam(layer.router.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        blend = torch.einsum("te,ted->td", layer.router(x).probs, experts_out)
        loss = nn.functional.mse_loss(blend, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def gate_from_centres(layer: MoELayer, centres: Tensor, *, sharpness: float = 1.0) -> MoELayer:
    """Initialise a linear softmax gate (with bias) so that it routes every input to its nearest centre.

    ``logit_e(x) = sharpness · (2 c_e·x − ‖c_e‖²) = sharpness · (‖x‖² − ‖x − c_e‖²)``: the ``‖x‖²`` term is
    the same for every expert, so the softmax is ``softmax(−sharpness · ‖x − c_e‖²)`` and its argmax is the
    k-means assignment. Expert ``e`` must be the one trained on cluster ``e``. In place; returns ``layer``.
    """
    sharpness = check_positive_float("sharpness", sharpness)
    gate = layer.router.gate
    if gate.bias is None:
        raise ValueError("gate_from_centres needs a router with a bias (router_bias=True)")
    if centres.shape != (layer.num_experts, layer.d_model):
        raise ValueError(f"centres must have shape [E, d_model] = {(layer.num_experts, layer.d_model)}, "
                         f"got {tuple(centres.shape)}")
    gate.weight.copy_(2 * sharpness * centres)
    gate.bias.copy_(-sharpness * centres.square().sum(1))
    return layer


def fit_ensemble(bank: ExpertBank, x: Tensor, y: Tensor, *, steps: int = 1000, lr: float = 1e-2) -> list[float]:
    """Train every expert of ``bank`` on all of ``(x, y)`` independently (their own MSE, summed)."""
    return fit_experts_on_subsets(bank, x, y, torch.zeros(x.shape[0], dtype=torch.long), steps=steps, lr=lr) \
        if bank.num_experts == 1 else _fit_all(bank, x, y, steps, lr)


def _fit_all(bank, x, y, steps, lr):
    steps, lr = check_int("steps", steps, minimum=0), check_positive_float("lr", lr)
    opt = torch.optim.Adam(bank.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = (_all_experts(bank, x) - y.unsqueeze(0)).square().mean(dim=(1, 2)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


class EnsembleMean(nn.Module):
    """The average of every expert of a bank, ``y = (1/E) Σ_e h_e(x)`` — an ensemble, no gate."""

    def __init__(self, bank: ExpertBank):
        super().__init__()
        self.bank = bank

    def forward(self, x: Tensor) -> Tensor:
        return _all_experts(self.bank, x.reshape(-1, x.shape[-1])).mean(0).reshape(*x.shape[:-1], self.bank.d_out)


def sparse_copy(layer: MoELayer, top_k: int = 1, *, backend: str = "loop") -> MoELayer:
    """A ``router="topk"`` copy of a dense-router ``layer`` with the same weights: it runs only the
    ``top_k`` most probable experts per input (weights renormalised to sum to 1). ``backend="loop"``
    (default) does no padded work, so :func:`moe_lib.count_flops` counts only the experts that run."""
    top_k = check_int("top_k", top_k, minimum=1, maximum=layer.num_experts)
    kwargs = {"activation": layer.experts.activation} if isinstance(layer.experts, MLPExperts) else {}
    sparse = MoELayer(layer.d_model, layer.d_ff, layer.num_experts, top_k, router="topk",
                      expert=layer.experts.kind, backend=backend, normalize_weights=True,
                      router_bias=layer.router.gate.bias is not None, d_out=layer.d_out, **kwargs)
    sparse.load_state_dict(layer.state_dict())
    return sparse.to(next(layer.parameters()).device)


#: Losses :func:`fit_end_to_end` accepts.
END_TO_END_LOSSES = ("cooperative", "competitive")


def fit_end_to_end(layer: MoELayer, x: Tensor, y: Tensor, *, loss: str = "cooperative", steps: int = 1000,
                   lr: float = 1e-2, sigma: float = 1.0) -> list[float]:
    """Train gate and experts of a dense-router ``layer`` together (full-batch Adam), the 1991 way.

    * ``"cooperative"`` — the squared error of the blend, ``mean ‖y − Σ p_i h_i(x)‖²`` (Jacobs et al. 1991,
      eq. 1): every expert is pushed to cancel what the others leave, so the experts end up depending on
      each other.
    * ``"competitive"`` — the negative log-likelihood of a mixture of Gaussians of standard deviation
      ``sigma`` centred on the experts' outputs (eq. 3 with ``d/σ``, ``o_i/σ``): each expert is pulled
      towards the target only as much as it is responsible for the case, so experts stay local.

    Returns the loss per step. The layer's auxiliary losses are not added (none in 1991).
    """
    from .._validate import check_choice
    from .losses import competitive_loss

    steps, lr = check_int("steps", steps, minimum=0), check_positive_float("lr", lr)
    loss = check_choice("loss", loss, END_TO_END_LOSSES)
    sigma = check_positive_float("sigma", sigma)
    if layer.router.name != "dense":
        raise TypeError(f"fit_end_to_end needs a MoELayer with router='dense', got router={layer.router.name!r}")
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    losses = []
    layer.train()
    for _ in range(steps):
        if loss == "cooperative":
            value = nn.functional.mse_loss(layer(x), y)
        else:
            value = competitive_loss(layer.router(x).probs, layer.expert_outputs(x) / sigma, y / sigma)
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(float(value.detach()))
    layer.eval()
    return losses


def train_recipes(x: Tensor, y: Tensor, *, num_experts: int = 4, d_ff: int = 16, steps: int = 2000,
                  lr: float = 0.03, seed: int = 0) -> dict[str, nn.Module]:
    """Train every recipe chapter 4 compares on ``(x [n, 2], y [n, 1])``, each from the same ``seed``.

    Returns ``{name: trained predictor}``: two dense MLPs (``num_experts·d_ff`` and ``d_ff`` hidden units),
    an ensemble averaging ``num_experts`` independently trained MLPs, the article's two-stage recipe
    (experts on k-means subsets for ``steps // 2``, then a gate for ``steps // 2``; the gate learned from
    scratch or started from the k-means centres), and end-to-end training with the cooperative and the
    competitive loss of Jacobs et al. (1991, eqs. 1 and 3). Every mixture also comes as a top-1 copy
    (``", top-1"``). Every method gets ``steps`` optimiser steps.
    """
    from ..utils import seed_everything

    num_experts = check_int("num_experts", num_experts, minimum=1)
    d_ff = check_int("d_ff", d_ff, minimum=1)
    steps = check_int("steps", steps, minimum=2)
    device = x.device

    def mixture() -> MoELayer:
        return MoELayer(x.shape[1], d_ff, num_experts, router="dense", expert="mlp", router_bias=True,
                        d_out=y.shape[1]).to(device)

    def dense_mlp(hidden: int) -> nn.Module:
        return nn.Sequential(nn.Linear(x.shape[1], hidden), nn.GELU(), nn.Linear(hidden, y.shape[1])).to(device)

    from ..training import fit_regression

    out: dict[str, nn.Module] = {}
    for hidden in (num_experts * d_ff, d_ff):
        seed_everything(seed)
        model = dense_mlp(hidden)
        fit_regression(model, x, y, steps=steps, lr=lr)
        out[f"dense MLP, {hidden} hidden"] = model
    seed_everything(seed)
    bank = mixture()
    fit_ensemble(bank.experts, x, y, steps=steps, lr=lr)
    out[f"ensemble of {num_experts}"] = EnsembleMean(bank.experts)
    seed_everything(seed)
    two_stage = mixture()
    centres, assign = kmeans(x, num_experts, seed=seed)
    fit_experts_on_subsets(two_stage.experts, x, y, assign, steps=steps // 2, lr=lr)  # stage 1
    from_kmeans = gate_from_centres(copy.deepcopy(two_stage), centres)
    for name, layer in (("two-stage", two_stage), ("two-stage, k-means gate", from_kmeans)):
        fit_gate(layer, x, y, steps=steps // 2, lr=lr)  # stage 2
        out[name], out[name + ", top-1"] = layer, sparse_copy(layer, 1)
    for loss in ("cooperative", "competitive"):
        seed_everything(seed)
        layer = mixture()
        fit_end_to_end(layer, x, y, loss=loss, steps=steps, lr=lr)
        out[f"end to end, {loss}"], out[f"end to end, {loss}, top-1"] = layer, sparse_copy(layer, 1)
    return out


@torch.no_grad()
def top_expert_error(layer: MoELayer, x: Tensor, y: Tensor) -> tuple[float, float]:
    """MSE of each input's top-ranked expert *alone*, and the gate's mean weight on that expert.

    Small error with a confident gate means the experts are local (they can be truncated to top-1); a large
    error means they only work blended (cooperative training, chapter 4).
    """
    p, h = layer.router(x).probs, layer.expert_outputs(x)
    own = h[torch.arange(len(x)), p.argmax(dim=1)]
    return float((own - y).square().mean()), float(p.max(dim=1).values.mean())


def per_seed(runs, column: str, n_train: int) -> dict[str, list[float]]:
    """``{method: [value of column per seed, in seed order]}`` for one training-set size of a long table of
    runs with columns ``seed``, ``n_train``, ``method`` and ``column`` (chapter 4's ``runs``). Every method
    must have run on the same seeds, so that two methods can be compared paired."""
    rows = runs[runs["n_train"] == n_train].sort_values("seed", kind="stable")
    out = {m: rows.loc[rows["method"] == m, column].tolist() for m in dict.fromkeys(rows["method"])}
    seeds = {m: rows.loc[rows["method"] == m, "seed"].tolist() for m in out}
    first = next(iter(seeds.values()), [])
    if any(s != first for s in seeds.values()):
        raise ValueError(f"every method must have run on the same seeds, got {seeds}")
    return out


def recipe_summary(runs, column: str, sizes, *, reference: str, decimals: int = 3,
                   lower_is_better: bool = True):
    """A table of ``column`` over seeds, one row per method: per training-set size ``n`` in ``sizes``, the
    cell ``"mean ± 95% CI"`` and the paired verdict against ``reference`` ("better", "worse",
    "within noise"; :func:`moe_lib.stats.compare`)."""
    import pandas as pd

    from ..stats import compare, summarize

    table = {}
    for n in sizes:
        values = per_seed(runs, column, n)
        if reference not in values:
            raise ValueError(f"reference {reference!r} is not one of the methods {list(values)}")
        cells, verdicts = {}, {}
        for method, vals in values.items():
            cells[method] = summarize(vals).format(decimals, n=False)
            if method == reference:
                verdicts[method] = "reference"
            else:
                verdicts[method] = compare(vals, values[reference], names=(method, reference),
                                           lower_is_better=lower_is_better).outcome
        table[f"n={n}"] = pd.Series(cells)
        table[f"vs reference, n={n}"] = pd.Series(verdicts)
    return pd.DataFrame(table)


def ratio_verdict(a, b, *, names: tuple[str, str] = ("A", "B")):
    """Compare two positive per-seed errors (same seeds) by their *ratio*: the paired verdict
    (:func:`moe_lib.stats.compare`) on ``log10 a − log10 b``. Suited to errors that span orders of magnitude
    across seeds, where one failed seed makes the interval of the raw difference uninformative.

    Returns ``(text, verdict)``: ``text`` is ``"×r (95% CI ×lo–×hi)"``, the geometric-mean ratio ``a / b``
    and its interval; ``verdict.winner`` names the lower (better) one, or is ``None`` ("within noise").
    """
    import math

    from ..stats import compare

    if any(v <= 0 for v in list(a) + list(b)):
        raise ValueError("ratio_verdict needs positive errors")
    v = compare([math.log10(x) for x in a], [math.log10(x) for x in b], names=names)
    return f"×{10 ** v.diff.mean:.3g} (95% CI ×{10 ** v.diff.low:.3g}–×{10 ** v.diff.high:.3g})", v
