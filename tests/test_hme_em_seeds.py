"""Chapter 3 over seeds: epochs to a common absolute target (censored runs stay censored), the table cell
that reports them, the standardised arm data, and the three trainers' curves."""
import pytest
import torch

from moe_lib.classic import (TrainerCurves, arm_problem, compare_trainers, describe_reached, epochs_to_converge,
                             epochs_to_reach)
from moe_lib.classic.em import TRAINERS


def test_epochs_to_reach_counts_to_an_absolute_target():
    errors = [0.9, 0.5, 0.2, 0.09, 0.05]
    assert epochs_to_reach(errors, 0.10) == 4
    assert epochs_to_reach(errors, 0.10, every=10) == 40          # recorded every 10 epochs
    assert epochs_to_reach(errors, 0.9) == 1                       # "<=": reaching the level counts
    assert epochs_to_reach(errors, 0.01) is None                   # censored, not len(errors)
    # a run still falling at its budget: its own-best criterion calls it converged, the absolute one not
    falling = [1.0 / (k + 1) for k in range(100)]
    assert epochs_to_converge(falling) == 91
    assert epochs_to_reach(falling, 0.005) is None
    with pytest.raises(ValueError):
        epochs_to_reach([], 0.1)
    with pytest.raises(ValueError):
        epochs_to_reach(errors, -0.1)


def test_describe_reached_never_averages_a_censored_run():
    assert describe_reached([8, 9, 10], 40) == "9.0 ± 2.5 (n=3)"
    assert describe_reached([None, None, None], 600) == "not reached in 600 epochs (0/3)"
    assert describe_reached([219, None, 310], 600) == "2/3 reached (219, 310); 1 not in 600 epochs"
    with pytest.raises(ValueError):
        describe_reached([], 10)


def test_arm_problem_is_standardised_on_the_training_set_and_seeded():
    x, y, x_te, y_te = arm_problem(500, 300, seed=3)
    assert x.dtype == torch.float64 and x.shape == (500, 6) and y.shape == (500, 2) and x_te.shape == (300, 6)
    torch.testing.assert_close(x.mean(0), torch.zeros(6, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(y.std(0), torch.ones(2, dtype=torch.float64), atol=1e-6, rtol=0)
    again = arm_problem(500, 300, seed=3)
    assert all(torch.equal(a, b) for a, b in zip((x, y, x_te, y_te), again))
    assert not torch.equal(x, arm_problem(500, 300, seed=4)[0])


def test_compare_trainers_records_every_epoch_and_em_is_fast():
    torch.manual_seed(0)
    x, y, x_te, y_te = arm_problem(400, 400, seed=0)
    run = compare_trainers(x, y, x_te, y_te, depth=2, em_epochs=8, gd_epochs=12, mlp_epochs=10, hidden=8, seed=0)
    assert isinstance(run, TrainerCurves) and list(run.curves) == list(TRAINERS) == list(run.models)
    assert [len(c) for c in run.curves.values()] == [8, 12, 10]
    assert all(b >= a - 1e-6 * abs(a) for a, b in zip(run.em_log_likelihood, run.em_log_likelihood[1:]))
    assert 0.5 < run.linear_error < 1.2                            # one linear map explains little
    assert min(run.curves["HME, EM"]) < run.linear_error             # EM's tree beats it within 8 steps
    same = compare_trainers(x, y, x_te, y_te, depth=2, em_epochs=8, gd_epochs=12, mlp_epochs=10, hidden=8, seed=0)
    assert same.curves["MLP, gradient descent"] == run.curves["MLP, gradient descent"]  # seeded: a rerun
    for name in TRAINERS:  # EM's solves can differ in the last bits between two calls (MKL LAPACK), no more
        torch.testing.assert_close(torch.tensor(same.curves[name]), torch.tensor(run.curves[name]),
                                   rtol=1e-9, atol=1e-12)
