"""The benchmark harness behind ``python -m moe_lib.bench``: every implementation of one MoE FFN layer, on
the same inputs and the same routing, timed side by side, each checked against an fp32 reference first.

One *case* is a shape (:mod:`moe_lib.bench.shapes`), a phase (``prefill`` or ``decode``), a token count
``T``, a mode (``fwd`` or ``fwdbwd``) and a routing:

* ``router`` — a random linear router, softmax, top-``k``, renormalised (Mixtral's rule);
* ``balanced`` — every expert gets the same number of assignments (``T·k/E``, when that divides);
* ``zipf`` — expert popularity ``∝ rank^-s`` (``s = 1.2``): a few hot experts, many cold or empty ones.

Every implementation (:data:`IMPLS`) receives the routing (weights ``[T, k]`` float32, expert ids
``[T, k]``) precomputed; what it times is everything after that — grouping the assignments by expert,
the expert GEMMs and the weighted combine — so every row costs the same useful FLOPs, ``6·T·k·d·f``
forward (three times that with the backward). ``dense_equal_flops`` is one dense SwiGLU FFN over
``T·k`` rows, the same FLOPs with no routing: the speed of light the others are divided by.

Each implementation runs in its own ``try``: a failure is recorded as an error string in the JSON and
the run goes on. Correctness comes before speed: each one first runs on *fresh* random inputs and
routing (a second seed) and its output — and in ``fwdbwd`` mode the gradients of the input and of a
sample of experts' weights — is compared with an fp32 per-expert reference, ``‖out − ref‖ / ‖ref‖``.
"""
from __future__ import annotations

import datetime as _dt
import gc
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..utils import git_state
from ..utils import relative_norm_error
from .shapes import MODES, PHASES, ROUTINGS, Shape
from .timing import wall_times

SCHEMA = "moe_lib.bench/1"

#: Relative-error tolerance for the ``correct`` flag, by dtype.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 3e-2, torch.float16: 1e-2}


# ----------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One measurement: a shape, a phase, a token count, a mode and a routing."""

    shape: Shape
    phase: str
    T: int
    mode: str
    routing: str

    @property
    def backward(self) -> bool:
        return self.mode == "fwdbwd"

    @property
    def key(self) -> str:
        return f"{self.shape.name}/{self.phase}/T={self.T}/{self.mode}/{self.routing}"


#: The decode token count run right after the prefill cases (the decode bandwidth target is set at T=64).
PRIORITY_DECODE_T = 64


def case_priority(case: Case, main_routing: str) -> int:
    """Rank of a case in the run (lower first): with the main routing, prefill forward (0), prefill forward +
    backward (1), decode at ``T = 64`` (2), the other decode token counts (3); then every case of the other
    routings (4). The ranking follows the targets: forward speed on prefill, the training speed-up, the
    decode bandwidth at ``T = 64``."""
    if case.routing != main_routing:
        return 4
    if case.phase == "prefill":
        return 0 if case.mode == "fwd" else 1
    return 2 if case.T == PRIORITY_DECODE_T else 3


def make_cases(shapes: Sequence[Shape], phases: Sequence[str], modes: Sequence[str], routings: Sequence[str],
               prefill_T: Sequence[int], decode_T: Sequence[int], full: bool = True) -> list[Case]:
    """All requested cases, most important first (:func:`case_priority`), so that a run cut short by its time
    budget still holds the headline numbers; within one rank, shapes and token counts keep their order.
    Decode is forward only (a decode step has no backward). ``full=False`` (smoke runs) keeps, for the
    other routings, only the prefill forward cases."""
    cases = []
    for r, routing in enumerate(routings):
        main = r == 0
        for shape in shapes:
            if "prefill" in phases:
                for T in prefill_T:
                    for mode in modes:
                        if main or full or mode == "fwd" or "fwd" not in modes:
                            cases.append(Case(shape, "prefill", T, mode, routing))
            if "decode" in phases and "fwd" in modes and (main or full):
                for T in decode_T:
                    cases.append(Case(shape, "decode", T, "fwd", routing))
    return sorted(cases, key=lambda c: case_priority(c, routings[0]))  # stable


# --------------------------------------------------------------------------------------- routing
def make_routing(kind: str, x: Tensor, shape: Shape, seed: int, router_weight: Tensor | None = None,
                 zipf_s: float = 1.2) -> tuple[Tensor, Tensor]:
    """Routing of ``T`` tokens: ``(weights [T, k] float32, experts [T, k] int64)``, ``k`` distinct experts
    per token, weights positive and summing to 1 per token.

    ``router`` needs ``router_weight [E, d]``: ``topk(softmax(x Wᵀ))`` renormalised, the logits computed
    in the input's dtype and the softmax in fp32, as Hugging Face's Mixtral router and ``fused_moe`` do.
    ``balanced`` gives token ``t`` the experts ``(t·k + j) mod E`` of a random relabelling, then shuffles
    the tokens; ``zipf`` samples ``k`` distinct experts per token from ``p_e ∝ rank(e)^-s``. The random
    parts are drawn on the CPU from ``seed``, so they are the same on every machine.
    """
    from ..routers import synthetic_routing
    from ..kernels.reference import route_ref

    T, E, k = x.shape[0], shape.E, shape.k
    g = torch.Generator().manual_seed(seed)
    if kind == "router":
        if router_weight is None:
            raise ValueError("routing='router' needs router_weight")
        w, idx = route_ref(x @ router_weight.t(), k)  # the kernels' reference router: one routing math
        return w, idx.long()
    if kind not in ("balanced", "zipf"):
        raise ValueError(f"unknown routing {kind!r}; accepted: {list(ROUTINGS)}")
    # the library's synthetic routings (chapter 11), then the experts relabelled at random so that the
    # busiest expert is not always expert 0, and (balanced) the tokens shuffled
    r = synthetic_routing(T, E, k, zipf=zipf_s if kind == "zipf" else 0.0, balanced=kind == "balanced",
                          generator=g)
    w, idx = r.weights.float(), torch.randperm(E, generator=g)[r.experts]
    if kind == "balanced":
        order = torch.randperm(T, generator=g)
        w, idx = w[order], idx[order]
    return w.to(x.device), idx.to(x.device)


