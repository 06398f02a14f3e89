"""Tests for the repeated-runs helpers of moe_lib.practice (chapters 15 and 16): recipes run from one seed,
per-seed values, the matched-FLOPs upcycling comparison and the domain subset of a task."""
import pytest
import torch

from moe_lib import seed_everything
from moe_lib.models import LMConfig, TransformerLM, evaluate_lm, train_lm
from moe_lib.practice import (domain_subset, finetune_recipes, merge_finetunes, merge_task_experts, per_seed_values,
                              upcycling_comparison)
from moe_lib.book.tasks import TaskData, TaskModel, multi_domain_task


def tiny_cfg(**kw):
    base = dict(seq_len=16, d_model=32, n_layers=2, n_heads=4, d_ff=48, ffn="dense")
    base.update(kw)
    return LMConfig(**base)


def _data(n=4000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), generator=g)


@pytest.fixture(scope="module")
def pretrained():
    out = {}
    for name, cfg in {"dense": tiny_cfg(), "moe": tiny_cfg(ffn="moe", num_experts=4, top_k=2, d_ff=24)}.items():
        seed_everything(0)
        model = TransformerLM(cfg)
        train_lm(model, _data(), steps=2, batch_size=4, progress=False)
        evaluate_lm(model, _data(600, 1))  # leaves no autograd graph in the MoE layers' last_info
        out[name] = model
    return out


RECIPES = {"dense, all": ("dense", {}), "moe, all": ("moe", {}), "moe, only experts": ("moe", {"train": ("experts",)}),
           "moe, lr": ("moe", {"lr": 3e-3})}


def test_recipes_run_in_order_and_do_not_depend_on_each_other(pretrained):
    train, val = _data(), _data(600, 1)
    probe = train[:64].reshape(4, 16)
    a = finetune_recipes(pretrained, RECIPES, train, val, seed=3, steps=3, batch_size=4, probe=probe)
    assert list(a) == list(RECIPES)
    reverse = dict(reversed(list(RECIPES.items())))
    b = finetune_recipes(pretrained, reverse, train, val, seed=3, steps=3, batch_size=4, probe=probe)
    for name in RECIPES:
        assert a[name]["val_loss"] == b[name]["val_loss"]  # each recipe re-seeds: order does not matter
    assert a["moe, only experts"]["trainable"] < a["moe, all"]["trainable"]
    assert a["moe, lr"]["val_loss"] != a["moe, all"]["val_loss"]  # the recipe's own kwargs win over common ones
    c = finetune_recipes(pretrained, {"moe, all": RECIPES["moe, all"]}, train, val, seed=4, steps=3, batch_size=4)
    assert c["moe, all"]["val_loss"] != a["moe, all"]["val_loss"]  # another seed, other batches


def test_recipes_reject_unknown_model_and_empty_recipes(pretrained):
    with pytest.raises(KeyError, match="names model"):
        finetune_recipes(pretrained, {"x": ("nope", {})}, _data(), _data(600, 1), steps=1, batch_size=2)
    with pytest.raises(ValueError, match="non-empty"):
        finetune_recipes(pretrained, {}, _data(), _data(600, 1))


def test_per_seed_values_keeps_seed_order_and_checks_recipes():
    runs = [{"a": {"val_loss": 1.0}, "b": {"val_loss": 2.0}}, {"a": {"val_loss": 1.5}, "b": {"val_loss": 2.5}}]
    assert per_seed_values(runs, "val_loss") == {"a": [1.0, 1.5], "b": [2.0, 2.5]}
    with pytest.raises(ValueError, match="entry 1"):
        per_seed_values([runs[0], {"a": {"val_loss": 1.0}}], "val_loss")
    with pytest.raises(ValueError):
        per_seed_values([], "val_loss")


