"""Expert banks: ``E`` experts of one kind, stored as stacked weights ``[E, ...]``.

Stacked weights (rather than a ``ModuleList`` of ``E`` small modules) are what grouped-GEMM kernels
consume and what Hugging Face's fused MoE checkpoints store, so every backend can run the same bank.
Each bank offers several views of the same computation:

* :meth:`ExpertBank.forward_expert` — expert ``e`` on its own rows ``[n, d_model]`` (the readable
  reference, used by the ``loop`` backend);
* :meth:`ExpertBank.forward_blocks` — each expert on its own block of rows, the weights indexed once
  (used by the ``torch`` backend: one block at a time stays in the cache);
* :meth:`ExpertBank.forward_padded` — all experts at once on a padded batch ``[E, C, d_model]``
  (batched matmul: chapter 11's padded step, the dense and ensemble layers);
* :meth:`ExpertBank.forward_grouped` — all experts at once on their grouped rows ``[N, d_model]`` with
  ``torch._grouped_mm`` (no padding; used by the ``grouped_mm`` backend).

Kinds: ``linear`` (``x W_e + b_e``, the 1991 local experts), ``mlp`` (``act(x W1 + b1) W2 + b2``, the
Transformer FFN of Switch/GShard) and ``swiglu`` (``(silu(x W_g) ⊙ x W_u) W_d``, Shazeer 2020, used by
Mixtral, Qwen-MoE and DeepSeek-V3).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ._validate import check_choice, check_int

ACTIVATIONS = {"relu": torch.relu, "gelu": nn.functional.gelu, "silu": nn.functional.silu, "tanh": torch.tanh}


def _uniform(shape: tuple[int, ...], fan_in: int) -> nn.Parameter:
    """``U(-1/√fan_in, 1/√fan_in)``, the default init of ``nn.Linear``, applied to every expert."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: ``torch._grouped_mm``'s backward
    rejects the stride-0 gradient that ``y.sum().backward()`` produces (torch 2.13)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_mm(x: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    """``out[r] = x[r] @ weight[e]`` for the rows ``offsets[e]:offsets[e+1]`` of each expert, one
    ``torch._grouped_mm`` call (``offsets`` is ``[E + 1]``; the kernel takes the ``E`` group ends as int32).
    On the CPU rows must be 16-byte aligned (float32: widths multiple of 4); on CUDA it wants bfloat16."""
    out = torch._grouped_mm(x.contiguous(), weight, offs=offsets[1:].to(torch.int32))
    return _ContiguousGrad.apply(out)


class ExpertBank(nn.Module):
    """Base class. Subclasses define the per-expert function on stacked weights.

    Args:
        num_experts: ``E``.
        d_model: input width.
        d_ff: hidden width of one expert (ignored by ``linear`` experts).
        d_out: output width (``d_model`` when ``None``).
    """

    kind = "base"
    #: The backends (:data:`moe_lib.backends.BACKENDS`) that can run this bank: ``loop`` needs
    #: :meth:`forward_expert`, ``torch`` :meth:`forward_blocks` (whose default is made of
    #: :meth:`forward_expert`), ``grouped_mm`` :meth:`forward_grouped`; a bank that implements fewer lists
    #: fewer (``MoELayer`` refuses the others by name).
    backends: tuple[str, ...] = ("loop", "torch", "grouped_mm")

    def __init__(self, num_experts: int, d_model: int, d_ff: int, d_out: int | None = None):
        super().__init__()
        self.num_experts = check_int("num_experts", num_experts, minimum=1)
        self.d_model = check_int("d_model", d_model, minimum=1)
        self.d_ff = check_int("d_ff", d_ff, minimum=1)
        self.d_out = self.d_model if d_out is None else check_int("d_out", d_out, minimum=1)

    #: The stacked ``[E, ...]`` parameters one expert reads, in the order :meth:`_expert` takes their slices.
    #: A bank that names them writes its function once (:meth:`_expert`); :meth:`forward_expert` and
    #: :meth:`forward_blocks` slice them. A bank with none implements :meth:`forward_expert` itself.
    stacked: tuple[str, ...] = ()

    def _expert(self, x: Tensor, *weights: Tensor) -> Tensor:  # pragma: no cover - abstract
        """One expert's function on ``x [n, d_model]``, given its slices of the :attr:`stacked` parameters."""
        raise NotImplementedError

    def forward_expert(self, e: int, x: Tensor) -> Tensor:
        """Expert ``e`` on ``x [n, d_model]`` -> ``[n, d_out]``."""
        if not self.stacked:  # pragma: no cover - abstract
            raise NotImplementedError
        return self._expert(x, *(getattr(self, name)[e] for name in self.stacked))

    def forward_padded(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Every expert on its own rows: ``x [E, C, d_model]`` -> ``[E, C, d_out]``."""
        raise NotImplementedError

    def forward_blocks(self, blocks: Sequence[tuple[int, Tensor]]) -> list[Tensor]:
        """Expert ``e`` on ``x_e [n_e, d_model]`` for each pair ``(e, x_e)`` -> the list of ``[n_e, d_out]``.

        The same arithmetic as :meth:`forward_expert`, block by block, with the :attr:`stacked` weights
        indexed once (``unbind``), so that the backward stacks the experts' weight gradients in one copy
        instead of adding one full-size zero tensor per expert. A bank without :attr:`stacked` parameters
        calls its :meth:`forward_expert`."""
        if not self.stacked:
            return [self.forward_expert(e, x) for e, x in blocks]
        slices = [getattr(self, name).unbind(0) for name in self.stacked]
        return [self._expert(x, *(w[e] for w in slices)) for e, x in blocks]

    def forward_grouped(self, x: Tensor, offsets: Tensor, expert_index: Tensor) -> Tensor:  # pragma: no cover
        """Every expert on its block of grouped rows: ``x [N, d_model]`` with expert ``e`` owning rows
        ``offsets[e]:offsets[e+1]`` (``expert_index [N]`` names each row's expert) -> ``[N, d_out]``."""
        raise NotImplementedError

    def flops_per_token(self) -> int:  # pragma: no cover - abstract
        """Floating-point operations (2 per multiply-add) of one expert on one token, matmuls only."""
        raise NotImplementedError


class LinearExperts(ExpertBank):
    """``h_e(x) = x W_e + b_e`` — the linear experts of Jacobs et al. (1991)."""

    kind = "linear"

    def __init__(self, num_experts: int, d_model: int, d_ff: int = 1, d_out: int | None = None):
        super().__init__(num_experts, d_model, d_ff, d_out)
        self.weight = _uniform((num_experts, self.d_model, self.d_out), self.d_model)
        self.bias = _uniform((num_experts, self.d_out), self.d_model)

    stacked = ("weight", "bias")

    def _expert(self, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        return x @ weight + bias

    def forward_padded(self, x: Tensor) -> Tensor:
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight)

    def forward_grouped(self, x: Tensor, offsets: Tensor, expert_index: Tensor) -> Tensor:
        return grouped_mm(x, self.weight, offsets) + self.bias[expert_index]

    def flops_per_token(self) -> int:
        return 2 * self.d_model * self.d_out


class MLPExperts(ExpertBank):
    """``h_e(x) = act(x W1_e + b1_e) W2_e + b2_e`` — the two-layer FFN expert (Switch, GShard)."""

    kind = "mlp"

    def __init__(self, num_experts: int, d_model: int, d_ff: int, d_out: int | None = None, activation: str = "gelu"):
        super().__init__(num_experts, d_model, d_ff, d_out)
        self.activation = check_choice("activation", activation, ACTIVATIONS)
        self.w1 = _uniform((num_experts, self.d_model, self.d_ff), self.d_model)
        self.b1 = _uniform((num_experts, self.d_ff), self.d_model)
        self.w2 = _uniform((num_experts, self.d_ff, self.d_out), self.d_ff)
        self.b2 = _uniform((num_experts, self.d_out), self.d_ff)

    stacked = ("w1", "b1", "w2", "b2")

    def _expert(self, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
        h = ACTIVATIONS[self.activation](x @ w1 + b1)
        return h @ w2 + b2

    def forward_padded(self, x: Tensor) -> Tensor:
        h = ACTIVATIONS[self.activation](torch.baddbmm(self.b1.unsqueeze(1), x, self.w1))
        return torch.baddbmm(self.b2.unsqueeze(1), h, self.w2)

    def forward_grouped(self, x: Tensor, offsets: Tensor, expert_index: Tensor) -> Tensor:
        h = ACTIVATIONS[self.activation](grouped_mm(x, self.w1, offsets) + self.b1[expert_index])
        return grouped_mm(h, self.w2, offsets) + self.b2[expert_index]

    def flops_per_token(self) -> int:
        return 2 * self.d_ff * (self.d_model + self.d_out)


class SwiGLUExperts(ExpertBank):
    """``h_e(x) = (silu(x Wg_e) ⊙ x Wu_e) Wd_e`` — the gated FFN of Mixtral/Qwen/DeepSeek (no biases)."""

    kind = "swiglu"
    backends = ("loop", "torch", "grouped_mm", "triton")

    def __init__(self, num_experts: int, d_model: int, d_ff: int, d_out: int | None = None):
        super().__init__(num_experts, d_model, d_ff, d_out)
        self.w_gate = _uniform((num_experts, self.d_model, self.d_ff), self.d_model)
        self.w_up = _uniform((num_experts, self.d_model, self.d_ff), self.d_model)
        self.w_down = _uniform((num_experts, self.d_ff, self.d_out), self.d_ff)

    stacked = ("w_gate", "w_up", "w_down")

    def _expert(self, x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
        act = ACTIVATIONS[getattr(self, "activation", "silu")]  # GLUExperts: its own activation
        return (act(x @ w_gate) * (x @ w_up)) @ w_down

    def forward_padded(self, x: Tensor) -> Tensor:
        h = nn.functional.silu(torch.bmm(x, self.w_gate)) * torch.bmm(x, self.w_up)
        return torch.bmm(h, self.w_down)

    def forward_grouped(self, x: Tensor, offsets: Tensor, expert_index: Tensor) -> Tensor:
        act = ACTIVATIONS[getattr(self, "activation", "silu")]
        h = act(grouped_mm(x, self.w_gate, offsets)) * grouped_mm(x, self.w_up, offsets)
        return grouped_mm(h, self.w_down, offsets)

    def flops_per_token(self) -> int:
        return 2 * self.d_ff * (2 * self.d_model + self.d_out)


class GLUExperts(SwiGLUExperts):
    """``h_e(x) = (act(x Wg_e) ⊙ x Wu_e) Wd_e`` — a gated FFN with any activation of
    :data:`ACTIVATIONS` (Shazeer 2020, eq. 5–6: GEGLU with ``"gelu"``, ReGLU with ``"relu"``; ``"silu"``
    is SwiGLU). Same weights and FLOPs as :class:`SwiGLUExperts`; used by :func:`moe_lib.from_transformers`
    for checkpoints whose ``hidden_act`` is not SiLU."""

    kind = "glu"

    def __init__(self, num_experts: int, d_model: int, d_ff: int, d_out: int | None = None, activation: str = "silu"):
        super().__init__(num_experts, d_model, d_ff, d_out)
        self.activation = check_choice("activation", activation, ACTIVATIONS)

    def forward_padded(self, x: Tensor) -> Tensor:
        h = ACTIVATIONS[self.activation](torch.bmm(x, self.w_gate)) * torch.bmm(x, self.w_up)
        return torch.bmm(h, self.w_down)


#: Expert kind -> class. ``MoELayer(expert=name)`` looks names up here.
EXPERTS: dict[str, type[ExpertBank]] = {
    c.kind: c for c in (LinearExperts, MLPExperts, SwiGLUExperts, GLUExperts)
}
