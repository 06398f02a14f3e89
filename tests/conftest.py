"""Shared test setup.

* Choose Triton's interpreter before anything can import Triton (no CUDA here); one torch thread per
  pytest-xdist worker.
* Under ``CI`` set to a true value (``1``, ``true``, ``yes``, ``on``; any case), a skipped test is a
  failure: a missing optional package, a missing built book or a broken import must not turn CI green by
  skipping. The few skips that are legitimate on the CI machine are listed in :data:`CI_ALLOWED_SKIPS`.
  Skips raised while collecting a module (a module-level ``pytest.importorskip``) fail the collection.
* One hypothesis configuration for every property test: the profile named by ``HYPOTHESIS_PROFILE``
  (default ``"moe_lib"``, see :data:`HYPOTHESIS_PROFILES`). A test keeps its own ``max_examples`` only
  where one example is expensive, with a comment saying so.
"""
import os
import re

import pytest
import torch
from hypothesis import settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist each worker is a process that torch gives one intra-op thread per core: two workers
# on the 2-core CI machine ask for four threads, and torch's spinning thread pool then makes small ops
# (a GELU on one row, a tiny matmul) 10-100x slower. One thread per worker; a plain `pytest` keeps torch's
# default.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

#: Hypothesis profiles (choose with ``HYPOTHESIS_PROFILE=<name>``; ``--hypothesis-profile`` works too).
#: Examples are random on every run, not ``derandomize=True``: a fixed seed would check the same examples
#: forever, while random ones explore new inputs on every CI run. A failure stays reproducible: hypothesis
#: prints the falsifying example, ``print_blob`` adds a ``@reproduce_failure`` line to paste, the local
#: example database (``.hypothesis/``) replays it first on the next run, and ``--hypothesis-seed=N``
#: reruns a whole session's draws. ``deadline=None``: examples build layers and run them on a shared CPU,
#: whose timing says nothing about correctness.
HYPOTHESIS_PROFILES = {
    "moe_lib": dict(max_examples=60, deadline=None, print_blob=True),
    # a deeper search now and then (e.g. after touching routers or dispatch): ten times the examples
    "thorough": dict(max_examples=600, deadline=None, print_blob=True),
}
for _name, _options in HYPOTHESIS_PROFILES.items():
    settings.register_profile(_name, **_options)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "moe_lib"))

#: ``CI`` values that mean "this is CI": skips fail. Anything else (unset, empty, ``0``, ``false``, ``no``) does not.
CI_TRUE_VALUES = ("1", "true", "yes", "on")

#: ``(node id prefix, regular expression the skip reason must match)``: the only skips allowed under CI.
CI_ALLOWED_SKIPS = (
    # Checks the error message of resolve_device("cuda") on a machine *without* CUDA; skips where CUDA exists.
    ("tests/test_chapter_paths.py::test_resolve_device_without_cuda_says_what_to_pass_instead",
     r"on a machine without CUDA"),
    # Stored outputs are only comparable inside the reproducibility contract (Linux x86-64 with AVX2, the
    # CPU vendor that computed them); outside it strict nbval runs --nbval-lax and these compare nothing.
    ("tests/test_portability.py::", r"outside the reproducibility contract"),
)


def ci_is_set() -> bool:
    """True when the environment variable ``CI`` holds a true value (see :data:`CI_TRUE_VALUES`)."""
    return os.environ.get("CI", "").strip().lower() in CI_TRUE_VALUES


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def _skip_allowed(nodeid: str, reason: str) -> bool:
    return any(nodeid.startswith(prefix) and re.search(pattern, reason) for prefix, pattern in CI_ALLOWED_SKIPS)


def _fail_skip_under_ci(report) -> None:
    if not (report.skipped and ci_is_set()) or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    if _skip_allowed(report.nodeid, reason):
        return
    report.outcome = "failed"
    report.longrepr = (f"skipped under CI={os.environ['CI']!r}, where a skip is a failure ({reason}); "
                       "install what it needs, or, if the skip is legitimate on the CI machine, add it to "
                       "CI_ALLOWED_SKIPS in tests/conftest.py")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI, a test that skipped (``skipif`` marks, ``pytest.skip``, ``importorskip`` in a test or a
    fixture) fails, unless :data:`CI_ALLOWED_SKIPS` lists it."""
    report = yield
    _fail_skip_under_ci(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """Under CI, a module that skips while being collected (module-level ``importorskip``) is a
    collection error, with the same rule as :func:`pytest_runtest_makereport`."""
    report = yield
    _fail_skip_under_ci(report)
    return report