def assignment_stats(idx: Tensor, num_experts: int) -> dict:
    """Load statistics of a routing: experts touched, empty experts, max and mean assignments per expert."""
    counts = torch.bincount(idx.reshape(-1), minlength=num_experts)
    mean = idx.numel() / num_experts
    return {"experts_touched": int((counts > 0).sum()), "empty_experts": int((counts == 0).sum()),
            "max_load": int(counts.max()), "mean_load": mean, "imbalance": float(counts.max()) / mean}


# ------------------------------------------------------------------------------------- problems
@dataclass
class Problem:
    """The tensors of one case: canonical weights (moe_lib's SwiGLUExperts layout) and two input sets."""

    case: Case
    dtype: torch.dtype
    device: torch.device
    w_gate: Tensor  # [E, d, f]
    w_up: Tensor  # [E, d, f]
    w_down: Tensor  # [E, f, d]
    router_weight: Tensor  # [E, d]
    inputs: dict = field(default_factory=dict)  # "time" / "check" -> (x, weights, experts, grad_out)
    memory_limit: float | None = None  # bytes a runner may allocate for temporaries (CUDA), None = no check

    @property
    def weights(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.w_gate, self.w_up, self.w_down


def make_problem(case: Case, dtype: torch.dtype, device: torch.device, seed: int = 0, zipf_s: float = 1.2) -> Problem:
    """Random weights (``N(0, 1/d)`` for gate and up, ``N(0, 1/f)`` for down, as the anchors), a timing
    input set and a fresh correctness input set (another seed), each with its routing and output grad."""
    s = case.shape
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*size, scale=1.0):
        return torch.randn(*size, generator=g, device=device, dtype=dtype) * scale

    p = Problem(case, dtype, device,
                w_gate=randn(s.E, s.d, s.f, scale=s.d ** -0.5), w_up=randn(s.E, s.d, s.f, scale=s.d ** -0.5),
                w_down=randn(s.E, s.f, s.d, scale=s.f ** -0.5), router_weight=randn(s.E, s.d, scale=s.d ** -0.5))
    for which, offset in (("time", 1), ("check", 2)):
        x = randn(case.T, s.d)
        w, idx = make_routing(case.routing, x, s, seed + 1000 * offset, p.router_weight, zipf_s)
        gy = randn(case.T, s.d) if case.backward else None
        p.inputs[which] = (x, w, idx, gy)
    return p


def check_experts(idx: Tensor, num_experts: int, limit: int = 16) -> list[int]:
    """Experts whose weight gradients the correctness check compares: all of them when ``E ≤ limit``,
    else the ``limit/2`` most loaded and ``limit/2`` others spread over the rest (empty ones included)."""
    if num_experts <= limit:
        return list(range(num_experts))
    counts = torch.bincount(idx.reshape(-1).cpu(), minlength=num_experts)
    top = counts.argsort(descending=True, stable=True)[: limit // 2].tolist()
    rest = [e for e in range(num_experts) if e not in top]
    step = len(rest) / (limit - len(top))
    return sorted(top + [rest[int(i * step)] for i in range(limit - len(top))])


def reference(x: Tensor, w: Tensor, idx: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor,
              grad_out: Tensor | None = None, experts: Sequence[int] = (), router_weight: Tensor | None = None) -> dict:
    """fp32 reference, one expert at a time (each expert's weights are upcast only while it runs, so the
    reference never holds an fp32 copy of the whole layer).

    Returns ``{"y": [T, d] fp32}``, plus with ``grad_out`` the gradients of ``Σ grad_out ⊙ y``:
    ``"dx"`` ``[T, d]`` and ``"dw"`` ``{e: (dWg, dWu, dWd)}`` for the experts listed in ``experts``. The
    routing weights are constants, unless ``router_weight`` is given: then ``w`` is taken to be
    ``renorm(softmax(x Wrᵀ)[idx])`` and ``dx`` includes the gradient through the router (what
    ``fused_moe`` differentiates).
    """
    T, k = idx.shape
    E = w_gate.shape[0]
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E).tolist()
    tok_all, slot_all = order // k, order % k
    y = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    dx = torch.zeros_like(y) if grad_out is not None else None
    dw_route = torch.zeros(T, k, dtype=torch.float32, device=x.device) if router_weight is not None else None
    dw = {}
    start = 0
    for e in range(E):
        n = counts[e]
        tok, slot = tok_all[start:start + n], slot_all[start:start + n]
        start += n
        if n == 0:
            if grad_out is not None and e in experts:
                dw[e] = (torch.zeros_like(w_gate[e], dtype=torch.float32), torch.zeros_like(w_up[e], dtype=torch.float32),
                         torch.zeros_like(w_down[e], dtype=torch.float32))
            continue
        with torch.enable_grad() if grad_out is not None else torch.no_grad():
            leaves = [t.detach().float().requires_grad_(grad_out is not None)
                      for t in (x[tok], w_gate[e], w_up[e], w_down[e])]
            xe, g, u, dn = leaves
            he = (F.silu(xe @ g) * (xe @ u)) @ dn
            ye = he * w[tok, slot, None].float()
            y.index_add_(0, tok, ye.detach())
            if dw_route is not None and grad_out is not None:
                dw_route[tok, slot] = (grad_out[tok].float() * he.detach()).sum(-1)
            if grad_out is not None:
                ye.backward(grad_out[tok].float())
                dx.index_add_(0, tok, xe.grad)
                if e in experts:
                    dw[e] = (g.grad, u.grad, dn.grad)
    if dw_route is not None and grad_out is not None:
        with torch.enable_grad():
            x32 = x.detach().float().requires_grad_()
            probs = torch.softmax(x32 @ router_weight.detach().float().t(), dim=-1).gather(1, idx.long())
            (dx_router,) = torch.autograd.grad(probs / probs.sum(-1, keepdim=True), x32, grad_outputs=dw_route)
        dx = dx + dx_router
    out = {"y": y}
    if grad_out is not None:
        out.update(dx=dx, dw=dw)
    return out


