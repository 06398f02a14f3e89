"""Windows of a token sequence for next-token prediction: random training batches (:func:`random_windows`),
the deterministic evaluation windows from the start (:func:`fixed_windows`) and windows spread over a whole
split (:func:`spread_windows`). Inputs ``[W, L]`` and targets ``[W, L]``, the inputs shifted by one.

Any 1-D token tensor works (the book uses :func:`moe_lib.book.corpus.stdlib_corpus`'s bytes); the language
model's training loop (:func:`moe_lib.models.train_lm`) and evaluation draw their batches here.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._validate import check_int


def random_windows(data: Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A batch of random windows for next-byte prediction: inputs ``[B, L]`` and targets ``[B, L]``
    (the inputs shifted by one). Draws ``B`` start offsets from ``generator``."""
    batch_size = check_int("batch_size", batch_size, minimum=1)
    seq_len = check_int("seq_len", seq_len, minimum=1)
    if data.numel() < seq_len + 1:
        raise ValueError(f"data has {data.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    start = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=generator)
    idx = start[:, None] + torch.arange(seq_len + 1)
    window = data[idx]
    return window[:, :-1], window[:, 1:]


def fixed_windows(data: Tensor, seq_len: int, max_windows: int | None = None) -> tuple[Tensor, Tensor]:
    """Non-overlapping consecutive windows (inputs ``[W, L]``, targets ``[W, L]``) from the start of
    ``data`` — the deterministic evaluation set. ``max_windows`` caps ``W``."""
    seq_len = check_int("seq_len", seq_len, minimum=1)
    count = (data.numel() - 1) // seq_len
    if max_windows is not None:
        count = min(count, check_int("max_windows", max_windows, minimum=1))
    if count < 1:
        raise ValueError(f"data has {data.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    x = data[: count * seq_len].reshape(count, seq_len)
    y = data[1: count * seq_len + 1].reshape(count, seq_len)
    return x, y


def spread_windows(data: Tensor, seq_len: int, count: int | None = None) -> tuple[Tensor, Tensor]:
    """``count`` non-overlapping windows (inputs ``[W, L]``, targets ``[W, L]``) spread evenly over the whole
    of ``data``: the windows of :func:`fixed_windows` (all of them), of which every ``≈ total/count``-th is
    kept, first and last included. Unlike the first ``count`` windows, which for the validation split of
    :func:`~moe_lib.book.corpus.stdlib_corpus` all come from its first file or two, these sample every file.
    ``count=None`` (or a count ≥ the number of windows) keeps them all: the whole split."""
    x, y = fixed_windows(data, seq_len)
    if count is None or check_int("count", count, minimum=1) >= x.shape[0]:
        return x, y
    if count == 1:
        return x[:1], y[:1]
    idx = torch.round(torch.arange(count, dtype=torch.float64) * ((x.shape[0] - 1) / (count - 1))).long()
    return x[idx], y[idx]
