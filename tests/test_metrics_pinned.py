"""Routing metrics on hand-made inputs whose values are counted by hand: :func:`moe_lib.metrics.purity`
(share of tokens served by their label's most frequent expert; ``nan`` when there are no tokens) and
:func:`moe_lib.metrics.expert_load` (assignments per expert, every expert listed).
"""
from __future__ import annotations

import math

import pytest
import torch

from moe_lib import metrics


def test_purity_is_the_share_of_each_labels_top_expert():
    # label 0: 3 of 4 tokens on expert 0; label 1: all 4 on expert 1 -> (3 + 4) / 8
    assert metrics.purity(torch.tensor([[3, 1], [0, 4]])) == 0.875
    assert metrics.purity(torch.tensor([[1, 1, 1], [2, 2, 2]])) == pytest.approx(3 / 9, rel=1e-6)


def test_purity_of_a_single_token_is_one():
    assert metrics.purity(torch.tensor([[0, 1]])) == 1.0
    assert metrics.purity(torch.tensor([[0, 1], [0, 0]])) == 1.0


def test_purity_without_tokens_is_nan():
    value = metrics.purity(torch.zeros(2, 3, dtype=torch.long))
    assert isinstance(value, float) and math.isnan(value)


def test_expert_load_counts_every_expert():
    load = metrics.expert_load(torch.tensor([[0, 2], [2, 3]]), 5)
    assert load.tolist() == [1, 0, 2, 1, 0]
    assert load.dtype == torch.int64
    assert metrics.expert_load(torch.tensor([[1], [1], [1]]), 3).tolist() == [0, 3, 0]
    assert metrics.expert_load(torch.zeros(0, 2, dtype=torch.long), 4).tolist() == [0, 0, 0, 0]
