"""Anomaly detection with a mixture of experts: experts model the regimes of normal data, and the mixture's
likelihood flags what no regime explains.

:func:`regime_sensor` generates a sensor whose reading ``y`` depends on a control input ``u`` through one of
several linear laws, switched by a hidden operating regime (a Markov chain); faults add offsets that put a
reading off every law. :func:`mixture_scores` fits a flat mixture of linear-Gaussian experts
(:class:`moe_lib.classic.HME` with ``depth=1``, trained by EM — Jordan & Jacobs 1994) and scores each case
by its negative log-likelihood ``−log Σ_i g_i(u) N(y; μ_i(u), σ_i²)``; :func:`single_model_scores` does the
same with one linear-Gaussian model. :func:`roc_curve` and :func:`roc_auc` measure how well a score ranks
anomalies above normal cases.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._validate import check_int, check_nonnegative_float

__all__ = ["SensorData", "regime_sensor", "mixture_scores", "single_model_scores", "roc_curve", "roc_auc",
           "anomaly_aucs"]


@dataclass
class SensorData:
    """``u [T, 1]`` control input, ``y [T, 1]`` reading, hidden ``regime [T]``, ``anomaly [T]`` (bool)."""

    u: Tensor
    y: Tensor
    regime: Tensor
    anomaly: Tensor


def regime_sensor(n: int, *, regimes: int = 3, anomaly_rate: float = 0.05, noise: float = 0.05,
                  fault_size: float = 0.5, stay: float = 0.98, seed: int = 0) -> SensorData:
    """A sensor that switches between ``regimes`` linear laws ``y = a_r u + b_r + ε``.

    The regime follows a Markov chain that stays put with probability ``stay``; ``u`` is a slowly varying
    load in ``[−1, 1]``. A fraction ``anomaly_rate`` of the readings get a fault: an offset of
    ``± fault_size·U(0.5, 1)`` — small enough that a faulty reading stays within the range of normal ones.
    Regime slopes and intercepts are fixed and distinct (the laws cross the same ``u`` range).
    """
    n = check_int("n", n, minimum=2)
    regimes = check_int("regimes", regimes, minimum=1)
    anomaly_rate = check_nonnegative_float("anomaly_rate", anomaly_rate)
    if anomaly_rate > 1:
        raise ValueError(f"anomaly_rate must be in [0, 1], got {anomaly_rate}")
    noise = check_nonnegative_float("noise", noise)
    fault_size = check_nonnegative_float("fault_size", fault_size)
    g = torch.Generator().manual_seed(seed)
    slopes = torch.linspace(-1.0, 1.0, regimes) if regimes > 1 else torch.zeros(1)
    intercepts = torch.linspace(-0.8, 0.8, regimes).flip(0) if regimes > 1 else torch.zeros(1)
    switch = torch.rand(n, generator=g) > stay
    jumps = torch.randint(1, max(regimes, 2), (n,), generator=g)
    regime = torch.empty(n, dtype=torch.long)
    r = 0
    for t in range(n):
        if switch[t] and regimes > 1:
            r = int((r + jumps[t]) % regimes)
        regime[t] = r
    phase = torch.rand(1, generator=g) * 6.28
    t = torch.arange(n, dtype=torch.float32)
    u = (torch.sin(t / 37.0 + phase) * 0.7 + 0.3 * torch.rand(n, generator=g) * 2 - 0.3).clamp(-1, 1)
    y = slopes[regime] * u + intercepts[regime] + noise * torch.randn(n, generator=g)
    anomaly = torch.rand(n, generator=g) < anomaly_rate
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    y = y + anomaly * sign * fault_size * (0.5 + 0.5 * torch.rand(n, generator=g))
    return SensorData(u.unsqueeze(1), y.unsqueeze(1), regime, anomaly)


def mixture_scores(train: SensorData, test: SensorData, *, num_experts: int = 4, epochs: int = 50,
                   seed: int = 0):
    """Fit a mixture of ``num_experts`` linear-Gaussian experts by EM on ``train`` (normal data, or data
    with rare anomalies) and return ``(scores [T_test], model)``: the negative log-likelihood of each test case."""
    from ..classic import HME, fit_em

    num_experts = check_int("num_experts", num_experts, minimum=2)
    torch.manual_seed(seed)
    model = HME(train.u.shape[1], train.y.shape[1], depth=1, branching=num_experts).double()
    fit_em(model, train.u.double(), train.y.double(), epochs=epochs)
    with torch.no_grad():
        scores = -torch.logsumexp(model.joint_log_probs(test.u.double(), test.y.double()), dim=-1)
    return scores.float(), model


def single_model_scores(train: SensorData, test: SensorData) -> Tensor:
    """One linear-Gaussian model ``y ~ N(a u + b, σ²)`` fitted by least squares; the negative log-likelihood
    of each test case (up to a constant), ``½ (y − a u − b)² / σ²``."""
    xb = torch.cat([train.u, torch.ones_like(train.u)], 1).double()
    coef = torch.linalg.lstsq(xb, train.y.double()).solution
    var = (train.y.double() - xb @ coef).square().mean()
    xt = torch.cat([test.u, torch.ones_like(test.u)], 1).double()
    return (0.5 * (test.y.double() - xt @ coef).square().sum(-1) / var).float()


def _check_scores(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    scores, labels = torch.as_tensor(scores).reshape(-1).double(), torch.as_tensor(labels).reshape(-1).bool()
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels must have the same length, got {scores.numel()} and {labels.numel()}")
    if labels.all() or not labels.any():
        raise ValueError("labels must contain both positives (anomalies) and negatives (normal cases)")
    return scores, labels


def roc_curve(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """False- and true-positive rates ``(fpr, tpr)`` as the threshold sweeps from ``+∞`` down, one point per
    distinct score (ties move together), starting at ``(0, 0)`` and ending at ``(1, 1)``. Higher score =
    more anomalous; ``labels`` is true for anomalies."""
    scores, labels = _check_scores(scores, labels)
    order = torch.argsort(scores, descending=True)
    s, lab = scores[order], labels[order].double()
    tp, fp = torch.cumsum(lab, 0), torch.cumsum(1 - lab, 0)
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]                          # keep the last index of each run of tied scores
    tpr = torch.cat([tp.new_zeros(1), tp[last] / lab.sum()])
    fpr = torch.cat([fp.new_zeros(1), fp[last] / (1 - lab).sum()])
    return fpr, tpr


def roc_auc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve = the probability that a random anomaly scores above a random normal case
    (ties count one half) — the Mann–Whitney statistic, computed from average ranks."""
    scores, labels = _check_scores(scores, labels)
    order = torch.argsort(scores)
    s = scores[order]
    ranks = torch.empty_like(scores)
    i, n = 0, s.numel()
    pos = torch.arange(1, n + 1, dtype=torch.float64)
    # average rank over ties
    uniq, inverse, counts = torch.unique(s, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks[order] = avg[inverse]
    del i, pos
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def anomaly_aucs(seed: int, n: int = 3000, *, num_experts: int = 4, epochs: int = 40) -> dict:
    """One anomaly-detection run of chapter 17: train on the recording ``regime_sensor(n, seed=2·seed)``,
    score ``regime_sensor(n, seed=2·seed + 1)``, and return the ROC AUC of the EM mixture
    (:func:`mixture_scores`) and of the single linear model (:func:`single_model_scores`):
    ``{"mixture": auc, "single model": auc}``. Seeds ``s`` and ``s + 1`` use disjoint recordings."""
    seed = check_int("seed", seed, minimum=0)
    train, test = regime_sensor(n, seed=2 * seed), regime_sensor(n, seed=2 * seed + 1)
    mixture, _ = mixture_scores(train, test, num_experts=num_experts, epochs=epochs, seed=seed)
    return {"mixture": roc_auc(mixture, test.anomaly), "single model": roc_auc(single_model_scores(train, test), test.anomaly)}
