"""Argument checks shared by every public constructor.

Each helper raises ``TypeError`` for a value of the wrong type and ``ValueError`` for a value out of range,
with a message that names the argument and says what is accepted. Nothing is coerced silently.
"""
from __future__ import annotations

import numbers
from typing import Iterable


def check_int(name: str, value, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """Return ``value`` if it is an integer within ``[minimum, maximum]``; raise otherwise.

    ``bool`` is rejected even though it subclasses ``int``: ``num_experts=True`` is a bug, not 1.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} of type {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise ValueError(f"{name} must be an integer {bound}, got {value}")
    if maximum is not None and value > maximum:
        bound = f"<= {maximum}" if minimum is None else f"between {minimum} and {maximum}"
        raise ValueError(f"{name} must be an integer {bound}, got {value}")
    return value


def check_positive_float(name: str, value, *, allow_none: bool = False) -> float | None:
    """Return ``value`` as a float if it is a finite real number > 0 (or ``None`` when allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        accepted = "a positive number or None" if allow_none else "a positive number"
        raise TypeError(f"{name} must be {accepted}, got {value!r} of type {type(value).__name__}")
    value = float(value)
    if not value > 0 or value == float("inf"):
        accepted = "a finite number > 0" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {accepted}, got {value}")
    return value


def check_nonnegative_float(name: str, value) -> float:
    """Return ``value`` as a float if it is a finite real number >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number >= 0, got {value!r} of type {type(value).__name__}")
    value = float(value)
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def check_choice(name: str, value, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices`` (strings); raise naming the accepted values."""
    choices = sorted(choices)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {choices}, got {value!r} of type {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; accepted values: {', '.join(repr(c) for c in choices)}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} of type {type(value).__name__}")
    return value


def check_counts(name: str, counts) -> list[int]:
    """Per-expert row counts (a tensor or any sequence of ints) as a non-empty list of Python ints >= 0."""
    try:
        values = counts.tolist() if hasattr(counts, "tolist") else list(counts)
    except TypeError:
        values = None
    if not isinstance(values, list):
        raise TypeError(f"{name} must be a sequence of per-expert counts (ints >= 0), got {counts!r}")
    out = [check_int(f"{name}[{i}]", v, minimum=0) for i, v in enumerate(values)]
    if not out:
        raise ValueError(f"{name} must hold at least one expert, got an empty sequence")
    return out
