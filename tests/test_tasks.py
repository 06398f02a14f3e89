"""The Part II task: deterministic, balanced, learnable; the model wrapper and training loop."""
import pytest
import torch

from moe_lib.book.tasks import TaskModel, domain_expert_counts, evaluate_task, multi_domain_task, train_and_evaluate
from moe_lib.training import fit_classifier


def test_task_is_deterministic_and_shared_between_splits():
    a, b = multi_domain_task(500, seed=3), multi_domain_task(500, seed=3)
    for name in ("x", "y", "domain", "token_ids"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    c = multi_domain_task(500, seed=4)
    assert not torch.equal(a.x, c.x)
    # token ids belong to their domain
    assert torch.equal(a.token_ids // 16, a.domain)
    assert a.x.shape == (500, 16) and a.y.max() < 4


def test_labels_are_a_function_of_domain_and_input():
    """The same input offset gets different labels in different domains (the label maps differ)."""
    data = multi_domain_task(4000, seed=0)
    counts = torch.bincount(data.domain * 4 + data.y, minlength=32).reshape(8, 4)
    assert torch.all(counts > 50), "every class occurs in every domain"


def test_model_shapes_and_token_ids():
    torch.manual_seed(0)
    data = multi_domain_task(64, seed=0)
    model = TaskModel(16, 4, router="hash")
    assert model(data.x, token_ids=data.token_ids).shape == (64, 4)
    assert model(data.x).shape == (64, 4)


def test_mixture_learns_the_task_better_than_chance_and_training_is_deterministic():
    train, test = multi_domain_task(2048, seed=0), multi_domain_task(1024, seed=1)
    runs = [train_and_evaluate(train, test, steps=60, num_experts=4, top_k=2)[2] for _ in range(2)]
    assert runs[0] == runs[1]
    assert runs[0]["accuracy"] > 0.5  # chance is 0.25
    assert set(runs[0]) >= {"accuracy", "loss", "load_cv", "max_violation", "dropped_fraction"}


def test_fit_classifier_balances_an_auxfree_router_without_a_hook():
    torch.manual_seed(0)
    data = multi_domain_task(256, seed=0)
    model = TaskModel(16, 4, num_experts=4, top_k=1, router="auxfree")
    history = fit_classifier(model, data.x, data.y, steps=5, batch_size=64)
    assert len(history.train_loss) == len(history.max_violation) == 5
    assert model.moe.router.expert_bias.abs().sum() > 0  # moved by the training forwards themselves


def test_evaluate_and_specialisation_counts():
    torch.manual_seed(0)
    data = multi_domain_task(300, seed=0)
    model = TaskModel(16, 4, num_experts=4, top_k=2, capacity_factor=0.5)
    metrics = evaluate_task(model, data)
    assert 0 <= metrics["dropped_fraction"] <= 1 and metrics["dropped_fraction"] > 0
    counts = domain_expert_counts(model, data, 8)
    assert counts.shape == (8, 4) and int(counts.sum()) == 300


@pytest.mark.parametrize("kwargs, error", [({"n": -1}, ValueError), ({"n": 10, "noise": 0}, ValueError),
                                           ({"n": 10, "num_classes": 1}, ValueError), ({"n": 1.5}, TypeError)])
def test_bad_task_arguments(kwargs, error):
    with pytest.raises(error):
        multi_domain_task(**kwargs)
