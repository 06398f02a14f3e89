"""A small vision mixture of experts: image patches as tokens, an MoE MLP over the tokens, a pooled classifier.

``image [8, 8] → patches [P, p·p] → linear embedding + position → x + MoE(LayerNorm(x)) → mean over tokens
→ linear → class logits`` — the patch-token MoE block of V-MoE (Riquelme et al. 2021) without attention,
built on :class:`moe_lib.MoELayer`. With ``num_experts=1`` the same model is a dense MLP, so a dense model
of equal active size is ``VisionMoE(num_experts=1, top_k=1, d_ff=top_k·d_ff)``.

:func:`load_digits_tensors` reads scikit-learn's bundled 8×8 digits (1,797 images shipped inside the
package; nothing is downloaded).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .._validate import check_int
from ..layer import MoELayer

__all__ = ["patchify", "VisionMoE", "load_digits_tensors", "fit_vision", "vision_accuracy", "token_routes",
           "split_validation", "lr_sweep", "pick_lr", "routing_purity"]


def patchify(images: Tensor, patch: int = 2) -> Tensor:
    """``[N, H, W]`` -> ``[N, (H/patch)·(W/patch), patch²]``, non-overlapping patches in row-major order."""
    patch = check_int("patch", patch, minimum=1)
    if not isinstance(images, Tensor) or images.dim() != 3:
        raise ValueError(f"images must be a [N, H, W] tensor, got {getattr(images, 'shape', type(images).__name__)}")
    n, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"patch must divide the image size {h}x{w}, got patch={patch}")
    x = images.reshape(n, h // patch, patch, w // patch, patch).permute(0, 1, 3, 2, 4)
    return x.reshape(n, (h // patch) * (w // patch), patch * patch)


class VisionMoE(nn.Module):
    """Patch tokens → one MoE MLP block → mean-pooled linear classifier.

    Args:
        image_size: side of the square input image. patch: patch side. d_model: token width.
        d_ff: hidden width of each expert. num_experts, top_k: of the :class:`moe_lib.MoELayer` (top-k router,
        MLP experts, Switch load-balancing loss with ``aux_loss_coef``). num_classes: output classes.
    """

    def __init__(self, image_size: int = 8, patch: int = 2, d_model: int = 32, d_ff: int = 32,
                 num_experts: int = 8, top_k: int = 2, num_classes: int = 10, aux_loss_coef: float = 0.01):
        super().__init__()
        self.image_size = check_int("image_size", image_size, minimum=1)
        self.patch = check_int("patch", patch, minimum=1)
        if self.image_size % self.patch:
            raise ValueError(f"patch must divide image_size={self.image_size}, got patch={patch}")
        self.num_tokens = (self.image_size // self.patch) ** 2
        d_model = check_int("d_model", d_model, minimum=1)
        self.embed = nn.Linear(self.patch * self.patch, d_model)
        self.position = nn.Parameter(0.02 * torch.randn(self.num_tokens, d_model))
        self.norm = nn.LayerNorm(d_model)
        self.moe = MoELayer(d_model, d_ff, num_experts, top_k, router="topk" if num_experts > 1 else "dense",
                            expert="mlp", aux_loss_coef=aux_loss_coef if num_experts > 1 else 0.0)
        self.head = nn.Linear(d_model, check_int("num_classes", num_classes, minimum=2))

    def tokens(self, images: Tensor) -> Tensor:
        """``[N, H, W]`` -> embedded patch tokens ``[N, P, d_model]``."""
        if not isinstance(images, Tensor) or images.dim() != 3 or images.shape[1:] != (self.image_size,) * 2:
            raise ValueError(f"images must be [N, {self.image_size}, {self.image_size}], "
                             f"got {getattr(images, 'shape', type(images).__name__)}")
        return self.embed(patchify(images, self.patch)) + self.position

    def forward(self, images: Tensor) -> Tensor:
        """``[N, H, W]`` -> class logits ``[N, num_classes]``; routing in ``self.moe.last_info``."""
        x = self.tokens(images)
        x = x + self.moe(self.norm(x))
        return self.head(x.mean(dim=1))

    def active_parameters(self) -> int:
        """Parameters one token uses: everything but the experts not chosen (``top_k`` of ``E`` experts)."""
        total = sum(p.numel() for p in self.parameters())
        experts = sum(p.numel() for p in self.moe.experts.parameters())
        return total - experts + experts * self.moe.top_k // self.moe.num_experts


def load_digits_tensors(test_fraction: float = 0.25, seed: int = 0):
    """scikit-learn's 8×8 digits as ``(x_train [N, 8, 8] in [0, 1], y_train, x_test, y_test)``, split at random."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def fit_vision(model: VisionMoE, x: Tensor, y: Tensor, *, epochs: int = 30, batch_size: int = 64,
               lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Adam on cross-entropy plus the layer's auxiliary loss; returns the mean training loss of each epoch."""
    epochs = check_int("epochs", epochs, minimum=0)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    model.train()
    for _ in range(epochs):
        total = 0.0
        for idx in torch.randperm(len(y), generator=g).split(batch_size):
            logits = model(x[idx])
            loss = nn.functional.cross_entropy(logits, y[idx])
            info = model.moe.last_info
            if info is not None and info.aux_loss is not None:
                loss = loss + info.aux_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        history.append(total / len(y))
    return history


