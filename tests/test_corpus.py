"""Tests of moe_lib.book.corpus: the offline standard-library corpus and its token-type labels."""
import numpy as np
import pytest
import torch

from moe_lib.book.corpus import STDLIB_FILES, TOKEN_TYPES, stdlib_corpus, token_type_labels
from moe_lib.models.windows import fixed_windows, random_windows


def test_labels_on_known_snippet():
    src = 'def f(x):\n    return x + 12  # hi\ns = "é"\n'
    labels = token_type_labels(src)
    assert len(labels) == len(src.encode("utf-8"))  # one label per byte: é is two bytes
    names = "".join("wikdpsc"[i] for i in labels)
    assert names == "kkkwipipp" + "w" + "wwww" + "kkkkkk" + "wiwpwddwwcccc" + "w" + "iwpw" + "ssss" + "w"
    assert TOKEN_TYPES[2] == "keyword" and TOKEN_TYPES[6] == "comment"


def test_labels_bad_input():
    with pytest.raises(TypeError, match="source"):
        token_type_labels(b"x = 1")
    with pytest.raises(ValueError, match="tokenize"):
        token_type_labels('x = """unterminated\n')


def test_corpus_is_deterministic_and_sized():
    a, b = stdlib_corpus(), stdlib_corpus()
    assert a.fingerprint == b.fingerprint and torch.equal(a.train, b.train) and torch.equal(a.val_labels, b.val_labels)
    assert a.files == STDLIB_FILES
    n = a.train.numel() + a.val.numel()
    assert n > 400_000
    assert a.val.numel() == pytest.approx(0.1 * n, rel=0.01)
    assert a.train.shape == a.train_labels.shape and a.val.shape == a.val_labels.shape
    assert int(a.train.max()) < 256 and int(a.train.min()) >= 0
    counts = np.bincount(a.train_labels.numpy(), minlength=len(TOKEN_TYPES))
    assert (counts > 0).all()


def test_corpus_small_file_list_and_missing_files(tmp_path):
    one = stdlib_corpus(["colorsys.py"], val_fraction=0.5)
    assert abs(one.train.numel() - one.val.numel()) <= 1
    with pytest.raises(FileNotFoundError, match="no_such_module.py"):
        stdlib_corpus(["colorsys.py", "no_such_module.py"])
    with pytest.raises(ValueError, match="val_fraction"):
        stdlib_corpus(["colorsys.py"], val_fraction=1.0)
    with pytest.raises(TypeError, match="files"):
        stdlib_corpus("colorsys.py")


def test_windows():
    data = torch.arange(100)
    x, y = fixed_windows(data, 10, max_windows=3)
    assert x.shape == (3, 10) and torch.equal(y, x + 1)
    g = torch.Generator().manual_seed(0)
    xb, yb = random_windows(data, 4, 8, g)
    assert xb.shape == (4, 8) and torch.equal(yb, xb + 1)
    with pytest.raises(ValueError, match="seq_len"):
        fixed_windows(torch.arange(5), 10)
