"""Metrics against hand-computed cases (the losses are in test_losses.py)."""
import math

import pytest
import torch

from moe_lib import metrics


def test_cv_and_maxvio_hand_computed():
    load = torch.tensor([2.0, 4.0, 6.0, 8.0])  # mean 5, population std sqrt(5)
    assert metrics.coefficient_of_variation(load) == pytest.approx(math.sqrt(5) / 5)
    assert metrics.max_violation(load) == pytest.approx((8 - 5) / 5)
    assert metrics.coefficient_of_variation(torch.ones(7)) == 0.0


def test_entropy_and_effective_experts():
    w = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0]])
    torch.testing.assert_close(metrics.entropy(w), torch.tensor([0.0, math.log(4), math.log(2)], dtype=torch.float64))
    torch.testing.assert_close(metrics.effective_num_experts(w), torch.tensor([1.0, 4.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(metrics.active_fraction(w), torch.tensor([0.25, 1.0, 0.5], dtype=torch.float64))


def test_article_sparsity_ratio_is_constant_for_normalised_gates():
    """(N − Σ|w|)/N = (N−1)/N for every gate whose weights sum to one — a softmax or a top-k."""
    torch.manual_seed(0)
    for n in (2, 4, 16):
        for scale in (0.01, 1.0, 100.0):
            w = torch.softmax(scale * torch.randn(50, n), dim=-1)
            torch.testing.assert_close(
                metrics.article_sparsity_ratio(w), torch.full((50,), (n - 1) / n, dtype=torch.float64)
            )
    # it does move for weights that do not sum to one (e.g. an unnormalised Switch gate)
    assert metrics.article_sparsity_ratio(torch.tensor([[0.5, 0.0]])).item() == pytest.approx(0.75)


def test_specialisation_counts_and_purity():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    top1 = torch.tensor([2, 2, 1, 0, 0, 1])
    counts = metrics.specialisation(top1, labels, num_experts=3, num_labels=3)
    assert counts.tolist() == [[0, 1, 2], [2, 0, 0], [0, 1, 0]]
    assert metrics.purity(counts) == pytest.approx(5 / 6)
    topk = torch.tensor([[2, 0], [2, 1], [1, 2], [0, 1], [0, 2], [1, 0]])
    counts_k = metrics.specialisation(topk, labels, num_experts=3, num_labels=3)
    assert counts_k.sum() == 12
    assert counts_k[0].tolist() == [1, 2, 3]
