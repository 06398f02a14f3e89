"""moe_lib.applications: MMoE / OMoE / shared-bottom, the synthetic tasks, anomaly AUC, the vision MoE."""
import math

import pytest
import torch

from moe_lib.applications import (MMoE, OMoE, SharedBottom, VisionMoE, patchify, regime_sensor, roc_auc,
                                  roc_curve, synthetic_tasks)


def test_mmoe_shapes_and_gates():
    torch.manual_seed(0)
    model = MMoE(10, num_experts=4, expert_hidden=8, expert_out=6, tower_hidden=5, num_tasks=3)
    x = torch.randn(7, 10)
    assert model(x).shape == (7, 3)
    g = model.gate_probs(x)
    assert g.shape == (3, 7, 4)
    torch.testing.assert_close(g.sum(-1), torch.ones(3, 7))
    assert not torch.allclose(g[0], g[1])             # one gate per task
    og = OMoE(10, 4, 8, 6, 5, num_tasks=3).gate_probs(x)
    torch.testing.assert_close(og[0], og[2])          # one shared gate
    assert SharedBottom(10, 8, 5, num_tasks=3)(x).shape == (7, 3)


def test_mmoe_task_outputs_are_per_task_mixtures():
    torch.manual_seed(1)
    model = MMoE(5, 3, 4, 2, 3, num_tasks=2)
    x = torch.randn(4, 5)
    mixed = torch.einsum("ne,ned->nd", model.gate_probs(x)[1], model.expert_outputs(x))
    torch.testing.assert_close(model(x)[:, 1:], model.towers[1](mixed))


def test_mmoe_bad_input():
    with pytest.raises(ValueError, match="num_gates"):
        MMoE(5, 3, 4, 2, 3, num_tasks=2, num_gates=3)
    with pytest.raises(ValueError, match="d_in"):
        MMoE(5, 3, 4, 2, 3)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="correlation"):
        synthetic_tasks(10, 1.5)


@pytest.mark.parametrize("p", [1.0, 0.9, 0.5, 0.0])
def test_synthetic_task_weights(p):
    data = synthetic_tasks(10, p, d=20, c=2.0)
    norms = data.w.norm(dim=1)
    torch.testing.assert_close(norms, torch.full((2,), 2.0))
    assert math.isclose(float(data.w[0] @ data.w[1] / norms.prod()), p, abs_tol=1e-5)


def test_label_correlation_falls_with_p():
    corr = [synthetic_tasks(4000, p, seed=0).label_correlation() for p in (1.0, 0.9, 0.5, 0.0)]
    assert corr[0] > 0.95
    assert all(a > b for a, b in zip(corr, corr[1:]))


def test_auc_hand_computed():
    # anomalies score 0.35 and 0.8; normals 0.1 and 0.4: pairs (0.35>0.1), (0.35<0.4), (0.8>both) -> 3/4
    assert roc_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == 0.75
    assert roc_auc(torch.tensor([1.0, 1.0]), torch.tensor([0, 1])) == 0.5                  # ties count 1/2
    assert roc_auc(torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1, 0, 0])) == 0.0
    fpr, tpr = roc_curve(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
    assert fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0] and tpr.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]
    area = float(torch.trapezoid(tpr, fpr))
    assert math.isclose(area, 0.75)
    with pytest.raises(ValueError, match="labels"):
        roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1]))


def test_regime_sensor():
    data = regime_sensor(500, regimes=3, anomaly_rate=0.1, seed=0)
    assert data.u.shape == data.y.shape == (500, 1)
    assert set(data.regime.tolist()) == {0, 1, 2}
    assert 0.03 < data.anomaly.float().mean() < 0.2


def test_vision_shapes():
    images = torch.arange(2 * 64, dtype=torch.float32).reshape(2, 8, 8)
    patches = patchify(images, 2)
    assert patches.shape == (2, 16, 4)
    assert patches[0, 1].tolist() == [2.0, 3.0, 10.0, 11.0]
    torch.manual_seed(0)
    model = VisionMoE(num_experts=4, top_k=2, d_model=16, d_ff=8)
    assert model(images).shape == (2, 10)
    assert model.moe.last_info.routing.experts.shape == (32, 2)
    dense = VisionMoE(num_experts=1, top_k=1, d_model=16, d_ff=16)
    # equal active size: top-2 experts of width 8 do the matmul work of one width-16 dense MLP
    assert model.moe.top_k * model.moe.experts.flops_per_token() == dense.moe.experts.flops_per_token()
    with pytest.raises(ValueError, match="images"):
        model(torch.randn(2, 7, 7))


def test_digits_load():
    pytest.importorskip("sklearn")
    from moe_lib.applications import load_digits_tensors

    xtr, ytr, xte, yte = load_digits_tensors()
    assert xtr.shape[1:] == (8, 8) and len(xtr) + len(xte) == 1797
    assert 0.0 <= float(xtr.min()) and float(xtr.max()) <= 1.0
