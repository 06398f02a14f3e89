"""Expectation–maximisation for hierarchical mixtures of linear experts (Jordan & Jacobs 1994, §4–5).

One EM step on the whole training set:

* **E-step** — the posterior ``h_l(t)`` that leaf ``l`` generated case ``t`` (:meth:`HME.posteriors`),
  summed over sub-trees into the posterior mass of every node.
* **M-step, experts** — each leaf is a weighted least-squares problem with weights ``h_l(t)``; solved
  exactly. Each leaf's variance is the weighted mean squared residual.
* **M-step, gates** — each gate is a weighted multinomial logistic regression whose targets are the
  posterior masses of its children: ``max_θ Σ_t Σ_c m_c(t) log g_c(x_t; θ)``. Solved by iteratively
  reweighted least squares (IRLS = Newton's method, the paper's choice), with step halving so that the
  gate's objective never decreases.

Because each M-step part does not decrease its term of the expected complete-data log-likelihood, every
step is a (generalised) EM step and the log-likelihood never decreases (Dempster et al. 1977) —
``tests/test_classic.py`` checks this on random problems.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._validate import check_int, check_nonnegative_float
from .hme import HME

MIN_VARIANCE = 1e-8


def _with_ones(x: Tensor) -> Tensor:
    return torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)


def _gate_objective(theta: Tensor, xb: Tensor, counts: Tensor) -> Tensor:
    return (counts * torch.log_softmax(xb @ theta.T, dim=-1)).sum()


def irls_gate(gate, x: Tensor, counts: Tensor, *, steps: int = 1, ridge: float = 1e-6) -> float:
    """Fit one softmax gate to soft targets by IRLS (Newton steps with step halving), in place.

    Args:
        gate: a :class:`~moe_lib.routers.DenseRouter` with a bias (``b`` outputs).
        x: ``[T, d]`` inputs.
        counts: ``[T, b]`` non-negative soft counts ``m_c(t)`` (posterior masses of the children).
        steps: Newton iterations.
        ridge: added to the negative Hessian's diagonal (the softmax is invariant to a shift of all its
            logits, so the Hessian is singular without it).

    Returns:
        the gate's objective ``Σ_t Σ_c m_c(t) log g_c(x_t)`` after the update (never lower than before).
    """
    xb = _with_ones(x)
    theta = torch.cat([gate.gate.weight.detach(), gate.gate.bias.detach().unsqueeze(1)], dim=1).to(x.dtype)
    b, p = theta.shape
    best = _gate_objective(theta, xb, counts)
    for _ in range(steps):
        g = torch.softmax(xb @ theta.T, dim=-1)                       # [T, b]
        s = counts.sum(-1)                                            # [T]
        grad = (counts - s.unsqueeze(1) * g).T @ xb                   # [b, p]
        # negative Hessian: Σ_t s_t (diag(g) − g gᵀ) ⊗ x xᵀ
        cov = torch.diag_embed(g) - g.unsqueeze(2) * g.unsqueeze(1)   # [T, b, b]
        neg_h = torch.einsum("t,tac,ti,tj->aicj", s, cov, xb, xb).reshape(b * p, b * p)
        neg_h = neg_h + ridge * (1 + neg_h.diagonal().abs().max()) * torch.eye(b * p, dtype=x.dtype)
        direction = torch.linalg.solve(neg_h, grad.reshape(-1)).reshape(b, p)
        step = 1.0
        for _ in range(30):
            candidate = theta + step * direction
            value = _gate_objective(candidate, xb, counts)
            if value >= best:
                theta, best = candidate, value
                break
            step /= 2
        else:
            break
    with torch.no_grad():
        gate.gate.weight.copy_(theta[:, :-1].to(gate.gate.weight.dtype))
        gate.gate.bias.copy_(theta[:, -1].to(gate.gate.bias.dtype))
    return float(best)


@torch.no_grad()
def em_step(hme: HME, x: Tensor, y: Tensor, *, irls_steps: int = 1) -> float:
    """One EM step on ``(x [T, d_in], y [T, d_out])``, in place. Returns the log-likelihood *before* it.

    Run the model in float64 (``hme.double()``) for the least-squares and Newton solves to be accurate.
    """
    irls_steps = check_int("irls_steps", irls_steps, minimum=1)
    joint = hme.joint_log_probs(x, y)
    log_likelihood = float(torch.logsumexp(joint, dim=-1).sum())
    h = torch.softmax(joint, dim=-1)                                  # E-step: [T, L]
    # Experts: weighted least squares per leaf, then the leaf's variance.
    xb = _with_ones(x)
    for leaf in range(hme.num_experts):
        w = h[:, leaf]
        root = w.sqrt().unsqueeze(1)
        solution = torch.linalg.lstsq(root * xb, root * y).solution   # [d_in + 1, d_out]
        hme.experts.weight[leaf] = solution[:-1].to(hme.experts.weight.dtype)
        hme.experts.bias[leaf] = solution[-1].to(hme.experts.bias.dtype)
        residual = (y - xb @ solution).square().sum(-1)
        var = (w * residual).sum() / (hme.d_out * w.sum()).clamp_min(torch.finfo(x.dtype).tiny)
        hme.log_var[leaf] = torch.log(var.clamp_min(MIN_VARIANCE)).to(hme.log_var.dtype)
    # Gates: the posterior mass of each node's children are the soft targets of its softmax.
    b = hme.branching
    mass = h
    masses = [mass]
    for _ in range(hme.depth):
        mass = mass.reshape(mass.shape[0], -1, b).sum(-1)
        masses.append(mass)
    masses = masses[::-1]                                             # masses[l]: [T, b^l]
    for level in range(hme.depth):
        children = masses[level + 1].reshape(x.shape[0], -1, b)       # [T, b^level, b]
        for j, gate in enumerate(hme.level_gates(level)):
            irls_gate(gate, x, children[:, j], steps=irls_steps)
    return log_likelihood


@dataclass
class EMResult:
    """Log-likelihood before every EM step and the relative error after each (if ``x_eval`` was given)."""

    log_likelihood: list[float] = field(default_factory=list)
    relative_error: list[float] = field(default_factory=list)


def relative_error(prediction: Tensor, target: Tensor) -> float:
    """``Σ‖y − ŷ‖² / Σ‖y − ȳ‖²``: mean squared error divided by the target's variance (1 = predicting the
    mean, 0 = perfect) — the measure of Jordan & Jacobs (1994), Table 1."""
    return float((target - prediction).square().sum() / (target - target.mean(0)).square().sum())


@torch.no_grad()
def fit_em(hme: HME, x: Tensor, y: Tensor, *, epochs: int = 50, irls_steps: int = 1,
           x_eval: Tensor | None = None, y_eval: Tensor | None = None, tol: float = 0.0) -> EMResult:
    """Run up to ``epochs`` EM steps (one pass over the data each). Stops early when the log-likelihood
    improves by less than ``tol`` per case. Records the relative error on ``(x_eval, y_eval)``."""
    epochs = check_int("epochs", epochs, minimum=0)
    tol = check_nonnegative_float("tol", tol)
    result = EMResult()
    for _ in range(epochs):
        ll = em_step(hme, x, y, irls_steps=irls_steps)
        if x_eval is not None:
            result.relative_error.append(relative_error(hme(x_eval), y_eval))
        if result.log_likelihood and (ll - result.log_likelihood[-1]) < tol * x.shape[0]:
            result.log_likelihood.append(ll)
            break
        result.log_likelihood.append(ll)
    return result


def fit_gradient(model: torch.nn.Module, x: Tensor, y: Tensor, *, epochs: int = 1000, lr: float = 1e-2,
                 loss: str = "nll", x_eval: Tensor | None = None, y_eval: Tensor | None = None,
                 eval_every: int = 1) -> list[float]:
    """Full-batch Adam, one step per epoch: ``loss="nll"`` minimises an :class:`HME`'s negative
    log-likelihood, ``"mse"`` the squared error of any model. Returns the relative error on
    ``(x_eval, y_eval)`` every ``eval_every`` epochs (empty without them)."""
    from .._validate import check_choice, check_positive_float

    epochs = check_int("epochs", epochs, minimum=0)
    lr = check_positive_float("lr", lr)
    loss = check_choice("loss", loss, ("nll", "mse"))
    if loss == "nll" and not isinstance(model, HME):
        raise TypeError(f"loss='nll' needs an HME, got {type(model).__name__}; use loss='mse'")
    eval_every = check_int("eval_every", eval_every, minimum=1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    errors = []
    for epoch in range(1, epochs + 1):
        value = -model.log_likelihood(x, y) / x.shape[0] if loss == "nll" else (model(x) - y).square().mean()
        opt.zero_grad()
        value.backward()
        opt.step()
        if x_eval is not None and epoch % eval_every == 0:
            with torch.no_grad():
                errors.append(relative_error(model(x_eval), y_eval))
    return errors


def epochs_to_converge(errors: list[float], *, every: int = 1, within: float = 0.1) -> int:
    """The first epoch at which ``errors`` (recorded every ``every`` epochs) comes within a fraction
    ``within`` of the best value the run reaches: ``error <= (1 + within) · min(errors)``."""
    if not errors:
        raise ValueError("errors must be a non-empty list of per-epoch errors")
    every = check_int("every", every, minimum=1)
    within = check_nonnegative_float("within", within)
    target = (1 + within) * min(errors)
    return every * (next(i for i, e in enumerate(errors) if e <= target) + 1)


def epochs_to_reach(errors: list[float], target: float, *, every: int = 1) -> int | None:
    """The first epoch at which ``errors`` (recorded every ``every`` epochs, the first at epoch ``every``)
    is ``<= target``, or ``None`` if the run never reaches it — a *censored* run, which must be reported as
    "not reached in N epochs", never as N.

    Unlike :func:`epochs_to_converge` (relative to each run's own best value) the target is one absolute
    level for every run, so runs cut off by their budget while still improving are not counted as converged.
    """
    if not errors:
        raise ValueError("errors must be a non-empty list of per-epoch errors")
    every = check_int("every", every, minimum=1)
    target = check_nonnegative_float("target", target)
    return next((every * (i + 1) for i, e in enumerate(errors) if e <= target), None)


def describe_reached(epochs: list[int | None], budget: int) -> str:
    """A table cell for the epochs several seeds needed to reach a target (``None`` = not reached).

    All reached: ``"9.0 ± 2.5 (n=3)"`` (mean ± 95 % t half-width, :func:`moe_lib.stats.summarize`); none:
    ``"not reached in 600 epochs (0/3)"``; some: the reached values and the count of censored runs, e.g.
    ``"2/3 reached (219, 310); 1 not in 600 epochs"`` — a censored run has no number to average.
    """
    from ..stats import summarize

    if not epochs:
        raise ValueError("epochs must hold one entry (an int or None) per seed")
    budget = check_int("budget", budget, minimum=1)
    reached = [e for e in epochs if e is not None]
    if len(reached) == len(epochs):
        return summarize(reached).format(decimals=1) if len(reached) > 1 else f"{reached[0]} (n=1)"
    if not reached:
        return f"not reached in {budget} epochs (0/{len(epochs)})"
    listed = ", ".join(str(e) for e in reached)
    return f"{len(reached)}/{len(epochs)} reached ({listed}); {len(epochs) - len(reached)} not in {budget} epochs"


def arm_problem(n_train: int, n_test: int, *, noise: float = 0.1, seed: int = 0,
                device: str | torch.device = "cpu") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Chapter 3's data: :func:`moe_lib.book.data.arm_inverse_dynamics` training (``seed``) and test
    (``seed + 1000``) sets, inputs and targets standardised with the training set's mean and standard
    deviation, in float64 (EM's solves want double precision). Returns ``x, y, x_test, y_test``."""
    from ..book.data import arm_inverse_dynamics

    x, y = arm_inverse_dynamics(n_train, noise=noise, seed=seed)
    x_te, y_te = arm_inverse_dynamics(n_test, noise=noise, seed=seed + 1000)
    x_mean, x_std, y_mean, y_std = x.mean(0), x.std(0), y.mean(0), y.std(0)

    def prep(t, mean, std):
        return ((t - mean) / std).to(device=device, dtype=torch.float64)

    return prep(x, x_mean, x_std), prep(y, y_mean, y_std), prep(x_te, x_mean, x_std), prep(y_te, y_mean, y_std)


def least_squares_error(x: Tensor, y: Tensor, x_eval: Tensor, y_eval: Tensor) -> float:
    """Test relative error of one linear model (with a bias) fitted to ``(x, y)`` by least squares."""
    linear = torch.linalg.lstsq(_with_ones(x), y).solution
    return relative_error(_with_ones(x_eval) @ linear, y_eval)


@dataclass
class TrainerCurves:
    """One seed of chapter 3's comparison: test relative error after every epoch of each trainer
    (``curves``: name -> list), the EM run's log-likelihood before every step, the least-squares linear
    model's test relative error, and the trained models (``models``: name -> module)."""

    curves: dict[str, list[float]]
    em_log_likelihood: list[float]
    linear_error: float
    models: dict[str, torch.nn.Module]


#: The trainers :func:`compare_trainers` runs, in order.
TRAINERS = ("HME, EM", "HME, gradient descent", "MLP, gradient descent")


def compare_trainers(x: Tensor, y: Tensor, x_eval: Tensor, y_eval: Tensor, *, depth: int = 4,
                     em_epochs: int = 40, gd_epochs: int = 600, mlp_epochs: int = 600, hidden: int = 50,
                     lr: float = 1e-2, seed: int = 0) -> TrainerCurves:
    """Train the three models chapter 3 compares, each from ``seed``, recording the test relative error
    after *every* epoch: an :class:`HME` of ``depth`` binary levels by EM (:func:`fit_em`), the same tree by
    full-batch Adam on its negative log-likelihood, and a one-hidden-layer tanh MLP of ``hidden`` units by
    full-batch Adam on the squared error (:func:`fit_gradient`). Also fits one linear model by least squares."""
    from ..utils import seed_everything

    linear_error = least_squares_error(x, y, x_eval, y_eval)
    seed_everything(seed)
    em_tree = HME(x.shape[1], y.shape[1], depth).to(device=x.device, dtype=x.dtype)
    em = fit_em(em_tree, x, y, epochs=em_epochs, x_eval=x_eval, y_eval=y_eval)
    seed_everything(seed)
    gd_tree = HME(x.shape[1], y.shape[1], depth).to(device=x.device, dtype=x.dtype)
    gd = fit_gradient(gd_tree, x, y, epochs=gd_epochs, lr=lr, loss="nll", x_eval=x_eval, y_eval=y_eval)
    seed_everything(seed)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.Tanh(),
                              torch.nn.Linear(hidden, y.shape[1])).to(device=x.device, dtype=x.dtype)
    mlp = fit_gradient(net, x, y, epochs=mlp_epochs, lr=lr, loss="mse", x_eval=x_eval, y_eval=y_eval)
    curves = dict(zip(TRAINERS, (em.relative_error, gd, mlp)))
    return TrainerCurves(curves, em.log_likelihood, linear_error, dict(zip(TRAINERS, (em_tree, gd_tree, net))))
