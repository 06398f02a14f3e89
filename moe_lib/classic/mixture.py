"""The adaptive mixture of local experts (Jacobs et al. 1991) as a :class:`~moe_lib.MoELayer`, and a
full-batch trainer shared by the mixtures and the back-propagation baselines of chapter 2.

The 1991 mixture is not a separate model: it is ``MoELayer(router="dense", expert="linear",
router_bias=True, d_out=D)`` — a softmax gate over every expert and linear experts, the same
router → experts → combine path as every other mixture in the book. What is specific to 1991 is only the
*loss*: the paper's competitive error (eq. 3) scores every expert's own output, which
:meth:`MoELayer.expert_outputs` provides; the cooperative error (eq. 1) scores the blend.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .._validate import check_choice, check_int, check_nonnegative_float, check_positive_float
from ..layer import MoELayer
from .losses import competitive_loss, cooperative_loss, mixture_output

#: Losses :func:`fit_mixture_classifier` accepts. ``competitive``/``cooperative`` need a dense-router
#: :class:`MoELayer`; ``squared`` (``‖d − f(x)‖²``) takes any module, e.g. a back-propagation MLP.
LOSSES = ("competitive", "cooperative", "squared")
OPTIMIZERS = ("sgd", "adam")


def local_experts(d_in: int, d_out: int, num_experts: int, *, backend: str = "torch") -> MoELayer:
    """The 1991 mixture: ``num_experts`` linear experts ``o_i = x W_i + b_i`` under a softmax gate
    ``p = softmax(x W_g + b_g)``, i.e. ``MoELayer(d_in, 1, num_experts, router="dense", expert="linear",
    router_bias=True, d_out=d_out)``.
    """
    return MoELayer(d_in, 1, num_experts, router="dense", expert="linear", router_bias=True,
                    d_out=d_out, backend=backend)


#: Hidden activations :func:`mlp` accepts.
MLP_ACTIVATIONS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


def mlp(d_in: int, hidden: int, d_out: int, *, activation: str = "sigmoid") -> nn.Sequential:
    """The back-propagation baseline of 1991: one hidden layer of logistic units, linear outputs.

    ``activation="tanh"`` gives the dense baseline of chapter 1 (same layers, same initialisation order).
    """
    d_in, hidden, d_out = (check_int(n, v, minimum=1) for n, v in (("d_in", d_in), ("hidden", hidden), ("d_out", d_out)))
    act = MLP_ACTIVATIONS[check_choice("activation", activation, tuple(MLP_ACTIVATIONS))]
    return nn.Sequential(nn.Linear(d_in, hidden), act(), nn.Linear(hidden, d_out))


def _is_dense_mixture(model: nn.Module) -> bool:
    return isinstance(model, MoELayer) and model.router.name == "dense"


def gate_and_experts(layer: MoELayer, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(p [T, E], o [T, E, D])``: the gate's probabilities and every expert's output on ``x [T, d]``."""
    return layer.router(x).probs, layer.expert_outputs(x)


def loss_and_output(model: nn.Module, x: Tensor, target: Tensor, loss: str) -> tuple[Tensor, Tensor]:
    """The named loss of ``model`` on ``(x, target)`` and the model's output ``[T, D]`` (for accuracy).

    For a mixture the output is the blend ``Σ p_i o_i`` — exactly ``layer(x)`` for a dense router.
    """
    loss = check_choice("loss", loss, LOSSES)
    if loss == "squared":
        out = model(x)
        return (target - out).square().sum(-1).mean(), out
    if not _is_dense_mixture(model):
        raise TypeError(f"loss={loss!r} needs a MoELayer with router='dense', got {type(model).__name__}")
    p, o = gate_and_experts(model, x)
    fn = competitive_loss if loss == "competitive" else cooperative_loss
    return fn(p, o, target), mixture_output(p, o)


@dataclass
class FitResult:
    """Per-epoch training loss and training accuracy, and the first epoch (1-based) at which the
    training accuracy reached ``criterion`` (``None`` if it never did)."""

    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    epochs_to_criterion: int | None = None


def one_hot(labels: Tensor, num_classes: int) -> Tensor:
    return nn.functional.one_hot(labels, num_classes).to(torch.get_default_dtype())