@torch.no_grad()
def vision_accuracy(model: VisionMoE, x: Tensor, y: Tensor) -> float:
    model.eval()
    return float((model(x).argmax(-1) == y).float().mean())


@torch.no_grad()
def token_routes(model: VisionMoE, x: Tensor) -> Tensor:
    """Each token's top expert ``[N, P]`` (the first of its ``top_k`` choices)."""
    model.eval()
    model(x)
    experts = model.moe.last_info.routing.experts[:, 0]
    return experts.reshape(x.shape[0], model.num_tokens)


def split_validation(x: Tensor, y: Tensor, fraction: float = 0.2, seed: int = 0):
    """Hold out a random ``fraction`` of a training set for validation: ``(x_fit, y_fit, x_val, y_val)``.
    Hyper-parameters are chosen on the validation part, so the test set plays no part in the choice."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(fraction * len(y)))
    val, fit = order[:n_val], order[n_val:]
    return x[fit], y[fit], x[val], y[val]


def lr_sweep(make_model, lrs, seeds, x_fit: Tensor, y_fit: Tensor, x_val: Tensor, y_val: Tensor,
             x_test: Tensor, y_test: Tensor, *, epochs: int = 15, batch_size: int = 64,
             keep_models: bool = False) -> dict:
    """Train ``make_model()`` at every learning rate in ``lrs`` over ``seeds`` (seed ``s``:
    ``torch.manual_seed(s)`` before building the model, ``fit_vision(..., seed=s)`` for the batch order)
    and return ``{lr: {"val": [accuracy per seed], "test": [accuracy per seed]}}``.

    Every model and learning rate sees the same seeds, so results compare paired. Choose the learning
    rate on ``"val"`` (:func:`pick_lr`) and report ``"test"`` at that rate only. With ``keep_models=True``
    each entry also holds the trained ``"models"`` (one per seed).
    """
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not lrs or not seeds:
        raise ValueError("lrs and seeds must be non-empty")
    out = {}
    for lr in lrs:
        val, test, models = [], [], []
        for s in seeds:
            torch.manual_seed(s)
            model = make_model()
            fit_vision(model, x_fit, y_fit, epochs=epochs, batch_size=batch_size, lr=lr, seed=s)
            val.append(vision_accuracy(model, x_val, y_val))
            test.append(vision_accuracy(model, x_test, y_test))
            if keep_models:
                models.append(model)
        out[lr] = {"val": val, "test": test, **({"models": models} if keep_models else {})}
    return out


def pick_lr(sweep: dict, decimals: int = 3):
    """The learning rate of :func:`lr_sweep`'s result with the highest mean validation accuracy, ranked on
    the mean rounded to ``decimals`` (:func:`moe_lib.utils.rank_by`: a tie keeps the first rate listed)."""
    from ..utils import rank_by

    means = {lr: sum(r["val"]) / len(r["val"]) for lr, r in sweep.items()}
    return rank_by(means, decimals=decimals, descending=True)[0]


@torch.no_grad()
def routing_purity(model: VisionMoE, x: Tensor, y: Tensor) -> dict:
    """How much of the routing the digit class and the patch position explain: the purity
    (:func:`moe_lib.metrics.purity`, share of tokens sent to their label's most frequent expert) of each
    token's top expert grouped by the image's class (``"by class"``) and by the patch position
    (``"by position"``), and the ``[labels, E]`` counts behind each (``"class counts"``,
    ``"position counts"``)."""
    from ..metrics import purity, specialisation

    routes = token_routes(model, x)                                        # [N, P]
    n, p = routes.shape
    e = model.moe.num_experts
    by_class = specialisation(routes.reshape(-1), y.repeat_interleave(p), e, int(y.max()) + 1)
    by_position = specialisation(routes.reshape(-1), torch.arange(p).repeat(n), e, p)
    return {"by class": purity(by_class), "by position": purity(by_position),
            "class counts": by_class, "position counts": by_position}
