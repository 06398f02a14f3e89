"""The auxiliary losses of moe_lib.losses (Switch load balancing, router z-loss, CV², importance, Shazeer's
smooth load) against cases computed by hand."""
import math

import pytest

import torch

from moe_lib import MoELayer
from moe_lib.losses import (cv_squared, importance_loss, load_balancing_loss, load_loss, router_z_loss,
                            shazeer_load)


def phi(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_switch_loss_hand_cases():
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    experts = torch.tensor([[0], [0]])
    # f = [1, 0], P = [0.55, 0.45] -> 2 * (1 * 0.55) = 1.1
    torch.testing.assert_close(load_balancing_loss(probs, experts), torch.tensor(1.1))
    # balanced: f = [0.5, 0.5] -> 2 * 0.5 * (0.55 + 0.45) = 1
    torch.testing.assert_close(load_balancing_loss(probs, torch.tensor([[0], [1]])), torch.tensor(1.0))
    # three experts: f = [1, 0, 0], P = [0.65, 0.25, 0.1] -> 3 * 0.65
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1]])
    torch.testing.assert_close(load_balancing_loss(probs, torch.tensor([[0], [0]])), torch.tensor(3 * 0.65))
    # k = 2, uniform probabilities, every expert chosen 4 times of 12: 3 * Σ (1/3)(1/3) = 1
    uniform = torch.full((6, 3), 1 / 3)
    balanced = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 1], [1, 2], [2, 0]])
    torch.testing.assert_close(load_balancing_loss(uniform, balanced), torch.tensor(1.0))


def test_switch_loss_ignores_invalid_entries_and_uses_full_softmax_gradient():
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6]], requires_grad=True)
    experts = torch.tensor([[0, 1], [1, 0]])
    valid = torch.tensor([[True, False], [True, False]])
    loss = load_balancing_loss(probs, experts, valid)  # f = [0.5, 0.5]
    torch.testing.assert_close(loss, torch.tensor(1.0))
    loss.backward()
    # d/dP_ij of E * sum_i f_i mean_t P_ti = E * f_j / T = 2 * 0.5 / 2 for every entry
    torch.testing.assert_close(probs.grad, torch.full((2, 2), 0.5))


def test_switch_loss_gives_a_top1_router_a_gradient():
    """The argmax has no gradient, the softmax does: d/dlogits of E·Σ_i f_i·mean_t p_ti with f held fixed."""
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.1, 1.5, 0.3, -0.2], [1.0, 0.9, 0.0, 3.0]], requires_grad=True)
    probs = logits.softmax(-1)
    load_balancing_loss(probs, probs.argmax(-1, keepdim=True)).backward()
    f = torch.tensor([1.0, 1.0, 0.0, 1.0]) / 3  # top-1 experts 0, 1, 3
    p = logits.detach().softmax(-1)
    # d(mean_t p_ti)/d logit_tj = p_ti (δ_ij − p_tj) / T
    expected = 4 * (p * f - p * (p * f).sum(-1, keepdim=True)) / 3
    torch.testing.assert_close(logits.grad, expected)
    assert logits.grad.abs().sum() > 0.1


def test_z_loss_hand_cases():
    torch.testing.assert_close(router_z_loss(torch.zeros(3, 2)), torch.tensor(math.log(2) ** 2))
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    expected = math.log(math.e + math.e**2 + math.e**3) ** 2
    torch.testing.assert_close(router_z_loss(logits), torch.tensor(expected))
    # the mean over tokens: (log 2)² and (log(3 + 1))²
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    torch.testing.assert_close(router_z_loss(logits), torch.tensor(expected))


def test_cv_squared_and_importance_hand_cases():
    torch.testing.assert_close(cv_squared(torch.tensor([1.0, 3.0])), torch.tensor(0.25))
    torch.testing.assert_close(cv_squared(torch.tensor([2.0, 2.0, 2.0])), torch.tensor(0.0))
    # one of E experts takes everything: CV^2 = E - 1
    torch.testing.assert_close(cv_squared(torch.tensor([4.0, 0.0, 0.0, 0.0])), torch.tensor(3.0))
    gates = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # importance [2, 0]
    torch.testing.assert_close(importance_loss(gates), torch.tensor(1.0))
    gates = torch.tensor([[0.75, 0.25], [0.25, 0.75]])  # importance [1, 1]
    torch.testing.assert_close(importance_loss(gates), torch.tensor(0.0))


def test_shazeer_load_hand_case():
    clean = torch.tensor([[1.0, 0.0, 0.0]])
    noisy = torch.tensor([[1.0, 0.2, -0.5]])
    std = torch.tensor([[1.0, 2.0, 0.5]])
    # k = 1: expert 0 is in the top 1 -> must beat the 2nd largest (0.2); others must beat the 1st (1.0)
    expected = torch.tensor([phi(0.8), phi(-1.0 / 2.0), phi(-1.0 / 0.5)])
    torch.testing.assert_close(shazeer_load(clean, noisy, std, 1), expected)
    # k = 2: experts 0, 1 inside -> threshold is the 3rd largest (-0.5); expert 2 must beat the 2nd (0.2)
    expected = torch.tensor([phi(1.5), phi(0.5 / 2.0), phi(-0.2 / 0.5)])
    torch.testing.assert_close(shazeer_load(clean, noisy, std, 2), expected)
    # k = E: every expert is always in: load = T
    torch.testing.assert_close(shazeer_load(clean, noisy, std, 3), torch.tensor([1.0, 1.0, 1.0]))


