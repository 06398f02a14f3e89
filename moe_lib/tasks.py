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

from ._validate import check_int, check_positive_float
from .layer import MoELayer
from .metrics import coefficient_of_variation, max_violation


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
def evaluate(model: TaskModel, data: TaskData, *, use_token_ids: bool = False) -> dict[str, float]:
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
    from .metrics import specialisation

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
    and :func:`evaluate` it on ``test``. ``model_kwargs`` go to :class:`TaskModel` (and on to
    :class:`MoELayer`). Returns ``(model, history, metrics)``; the model is back on the CPU."""
    from .training import fit_classifier
    from .utils import seed_everything

    seed_everything(seed)
    num_classes = int(max(train.y.max(), test.y.max())) + 1
    model = TaskModel(train.x.shape[1], num_classes, **model_kwargs).to(device)
    tr = train.to(device)
    history = fit_classifier(model, tr.x, tr.y, token_ids=tr.token_ids if use_token_ids else None, steps=steps,
                             lr=lr, batch_size=batch_size, seed=seed, progress=progress)
    model = model.cpu()
    return model, history, evaluate(model, test, use_token_ids=use_token_ids)
