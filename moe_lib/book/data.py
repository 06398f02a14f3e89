"""Data sets. Generated ones are reproducible from a seed; the one real data set (Peterson & Barney
1952 vowels, chapter 2) is read offline from an optional dependency, never downloaded."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._validate import check_int, check_nonnegative_float

#: Regimes of :func:`piecewise_regression`: ``(left edge, slope, intercept)`` of each linear piece on
#: ``[-2, 2]``. Neighbouring pieces jump, so one smooth function fits them badly and one linear expert per
#: piece fits them exactly.
PIECES: tuple[tuple[float, float, float], ...] = (
    (-2.0, 1.5, 3.5),   # x in [-2, -1): rising towards 2
    (-1.0, -2.0, -1.5),  # x in [-1, 0): falling from 0.5 to -1.5
    (0.0, 2.5, -0.5),   # x in [0, 1): rising from -0.5 to 2
    (1.0, -1.0, 0.0),   # x in [1, 2]: falling from -1 to -2
)


def piecewise_target(x: Tensor) -> Tensor:
    """The noise-free target of :func:`piecewise_regression` at ``x`` (any shape)."""
    y = torch.zeros_like(x)
    for left, slope, intercept in PIECES:
        y = torch.where(x >= left, slope * x + intercept, y)
    return y


def piecewise_region(x: Tensor) -> Tensor:
    """Index (0–3) of the piece each ``x`` falls in."""
    edges = torch.tensor([p[0] for p in PIECES[1:]], dtype=x.dtype)
    return torch.bucketize(x, edges, right=True)


def piecewise_regression(n: int, *, noise: float = 0.1, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` points ``x ~ U(-2, 2)``, ``y = piece(x) + N(0, noise²)``; returns ``x, y`` of shape ``[n, 1]``.

    Four linear regimes with jumps between them (:data:`PIECES`): the toy problem on which experts
    visibly take regions (chapter 1).
    """
    n = check_int("n", n, minimum=1)
    noise = check_nonnegative_float("noise", noise)
    g = torch.Generator().manual_seed(check_int("seed", seed))
    x = torch.rand(n, 1, generator=g) * 4 - 2
    y = piecewise_target(x) + noise * torch.randn(n, 1, generator=g)
    return x, y


# ------------------------------------------------------------------------------------------------
# Peterson & Barney (1952) vowels — real data, shipped inside Praat (optional dependency)

#: The four vowels of Jacobs et al. (1991): (Peterson–Barney code, IPA symbol, key word).
VOWELS_1991: tuple[tuple[str, str, str], ...] = (
    ("iy", "i", "heed"),
    ("ih", "ɪ", "hid"),
    ("aa", "a", "hod"),
    ("ah", "ʌ", "hud"),
)


def peterson_barney_table():
    """The full Peterson & Barney (1952) formant table as a pandas ``DataFrame``.

    One row per utterance: ``Type`` (``m`` man, ``w`` woman, ``c`` child), ``Sex``, ``Speaker`` (1–76),
    ``Vowel`` (Peterson–Barney code), ``IPA`` (Praat's notation), ``F0``–``F3`` in Hz. The table ships
    inside Praat; we read it through its Python bindings, ``praat-parselmouth`` (GPL-3.0), which is an
    optional dependency: ``pip install moe-lib[vowels]``.

    Raises:
        ImportError: ``praat-parselmouth`` is not installed.
    """
    try:
        from parselmouth.praat import call
    except ImportError as err:  # exercised by tests/test_vowels.py
        raise ImportError(
            "the Peterson & Barney vowel table ships inside Praat's Python bindings, which are an "
            "optional dependency of moe_lib: install them with `pip install moe-lib[vowels]` "
            "(or `pip install praat-parselmouth`)"
        ) from err
    import pandas as pd

    table = call("Create formant table (Peterson & Barney 1952)")
    columns = [call(table, "Get column label", j) for j in range(1, call(table, "Get number of columns") + 1)]
    rows = [[call(table, "Get value", i, c) for c in columns] for i in range(1, call(table, "Get number of rows") + 1)]
    df = pd.DataFrame(rows, columns=columns)
    for c in ("Speaker", "F0", "F1", "F2", "F3"):
        df[c] = df[c].astype(int)
    for c in ("Type", "Sex", "Vowel", "IPA"):
        df[c] = df[c].astype(str)
    return df


