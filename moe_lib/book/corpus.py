"""An offline text corpus for the language-model chapters: the Python standard library's own source.

:func:`stdlib_corpus` reads a fixed, documented list of module files (:data:`STDLIB_FILES`) from the
standard library of the *running* interpreter (``sysconfig.get_paths()["stdlib"]``). Nothing is
downloaded. The same Python version gives the same bytes, so results reproduce across machines; another
version gives slightly different files (``Corpus.fingerprint`` tells them apart).

Tokens are **bytes** (vocabulary 256): no tokenizer to train or ship, and "bits per byte" is directly
comparable across models. Every byte also carries a **token-type label** (:data:`TOKEN_TYPES`) computed
with Python's own :mod:`tokenize` — whitespace/indentation, identifier, keyword, number, punctuation,
string, comment — so chapter 9 can ask which kinds of bytes each expert receives.

Split: the first ``1 − val_fraction`` of every file's bytes are training data, the rest validation
(every file contributes to both, so the two splits have the same mix of styles).
"""
from __future__ import annotations

import hashlib
import io
import keyword
import os
import sysconfig
import tokenize
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .._validate import check_int

#: The module files of the corpus, in order (paths relative to the standard library directory). Chosen
#: as pure-Python modules present in every CPython since 3.9, of varied style (parsers, numerics,
#: text utilities, data structures); about 0.6 MB in all.
STDLIB_FILES: tuple[str, ...] = (
    "argparse.py", "textwrap.py", "string.py", "heapq.py", "bisect.py", "fractions.py",
    "statistics.py", "shlex.py", "difflib.py", "calendar.py", "colorsys.py", "functools.py",
    "dataclasses.py", "enum.py", "pprint.py", "random.py", "csv.py", "fnmatch.py", "glob.py",
    "copy.py", "operator.py", "queue.py", "sched.py", "contextlib.py", "graphlib.py", "numbers.py",
    "tokenize.py",
)

#: Token types of :func:`token_type_labels`, by label id.
TOKEN_TYPES: tuple[str, ...] = (
    "whitespace", "identifier", "keyword", "number", "punctuation", "string", "comment",
)
WHITESPACE, IDENTIFIER, KEYWORD, NUMBER, PUNCTUATION, STRING, COMMENT = range(len(TOKEN_TYPES))

_STRING_TOKENS = {tokenize.STRING} | {getattr(tokenize, n) for n in ("FSTRING_START", "FSTRING_MIDDLE",
                                                                    "FSTRING_END") if hasattr(tokenize, n)}


def stdlib_dir() -> str:
    """The standard library directory of the running interpreter."""
    return sysconfig.get_paths()["stdlib"]


def token_type_labels(source: str) -> np.ndarray:
    """Label every **byte** of ``source`` (UTF-8) with its token type (an index into :data:`TOKEN_TYPES`).

    Uses :func:`tokenize.generate_tokens`: ``NAME`` tokens are keywords if :func:`keyword.iskeyword`,
    identifiers otherwise; ``NUMBER`` → number; ``OP`` → punctuation; ``STRING`` (and f-string parts) →
    string; ``COMMENT`` → comment. Everything no token covers (spaces, newlines, indentation, line
    continuations) is whitespace. A multi-byte character takes its character's label on all its bytes.

    Raises:
        TypeError: ``source`` is not a ``str``.
        ValueError: ``source`` is not valid Python for :mod:`tokenize`.
    """
    if not isinstance(source, str):
        raise TypeError(f"source must be a str of Python source code, got {type(source).__name__}")
    lines = source.splitlines(keepends=True)
    starts = np.zeros(len(lines) + 2, dtype=np.int64)
    starts[1:len(lines) + 1] = np.cumsum([len(line) for line in lines])
    starts[len(lines) + 1] = len(source)
    labels = np.full(len(source), WHITESPACE, dtype=np.int64)
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.NAME:
                kind = KEYWORD if keyword.iskeyword(tok.string) else IDENTIFIER
            elif tok.type == tokenize.NUMBER:
                kind = NUMBER
            elif tok.type == tokenize.OP:
                kind = PUNCTUATION
            elif tok.type in _STRING_TOKENS:
                kind = STRING
            elif tok.type == tokenize.COMMENT:
                kind = COMMENT
            else:
                continue
            begin = starts[tok.start[0] - 1] + tok.start[1]
            end = starts[tok.end[0] - 1] + tok.end[1]
            labels[begin:end] = kind
    except (tokenize.TokenError, IndentationError, SyntaxError) as err:
        raise ValueError(f"source is not valid Python for tokenize: {err}") from err
    widths = np.fromiter((len(ch.encode("utf-8")) for ch in source), dtype=np.int64, count=len(source))
    return np.repeat(labels, widths)


@dataclass
class Corpus:
    """A byte-level corpus with per-byte token-type labels.

    Attributes:
        train, val: ``[N]`` int64 byte values (0–255).
        train_labels, val_labels: ``[N]`` int64 token-type labels (:data:`TOKEN_TYPES`).
        files: the files read, in order.
        fingerprint: first 12 hex digits of the SHA-256 of all the bytes (same on every machine with the
            same Python).
    """

    train: Tensor
    val: Tensor
    train_labels: Tensor
    val_labels: Tensor
    files: tuple[str, ...]
    fingerprint: str

    vocab_size = 256
    token_types = TOKEN_TYPES

    def summary(self) -> dict:
        """Sizes, for a table."""
        return {"files": len(self.files), "train bytes": int(self.train.numel()),
                "validation bytes": int(self.val.numel()), "fingerprint": self.fingerprint}


def stdlib_corpus(files: tuple[str, ...] | list[str] = STDLIB_FILES, *, val_fraction: float = 0.1,
                  root: str | None = None) -> Corpus:
    """Read ``files`` from the standard library (or ``root``) into a byte-level :class:`Corpus`.

    Args:
        files: paths relative to ``root``; default :data:`STDLIB_FILES`.
        val_fraction: share of each file's bytes (its end) held out for validation, in ``(0, 1)``.
        root: directory to read from; ``None`` (default) is :func:`stdlib_dir`.

    Raises:
        FileNotFoundError: some files are missing (all missing names are listed).
        ValueError / TypeError: bad ``files`` or ``val_fraction``.
    """
    if isinstance(files, str) or not isinstance(files, (tuple, list)) or not files:
        raise TypeError("files must be a non-empty list or tuple of paths relative to the standard library")
    if not all(isinstance(f, str) for f in files):
        raise TypeError("files must contain only str paths")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be a number strictly between 0 and 1, got {val_fraction!r}")
    root = stdlib_dir() if root is None else root
    paths = [os.path.join(root, f) for f in files]
    missing = [f for f, p in zip(files, paths) if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"corpus files not found under {root!r}: {missing}. The corpus reads the running Python's "
            "standard library; pass files= (or root=) to choose files that exist")
    digest = hashlib.sha256()
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "train_labels": [], "val_labels": []}
    for path in paths:
        with open(path, "rb") as fh:
            raw = fh.read()
        digest.update(raw)
        data = np.frombuffer(raw, dtype=np.uint8).astype(np.int64)
        labels = token_type_labels(raw.decode("utf-8"))
        cut = int(round(len(data) * (1 - val_fraction)))
        parts["train"].append(data[:cut])
        parts["val"].append(data[cut:])
        parts["train_labels"].append(labels[:cut])
        parts["val_labels"].append(labels[cut:])
    tensors = {k: torch.from_numpy(np.concatenate(v)) for k, v in parts.items()}
    return Corpus(**tensors, files=tuple(files), fingerprint=digest.hexdigest()[:12])
