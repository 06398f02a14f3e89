"""moe_lib.classic: the 1991 losses against the paper's closed forms, EM never decreasing the likelihood,
and the trainers recovering known answers."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_lib import MoELayer
from moe_lib.classic import (HME, EnsembleMean, competitive_loss, cooperative_loss, em_step, fit_mixture_classifier,
                             fit_em, fit_ensemble, fit_experts_on_subsets, fit_gate, kmeans, local_experts,
                             mixture_output, posterior, relative_error, sparse_copy)
from moe_lib.classic.em import irls_gate
from moe_lib.classic.mixture import gate_and_experts, loss_and_output


def _random_case(seed, T=7, E=3, D=2):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(T, E, generator=g, dtype=torch.float64), -1)
    o = torch.randn(T, E, D, generator=g, dtype=torch.float64) * 2
    d = torch.randn(T, D, generator=g, dtype=torch.float64)
    return p, o, d


@pytest.mark.parametrize("seed", range(5))
def test_cooperative_gradient_is_eq4(seed):
    p, o, d = _random_case(seed)
    o.requires_grad_(True)
    cooperative_loss(p, o, d, reduction="sum").backward()
    blend = (p.unsqueeze(-1) * o).sum(1)
    expected = -2 * p.unsqueeze(-1) * (d - blend).unsqueeze(1)       # ∂E/∂o_i = −2 p_i (d − o)
    torch.testing.assert_close(o.grad, expected.detach())


@pytest.mark.parametrize("seed", range(5))
def test_competitive_gradient_is_eq5(seed):
    p, o, d = _random_case(seed)
    o.requires_grad_(True)
    competitive_loss(p, o, d, reduction="sum").backward()
    lik = p * torch.exp(-0.5 * (d.unsqueeze(1) - o).square().sum(-1))
    h = lik / lik.sum(-1, keepdim=True)                               # the paper's posterior h_i
    expected = -h.unsqueeze(-1) * (d.unsqueeze(1) - o)                # ∂E/∂o_i = −h_i (d − o_i)
    torch.testing.assert_close(o.grad, expected.detach())
    torch.testing.assert_close(posterior(p, o, d), h.detach())


def test_competitive_gate_gradient_is_p_minus_h():
    p, o, d = _random_case(11)
    logits = torch.log(p).clone().requires_grad_(True)
    competitive_loss(torch.softmax(logits, -1), o, d, reduction="sum").backward()
    torch.testing.assert_close(logits.grad, p - posterior(p, o, d))


def test_losses_values_and_reductions():
    p, o, d = _random_case(3)
    per_case = -torch.log((p * torch.exp(-0.5 * (d.unsqueeze(1) - o).square().sum(-1))).sum(-1))
    torch.testing.assert_close(competitive_loss(p, o, d, reduction="none"), per_case)
    torch.testing.assert_close(competitive_loss(p, o, d), per_case.mean())
    torch.testing.assert_close(cooperative_loss(p, o, d, reduction="sum"),
                               (d - mixture_output(p, o)).square().sum())
    # far-off outputs: the log-sum-exp keeps the loss finite
    assert torch.isfinite(competitive_loss(p, o * 1e3, d))


def test_loss_argument_errors():
    p, o, d = _random_case(0)
    with pytest.raises(ValueError, match="reduction"):
        competitive_loss(p, o, d, reduction="avg")
    with pytest.raises(ValueError, match="gate_probs"):
        cooperative_loss(p[:, :2], o, d)
    with pytest.raises(ValueError, match="target"):
        competitive_loss(p, o, d[:, :1])
    with pytest.raises(TypeError, match="expert_out"):
        competitive_loss(p, o.tolist(), d)


def test_1991_mixture_is_a_moe_layer_and_its_blend_is_the_forward():
    layer = local_experts(2, 4, 8)
    assert isinstance(layer, MoELayer) and layer.router.name == "dense" and layer.experts.kind == "linear"
    assert layer.router.gate.bias is not None and layer.d_out == 4
    x = torch.randn(10, 2)
    p, o = gate_and_experts(layer, x)
    torch.testing.assert_close(mixture_output(p, o), layer(x))
    _, out = loss_and_output(layer, x, torch.zeros(10, 4), "competitive")
    torch.testing.assert_close(out, layer(x))


def test_fit_classifier_arguments():
    layer = local_experts(2, 2, 2)
    x, labels = torch.randn(8, 2), torch.tensor([0, 1] * 4)
    with pytest.raises(ValueError, match="loss"):
        fit_mixture_classifier(layer, x, labels, loss="hinge")
    with pytest.raises(ValueError, match="optimizer"):
        fit_mixture_classifier(layer, x, labels, optimizer="lbfgs")
    with pytest.raises(ValueError, match="criterion"):
        fit_mixture_classifier(layer, x, labels, criterion=1.5)
    with pytest.raises(TypeError, match="router='dense'"):
        fit_mixture_classifier(torch.nn.Linear(2, 2), x, labels, loss="competitive")


@pytest.mark.parametrize("loss", ["competitive", "cooperative"])
def test_mixture_learns_a_problem_only_experts_can_split(loss):
    # Two regions, each linearly separable with a *different* rule: left half: class = (y > 0);
    # right half: class = (y < 0). One linear classifier cannot do better than chance; two experts can.
    torch.manual_seed(0)
    x = torch.rand(400, 2) * 2 - 1
    labels = ((x[:, 1] > 0) ^ (x[:, 0] > 0)).long()
    torch.manual_seed(1)
    layer = local_experts(2, 2, 4)
    result = fit_mixture_classifier(layer, x * 3, labels, loss=loss, epochs=1500, lr=0.1, criterion=0.9)
    assert result.epochs_to_criterion is not None
    assert result.accuracy[-1] > 0.9
    assert result.loss[-1] < result.loss[0]


# ------------------------------------------------------------------------------------------- HME, EM
def _regression(seed, n=60, d=2, D=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.sin(2 * x[:, :D]) + 0.3 * x[:, -D:] ** 2 + 0.1 * torch.randn(n, D, generator=g, dtype=torch.float64)
    return x, y


@settings(max_examples=25)  # expensive: each example fits a tree of up to 27 experts by EM, 4 steps
@given(seed=st.integers(0, 10_000), depth=st.integers(1, 3), branching=st.integers(2, 3),
       d=st.integers(1, 3), D=st.integers(1, 2))
def test_em_step_never_decreases_log_likelihood(seed, depth, branching, d, D):
    x, y = _regression(seed, n=40, d=d, D=D)
    torch.manual_seed(seed)
    hme = HME(d, D, depth, branching).double()
    previous = float(hme.log_likelihood(x, y).detach())
    for _ in range(4):
        before = em_step(hme, x, y)
        assert before == pytest.approx(previous, rel=1e-9, abs=1e-9)
        after = float(hme.log_likelihood(x, y).detach())
        assert after >= before - 1e-7 * (1 + abs(before)), (before, after)
        previous = after


def test_hme_structure_and_path_probs():
    hme = HME(3, 2, depth=3, branching=2)
    assert len(hme.gates) == 7 and hme.num_experts == 8
    x = torch.randn(5, 3)
    g = hme.path_probs(x)
    torch.testing.assert_close(g.sum(-1), torch.ones(5))
    # leaf 5 = path right (1), left (0), right (1)
    probs = hme.gate_probs(x)
    torch.testing.assert_close(g[:, 5], probs[0][:, 0, 1] * probs[1][:, 1, 0] * probs[2][:, 2, 1])
    torch.testing.assert_close(hme(x), (g.unsqueeze(-1) * hme.expert_outputs(x)).sum(1))
    with pytest.raises(ValueError, match="depth"):
        HME(3, 2, depth=0)
    with pytest.raises(ValueError, match="branching"):
        HME(3, 2, branching=1)
    with pytest.raises(ValueError, match="d_in=3"):
        hme(torch.randn(5, 4))


def test_one_level_hme_is_the_1991_mixture():
    torch.manual_seed(0)
    hme, layer = HME(2, 3, depth=1, branching=4), local_experts(2, 3, 4)
    layer.router.load_state_dict(hme.gates[0].state_dict())
    layer.experts.load_state_dict(hme.experts.state_dict())
    x = torch.randn(6, 2)
    torch.testing.assert_close(hme(x), layer(x))


def test_em_recovers_two_known_linear_regimes():
    # y = 2x + 1 for x < 0 and y = −3x + 1 for x > 0: one gate, two linear experts, exact answer known.
    g = torch.Generator().manual_seed(0)
    x = torch.rand(400, 1, generator=g, dtype=torch.float64) * 4 - 2
    y = torch.where(x < 0, 2 * x + 1, -3 * x + 1) + 0.01 * torch.randn(400, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    hme = HME(1, 1, depth=1, branching=2).double()
    result = fit_em(hme, x, y, epochs=60, x_eval=x, y_eval=y)
    assert all(b >= a - 1e-6 for a, b in zip(result.log_likelihood, result.log_likelihood[1:]))
    assert result.relative_error[-1] < 1e-3
    slopes = sorted(hme.experts.weight[:, 0, 0].detach().tolist())
    assert slopes == pytest.approx([-3, 2], abs=0.02)
    assert hme.log_var.exp().max() < 1e-3


def test_irls_gate_fits_a_logistic_regression():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 2, generator=g, dtype=torch.float64)
    true_logit = 1.5 * x[:, 0] - 2.0 * x[:, 1] + 0.5
    counts = torch.stack([1 - torch.sigmoid(true_logit), torch.sigmoid(true_logit)], 1)
    hme = HME(2, 1, depth=1).double()
    irls_gate(hme.gates[0], x, counts, steps=20)
    w, b = hme.gates[0].gate.weight.detach(), hme.gates[0].gate.bias.detach()
    assert (w[1] - w[0]).tolist() == pytest.approx([1.5, -2.0], abs=1e-4)
    assert float(b[1] - b[0]) == pytest.approx(0.5, abs=1e-4)


def test_relative_error():
    y = torch.tensor([[1.0], [2.0], [3.0]])
    assert relative_error(y, y) == 0
    assert relative_error(torch.full_like(y, 2.0), y) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------ two-stage
def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[-5.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    x = torch.cat([c + 0.1 * torch.randn(50, 2, generator=g) for c in centres])
    found, assign = kmeans(x, 3, seed=1)
    assert sorted(map(tuple, found.round().tolist())) == sorted(map(tuple, centres.tolist()))
    for j in range(3):
        assert assign[j * 50:(j + 1) * 50].unique().numel() == 1
    with pytest.raises(ValueError, match="k"):
        kmeans(x, 0)


def test_two_stage_recovers_a_piecewise_linear_function():
    x = torch.linspace(-2, 2, 200).unsqueeze(1)
    y = torch.where(x < 0, 2 * x, -x + 1)
    torch.manual_seed(0)
    layer = MoELayer(1, 1, 2, router="dense", expert="linear", router_bias=True)
    assign = (x[:, 0] >= 0).long()
    fit_experts_on_subsets(layer.experts, x, y, assign, steps=1500, lr=0.05)
    assert sorted(layer.experts.weight.flatten().tolist()) == pytest.approx([-1, 2], abs=0.01)
    losses = fit_gate(layer, x, y, steps=1500, lr=0.1)
    assert losses[-1] < 0.05 * losses[0]
    sparse = sparse_copy(layer, 1)
    assert sparse.router.name == "topk" and sparse.top_k == 1
    away = (x[:, 0].abs() > 0.3)
    torch.testing.assert_close(sparse(x)[away], y[away], atol=0.02, rtol=0)


def test_ensemble_mean_and_fit_ensemble():
    torch.manual_seed(0)
    layer = MoELayer(1, 4, 3, router="dense", expert="linear")
    x = torch.randn(50, 1)
    y = 3 * x - 1
    fit_ensemble(layer.experts, x, y, steps=800, lr=0.05)
    ens = EnsembleMean(layer.experts)
    torch.testing.assert_close(ens(x), layer.expert_outputs(x).mean(1))
    assert torch.allclose(ens(x), y, atol=1e-2)
    with pytest.raises(ValueError, match="assign"):
        fit_experts_on_subsets(layer.experts, x, y, torch.full((50,), 7))


def test_epochs_to_converge():
    from moe_lib.classic import epochs_to_converge
    assert epochs_to_converge([1.0, 0.5, 0.105, 0.1, 0.1]) == 3
    assert epochs_to_converge([1.0, 0.5, 0.105, 0.1], every=10) == 30
    with pytest.raises(ValueError, match="errors"):
        epochs_to_converge([])


def test_gate_from_centres_routes_to_the_nearest_centre():
    from moe_lib.classic import gate_from_centres
    centres = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    layer = MoELayer(2, 4, 3, router="dense", expert="mlp", router_bias=True, d_out=1)
    gate_from_centres(layer, centres, sharpness=2.0)
    x = torch.randn(200, 2, generator=torch.Generator().manual_seed(0)) * 2
    assert torch.equal(layer.router(x).probs.argmax(1), torch.cdist(x, centres).argmin(1))
    expected = torch.softmax(-2.0 * torch.cdist(x, centres).square(), dim=1)
    torch.testing.assert_close(layer.router(x).probs, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="centres"):
        gate_from_centres(layer, centres[:2])
    with pytest.raises(ValueError, match="bias"):
        gate_from_centres(MoELayer(2, 4, 3, router="dense", expert="mlp", d_out=1), centres)


@pytest.mark.parametrize("loss", ["cooperative", "competitive"])
def test_fit_end_to_end_learns_two_linear_regimes(loss):
    from moe_lib.classic import fit_end_to_end
    x = torch.linspace(-2, 2, 200).unsqueeze(1)
    y = torch.where(x < 0, 2 * x, -x + 1)
    torch.manual_seed(0)
    layer = MoELayer(1, 1, 2, router="dense", expert="linear", router_bias=True)
    losses = fit_end_to_end(layer, x, y, loss=loss, steps=1500, lr=0.1)
    assert len(losses) == 1500 and losses[-1] < losses[0]
    away = x[:, 0].abs() > 0.3
    torch.testing.assert_close(layer(x)[away], y[away], atol=0.1, rtol=0)
    with pytest.raises(TypeError, match="dense"):
        fit_end_to_end(sparse_copy(layer, 1), x, y)
    with pytest.raises(ValueError, match="loss"):
        fit_end_to_end(layer, x, y, loss="nope")


def test_competitive_experts_survive_top1_cooperative_need_not():
    """Competitive training keeps experts local, so the top-1 copy predicts as well as the blend."""
    from moe_lib.classic import fit_end_to_end
    x = torch.linspace(-2, 2, 200).unsqueeze(1)
    y = torch.where(x < 0, 2 * x, -x + 1)
    torch.manual_seed(0)
    layer = MoELayer(1, 1, 2, router="dense", expert="linear", router_bias=True)
    fit_end_to_end(layer, x, y, loss="competitive", steps=1500, lr=0.1)
    away = x[:, 0].abs() > 0.3
    torch.testing.assert_close(sparse_copy(layer, 1)(x)[away], y[away], atol=0.1, rtol=0)


def test_fit_gate_trains_only_the_router():
    torch.manual_seed(0)
    layer = MoELayer(1, 1, 2, router="dense", expert="linear", router_bias=True)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(40, 1)
    losses = fit_gate(layer, x, 3 * x, steps=20, lr=0.1)
    assert len(losses) == 20 and losses[-1] < losses[0]  # the gate really trained
    for k, v in layer.state_dict().items():  # the router moved, the experts did not
        assert torch.equal(v, before[k]) == k.startswith("experts."), k
    with pytest.raises(TypeError, match="dense"):
        fit_gate(sparse_copy(layer, 1), x, 3 * x)


def test_clustered_regression():
    from moe_lib.book.data import CLUSTER_CENTRES, clustered_region, clustered_regression, clustered_target
    x, y = clustered_regression(500, seed=3)
    assert x.shape == (500, 2) and y.shape == (500, 1) and x.dtype == torch.float32
    x2, y2 = clustered_regression(500, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x0, y0 = clustered_regression(500, noise=0.0, seed=3)
    torch.testing.assert_close(y0, clustered_target(x0))
    centres = torch.tensor(CLUSTER_CENTRES)
    assert torch.equal(clustered_region(centres), torch.arange(4))
    _, assign = kmeans(x, 4, seed=0)
    region = clustered_region(x)
    purity = sum(int(region[assign == j].bincount().max()) for j in range(4)) / 500
    assert purity > 0.97
    with pytest.raises(ValueError):
        clustered_regression(0)


def test_train_recipes_returns_every_method_trained():
    from moe_lib.classic import top_expert_error, train_recipes
    from moe_lib.book.data import clustered_regression

    x, y = clustered_regression(64, seed=0)
    models = train_recipes(x, y, num_experts=2, d_ff=4, steps=4, lr=0.03, seed=0)
    assert set(models) == {
        "dense MLP, 8 hidden", "dense MLP, 4 hidden", "ensemble of 2", "two-stage", "two-stage, top-1",
        "two-stage, k-means gate", "two-stage, k-means gate, top-1", "end to end, cooperative",
        "end to end, cooperative, top-1", "end to end, competitive", "end to end, competitive, top-1",
    }
    for model in models.values():
        assert model(x).shape == y.shape
    assert models["two-stage, top-1"].top_k == 1
    # every parameter of every recipe moved from where it started (each recipe starts from seed 0)
    initial = []
    for hidden in (8, 4):
        torch.manual_seed(0)
        initial += list(torch.nn.Sequential(torch.nn.Linear(2, hidden), torch.nn.GELU(),
                                            torch.nn.Linear(hidden, 1)).parameters())
    torch.manual_seed(0)
    initial += list(MoELayer(2, 4, 2, router="dense", expert="mlp", router_bias=True, d_out=1).parameters())
    for name, model in models.items():
        params = list(model.parameters())
        assert params, name
        for p in params:
            assert not any(p.shape == q.shape and torch.equal(p.detach(), q.detach()) for q in initial), name
    err, weight = top_expert_error(models["two-stage"], x, y)
    assert err >= 0 and 0.5 <= weight <= 1.0  # 2 experts: the top weight is at least one half