def test_upcycling_comparison_matches_flops_of_the_three_runs():
    train, val = _data(), _data(600, 1)
    runs = upcycling_comparison(train, val, tiny_cfg(), dense_steps=4, extra_steps=3, num_experts=4, top_k=2,
                                batch_size=4, seed=0, eval_every=2)
    f = runs["flops per token"]
    assert f["moe"] > f["dense"]
    step = {k: 3 * v * 4 * 16 for k, v in f.items()}
    upcycled, continued, scratch = (runs[k].flops[-1] for k in ("upcycled", "dense continued", "from scratch"))
    assert upcycled == pytest.approx(4 * step["dense"] + 3 * step["moe"])
    assert abs(continued - upcycled) <= step["dense"] / 2  # matched to the nearest dense step
    assert abs(scratch - upcycled) <= step["moe"] / 2  # matched to the nearest MoE step
    assert runs["dense continued"].steps == round(3 * f["moe"] / f["dense"])
    assert runs["upcycled"].model.cfg.ffn == "moe" and runs["dense continued"].model.cfg.ffn == "dense"
    for k in ("dense", "dense continued", "upcycled", "from scratch"):
        assert len(runs[k].flops) == len(runs[k].losses)
    # the upcycled run starts where the dense pre-training ended (same function at step 0)
    assert runs["upcycled"].losses[0] == pytest.approx(runs["dense"].losses[-1], abs=1e-4)
    again = upcycling_comparison(train, val, tiny_cfg(), dense_steps=4, extra_steps=3, num_experts=4, top_k=2,
                                 batch_size=4, seed=0, eval_every=2)
    assert list(again["upcycled"].losses) == list(runs["upcycled"].losses)  # deterministic for a seed


def test_domain_subset_selects_domains_in_order():
    data = multi_domain_task(400, num_domains=8, seed=0)
    part = domain_subset(data, [2, 5])
    assert isinstance(part, TaskData) and len(part) == int(((data.domain == 2) | (data.domain == 5)).sum())
    assert set(part.domain.tolist()) == {2, 5}
    keep = torch.isin(data.domain, torch.tensor([2, 5]))
    assert torch.equal(part.x, data.x[keep]) and torch.equal(part.y, data.y[keep])
    with pytest.raises(ValueError):
        domain_subset(data, [])
    with pytest.raises(TypeError):
        domain_subset(data.x, [1])


def test_merge_finetunes_returns_base_sources_and_two_merges():
    seed_everything(0)
    base = TransformerLM(tiny_cfg())
    domains = {"a": (_data(2000, 2), _data(300, 3)), "b": (_data(2000, 4), _data(300, 5))}
    out = merge_finetunes(base, domains, steps=2, batch_size=4, seed=1, gate_windows=4)
    assert list(out) == ["base", "a fine-tune", "b fine-tune", "merged (base non-FFN)", "merged (mean non-FFN)"]
    assert out["base"] is base
    for k in ("merged (base non-FFN)", "merged (mean non-FFN)"):
        assert out[k].cfg.ffn == "moe" and out[k].cfg.num_experts == 2
    again = merge_finetunes(base, domains, steps=2, batch_size=4, seed=1, gate_windows=4)
    idx = _data(64, 9).reshape(4, 16)
    with torch.no_grad():
        assert torch.equal(out["merged (mean non-FFN)"].eval()(idx), again["merged (mean non-FFN)"].eval()(idx))
    with pytest.raises(ValueError):
        merge_finetunes(base, {"a": domains["a"]})


def test_merge_task_experts_sources_share_all_but_the_ffn():
    train = multi_domain_task(600, num_domains=4, seed=0)
    make = lambda: TaskModel(16, 4, d_model=16, d_ff=16, num_experts=1, router="dense", expert="mlp")  # noqa: E731
    out = merge_task_experts(train, [[0, 1], [2, 3]], make, steps=3, seed=0)
    assert len(out["sources"]) == 2 and out["merged"].moe.num_experts == 2
    base_state = out["base"].state_dict()
    assert any(".experts." in k for k in base_state)
    for src in out["sources"]:
        for k, v in src.state_dict().items():  # each source fine-tuned its FFN and nothing else
            assert torch.equal(v, base_state[k]) == (".experts." not in k), k