def test_load_loss_is_cv_squared_of_load_and_has_gradient():
    torch.manual_seed(0)
    clean = torch.randn(16, 4, requires_grad=True)
    std = torch.rand(16, 4) + 0.5
    noisy = clean.detach() + torch.randn(16, 4) * std
    loss = load_loss(clean, noisy, std, 2)
    torch.testing.assert_close(loss, cv_squared(shazeer_load(clean, noisy, std, 2)))
    loss.backward()
    assert clean.grad.abs().sum() > 0


def test_losses_on_empty_batches():
    """No token: every loss is exactly 0 (not the NaN of a mean over nothing), and so is the layer's total."""
    assert float(load_balancing_loss(torch.zeros(0, 3), torch.zeros(0, 1, dtype=torch.long))) == 0.0
    assert float(router_z_loss(torch.zeros(0, 3))) == 0.0
    assert torch.equal(shazeer_load(torch.zeros(0, 3), torch.zeros(0, 3), torch.ones(0, 3), 1), torch.zeros(3))
    assert float(load_loss(torch.zeros(0, 3), torch.zeros(0, 3), torch.ones(0, 3), 1)) == 0.0
    assert float(importance_loss(torch.zeros(0, 3))) == 0.0
    layer = MoELayer(4, 6, 3, 2, router="noisy_topk", aux_loss_coef=0.1, z_loss_coef=0.1, importance_loss_coef=0.1,
                     load_loss_coef=0.1)
    _, info = layer(torch.zeros(0, 4), return_info=True)
    assert set(info.aux_losses) == {"load_balance", "z_loss", "importance", "load"}
    assert all(v.item() == 0.0 for v in info.aux_losses.values()) and info.aux_loss.item() == 0.0


def test_auxiliary_losses_names_every_term_and_weights_the_sum():
    from moe_lib.losses import auxiliary_losses
    from moe_lib.routers import Routing
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    routing = Routing(logits=probs.log() + 1.0, probs=probs, experts=torch.tensor([[0], [0]]),
                      weights=torch.tensor([[1.0], [1.0]]))
    terms, total = auxiliary_losses(routing, aux_loss_coef=0.5, z_loss_coef=2.0, importance_loss_coef=3.0,
                                    load_loss_coef=7.0)
    assert list(terms) == ["load_balance", "z_loss", "importance"]  # "load" only for the noisy router
    torch.testing.assert_close(terms["load_balance"], torch.tensor(1.1))
    torch.testing.assert_close(terms["z_loss"], torch.tensor(1.0))  # logsumexp of log-probs + 1 is 1
    torch.testing.assert_close(terms["importance"], torch.tensor(1.0))  # importance [2, 0]: CV² = 1
    torch.testing.assert_close(total, torch.tensor(0.5 * 1.1 + 2.0 * 1.0 + 3.0 * 1.0))
    _, switch_only = auxiliary_losses(routing, aux_loss_coef=0.01)
    torch.testing.assert_close(switch_only, torch.tensor(0.011))
    noisy = MoELayer(4, 4, 3, 2, router="noisy_topk", expert="linear", load_loss_coef=7.0, aux_loss_coef=0.0)
    with torch.no_grad():
        noisy.router.noise.weight.fill_(0.5)
    r = noisy.router(torch.randn(6, 4))
    terms, total = auxiliary_losses(r, aux_loss_coef=0.0, load_loss_coef=7.0)
    assert list(terms) == ["load_balance", "z_loss", "importance", "load"]
    torch.testing.assert_close(total, 7.0 * load_loss(r.clean_logits, r.logits, r.noise_std, 2))


def test_switch_loss_single_token_all_dropped_and_float64():
    # one token, one assignment: f = [1, 0], P = [0.7, 0.3] -> 2 * 0.7
    probs = torch.tensor([[0.7, 0.3]])
    torch.testing.assert_close(load_balancing_loss(probs, torch.tensor([[0]])), torch.tensor(1.4))
    # every entry marked not valid: no assignment, loss 0 (not 0/0)
    two = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    none = load_balancing_loss(two, torch.tensor([[0], [1]]), torch.tensor([[False], [False]]))
    assert none.item() == 0.0
    # float64 end to end: f = [2/3, 1/3] exactly, P = [0.5, 0.5] -> 2 * 0.5 = 1
    p64 = torch.tensor([[0.2, 0.8], [0.6, 0.4], [0.7, 0.3]], dtype=torch.float64)
    loss = load_balancing_loss(p64, torch.tensor([[0], [0], [1]]))
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, torch.tensor(2 * (2 / 3 * 0.5 + 1 / 3 * 0.5), dtype=torch.float64),
                               rtol=1e-15, atol=0)


