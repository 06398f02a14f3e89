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

Every view takes a ``hidden_hook``, a function of the hidden activations (after the activation, before the
output projection; linear experts have none and refuse one): how :class:`~moe_lib.practice.DropoutExperts`
adds dropout without restating a formula.
A bank is built by its constructor (a random init) or from given stacked weights
(:meth:`ExpertBank.from_weights`: upcycled, merged or converted experts, handed to
:class:`~moe_lib.MoELayer` as ``expert=bank``).

Kinds: ``linear`` (``x W_e + b_e``, the 1991 local experts), ``mlp`` (``act(x W1 + b1) W2 + b2``, the
Transformer FFN of Switch/GShard) and ``swiglu`` (``(silu(x W_g) ⊙ x W_u) W_d``, Shazeer 2020, used by
Mixtral, Qwen-MoE and DeepSeek-V3).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar

import torch
from torch import Tensor, nn

from ._validate import check_choice, check_int

ACTIVATIONS = {"relu": torch.relu, "gelu": nn.functional.gelu, "silu": nn.functional.silu, "tanh": torch.tanh}


#: While :meth:`ExpertBank.from_weights` builds a bank: the weights it was given, in creation order, with
#: their names; ``_uniform`` takes the next one instead of drawing an init.
_GIVEN: ContextVar[Iterator[tuple[str, Tensor]] | None] = ContextVar("_GIVEN", default=None)

#: A function of a bank's hidden activations ``h`` returning the tensor the bank continues with (same shape).
HiddenHook = Callable[[Tensor], Tensor]


def _uniform(shape: tuple[int, ...], fan_in: int) -> nn.Parameter:
    """``U(-1/√fan_in, 1/√fan_in)``, the default init of ``nn.Linear``, applied to every expert — or, inside
    :meth:`ExpertBank.from_weights`, a contiguous copy of the next given weight (no random draw)."""
    given = _GIVEN.get()
    if given is not None:
        name, weight = next(given)
        if tuple(weight.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {list(shape)} (from the other weights' sizes), "
                             f"got {list(weight.shape)}")
        return nn.Parameter(weight.detach().clone(memory_format=torch.contiguous_format))
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))