@dataclass
class VowelSplit:
    """One side (train or test) of the 1991 vowel task.

    Attributes:
        x: ``[n, 2]`` float32 formants ``(F1, F2)`` in Hz (raw; standardise with the train statistics).
        labels: ``[n]`` int64 class ids, indices into :data:`VOWELS_1991`.
        speakers: ``[n]`` int64 speaker numbers of Peterson & Barney.
    """

    x: Tensor
    labels: Tensor
    speakers: Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]


def peterson_barney_vowels(
    train_speakers: tuple[int, int] = (1, 50), test_speakers: tuple[int, int] = (51, 75)
) -> tuple[VowelSplit, VowelSplit]:
    """The vowel task of Jacobs et al. (1991): ``(F1, F2)`` of [i], [ɪ], [a], [ʌ] from Peterson & Barney.

    Speakers ``train_speakers`` (inclusive range, default 1–50) train and ``test_speakers`` (default
    51–75) test, as in the paper; Peterson & Barney's speaker 76 is unused by default. Every speaker said
    each vowel twice, so the defaults give 4 × 50 × 2 = 400 training and 4 × 25 × 2 = 200 test cases.

    Raises:
        ImportError: ``praat-parselmouth`` is missing (``pip install moe-lib[vowels]``).
        ValueError: a speaker range is not a pair ``(first, last)`` of speaker numbers with first <= last.
    """
    for name, rng in (("train_speakers", train_speakers), ("test_speakers", test_speakers)):
        if not (isinstance(rng, tuple) and len(rng) == 2):
            raise ValueError(f"{name} must be a pair (first, last) of speaker numbers, got {rng!r}")
        check_int(f"{name}[0]", rng[0], minimum=1)
        check_int(f"{name}[1]", rng[1], minimum=rng[0])
    df = peterson_barney_table()
    codes = [v[0] for v in VOWELS_1991]
    df = df[df["Vowel"].isin(codes)]

    def side(rng):
        part = df[(df["Speaker"] >= rng[0]) & (df["Speaker"] <= rng[1])]
        x = torch.tensor(part[["F1", "F2"]].to_numpy(dtype="float32"))
        labels = torch.tensor([codes.index(v) for v in part["Vowel"]], dtype=torch.long)
        speakers = torch.tensor(part["Speaker"].to_numpy(dtype="int64"))
        return VowelSplit(x, labels, speakers)

    return side(train_speakers), side(test_speakers)


# ------------------------------------------------------------------------------------------------
# A simulated robot arm (chapter 3): the inverse dynamics of a two-joint planar arm

#: Physical constants of :func:`arm_inverse_dynamics`: link masses (kg), lengths (m), distance of each
#: centre of mass from its joint (m), moments of inertia about the centre of mass (kg m²), gravity.
ARM = dict(m1=1.0, m2=1.0, l1=1.0, l2=1.0, lc1=0.5, lc2=0.5, i1=1.0 / 12, i2=1.0 / 12, g=9.81)


def arm_torques(q: Tensor, dq: Tensor, ddq: Tensor) -> Tensor:
    """Joint torques ``τ = M(q) q̈ + C(q, q̇) q̇ + G(q)`` of a two-link planar arm in a vertical plane
    (the textbook rigid-body equations, constants in :data:`ARM`). ``q, dq, ddq``: ``[n, 2]``; returns
    ``[n, 2]``."""
    p = ARM
    c2, s2 = torch.cos(q[:, 1]), torch.sin(q[:, 1])
    m11 = p["m1"] * p["lc1"] ** 2 + p["m2"] * (p["l1"] ** 2 + p["lc2"] ** 2 + 2 * p["l1"] * p["lc2"] * c2) + p["i1"] + p["i2"]
    m12 = p["m2"] * (p["lc2"] ** 2 + p["l1"] * p["lc2"] * c2) + p["i2"]
    m22 = p["m2"] * p["lc2"] ** 2 + p["i2"]
    h = -p["m2"] * p["l1"] * p["lc2"] * s2
    g1 = (p["m1"] * p["lc1"] + p["m2"] * p["l1"]) * p["g"] * torch.cos(q[:, 0]) + p["m2"] * p["lc2"] * p["g"] * torch.cos(q.sum(1))
    g2 = p["m2"] * p["lc2"] * p["g"] * torch.cos(q.sum(1))
    tau1 = m11 * ddq[:, 0] + m12 * ddq[:, 1] + h * dq[:, 1] ** 2 + 2 * h * dq[:, 0] * dq[:, 1] + g1
    tau2 = m12 * ddq[:, 0] + m22 * ddq[:, 1] - h * dq[:, 0] ** 2 + g2
    return torch.stack([tau1, tau2], dim=1)


