"""Tests of moe_lib.models: the Transformer LM, its parameter/FLOP accounting, training and exact resume."""
import math

import pytest
import torch

from moe_lib import seed_everything
from moe_lib.models import (LMConfig, TransformerLM, evaluate_lm, flops_per_token, lm_variants, load_checkpoint,
                            model_from_checkpoint, parameter_counts, train_lm)
from moe_lib.models.analysis import consecutive_reuse, reuse_by_chance, routing_trace, top_expert_change

SMALL = dict(d_model=32, n_layers=2, n_heads=4, seq_len=16, d_ff=32, num_experts=4)


def tiny_variants():
    return lm_variants(**SMALL, granularity=2)


@pytest.mark.parametrize("name", ["dense", "switch", "top-2", "fine+shared"])
def test_shapes_and_per_layer_aux(name):
    seed_everything(0)
    model = TransformerLM(tiny_variants()[name])
    idx = torch.randint(0, 256, (3, 16))
    assert model(idx).shape == (3, 16, 256)
    losses = model.aux_losses()
    assert len(losses) == (0 if name == "dense" else 2)  # one per MoE layer, never pooled
    assert all(l.requires_grad and l.dim() == 0 for l in losses)


@pytest.mark.parametrize("name", ["dense", "switch", "top-2", "fine+shared"])
def test_causal_future_token_does_not_change_past_logits(name):
    seed_everything(1)
    model = TransformerLM(tiny_variants()[name]).eval()
    idx = torch.randint(0, 256, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 17) % 256
    with torch.no_grad():
        a, b = model(idx), model(changed)
    if name == "dense":
        assert torch.equal(a[:, :10], b[:, :10])
    else:
        # An expert runs on its block of rows, whose size depends on the whole batch, and the CPU GEMM rounds
        # a row differently with the block size (1 ulp; the loop backend does the same): past logits may move
        # by float32 rounding, never more. A leak from the future moves them like the later logits (> 0.1).
        torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-6)
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 0.1  # the test can fail: later logits do change


def test_equal_active_parameters_and_flops():
    counts = {n: parameter_counts(TransformerLM(c)) for n, c in tiny_variants().items()}
    dense = counts["dense"]["active"]
    d, L, E = SMALL["d_model"], SMALL["n_layers"], SMALL["num_experts"]
    assert counts["dense"]["total"] == dense
    # dense: 2 norms per block + final norm, qkv+out, SwiGLU 3*d*d_ff, token + position tables
    assert dense == L * (2 * d + 4 * d * d + 3 * d * SMALL["d_ff"]) + d + 256 * d + 16 * d
    for name in ("switch", "top-2", "fine+shared"):
        c = counts[name]
        gate = L * d * tiny_variants()[name].num_experts
        assert c["active"] == dense + gate  # same active FFN width, plus the router
        assert c["total"] > 3 * dense / 2
    # switch keeps E copies of the FFN: total FFN params = E x dense FFN
    assert counts["switch"]["total"] - counts["switch"]["active"] == L * (E - 1) * 3 * d * SMALL["d_ff"]
    flops = {n: flops_per_token(TransformerLM(c)) for n, c in tiny_variants().items()}
    for name in ("switch", "top-2", "fine+shared"):
        assert flops[name] == pytest.approx(flops["dense"], rel=0.05)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="ffn"):
        LMConfig(ffn="sparse")
    with pytest.raises(ValueError, match="n_heads"):
        LMConfig(d_model=30, n_heads=4)
    with pytest.raises(TypeError, match="cfg"):
        TransformerLM({"d_model": 8})
    with pytest.raises(ValueError, match="seq_len"):
        TransformerLM(LMConfig(**SMALL))(torch.zeros(1, 17, dtype=torch.long))


def _data():
    g = torch.Generator().manual_seed(0)
    text = torch.randint(97, 123, (3000,), generator=g)
    return text[:2500], text[2500:]


def test_training_reduces_loss_and_evaluate_bits():
    seed_everything(0, threads=1)
    train, val = _data()
    model = TransformerLM(tiny_variants()["top-2"])
    before = evaluate_lm(model, val, max_windows=8)
    history = train_lm(model, train, steps=40, batch_size=8, val_data=val, eval_every=20, eval_windows=8,
                       progress=False)
    after = evaluate_lm(model, val, max_windows=8)
    assert after["loss"] < before["loss"] - 1.0
    assert after["bits_per_byte"] == pytest.approx(after["loss"] / torch.log(torch.tensor(2.0)).item())
    assert history.eval_step == [0, 20, 40] and len(history.train_loss) == 40
    assert all(len(a) == 2 for a in history.aux_per_layer)


@pytest.mark.parametrize("name", ["dense", "fine+shared"])
def test_resume_is_bit_exact(tmp_path, name):
    train, val = _data()
    kwargs = dict(steps=12, batch_size=4, warmup=3, val_data=val, eval_every=4, eval_windows=4, progress=False)
    seed_everything(0, threads=1)
    straight = TransformerLM(tiny_variants()[name])
    full = train_lm(straight, train, **kwargs)

    seed_everything(0, threads=1)
    first = TransformerLM(tiny_variants()[name])
    ckpt = str(tmp_path / "run.pt")
    train_lm(first, train, checkpoint_path=ckpt, stop_at=7, **kwargs)
    assert load_checkpoint(ckpt)["step"] == 7
    torch.manual_seed(123)  # disturb the global RNG: the checkpoint must restore it
    seed_everything(5, threads=1)
    second = TransformerLM(tiny_variants()[name])  # different initial weights, overwritten by the resume
    resumed = train_lm(second, train, resume_from=ckpt, **kwargs)
    assert resumed.train_loss == full.train_loss  # bit for bit, every step
    assert resumed.val_loss == full.val_loss
    for p, q in zip(straight.parameters(), second.parameters()):
        assert torch.equal(p, q)
    reloaded = model_from_checkpoint(str(tmp_path / "run.pt"))
    assert reloaded.cfg == second.cfg


def test_routing_analysis():
    seed_everything(0)
    model = TransformerLM(tiny_variants()["top-2"])
    trace = routing_trace(model, torch.randint(0, 256, (2, 16)))
    assert len(trace) == 2 and trace[0].shape == (2, 16, 2)
    same = torch.tensor([[[1, 2], [1, 3], [0, 2]]])
    assert consecutive_reuse(same) == {"first": 0.5, "any": 0.5}  # (1,2)-(1,3) share 1; (1,3)-(0,2) none
    chance = reuse_by_chance(torch.zeros(1, 4, 2, dtype=torch.long), 8)
    assert chance["first_uniform"] == 0.125 and chance["first_marginal"] == 1.0
    assert chance["any_uniform"] == pytest.approx(13 / 28)
    assert top_expert_change(same, same) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        top_expert_change(same, same[:, :2])


def test_steps_to_reach_interpolates_between_evaluations():
    from moe_lib.models import LMHistory, steps_to_reach

    h = LMHistory(eval_step=[0, 10, 20, 30], val_loss=[4.0, 3.0, 2.0, 1.5])
    assert steps_to_reach(h, 4.5) == 0.0
    assert steps_to_reach(h, 3.0) == 10.0
    assert steps_to_reach(h, 2.5) == pytest.approx(15.0)
    assert steps_to_reach(h, 1.75) == pytest.approx(25.0)
    assert math.isnan(steps_to_reach(h, 1.0))
