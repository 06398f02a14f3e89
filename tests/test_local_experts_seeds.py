"""The chapter 1-2 helpers of issue 13: the 1991 mixture's "top expert alone" accuracy (chapter 2), and where a
mixture's error sits on the regime problem of chapter 1 (``moe_lib.classic.regimes``)."""
import math

import pytest
import torch
from torch import nn

from moe_lib import seed_everything
from moe_lib.classic import accuracy, local_experts, mlp, sparse_copy, top_expert_error
from moe_lib.classic.mixture import top_expert_accuracy
from moe_lib.classic.regimes import error_near_edges, gate_sparsity, regime_diagnosis
from moe_lib.book.data import PIECES, piecewise_regression, piecewise_region, piecewise_target

EDGES = [left for left, _, _ in PIECES[1:]]


def exact_mixture(sharpness: float = 200.0):
    """A 1-D mixture with one expert per regime of :data:`PIECES` and a gate that switches at the edges."""
    layer = local_experts(1, 1, 4)
    centres = torch.tensor([-1.5, -0.5, 0.5, 1.5])  # regime r wins where x is nearest its centre
    with torch.no_grad():
        layer.experts.weight.copy_(torch.tensor([p[1] for p in PIECES]).view(4, 1, 1))
        layer.experts.bias.copy_(torch.tensor([p[2] for p in PIECES]).view(4, 1))
        layer.router.gate.weight.copy_((sharpness * centres).view(4, 1))
        layer.router.gate.bias.copy_(-0.5 * sharpness * centres**2)
    return layer.eval()


def test_mlp_tanh_is_the_chapter_1_dense_network():
    seed_everything(3)
    ours = mlp(1, 5, 1, activation="tanh")
    seed_everything(3)
    ref = nn.Sequential(nn.Linear(1, 5), nn.Tanh(), nn.Linear(5, 1))
    assert isinstance(ours[1], nn.Tanh)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values()))
    assert isinstance(mlp(2, 3, 4)[1], nn.Sigmoid)  # the 1991 default is unchanged
    with pytest.raises(ValueError):
        mlp(1, 5, 1, activation="relu")


def test_top_expert_accuracy_equals_a_top1_copy():
    seed_everything(0)
    layer = local_experts(2, 4, 8)
    x, labels = torch.randn(300, 2), torch.randint(0, 4, (300,))
    acc, weight = top_expert_accuracy(layer, x, labels)
    assert acc == pytest.approx(accuracy(sparse_copy(layer, 1), x, labels))
    assert 1 / 8 <= weight <= 1
    with pytest.raises(TypeError):
        top_expert_accuracy(nn.Linear(2, 4), x, labels)


def test_error_near_edges_splits_the_mse():
    seed_everything(1)
    model = mlp(1, 5, 1, activation="tanh")
    x, y = piecewise_regression(500, seed=2)
    near, far = error_near_edges(model, x, y, EDGES, width=0.1)
    with torch.no_grad():
        total = float((model(x) - y).square().mean())
    assert near + far == pytest.approx(total, rel=1e-5)
    assert near > 0 and far > 0
    # the noise-free target itself has no error, near the edges or away from them
    x_far = torch.tensor([[-1.5], [0.5], [1.7]])
    assert error_near_edges(lambda t: piecewise_target(t), x_far, piecewise_target(x_far), EDGES) == (0.0, 0.0)
    with pytest.raises(ValueError):
        error_near_edges(model, torch.zeros(3, 2), torch.zeros(3, 1), EDGES)


def test_regime_diagnosis_of_an_exact_mixture():
    layer = exact_mixture()
    x = torch.linspace(-1.99, 1.99, 2001).unsqueeze(1)
    y = piecewise_target(x)
    d = regime_diagnosis(layer, x, y, piecewise_region(x[:, 0]), EDGES)
    assert d["experts that win"] == 4
    assert d["purity"] == pytest.approx(1.0)
    assert d["top-1 expert alone, MSE"] < 1e-6  # each expert is exact on its own regime
    assert d["mean top gate weight"] > 0.95
    # the blend's only error is where the soft gate switches, next to the jumps
    assert 0 < d["test MSE"] < 0.02
    assert d["MSE within 0.05 of a jump"] == pytest.approx(d["test MSE"], rel=1e-3)
    top1, _ = top_expert_error(layer, x, y)
    assert d["top-1 expert alone, MSE"] == pytest.approx(top1)


def test_gate_sparsity_ratio_is_constant_but_entropy_is_not():
    seed_everything(0)
    soft = local_experts(1, 1, 4)
    x = torch.randn(200, 1)
    s_soft, s_top1 = gate_sparsity(soft, x), gate_sparsity(sparse_copy(soft, 1).eval(), x)
    assert s_soft["article's sparsity ratio"] == pytest.approx(0.75)
    assert s_top1["article's sparsity ratio"] == pytest.approx(0.75)
    assert s_soft["experts run per prediction"] == pytest.approx(4)
    assert s_top1["experts run per prediction"] == pytest.approx(1)
    assert s_top1["gate entropy (nats)"] == pytest.approx(0.0, abs=1e-6)
    assert 1 < s_soft["effective experts"] <= 4
    assert math.isclose(s_soft["effective experts"], math.exp(s_soft["gate entropy (nats)"]), rel_tol=0.2)