def grad_error(grads: tuple[Tensor, Tensor, Tensor], ref: dict) -> float:
    """Relative error of the weight gradients over the reference's experts, all three matrices pooled."""
    num = den = 0.0
    for e, ref_e in ref.items():
        for got, want in zip(grads, ref_e):
            num += (got[e].double() - want.double()).norm().item() ** 2
            den += want.double().norm().item() ** 2
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


# --------------------------------------------------------------------------------- implementations
class Skip(Exception):
    """Raised by a runner's constructor when the case is outside what it can (or should) run."""


class Runner:
    """One implementation, built for one problem. ``forward(x, w, idx) -> y [T, d]``; ``params`` are the
    weight leaves it trains (in its own layout) and ``weight_grads()`` maps their gradients back to the
    canonical ``(dWg [E,d,f], dWu [E,d,f], dWd [E,f,d])`` (views, no copies)."""

    impl_used: str | None = None
    note: str | None = None
    routes_itself = False  # computes its own routing from x (fused_moe): checked against its own choice
    last_routing: tuple[Tensor, Tensor] | None = None

    def __init__(self, params: Sequence[Tensor] = ()):
        self.params = list(params)

    def forward(self, x: Tensor, w: Tensor, idx: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def weight_grads(self):
        return None

    def timed(self, x: Tensor, w: Tensor, idx: Tensor, gy: Tensor | None) -> tuple[Callable[[], object], list[Tensor]]:
        """The closure to time and the tensors whose ``.grad`` is reset between calls."""
        if gy is None:
            def fn():
                with torch.no_grad():
                    return self.forward(x, w, idx)
            return fn, []
        xg = x.detach().requires_grad_()
        return (lambda: self.forward(xg, w, idx).backward(gy)), [xg, *self.params]


def _leaf(t: Tensor, grad: bool) -> Tensor:
    return t.detach().requires_grad_(grad)


def _swiglu(h: Tensor, f: int) -> Tensor:
    g, u = h.split(f, dim=-1)
    return F.silu(g) * u


class DenseRunner(Runner):
    """A dense SwiGLU FFN (expert 0's weights) over ``T·k`` rows: equal FLOPs, no routing."""

    def __init__(self, p: Problem, grad: bool):
        self.f = p.case.shape.f
        self.k = p.case.shape.k
        self.w13 = _leaf(torch.cat([p.w_gate[0], p.w_up[0]], dim=1), grad)  # [d, 2f]
        self.w2 = _leaf(p.w_down[0].clone(), grad)  # [f, d]
        super().__init__([self.w13, self.w2])

    def dense(self, xk: Tensor) -> Tensor:
        return _swiglu(xk @ self.w13, self.f) @ self.w2

    def forward(self, x, w, idx):
        return self.dense(x.repeat_interleave(self.k, 0))

    def timed(self, x, w, idx, gy):
        xk = x.detach().repeat_interleave(self.k, 0)
        if gy is None:
            def fn():
                with torch.no_grad():
                    return self.dense(xk)
            return fn, []
        xk.requires_grad_()
        gyk = gy.repeat_interleave(self.k, 0)
        return (lambda: self.dense(xk).backward(gyk)), [xk, *self.params]


class NaiveLoopRunner(Runner):
    """One Python iteration per expert: find its tokens, run it, ``index_add`` the weighted result."""

    def __init__(self, p: Problem, grad: bool):
        self.w_gate, self.w_up, self.w_down = (_leaf(t, grad) for t in p.weights)
        super().__init__([self.w_gate, self.w_up, self.w_down])

    def forward(self, x, w, idx):
        out = torch.zeros_like(x)
        for e in range(self.w_gate.shape[0]):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            h = x[tok]
            y = (F.silu(h @ self.w_gate[e]) * (h @ self.w_up[e])) @ self.w_down[e]
            out.index_add_(0, tok, y * w[tok, slot, None].to(y.dtype))
        return out

    def weight_grads(self):
        return self.w_gate.grad, self.w_up.grad, self.w_down.grad


class GroupedMMRunner(Runner):
    """Sort the assignments by expert, two ``torch._grouped_mm`` calls, weighted ``index_add`` back."""

    def __init__(self, p: Problem, grad: bool):
        if not hasattr(torch, "_grouped_mm"):
            raise RuntimeError(f"torch {torch.__version__} has no torch._grouped_mm")
        self.f = p.case.shape.f
        self.w13 = _leaf(torch.cat([p.w_gate, p.w_up], dim=2), grad)  # [E, d, 2f]
        self.w2 = _leaf(p.w_down, grad)  # [E, f, d]
        super().__init__([self.w13, self.w2])

    def forward(self, x, w, idx):
        k = idx.shape[1]
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        offs = torch.cumsum(torch.bincount(flat, minlength=self.w13.shape[0]), 0).to(torch.int32)
        rows = order // k
        h = torch._grouped_mm(x[rows], self.w13, offs=offs)
        y = torch._grouped_mm(_swiglu(h, self.f), self.w2, offs=offs)
        y = y * w.reshape(-1)[order, None].to(y.dtype)
        out = torch.zeros_like(x)
        out.index_add_(0, rows, y)
        return out

    def weight_grads(self):
        g = self.w13.grad
        return g[..., : self.f], g[..., self.f:], self.w2.grad


class HFRunner(Runner):
    """Hugging Face transformers' Mixtral experts module (``MixtralExperts``) with one of its experts
    implementations (``eager``, ``grouped_mm``, ``batched_mm``), built offline from a config and given
    the precomputed routing, as its ``MixtralSparseMoeBlock`` would give it after its router."""

    def __init__(self, p: Problem, grad: bool, implementation: str):
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts

        s = p.case.shape
        cfg = MixtralConfig(hidden_size=s.d, intermediate_size=s.f, num_local_experts=s.E, num_experts_per_tok=s.k)
        cfg._experts_implementation = implementation
        with torch.device("meta"):
            ex = MixtralExperts(cfg)
        if not hasattr(ex, "gate_up_proj"):
            import transformers
            raise RuntimeError(f"transformers {transformers.__version__}: MixtralExperts has no gate_up_proj "
                               "(the 5.x fused layout is needed)")
        # HF layout (5.x): gate_up_proj [E, 2f, d], down_proj [E, d, f]; F.linear(x, W) = x Wᵀ.
        ex.gate_up_proj = torch.nn.Parameter(torch.cat([p.w_gate, p.w_up], dim=2).transpose(1, 2).contiguous(),
                                             requires_grad=grad)
        ex.down_proj = torch.nn.Parameter(p.w_down.transpose(1, 2).contiguous(), requires_grad=grad)
        self.ex, self.f = ex, s.f
        super().__init__([ex.gate_up_proj, ex.down_proj])

    def forward(self, x, w, idx):
        return self.ex(x, idx, w)

    def weight_grads(self):
        g = self.ex.gate_up_proj.grad
        return (g[:, : self.f].transpose(1, 2), g[:, self.f:].transpose(1, 2), self.ex.down_proj.grad.transpose(1, 2))


def _bank(p: Problem, grad: bool):
    """A :class:`~moe_lib.experts.SwiGLUExperts` bank holding the problem's weights (no init drawn, no copy)."""
    from ..experts import SwiGLUExperts

    s = p.case.shape
    with torch.device("meta"):
        bank = SwiGLUExperts(s.E, s.d, s.f)
    for name, weight in zip(("w_gate", "w_up", "w_down"), p.weights):
        setattr(bank, name, torch.nn.Parameter(weight.detach(), requires_grad=grad))
    return bank


class BackendRunner(Runner):
    """moe_lib's ``MoELayer`` data path after its router, on the harness's routing: the layer's dispatch
    stage over a bank holding the problem's weights — :class:`~moe_lib.dispatch.TokenDispatcher` (group by
    expert, the backend, the combine) with one of :data:`moe_lib.backends.BACKENDS`, or
    :class:`moe_lib.kernels.KernelDispatcher` (grouping on the device, the fused kernels)."""

    def __init__(self, p: Problem, grad: bool, backend: str, dispatcher=None):
        from ..backends import BACKENDS
        from ..dispatch import TokenDispatcher

        self.bank, self.backend, self.E = _bank(p, grad), BACKENDS[backend], p.case.shape.E
        self.dispatcher = TokenDispatcher() if dispatcher is None else dispatcher
        super().__init__([self.bank.w_gate, self.bank.w_up, self.bank.w_down])

    def forward(self, x, w, idx):
        from ..routers import Routing

        empty = x.new_zeros(0, self.E, dtype=torch.float32)
        routing = Routing(logits=empty, probs=empty, experts=idx, weights=w)
        return self.dispatcher(self.bank, x, routing, self.backend)[0]

    def weight_grads(self):
        return self.bank.w_gate.grad, self.bank.w_up.grad, self.bank.w_down.grad


def _kernel_runner(p: Problem, grad: bool) -> BackendRunner:
    """``moe_lib_triton``: the layer's dispatch stage with :class:`moe_lib.kernels.KernelDispatcher`."""
    from ..kernels import KernelDispatcher  # ImportError (recorded) where moe_lib.kernels cannot be imported

    runner = BackendRunner(p, grad, "triton", KernelDispatcher())
    runner.impl_used = "triton"  # the kernels' implementation, recorded beside the time (never a torch fallback)
    return runner


class LayerRunner(Runner):
    """``moe_lib_fused``: a whole :class:`~moe_lib.MoELayer` — :class:`moe_lib.kernels.FusedTopKRouter`
    (router kernel) holding the problem's router weight, :class:`moe_lib.kernels.KernelDispatcher` and the
    bank — so it routes by itself; checked against the reference of its own routing."""

    routes_itself = True

    def __init__(self, p: Problem, grad: bool):
        from ..kernels import FusedTopKRouter, KernelDispatcher
        from ..layer import MoELayer

        s = p.case.shape
        with torch.device("meta"):
            router = FusedTopKRouter(s.d, s.E, s.k)
        router.gate.weight = torch.nn.Parameter(p.router_weight.detach(), requires_grad=grad)
        self.layer = MoELayer(s.d, s.f, s.E, router=router, expert=_bank(p, grad), dispatcher=KernelDispatcher(),
                              backend="triton", aux_loss_coef=0.0)
        self.impl_used = "triton"
        bank = self.layer.experts
        super().__init__([bank.w_gate, bank.w_up, bank.w_down, router.gate.weight])

    def forward(self, x, w, idx):
        y, info = self.layer(x, return_info=True)
        self.last_routing = (info.routing.weights.detach(), info.routing.experts)
        return y

    def weight_grads(self):
        bank = self.layer.experts
        return bank.w_gate.grad, bank.w_up.grad, bank.w_down.grad


@dataclass(frozen=True)
class Impl:
    """An entry of the benchmark: ``build(problem, grad) -> Runner``; ``skip(case, options) -> reason|None``."""

    name: str
    family: str  # "baseline" (speed of light), "moe_lib", "peer"
    description: str
    build: Callable[[Problem, bool], Runner]
    skip: Callable[[Case, dict], str | None] = lambda case, opts: None
    uses_triton: bool = False  # runs Triton kernels: on the CPU (interpreter) checked but never timed


def _skip_slow_loop(case: Case, opts: dict) -> str | None:
    if case.backward and case.shape.E > opts.get("max_loop_experts_bwd", 64):
        return (f"one Python iteration per expert with E={case.shape.E} > {opts.get('max_loop_experts_bwd', 64)} "
                "in fwd+bwd (raise --max-loop-experts-bwd to run it)")
    return None


def _skip_dense(case: Case, opts: dict) -> str | None:
    rows = case.T * case.shape.k
    elem = torch.tensor([], dtype=opts.get("dtype", torch.bfloat16)).element_size()
    if rows * case.shape.d * elem >= 2 ** 33:
        return f"the dense input copy [T*k={rows}, d] would exceed 8 GiB"
    return None


def _skip_fused(case: Case, opts: dict) -> str | None:
    if case.routing != "router":
        return "fused_moe routes with its own router: only routing='router' gives it the same assignments"
    return None


def _skip_batched(case: Case, opts: dict) -> str | None:
    if case.T * case.shape.k > 512:
        return "batched_mm gathers one weight copy per (token, expert) pair: decode sizes only (T*k <= 512)"
    return None


def _backend_impls() -> list[Impl]:
    """One entry per moe_lib backend beyond the reference ``loop`` (``torch`` now; ``grouped_mm`` and
    ``triton`` join automatically when :data:`moe_lib.backends.BACKENDS` lists them)."""
    from ..backends import BACKENDS

    out = []
    for name in BACKENDS:
        out.append(Impl(f"moe_lib_{name}" if name in ("torch", "loop") else f"moe_lib_backend_{name}", "moe_lib",
                        f"moe_lib MoELayer data path: make_plan + backend={name!r}",
                        lambda p, g, name=name: BackendRunner(p, g, name), uses_triton=name == "triton"))
    return out


def impl_registry() -> dict[str, Impl]:
    """Every implementation the harness knows, in table order."""
    impls = [
        Impl("dense_equal_flops", "baseline", "dense SwiGLU FFN over T*k rows: equal FLOPs, no routing (speed of light)",
             DenseRunner, _skip_dense),
        Impl("moe_lib_triton", "moe_lib", "MoELayer dispatch stage with kernels.KernelDispatcher (permute_metadata + "
             "expert_ffn)", _kernel_runner, uses_triton=True),
        Impl("moe_lib_fused", "moe_lib", "MoELayer with kernels.FusedTopKRouter + KernelDispatcher (router + "
             "metadata + FFN kernels, what fused_moe computes)", LayerRunner, _skip_fused, uses_triton=True),
        *_backend_impls(),
        Impl("torch_grouped_mm", "peer", "sort + two torch._grouped_mm + index_add (the anchors' hand-written path)",
             GroupedMMRunner),
        Impl("hf_grouped_mm", "peer", "transformers MixtralExperts, experts implementation 'grouped_mm'",
             lambda p, g: HFRunner(p, g, "grouped_mm")),
        Impl("hf_batched_mm", "peer", "transformers MixtralExperts, experts implementation 'batched_mm'",
             lambda p, g: HFRunner(p, g, "batched_mm"), _skip_batched),
        Impl("hf_eager", "peer", "transformers MixtralExperts, eager loop over the experts hit",
             lambda p, g: HFRunner(p, g, "eager"), _skip_slow_loop),
        Impl("naive_loop", "peer", "Python loop over experts: nonzero, three matmuls, index_add",
             NaiveLoopRunner, _skip_slow_loop),
    ]
    return {i.name: i for i in impls}


# ---------------------------------------------------------------------------------------- timing
def time_ms(fn: Callable[[], object], device: torch.device, grad_to_none: Sequence[Tensor] = (),
            warmup_ms: float = 25, rep_ms: float = 100, cpu_reps: int = 5, cpu_max_s: float = 0.5) -> float:
    """Median milliseconds of ``fn()``. CUDA: ``triton.testing.do_bench`` (L2 flushed between calls).
    CPU: :func:`moe_lib.bench.timing.wall_times` — one warm-up call, then up to ``cpu_reps`` timed calls
    (the gradients of ``grad_to_none`` cleared before each), stopping after ``cpu_max_s`` seconds (at least
    one); the middle sample (the upper one of an even count)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(grad_to_none) or None,
                                             return_mode="median"))

    times = sorted(wall_times(fn, repeats=cpu_reps, warmup=1, device=device, max_s=cpu_max_s,
                              before=lambda: _zero_grads(grad_to_none)))
    return 1e3 * times[len(times) // 2]


def measure_ceilings(device: torch.device, dtype: torch.dtype, **timing) -> dict:
    """Dense matmul TFLOP/s (``n³``, n = 8192 on CUDA, 256 on CPU) and device copy TB/s (bytes read plus
    written; 1 GiB on CUDA, 16 MiB on CPU), measured now with the same timer as the cases."""
    n = 8192 if device.type == "cuda" else 256
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, **timing)
    dense = 2 * n ** 3 / ms / 1e9
    del a, b
    nbytes = 2 ** 30 if device.type == "cuda" else 2 ** 24
    src = torch.empty(nbytes // 2, device=device, dtype=torch.bfloat16).fill_(1.0)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, **timing)
    copy = 2 * nbytes / ms / 1e9
    del src, dst
    return {"dense_tflops": dense, "dense_n": n, "dense_dtype": str(dtype).replace("torch.", ""),
            "copy_TBps": copy, "copy_bytes": nbytes}


# ------------------------------------------------------------------------------------- metadata
def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:300]


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


def metadata(device: torch.device, dtype: torch.dtype, smoke: bool) -> dict:
    """Where and with what the run was made."""
    try:
        from importlib.metadata import version
        moe_lib_version = version("moe-lib")
    except Exception:
        moe_lib_version = None
    try:
        from .. import kernels as K
        kernels = {"kernels_available": bool(K.available()), "kernels_interpreting": bool(K.interpreting())}
    except Exception as e:
        kernels = {"kernels_available": False, "kernels_interpreting": None, "kernels_error": _error(e)}
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type, "gpu": None, "gpu_sms": None, "gpu_capability": None,
        "cpu": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
        "dtype": str(dtype).replace("torch.", ""), "smoke": smoke,
        "python": platform.python_version(), "torch": torch.__version__, "triton": _version("triton"),
        "transformers": _version("transformers"), "moe_lib": moe_lib_version, **git_state(), **kernels,
        "timer": ("triton.testing.do_bench, median" if device.type == "cuda"
                  else "time.perf_counter, median of a few calls after one warm-up"),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(gpu=props.name, gpu_sms=props.multi_processor_count,
                    gpu_capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                    gpu_memory_gb=props.total_memory / 1e9, cuda=torch.version.cuda)
    return meta


# ---------------------------------------------------------------------------------------- running
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device):
    if device.type == "cuda":  # collect cycles that may hold GPU memory (slow: not on the CPU)
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _zero_grads(tensors):
    for t in tensors:
        t.grad = None


def _triton_interpreting() -> bool:
    from ..kernels.config import interpreting  # lazily: moe_lib.kernels imports triton

    return interpreting()


def check(runner: Runner, p: Problem, ref: dict, res: dict) -> None:
    """Run ``runner`` once on the check inputs and store its relative errors (output; with the backward
    also the input gradient and the sampled experts' weight gradients) and the ``correct`` flag in ``res``.
    A runner that routes by itself is compared with the reference of the routing it chose, and the share
    of tokens whose experts differ from the harness's router is recorded (``routing_mismatch``)."""
    case = p.case
    x, w, idx, gy = p.inputs["check"]
    if case.backward:
        xg = x.detach().requires_grad_()
        _zero_grads(runner.params)
        y = runner.forward(xg, w, idx)
        y.backward(gy)
        y, dx, grads = y.detach(), xg.grad, runner.weight_grads()
    else:
        with torch.no_grad():
            y = runner.forward(x, w, idx)
        dx = grads = None
    if runner.routes_itself and runner.last_routing is not None:
        w_own, idx_own = runner.last_routing
        idx_own = idx_own.long()
        same = (idx_own.sort(-1).values == idx.sort(-1).values).all(-1)
        res["routing_mismatch"] = 1.0 - same.float().mean().item()
        ref = reference(x, w_own, idx_own, *p.weights, grad_out=gy, experts=list(ref.get("dw", {})),
                        router_weight=p.router_weight if case.backward else None)
    res["relerr"] = relative_norm_error(y, ref["y"])
    if case.backward:
        res["relerr_dx"] = relative_norm_error(dx, ref["dx"])
        res["relerr_dw"] = grad_error(grads, ref["dw"]) if grads is not None else None
    _zero_grads(runner.params)
    tol = TOLERANCE.get(p.dtype, 3e-2)
    errs = [res[k] for k in ("relerr", "relerr_dx", "relerr_dw") if res[k] is not None]
    res["correct"] = all(e <= tol for e in errs)  # NaN compares False


#: The fields of one implementation's result (``None`` when not measured or not applicable).
RESULT_FIELDS = ("ms", "tflops", "ratio_to_dense", "relerr", "relerr_dx", "relerr_dw", "correct", "peak_mem_gb",
                 "workspace_gb", "TBps", "bw_share", "routing_mismatch", "impl_used", "note", "error", "skipped")


def empty_result(**values) -> dict:
    """A result with every field of :data:`RESULT_FIELDS`, ``None`` unless given."""
    res = dict.fromkeys(RESULT_FIELDS)
    res.update(values)
    return res


def run_impl(impl: Impl, p: Problem, ref: dict, opts: dict, ceilings: dict | None) -> dict:
    """Build, check and time one implementation on one problem; never raises."""
    case, device = p.case, p.device
    res = empty_result()
    reason = impl.skip(case, opts)
    if reason:
        res["skipped"] = reason
        return res
    runner = None
    stage = "build"
    try:
        if device.type == "cuda" and impl.uses_triton and _triton_interpreting():
            raise RuntimeError("TRITON_INTERPRET=1 on a GPU: the kernels would run in the interpreter, not timed")
        runner = impl.build(p, case.backward)
        stage = "check"  # correctness first, on the fresh inputs
        if impl.family != "baseline":
            check(runner, p, ref, res)
        if device.type != "cuda" and impl.uses_triton and _triton_interpreting():
            res["skipped"] = "not timed: Triton kernels run in the interpreter on the CPU (correctness only)"
            return res
        stage = "time"
        x, w, idx, gy = p.inputs["time"]
        fn, leaves = runner.timed(x, w, idx, gy)
        if device.type == "cuda":  # one call under the peak-memory counter (also the first warm-up)
            _sync(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            _sync(device)
            peak = torch.cuda.max_memory_allocated(device)
            res["peak_mem_gb"], res["workspace_gb"] = peak / 1e9, (peak - base) / 1e9
            _zero_grads(leaves)
        ms = time_ms(fn, device, leaves, **opts.get("timing", {}))
        res["ms"] = ms
        res["tflops"] = case.shape.flops(case.T, case.backward) / ms / 1e9
        if case.phase == "decode" and impl.family != "baseline":  # the dense GEMM reads one expert only
            touched = assignment_stats(idx, case.shape.E)["experts_touched"]
            res["TBps"] = touched * case.shape.expert_params() * p.w_gate.element_size() / ms / 1e9
            if ceilings:
                res["bw_share"] = res["TBps"] / ceilings["copy_TBps"]
    except Skip as e:
        res["skipped"] = str(e)
    except Exception as e:  # one implementation never stops the run
        res["error"] = f"{stage}: {_error(e)}"
    finally:
        if runner is not None:
            res["impl_used"] = runner.impl_used
            res["note"] = runner.note
        runner = None
        _free(device)
    return res


def ratio(numerator_ms: float | None, denominator_ms: float | None) -> float | None:
    """``numerator / denominator`` of two times, ``None`` if either is missing or not positive. With the
    dense time as numerator it is the *ratio to dense* (1.0 = the speed of light)."""
    if not numerator_ms or not denominator_ms or numerator_ms <= 0 or denominator_ms <= 0:
        return None
    return numerator_ms / denominator_ms


def run_case(case: Case, impls: Sequence[Impl], opts: dict, ceilings: dict | None, deadline: float) -> dict:
    """Every implementation on one case; implementations not started before ``deadline`` are skipped."""
    device, dtype = opts["device"], opts["dtype"]
    s = case.shape
    row = {"shape": s.name, "phase": case.phase, "mode": case.mode, "routing": case.routing, "T": case.T,
           "d": s.d, "f": s.f, "E": s.E, "k": s.k, "fine_grained": s.fine_grained,
           "gflop": s.flops(case.T, case.backward) / 1e9}
    results = {}
    try:
        p = make_problem(case, dtype, device, seed=opts.get("seed", 0), zipf_s=opts.get("zipf_s", 1.2))
        p.memory_limit = opts.get("memory_limit_bytes")
        _, _, idx, _ = p.inputs["time"]
        row.update(assignment_stats(idx, s.E))
        row["weight_bytes_touched"] = row["experts_touched"] * s.expert_params() * p.w_gate.element_size()
        x, w, cidx, gy = p.inputs["check"]
        keep = check_experts(cidx, s.E) if case.backward else []
        ref = reference(x, w, cidx, *p.weights, grad_out=gy, experts=keep)
        row["grad_experts_checked"] = len(keep) if case.backward else None
    except Exception as e:
        row["error"] = _error(e)
        row["results"] = {i.name: empty_result(error=f"setup: {row['error']}") for i in impls}
        _free(device)
        return row
    for impl in impls:
        if time.monotonic() > deadline:
            results[impl.name] = empty_result(skipped="time budget spent")
            continue
        results[impl.name] = run_impl(impl, p, ref, opts, ceilings)
    dense = results.get("dense_equal_flops", {}).get("ms")
    for r in results.values():
        if r.get("ms") is not None:
            r["ratio_to_dense"] = ratio(dense, r["ms"])
    row["results"] = results
    del p, ref
    _free(device)
    return row


#: Peers whose H200 numbers the committed anchors (``benchmarks/anchors/``) already hold, and which cost the
#: most time per case (a Python loop over the experts): on the GPU they run only when time remains.
DEFERRED_IMPLS = ("naive_loop", "hf_eager")
DEFERRED = "deferred: a peer the committed anchors hold, run after every case when time remains"


def _merge(row: dict, extra: dict, names: Sequence[str]) -> None:
    """Put ``extra``'s results into ``row`` (table order ``names``), their ratio to ``row``'s dense time."""
    dense = row["results"].get("dense_equal_flops", {}).get("ms")
    for name, r in extra.get("results", {}).items():
        if r.get("ms") is not None:
            r["ratio_to_dense"] = ratio(dense, r["ms"])
        row["results"][name] = r
    row["results"] = {n: row["results"][n] for n in names if n in row["results"]}


def run(cases: Sequence[Case], impls: Sequence[Impl], *, device: torch.device, dtype: torch.dtype, smoke: bool,
        budget_s: float, out: Path | None, seed: int = 0, zipf_s: float = 1.2, ceilings: bool = True,
        timing: dict | None = None, max_loop_experts_bwd: int = 64, memory_fraction: float = 0.5,
        config: dict | None = None, deferred: Sequence[str] = (), log: Callable[[str], None] = print) -> dict:
    """Run ``cases`` × ``impls`` within ``budget_s`` seconds and write the JSON to ``out`` after every case
    (so a run killed at its time limit still leaves what it measured). Returns the result dict.

    Implementations named in ``deferred`` (e.g. :data:`DEFERRED_IMPLS`) are left out of the first pass over
    the cases; a second pass runs them, case by case in the same order, while time remains (until then their
    result says :data:`DEFERRED`; if the budget ends first, ``"time budget spent"``)."""
    start = time.monotonic()
    deadline = start + budget_s
    timing = dict(timing or {})
    names = [i.name for i in impls]
    later = [i for i in impls if i.name in set(deferred)]
    first = [i for i in impls if i not in later]
    opts = {"device": device, "dtype": dtype, "seed": seed, "zipf_s": zipf_s, "timing": timing,
            "max_loop_experts_bwd": max_loop_experts_bwd}
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        opts["memory_limit_bytes"] = memory_fraction * free
    result = {"schema": SCHEMA, "meta": metadata(device, dtype, smoke),
              "config": {**(config or {}), "budget_s": budget_s, "seed": seed, "zipf_s": zipf_s,
                         "impls": names, "impl_descriptions": {i.name: i.description for i in impls},
                         "deferred_impls": [i.name for i in later], "timing": timing,
                         "max_loop_experts_bwd": max_loop_experts_bwd},
              "ceilings": None, "cases": [], "complete": False, "elapsed_s": None}
    if ceilings:
        try:
            result["ceilings"] = measure_ceilings(device, dtype, **timing)
            c = result["ceilings"]
            log(f"ceilings: dense {c['dense_tflops']:.4g} TFLOP/s ({c['dense_dtype']}, n={c['dense_n']}), "
                f"copy {c['copy_TBps']:.4g} TB/s")
        except Exception as e:
            result["ceilings_error"] = _error(e)
    from .report import format_case  # the table lines

    def save():
        result["elapsed_s"] = time.monotonic() - start
        if out is not None:
            write_json(result, out)

    skipped = 0
    for i, case in enumerate(cases):
        if time.monotonic() > deadline:
            skipped = len(cases) - i
            result["skipped_cases"] = [c.key for c in cases[i:]]
            log(f"time budget of {budget_s:.0f} s spent: {skipped} case(s) not run")
            break
        row = run_case(case, first, opts, result["ceilings"], deadline)
        _merge(row, {"results": {im.name: empty_result(skipped=DEFERRED) for im in later}}, names)
        result["cases"].append(row)
        log(format_case(row, names))
        save()
    if later:
        for case, row in zip(cases, result["cases"]):
            if time.monotonic() > deadline:
                break
            if "error" in row:  # its setup failed: nothing to add
                continue
            _merge(row, run_case(case, later, opts, result["ceilings"], deadline), names)
            log(f"(deferred peers) {format_case(row, names)}")
            save()
        for row in result["cases"]:
            for im in later:
                if row["results"].get(im.name, {}).get("skipped") == DEFERRED:
                    row["results"][im.name]["skipped"] = "time budget spent before this deferred peer ran"
    result["complete"] = skipped == 0 and all(
        "time budget" not in str(r.get("skipped")) for row in result["cases"] for r in row.get("results", {}).values())
    save()
    return result


def write_json(result: dict, path: Path) -> None:
    """Write atomically (a temporary file renamed), NaN as null."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(result), indent=1) + "\n")
    os.replace(tmp, path)


def _clean(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


__all__ = ["SCHEMA", "Case", "Impl", "Problem", "Runner", "make_cases", "make_routing", "assignment_stats",
           "make_problem", "reference", "relative_norm_error", "impl_registry", "time_ms", "measure_ceilings",
           "run", "run_case", "ratio", "write_json", "case_priority", "DEFERRED_IMPLS", "MODES", "PHASES",
           "ROUTINGS"]