def test_z_loss_and_cv_squared_dtypes():
    assert router_z_loss(torch.zeros(0, 3, dtype=torch.float64)).dtype == torch.float32
    assert router_z_loss(torch.zeros(2, 3, dtype=torch.float64)).dtype == torch.float32
    assert cv_squared(torch.tensor([1, 3])).dtype == torch.float32  # integers are averaged as floats
    torch.testing.assert_close(cv_squared(torch.tensor([1, 3])), torch.tensor(0.25))
    assert cv_squared(torch.tensor([1.0, 3.0], dtype=torch.bfloat16)).dtype == torch.float32
    assert cv_squared(torch.tensor([1.0, 3.0], dtype=torch.float64)).dtype == torch.float64
    assert cv_squared(torch.tensor([5.0])).item() == 0.0
    # eps keeps a vanishing mean finite and positive: Var = 2.5e-13, mean² = 2.5e-13, eps = 1e-10
    tiny = cv_squared(torch.tensor([1e-6, 0.0], dtype=torch.float64))
    torch.testing.assert_close(tiny, torch.tensor(2.5e-13 / (2.5e-13 + 1e-10), dtype=torch.float64))


def test_auxiliary_losses_with_terms_other_than_one_and_invalid_entries():
    from moe_lib.losses import auxiliary_losses
    from moe_lib.routers import Routing
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.5, 0.5]])
    routing = Routing(logits=probs.log() + 2.0, probs=probs, experts=torch.tensor([[0], [0], [1]]),
                      weights=torch.ones(3, 1))
    terms, total = auxiliary_losses(routing, aux_loss_coef=0.5, z_loss_coef=2.0, importance_loss_coef=3.0)
    torch.testing.assert_close(terms["z_loss"], torch.tensor(4.0))  # (log Σ p + 2)² = 4
    torch.testing.assert_close(terms["importance"], torch.tensor(1 / 9))  # importance [2, 1]
    torch.testing.assert_close(total, 0.5 * terms["load_balance"] + 2.0 * 4.0 + 3.0 / 9)
    # a routing whose second entry of token 0 is not an assignment: the balance term counts valid ones only
    gshard_like = Routing(logits=probs.log(), probs=probs, experts=torch.tensor([[0, 1], [1, 0], [0, 1]]),
                          weights=torch.tensor([[1.0, 0.0], [0.6, 0.4], [0.5, 0.5]]),
                          valid=torch.tensor([[True, False], [True, True], [True, True]]))
    terms, _ = auxiliary_losses(gshard_like, aux_loss_coef=1.0)
    torch.testing.assert_close(terms["load_balance"],
                               load_balancing_loss(probs, gshard_like.experts, gshard_like.valid))
    assert not torch.allclose(terms["load_balance"], load_balancing_loss(probs, gshard_like.experts))


def test_auxiliary_losses_leaves_out_the_load_term_unless_asked():
    from moe_lib.losses import auxiliary_losses
    noisy = MoELayer(4, 4, 3, 2, router="noisy_topk", expert="linear")
    with torch.no_grad():
        noisy.router.noise.weight.fill_(0.5)
    r = noisy.router(torch.randn(6, 4))
    terms, total = auxiliary_losses(r, aux_loss_coef=0.0)  # load_loss_coef defaults to 0
    assert terms["load"] > 0 and total.item() == 0.0


def test_only_the_configured_terms_are_computed_in_the_forward_pass():
    """Issue 16, item 3: a term with coefficient 0 costs nothing unless read; reading it gives the value a
    layer configured with it computes, and the sum is the configured terms only."""
    torch.manual_seed(0)
    x = torch.randn(12, 4)
    lazy = MoELayer(4, 6, 3, 2, router="noisy_topk", aux_loss_coef=0.0, z_loss_coef=0.5).eval()
    _, info = lazy(x, return_info=True)
    assert info.aux_losses.computed() == ("z_loss",)
    assert set(info.aux_losses) == {"load_balance", "z_loss", "importance", "load"}  # all readable
    assert info.aux_loss.item() == (0.5 * info.aux_losses["z_loss"]).item()
    full = MoELayer(4, 6, 3, 2, router="noisy_topk", aux_loss_coef=0.1, importance_loss_coef=0.1,
                    load_loss_coef=0.1).eval()
    full.load_state_dict(lazy.state_dict())
    _, every = full(x, return_info=True)
    assert every.aux_losses.computed() == ("load_balance", "importance", "load")
    for name in ("load_balance", "importance", "load"):  # read on demand: the same value
        assert torch.equal(info.aux_losses[name], every.aux_losses[name]), name
    assert info.aux_losses.computed() == ("load_balance", "z_loss", "importance", "load")
    with pytest.raises(KeyError):
        MoELayer(4, 6, 3, 2)(x, return_info=True)[1].aux_losses["load"]  # no noise: no load term
    none = MoELayer(4, 6, 3, 2, aux_loss_coef=0.0)
    _, nothing = none(x, return_info=True)
    assert nothing.aux_losses.computed() == () and nothing.aux_loss.item() == 0.0
    assert not nothing.aux_loss.requires_grad
