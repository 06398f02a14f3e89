"""The Peterson & Barney vowels of chapter 2 (the table needs the optional extra ``moe-lib[vowels]``) and
the arm dynamics data."""
import builtins

import pytest
import torch

from moe_lib.book import data


@pytest.fixture
def vowels_extra():
    """The optional extra ``moe-lib[vowels]`` (Praat's bindings, which hold the table): only the tests that
    read the table need it; skipping without it is a failure under CI (tests/conftest.py)."""
    return pytest.importorskip("parselmouth", reason="pip install moe-lib[vowels]")


def test_full_table_is_peterson_barney(vowels_extra):
    df = data.peterson_barney_table()
    assert len(df) == 1520                                    # 76 speakers x 10 vowels x 2 repetitions
    assert df["Speaker"].nunique() == 76 and df["Vowel"].nunique() == 10
    assert (df.groupby(["Speaker", "Vowel"]).size() == 2).all()
    assert df.groupby("Type")["Speaker"].nunique().to_dict() == {"c": 15, "m": 33, "w": 28}
    assert df[["F0", "F1", "F2", "F3"]].gt(0).all().all()


def test_1991_split_sizes_and_speakers(vowels_extra):
    train, test = data.peterson_barney_vowels()
    assert (len(train), len(test)) == (400, 200)             # 4 vowels x 50 (25) speakers x 2
    assert train.x.shape == (400, 2) and train.x.dtype == torch.float32
    assert set(train.speakers.tolist()) == set(range(1, 51))
    assert set(test.speakers.tolist()) == set(range(51, 76))
    assert train.labels.bincount().tolist() == [100] * 4 and test.labels.bincount().tolist() == [50] * 4
    # [i] has the lowest F1 and the highest F2 of the four; [a] the highest F1
    means = torch.stack([train.x[train.labels == c].mean(0) for c in range(4)])
    assert int(means[:, 0].argmin()) == 0 and int(means[:, 1].argmax()) == 0 and int(means[:, 0].argmax()) == 2


def test_custom_split_and_bad_ranges(vowels_extra):
    train, test = data.peterson_barney_vowels((1, 10), (11, 12))
    assert (len(train), len(test)) == (80, 16)
    with pytest.raises(ValueError, match="train_speakers"):
        data.peterson_barney_vowels((5, 1))
    with pytest.raises(ValueError, match="test_speakers"):
        data.peterson_barney_vowels((1, 50), [51, 75])


def test_missing_extra_names_it(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("parselmouth"):
            raise ImportError("no parselmouth")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install moe-lib\[vowels\]"):
        data.peterson_barney_vowels()


def test_arm_dynamics_is_deterministic_and_physical():
    x, y = data.arm_inverse_dynamics(100, seed=3)
    x2, y2 = data.arm_inverse_dynamics(100, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2) and x.shape == (100, 6) and y.shape == (100, 2)
    # at rest, horizontal arm: torque = gravity only
    zero = torch.zeros(1, 2)
    tau = data.arm_torques(zero, zero, zero)
    p = data.ARM
    assert float(tau[0, 1]) == pytest.approx(p["m2"] * p["lc2"] * p["g"])
    assert float(tau[0, 0]) == pytest.approx((p["m1"] * p["lc1"] + p["m2"] * p["l1"] + p["m2"] * p["lc2"]) * p["g"])