def _hooked(h: Tensor, hook: HiddenHook | None) -> Tensor:
    return h if hook is None else hook(h)


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

    #: The stacked ``[E, ...]`` parameters one expert reads, in the order :meth:`_expert` takes their slices
    #: (also the order the constructor creates them in, which :meth:`from_weights` relies on).
    #: A bank that names them writes its function once (:meth:`_expert`); :meth:`forward_expert` and
    #: :meth:`forward_blocks` slice them. A bank with none implements :meth:`forward_expert` itself.
    stacked: tuple[str, ...] = ()

    @classmethod
    def from_weights(cls, *weights: Tensor, **options) -> "ExpertBank":
        """A bank holding ``weights`` — one stacked ``[E, ...]`` tensor per name of :attr:`stacked`, in that
        order and in the ``x @ W`` layout (``[E, in, out]``) — with no random init drawn.

        The sizes (``num_experts``, ``d_model``, ``d_ff``, ``d_out``) are read from the weights; ``options``
        are the constructor's others (``activation``). The parameters are contiguous copies in the given
        weights' dtype and device, so the sources are never modified and later training does not touch
        them. This is how experts upcycled from a dense FFN, merged from several models or read from a
        Hugging Face checkpoint are built before they are handed to :class:`~moe_lib.MoELayer`
        (``expert=bank``). The global RNG is not used: see :meth:`consume_init_draws` for callers that
        must keep a seeded stream where the constructor's draws used to be.

        Raises:
            TypeError: the number of weights is not ``len(stacked)`` or one is not a tensor.
            ValueError: a weight's shape does not fit the sizes the others give (the message names it).
        """
        if not cls.stacked:
            raise TypeError(f"{cls.__name__} names no stacked parameters: it cannot be built from weights")
        if len(weights) != len(cls.stacked):
            raise TypeError(f"{cls.__name__}.from_weights takes {len(cls.stacked)} weights "
                            f"({', '.join(cls.stacked)}), got {len(weights)}")
        for name, w in zip(cls.stacked, weights):
            if not isinstance(w, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
            if w.dim() < 2:
                raise ValueError(f"{name} must be stacked [num_experts, ...], got shape {list(w.shape)}")
        token = _GIVEN.set(iter(zip(cls.stacked, weights)))
        try:
            bank = cls(*cls._sizes(weights), **options)
        finally:
            _GIVEN.reset(token)
        return bank

    @classmethod
    def _sizes(cls, weights: Sequence[Tensor]) -> tuple[int, int, int, int]:
        """``(num_experts, d_model, d_ff, d_out)`` of stacked weights whose first is ``[E, d_model, d_ff]``
        and whose last matrix is ``[E, d_ff, d_out]`` (banks with a hidden layer)."""
        first, last = weights[0], [w for w in weights if w.dim() == 3][-1]
        return first.shape[0], first.shape[1], first.shape[2], last.shape[-1]

    def consume_init_draws(self) -> None:
        """Draw, and discard, exactly the random numbers this bank's constructor draws from the global RNG
        (one ``uniform_`` per :attr:`stacked` parameter, in order, of its shape), leaving the bank as it is.

        For a caller that used to build a bank by its constructor and overwrite its weights, and now builds
        it with :meth:`from_weights`: calling this where the constructor used to run keeps every later
        seeded draw — and so every seeded result downstream — where it was."""
        for name in self.stacked:
            torch.empty(getattr(self, name).shape).uniform_()

    def _expert(self, x: Tensor, *weights: Tensor, hook: HiddenHook | None = None) -> Tensor:  # pragma: no cover
        """One expert's function on ``x [n, d_model]``, given its slices of the :attr:`stacked` parameters;
        ``hook`` (when given) transforms the hidden activations before the output projection."""
        raise NotImplementedError

    def forward_expert(self, e: int, x: Tensor, hidden_hook: HiddenHook | None = None) -> Tensor:
        """Expert ``e`` on ``x [n, d_model]`` -> ``[n, d_out]``.

        Every view of the bank takes ``hidden_hook``: a function applied to the hidden activations (after
        the activation, before the output projection) — how a wrapper such as
        :class:`~moe_lib.practice.DropoutExperts` changes them without restating the bank's formula."""
        if not self.stacked:  # pragma: no cover - abstract
            raise NotImplementedError
        return self._expert(x, *(getattr(self, name)[e] for name in self.stacked), hook=hidden_hook)

    def forward_padded(self, x: Tensor, hidden_hook: HiddenHook | None = None) -> Tensor:  # pragma: no cover
        """Every expert on its own rows: ``x [E, C, d_model]`` -> ``[E, C, d_out]``."""
        raise NotImplementedError

    def forward_blocks(self, blocks: Sequence[tuple[int, Tensor]],
                       hidden_hook: HiddenHook | None = None) -> list[Tensor]:
        """Expert ``e`` on ``x_e [n_e, d_model]`` for each pair ``(e, x_e)`` -> the list of ``[n_e, d_out]``.

        The same arithmetic as :meth:`forward_expert`, block by block, with the :attr:`stacked` weights
        indexed once (``unbind``), so that the backward stacks the experts' weight gradients in one copy
        instead of adding one full-size zero tensor per expert. A bank without :attr:`stacked` parameters
        calls its :meth:`forward_expert`."""
        if not self.stacked:
            return [self.forward_expert(e, x, hidden_hook) for e, x in blocks]
        slices = [getattr(self, name).unbind(0) for name in self.stacked]
        return [self._expert(x, *(w[e] for w in slices), hook=hidden_hook) for e, x in blocks]

    def forward_grouped(self, x: Tensor, offsets: Tensor, expert_index: Tensor,
                        hidden_hook: HiddenHook | None = None) -> Tensor:  # pragma: no cover
        """Every expert on its block of grouped rows: ``x [N, d_model]`` with expert ``e`` owning rows
        ``offsets[e]:offsets[e+1]`` (``expert_index [N]`` names each row's expert) -> ``[N, d_out]``."""
        raise NotImplementedError

    def flops_per_token(self) -> int:  # pragma: no cover - abstract
        """Floating-point operations (2 per multiply-add) of one expert on one token, matmuls only."""
        raise NotImplementedError


class LinearExperts(ExpertBank):
    """``h_e(x) = x W_e + b_e`` — the linear experts of Jacobs et al. (1991). They have no hidden
    activations, so a ``hidden_hook`` is refused."""

    kind = "linear"

    def __init__(self, num_experts: int, d_model: int, d_ff: int = 1, d_out: int | None = None):
        super().__init__(num_experts, d_model, d_ff, d_out)
        self.weight = _uniform((num_experts, self.d_model, self.d_out), self.d_model)
        self.bias = _uniform((num_experts, self.d_out), self.d_model)

    stacked = ("weight", "bias")

    @classmethod
    def _sizes(cls, weights: Sequence[Tensor]) -> tuple[int, int, int, int]:
        num_experts, d_model, d_out = weights[0].shape
        return num_experts, d_model, 1, d_out

    @staticmethod
    def _no_hook(hook: HiddenHook | None) -> None:
        if hook is not None:
            raise ValueError("hidden_hook must be None for linear experts: they have no hidden activations")

    def _expert(self, x: Tensor, weight: Tensor, bias: Tensor, hook: HiddenHook | None = None) -> Tensor:
        self._no_hook(hook)
        return x @ weight + bias

    def forward_padded(self, x: Tensor, hidden_hook: HiddenHook | None = None) -> Tensor:
        self._no_hook(hidden_hook)
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight)

    def forward_grouped(self, x: Tensor, offsets: Tensor, expert_index: Tensor,
                        hidden_hook: HiddenHook | None = None) -> Tensor:
        self._no_hook(hidden_hook)
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

    def _expert(self, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                hook: HiddenHook | None = None) -> Tensor:
        h = ACTIVATIONS[self.activation](x @ w1 + b1)
        return _hooked(h, hook) @ w2 + b2

    def forward_padded(self, x: Tensor, hidden_hook: HiddenHook | None = None) -> Tensor:
        h = ACTIVATIONS[self.activation](torch.baddbmm(self.b1.unsqueeze(1), x, self.w1))
        return torch.baddbmm(self.b2.unsqueeze(1), _hooked(h, hidden_hook), self.w2)

    def forward_grouped(self, x: Tensor, offsets: Tensor, expert_index: Tensor,
                        hidden_hook: HiddenHook | None = None) -> Tensor:
        h = ACTIVATIONS[self.activation](grouped_mm(x, self.w1, offsets) + self.b1[expert_index])
        return grouped_mm(_hooked(h, hidden_hook), self.w2, offsets) + self.b2[expert_index]

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

    def _act(self, h: Tensor) -> Tensor:
        return ACTIVATIONS[getattr(self, "activation", "silu")](h)  # GLUExperts: its own activation

    def _expert(self, x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor,
                hook: HiddenHook | None = None) -> Tensor:
        return _hooked(self._act(x @ w_gate) * (x @ w_up), hook) @ w_down

    def forward_padded(self, x: Tensor, hidden_hook: HiddenHook | None = None) -> Tensor:
        h = self._act(torch.bmm(x, self.w_gate)) * torch.bmm(x, self.w_up)
        return torch.bmm(_hooked(h, hidden_hook), self.w_down)

    def forward_grouped(self, x: Tensor, offsets: Tensor, expert_index: Tensor,
                        hidden_hook: HiddenHook | None = None) -> Tensor:
        h = self._act(grouped_mm(x, self.w_gate, offsets)) * grouped_mm(x, self.w_up, offsets)
        return grouped_mm(_hooked(h, hidden_hook), self.w_down, offsets)

    def flops_per_token(self) -> int:
        return 2 * self.d_ff * (2 * self.d_model + self.d_out)


class GLUExperts(SwiGLUExperts):
    """``h_e(x) = (act(x Wg_e) ⊙ x Wu_e) Wd_e`` — a gated FFN with any activation of
    :data:`ACTIVATIONS` (Shazeer 2020, eq. 5–6: GEGLU with ``"gelu"``, ReGLU with ``"relu"``; ``"silu"``
    is SwiGLU). Same weights, formulas and FLOPs as :class:`SwiGLUExperts`; used by
    :func:`moe_lib.from_transformers` for checkpoints whose ``hidden_act`` is not SiLU."""

    kind = "glu"

    def __init__(self, num_experts: int, d_model: int, d_ff: int, d_out: int | None = None, activation: str = "silu"):
        super().__init__(num_experts, d_model, d_ff, d_out)
        self.activation = check_choice("activation", activation, ACTIVATIONS)


#: Expert kind -> class. ``MoELayer(expert=name)`` looks names up here.
EXPERTS: dict[str, type[ExpertBank]] = {
    c.kind: c for c in (LinearExperts, MLPExperts, SwiGLUExperts, GLUExperts)
}
