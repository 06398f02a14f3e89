"""The Triton language features moe_lib's kernels need, checked on the installed Triton.

An older Triton fails only when a kernel is first compiled, deep inside the code generator and with a
message that names neither the feature nor the version. :func:`feature_error` checks up front and
:mod:`moe_lib.kernels` refuses ``impl="triton"`` with its message (``impl="torch"`` keeps working).

What the kernels use beyond the basics (``tl.load``/``store``/``dot``/``arange``/``where``):

* ``tl.histogram(x, bins, mask=...)`` — the metadata kernels count only the live assignments; the ``mask``
  argument arrived in Triton 3.4 (triton-lang/triton pull request 6695, "Add support for masked histograms");
* ``tl.sort`` — the one-program metadata kernel sorts its keys;
* ``tl.cumsum`` — offsets and the tile schedule;
* ``tl.static_range`` — the router's unrolled top-k rounds;
* ``tl.math.erf`` — the GELU activation;
* ``tl.dot(a, b, acc)`` — accumulation into a given accumulator (the GEMM loops).
"""
from __future__ import annotations

import inspect

#: Oldest Triton with every feature below (the ``mask`` of ``tl.histogram``); ``pyproject.toml`` asks for it.
NEEDED = "3.4"


def _has_param(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - a builtin without a signature
        return False


def missing_features(tl=None) -> list[str]:
    """Names of the features the installed ``triton.language`` (or ``tl``) lacks, in the notation above."""
    if tl is None:
        import triton.language as tl
    missing = []
    histogram = getattr(tl, "histogram", None)
    if histogram is None:
        missing.append("tl.histogram")
    elif not _has_param(histogram, "mask"):
        missing.append("tl.histogram(mask=)")
    for name in ("sort", "cumsum", "static_range"):
        if getattr(tl, name, None) is None:
            missing.append(f"tl.{name}")
    if getattr(getattr(tl, "math", None), "erf", None) is None:
        missing.append("tl.math.erf")
    dot = getattr(tl, "dot", None)
    if dot is None or not _has_param(dot, "acc"):
        missing.append("tl.dot(acc=)")
    return missing


def feature_error(tl=None, version: str | None = None) -> str | None:
    """``None`` when the installed Triton has every feature; else a message naming the missing features, the
    installed version and the needed one."""
    missing = missing_features(tl)
    if not missing:
        return None
    if version is None:
        import triton

        version = getattr(triton, "__version__", "unknown")
    return (f"the installed triton {version} lacks {', '.join(missing)}, which moe_lib's kernels use; they need "
            f"triton >= {NEEDED} (pip install 'triton>={NEEDED}', or a torch wheel that brings it)")