def arm_inverse_dynamics(n: int, *, noise: float = 0.0, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` random states of a two-joint arm and the torques that produce them.

    Inputs ``x = (q1, q2, q̇1, q̇2, q̈1, q̈2)`` with angles uniform in ``[−π, π]``, velocities in
    ``[−1, 1]`` rad/s and accelerations in ``[−2, 2]`` rad/s²; targets ``y = τ + N(0, noise²)``
    (:func:`arm_torques`). A small, documented substitute for the four-joint arm of Jordan & Jacobs (1994):
    the same kind of smooth, strongly nonlinear regression (products of velocities, cosines of angles),
    with 6 inputs and 2 outputs instead of 12 and 4. Returns float32 ``x [n, 6]``, ``y [n, 2]``.
    """
    n = check_int("n", n, minimum=1)
    noise = check_nonnegative_float("noise", noise)
    g = torch.Generator().manual_seed(check_int("seed", seed))
    q = (torch.rand(n, 2, generator=g) * 2 - 1) * torch.pi
    dq = torch.rand(n, 2, generator=g) * 2 - 1
    ddq = (torch.rand(n, 2, generator=g) * 2 - 1) * 2
    y = arm_torques(q, dq, ddq) + noise * torch.randn(n, 2, generator=g)
    return torch.cat([q, dq, ddq], dim=1), y


# ------------------------------------------------------------------------------------------------
# Clustered regimes in 2-D (chapter 4): inputs come in clusters and each cluster has its own function

#: Centres of :func:`clustered_regression`'s input clusters (the corners of a square).
CLUSTER_CENTRES: tuple[tuple[float, float], ...] = ((-1.5, -1.5), (1.5, -1.5), (-1.5, 1.5), (1.5, 1.5))
#: Per-cluster function ``y = a·‖x − μ‖² + (w₁, w₂)·(x − μ) + b``: ``(a, w₁, w₂, b)``. Different curvature,
#: slope and level in every cluster, so one smooth function has to change abruptly between them.
CLUSTER_FUNCTIONS: tuple[tuple[float, float, float, float], ...] = (
    (1.0, 1.0, 0.0, -1.0),
    (-1.0, 0.0, 1.5, 1.0),
    (0.5, -1.5, 1.0, 0.5),
    (-0.5, 1.0, -1.0, -0.5),
)


def clustered_target(x: Tensor) -> Tensor:
    """The noise-free target of :func:`clustered_regression` at ``x [n, 2]``: the function of the nearest
    centre (:data:`CLUSTER_CENTRES`, :data:`CLUSTER_FUNCTIONS`); returns ``[n, 1]``."""
    centres = torch.tensor(CLUSTER_CENTRES, dtype=x.dtype)
    coef = torch.tensor(CLUSTER_FUNCTIONS, dtype=x.dtype)
    region = torch.cdist(x, centres).argmin(dim=1)
    d = x - centres[region]
    a, w, b = coef[region, 0], coef[region, 1:3], coef[region, 3]
    return (a * d.square().sum(1) + (w * d).sum(1) + b).unsqueeze(1)


def clustered_region(x: Tensor) -> Tensor:
    """Index of the nearest centre of :data:`CLUSTER_CENTRES` (the true regime) for each row of ``x [n, 2]``."""
    return torch.cdist(x, torch.tensor(CLUSTER_CENTRES, dtype=x.dtype)).argmin(dim=1)


def clustered_regression(n: int, *, spread: float = 0.6, noise: float = 0.1,
                         seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` points in 2-D drawn around four centres, each centre with its own quadratic function.

    ``x = μ_c + spread · N(0, I)`` with ``c`` uniform over :data:`CLUSTER_CENTRES`; ``y`` is the function
    of the *nearest* centre (:func:`clustered_target`, so ``y`` is a function of ``x``) plus
    ``N(0, noise²)``. The inputs form clusters, so k-means on ``x`` recovers the regimes — the setting the
    two-stage recipe of chapter 4 assumes. Returns float32 ``x [n, 2]``, ``y [n, 1]``.
    """
    n = check_int("n", n, minimum=1)
    spread = check_nonnegative_float("spread", spread)
    noise = check_nonnegative_float("noise", noise)
    g = torch.Generator().manual_seed(check_int("seed", seed))
    centres = torch.tensor(CLUSTER_CENTRES)
    c = torch.randint(0, len(CLUSTER_CENTRES), (n,), generator=g)
    x = centres[c] + spread * torch.randn(n, 2, generator=g)
    return x, clustered_target(x) + noise * torch.randn(n, 1, generator=g)
