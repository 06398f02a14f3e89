"""The shared task of Part II: multi-domain classification, where experts can specialise.

:func:`multi_domain_task` draws examples from ``D`` *domains*. Each domain has its own input distribution
(a Gaussian with its own centre and scale) and its own label function (the argmax of a domain-specific
random linear map of the input's offset from the centre, over ``C`` classes). Each example also carries
a *token id* from a vocabulary of ``D · ids_per_domain`` ids (each id belongs to one domain and shifts the
input by its own small offset), so routers that route by id (hash layers) have ids to hash.

A single small network must learn ``D`` unrelated label functions at once; a mixture can give each
domain (or a few) its own expert — provided the router learns to tell the domains apart and spreads
them over the experts. Everything is generated from seeds, offline and deterministic.

:class:`TaskModel` is the model of the Part II chapters: ``embed → h + MoE(LayerNorm(h)) → LayerNorm →
head``. Tokens that an expert drops still flow through the residual ``h``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._validate import check_int, check_positive_float
from ..layer import MoELayer
from ..metrics import coefficient_of_variation, max_violation


@dataclass
class TaskData:
    """``x [N, d_in]`` float32 inputs, ``y [N]`` class labels, ``domain [N]`` and ``token_ids [N]``."""

    x: Tensor
    y: Tensor
    domain: Tensor
    token_ids: Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device) -> "TaskData":
        return TaskData(self.x.to(device), self.y.to(device), self.domain.to(device), self.token_ids.to(device))


def multi_domain_task(
    n: int,
    *,
    num_domains: int = 8,
    d_in: int = 16,
    num_classes: int = 4,
    ids_per_domain: int = 16,
    noise: float = 1.0,
    seed: int = 0,
    task_seed: int = 1234,
) -> TaskData:
    """``n`` examples of the multi-domain task.

    The *task* (domain centres, scales, label maps, id offsets) is fixed by ``task_seed``, so training and
    test sets drawn with different ``seed`` share it. An example of domain ``d`` with id ``i``:
    ``x = μ_d + ν_i + s_d · noise · ε`` with ``ε ~ N(0, I)``, ``|μ_d| ≈ 4``, ``|ν_i| ≈ 0.5``,
    ``s_d ∈ [0.5, 1.5]``; its label is ``argmax_c (A_d (x − μ_d))_c`` — balanced classes within each
    domain, and a different linear partition in every domain.
    """
    n = check_int("n", n, minimum=0)
    num_domains = check_int("num_domains", num_domains, minimum=1)
    d_in = check_int("d_in", d_in, minimum=1)
    num_classes = check_int("num_classes", num_classes, minimum=2)
    ids_per_domain = check_int("ids_per_domain", ids_per_domain, minimum=1)
    noise = check_positive_float("noise", noise)
    g = torch.Generator().manual_seed(int(task_seed))
    centres = torch.randn(num_domains, d_in, generator=g)
    centres = 4.0 * centres / centres.norm(dim=1, keepdim=True)
    scales = 0.5 + torch.rand(num_domains, generator=g)
    label_maps = torch.randn(num_domains, num_classes, d_in, generator=g)
    id_offsets = 0.5 * torch.randn(num_domains * ids_per_domain, d_in, generator=g) / d_in**0.5
    g = torch.Generator().manual_seed(int(seed))
    domain = torch.randint(0, num_domains, (n,), generator=g)
    token_ids = domain * ids_per_domain + torch.randint(0, ids_per_domain, (n,), generator=g)
    eps = torch.randn(n, d_in, generator=g)
    offset = id_offsets[token_ids] + scales[domain].unsqueeze(1) * noise * eps
    x = centres[domain] + offset
    logits = torch.einsum("ncd,nd->nc", label_maps[domain], offset)
    return TaskData(x=x, y=logits.argmax(dim=1), domain=domain, token_ids=token_ids)


class TaskModel(nn.Module):
    """``embed → h = h + MoE(LayerNorm(h)) → head(LayerNorm(h))``, one :class:`MoELayer` block.

    Args:
        d_in: input width; num_classes: outputs; d_model: width of the block.
        d_ff, num_experts, top_k, moe_kwargs: passed to :class:`MoELayer` (``router=...``, ...).
    """

    def __init__(self, d_in: int, num_classes: int, *, d_model: int = 32, d_ff: int = 32, num_experts: int = 8,
                 top_k: int | None = None, **moe_kwargs):
        super().__init__()
        self.embed = nn.Linear(d_in, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.moe = MoELayer(d_model, d_ff, num_experts, top_k, **moe_kwargs)
        self.norm2 = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Tensor:
        h = self.embed(x)
        h = h + self.moe(self.norm1(h), token_ids=token_ids)
        return self.head(self.norm2(h))


@torch.no_grad()
def evaluate_task(model: TaskModel, data: TaskData, *, use_token_ids: bool = False) -> dict[str, float]:
    """Accuracy and cross-entropy on ``data`` (one batch, eval mode) and the routing of that batch.

    Keys: ``accuracy``, ``loss``, ``load_cv`` (CV of the per-expert load, Shazeer et al. 2017),
    ``importance_cv`` (CV of the summed gate values), ``max_violation`` (Wang et al. 2024),
    ``experts_used`` (experts that received at least 1 % of the mean load), ``dropped_fraction``,
    ``tokens_dropped_fraction``.
    """
    was_training = model.training
    model.eval()
    logits = model(data.x, token_ids=data.token_ids if use_token_ids else None)
    info = model.moe.last_info
    model.train(was_training)
    load = info.plan.requested.double()
    stats = info.stats()
    importance = info.routing.dense_weights().sum(0)
    return {
        "accuracy": float((logits.argmax(1) == data.y).double().mean()),
        "loss": float(nn.functional.cross_entropy(logits, data.y)),
        "load_cv": coefficient_of_variation(load),
        "importance_cv": coefficient_of_variation(importance),
        "max_violation": max_violation(load),
        "experts_used": int((load >= 0.01 * load.mean()).sum()),
        "dropped_fraction": stats["dropped_fraction"],
        "tokens_dropped_fraction": stats["tokens_dropped"] / max(1, stats["tokens"]),
    }


def domain_expert_counts(model: TaskModel, data: TaskData, num_domains: int) -> Tensor:
    """``[num_domains, E]``: how many examples of each domain have each expert as their highest-weight
    expert (evaluation mode) — the specialisation of the experts."""
    from ..metrics import specialisation

    with torch.no_grad():
        was_training = model.training
        model.eval()
        model(data.x)
        model.train(was_training)
        top = model.moe.last_info.routing.dense_weights().argmax(dim=1)
    return specialisation(top, data.domain, model.moe.num_experts, num_domains)


def train_and_evaluate(
    train: TaskData,
    test: TaskData,
    *,
    steps: int = 300,
    lr: float = 3e-3,
    batch_size: int = 256,
    seed: int = 0,
    use_token_ids: bool = False,
    device: str = "cpu",
    progress: bool = False,
    **model_kwargs,
):
    """Build a :class:`TaskModel` from ``seed``, train it with :func:`moe_lib.training.fit_classifier`
    and :func:`evaluate_task` it on ``test``. ``model_kwargs`` go to :class:`TaskModel` (and on to
    :class:`MoELayer`). Returns ``(model, history, metrics)``; the model is back on the CPU."""
    from ..training import fit_classifier
    from ..utils import seed_everything

    seed_everything(seed)
    num_classes = int(max(train.y.max(), test.y.max())) + 1
    model = TaskModel(train.x.shape[1], num_classes, **model_kwargs).to(device)
    tr = train.to(device)
    history = fit_classifier(model, tr.x, tr.y, token_ids=tr.token_ids if use_token_ids else None, steps=steps,
                             lr=lr, batch_size=batch_size, seed=seed, progress=progress)
    model = model.cpu()
    return model, history, evaluate_task(model, test, use_token_ids=use_token_ids)


@dataclass
class SeedRuns:
    """One setting of :func:`train_and_evaluate` run over several seeds (:func:`train_over_seeds`).

    ``seeds`` in run order; ``summaries`` maps each metric of :func:`evaluate_task` to its
    :class:`moe_lib.stats.Summary` over the seeds (per-seed values in ``summaries[m].values``, in seed
    order, so two settings run on the same seeds compare *paired*); ``histories`` and ``models`` hold each
    seed's training history and trained model (``models`` is empty when ``keep_models=False``).
    ``runs[metric]`` is ``runs.summaries[metric]``.
    """

    seeds: tuple[int, ...]
    summaries: dict
    histories: list
    models: list

    def __getitem__(self, metric: str):
        return self.summaries[metric]

    def keys(self):
        return self.summaries.keys()

    def curves(self, name: str = "max_violation"):
        """``[n_seeds, steps]`` float array of one per-step history field (``max_violation``,
        ``max_logit``, ``train_loss``, ...): the input of :func:`moe_lib.book.plot.mean_band`."""
        import numpy as np

        return np.asarray([getattr(h, name) for h in self.histories], dtype=float)


def train_over_seeds(train: TaskData, test: TaskData, *, seeds, keep_models: bool = True, **kwargs) -> SeedRuns:
    """:func:`train_and_evaluate` once per seed (``seeds``: a count ``n`` for seeds ``0..n-1``, or a
    sequence of ints), same data, same ``kwargs``; the seed sets the initialisation, the batch order and the
    router noise. Returns a :class:`SeedRuns` whose metrics are summarised by
    :func:`moe_lib.stats.over_seeds` (mean ± 95 % t-interval)."""
    from ..stats import over_seeds

    if "seed" in kwargs:
        raise TypeError("train_over_seeds takes seeds=..., not seed=...")
    histories, models, used = [], [], []

    def run(seed: int) -> dict[str, float]:
        model, history, metrics = train_and_evaluate(train, test, seed=seed, **kwargs)
        used.append(seed)
        histories.append(history)
        if keep_models:
            models.append(model)
        return {k: float(v) for k, v in metrics.items()}

    summaries = over_seeds(run, seeds)
    return SeedRuns(tuple(used), summaries, histories, models)


def summary_table(results, metrics, *, reference: str | None = None, verdicts=None, decimals=3):
    """A pandas table of several settings over seeds, one row per setting, one ``"mean ± half-width"``
    column per metric (95 % t-interval, :class:`moe_lib.stats.Summary`), and a column ``n`` (seeds).

    ``results`` maps setting → :class:`SeedRuns` (or any mapping metric → Summary); ``metrics`` is a list
    of metric names or a mapping name → column label. With ``reference`` (a key of ``results``) and
    ``verdicts`` (mapping metric → ``lower_is_better``), a column ``"<label> vs <reference>"`` per verdict
    metric holds :func:`moe_lib.stats.compare`'s paired verdict: ``"better"``, ``"worse"`` or
    ``"within noise"`` (``"reference"`` on the reference row). ``decimals`` is one int or a mapping
    metric → int (metrics not in it get 3).
    """
    import pandas as pd

    from ..stats import compare

    labels = dict(metrics) if isinstance(metrics, dict) else {m: m for m in metrics}
    verdicts = dict(verdicts or {})
    if verdicts and reference is None:
        raise ValueError("verdicts need a reference setting")
    if reference is not None and reference not in results:
        raise ValueError(f"reference must be one of {list(results)}, got {reference!r}")
    digits = {m: (decimals.get(m, 3) if isinstance(decimals, dict) else decimals) for m in labels}
    rows = {}
    for name, res in results.items():
        row = {label: res[m].format(digits[m], n=False) for m, label in labels.items()}
        row["n"] = min(res[m].n for m in labels)
        for m, lower in verdicts.items():
            column = f"{labels.get(m, m)} vs {reference}"
            if name == reference:
                row[column] = "reference"
            else:
                row[column] = compare(res[m], results[reference][m], names=(name, reference),
                                      lower_is_better=lower).outcome
        rows[name] = row
    return pd.DataFrame.from_dict(rows, orient="index")