def fit_mixture_classifier(
    model: nn.Module,
    x: Tensor,
    labels: Tensor,
    *,
    loss: str = "competitive",
    epochs: int = 1000,
    lr: float = 0.1,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    criterion: float | None = None,
    stop_at_criterion: bool = False,
) -> FitResult:
    """Full-batch training on one-hot targets, one update per epoch (as in 1991).

    Args:
        model: a dense :class:`MoELayer` (competitive/cooperative) or any module (``squared``).
        x: ``[T, d]`` inputs; ``labels``: ``[T]`` class ids; targets are their one-hot codes.
        loss: one of :data:`LOSSES`.
        epochs: maximum number of epochs.
        lr, optimizer, momentum: plain gradient descent with momentum (``"sgd"``) or Adam.
        criterion: a training-accuracy level in ``(0, 1]``; the first epoch reaching it is recorded.
        stop_at_criterion: stop training there.

    The accuracy of an epoch is measured on the outputs of that epoch's forward pass (before its update),
    so it costs no extra pass. Deterministic for a given model initialisation.
    """
    epochs = check_int("epochs", epochs, minimum=0)
    lr = check_positive_float("lr", lr)
    optimizer = check_choice("optimizer", optimizer, OPTIMIZERS)
    momentum = check_nonnegative_float("momentum", momentum)
    check_choice("loss", loss, LOSSES)
    if criterion is not None and not 0 < float(criterion) <= 1:
        raise ValueError(f"criterion must be a training accuracy in (0, 1] or None, got {criterion}")
    num_classes = int(labels.max()) + 1
    target = one_hot(labels, num_classes).to(x.dtype)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum) if optimizer == "sgd" else torch.optim.Adam(params, lr=lr)
    result = FitResult()
    model.train()
    for epoch in range(1, epochs + 1):
        value, out = loss_and_output(model, x, target, loss)
        acc = float((out.argmax(-1) == labels).float().mean())
        result.loss.append(float(value.detach()))
        result.accuracy.append(acc)
        if criterion is not None and result.epochs_to_criterion is None and acc >= criterion:
            result.epochs_to_criterion = epoch
            if stop_at_criterion:
                break
        opt.zero_grad()
        value.backward()
        opt.step()
    model.eval()
    return result


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, labels: Tensor) -> float:
    """Fraction of ``x`` whose largest output is the right class (the blend for a mixture)."""
    return float((model(x).argmax(-1) == labels).float().mean())


@torch.no_grad()
def expert_usage(layer: MoELayer, x: Tensor, labels: Tensor, num_classes: int | None = None,
                 threshold: float = 0.5) -> tuple[Tensor, Tensor]:
    """Which expert the gate picks for which class.

    Returns ``(counts [E, C], active [E])``: ``counts[e, c]`` is how many cases of class ``c`` have expert
    ``e`` as the gate's most probable expert; an expert is *active* if it is the most probable for at
    least one case with a gate probability above ``threshold``.
    """
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    p = layer.router(x).probs
    top_p, winner = p.max(dim=-1)
    counts = torch.zeros(layer.num_experts, num_classes, dtype=torch.long)
    counts.index_put_((winner, labels), torch.ones_like(labels), accumulate=True)
    active = torch.zeros(layer.num_experts, dtype=torch.bool)
    active[winner[top_p > threshold]] = True
    return counts, active


@torch.no_grad()
def top_expert_accuracy(layer: MoELayer, x: Tensor, labels: Tensor) -> tuple[float, float]:
    """Accuracy of each case's top-ranked expert *alone*, and the gate's mean weight on that expert.

    The classification twin of :func:`moe_lib.classic.top_expert_error`: the output of the expert with the
    largest gate probability, without the blend. Experts that are local (each right on its own region)
    keep the mixture's accuracy; experts that only work blended (cooperative training) lose it.
    """
    if not _is_dense_mixture(layer):
        raise TypeError(f"top_expert_accuracy needs a MoELayer with router='dense', got {type(layer).__name__}")
    p, o = gate_and_experts(layer, x)
    top_p, top = p.max(dim=-1)
    own = o[torch.arange(len(x), device=x.device), top]
    return float((own.argmax(-1) == labels).float().mean()), float(top_p.mean())
