"""moe_lib — the library behind the MoE Book.

One data path for every mixture in the book, from the 1991 mixture of local experts to Mixtral::

    x [..., d] -> router -> dispatch (group by expert, capacity) -> expert bank -> weighted combine -> y

Start with :class:`MoELayer`. The core data path is the top-level modules (:mod:`~moe_lib.routers`,
:mod:`~moe_lib.dispatch`, :mod:`~moe_lib.backends`, :mod:`~moe_lib.experts`, :mod:`~moe_lib.layer`,
:mod:`~moe_lib.losses`, :mod:`~moe_lib.metrics`, :mod:`~moe_lib.training`, :mod:`~moe_lib.stats`,
:mod:`~moe_lib.utils`). Library subpackages: :mod:`moe_lib.classic` (the 1991 mixture's losses, hierarchical
mixtures and EM), :mod:`moe_lib.models` (a small MoE Transformer language model), :mod:`moe_lib.interop`
(:func:`from_transformers` for Hugging Face MoE blocks), :mod:`moe_lib.distributed` (expert parallelism),
:mod:`moe_lib.practice` (fine-tuning by parameter role, upcycling, merging), :mod:`moe_lib.applications`
(MMoE, anomaly detection, a vision MoE), :mod:`moe_lib.bench` (the benchmark harness and the one timer,
:mod:`moe_lib.bench.timing`).

:mod:`moe_lib.book` holds what the book's chapters use to teach and is not part of the data path: the data
sets (``book.data``), the multi-domain task of Part II (``book.tasks``), the byte corpus (``book.corpus``),
plots (``book.plot``), cost models and calculators (``book.grouping``, ``book.serving``, ``book.business``),
the full-scale experiment records (``book.full_scale``) and the reproducibility contract
(``book.reproducibility``).

:mod:`moe_lib.kernels` holds the Triton kernels (chapter 11); without CUDA they run in Triton's interpreter,
which must be chosen before Triton is first imported — so this module sets ``TRITON_INTERPRET=1`` (unless
already set) on a machine without CUDA, before importing anything that may import Triton.
"""
import os as _os

import torch as _torch

if not _torch.cuda.is_available():
    _os.environ.setdefault("TRITON_INTERPRET", "1")

# The core data path is imported here; the chapter-support subpackages (and the names they export at the top
# level) load on first use, so ``import moe_lib`` stays light and never starts moe_lib.distributed.
from . import backends, dispatch, experts, losses, metrics, routers, stats, training, utils  # noqa: E402
from .backends import BACKENDS
from .dispatch import Dispatcher, DispatchPlan, SlotDispatcher, TokenDispatcher, make_plan
from .experts import EXPERTS, ExpertBank, GLUExperts, LinearExperts, MLPExperts, SwiGLUExperts
from .layer import MoEInfo, MoELayer
from .routers import (
    ROUTERS,
    AuxFreeRouter,
    BaseRouter,
    DenseRouter,
    ExpertChoiceRouter,
    GroupCapacityRouter,
    GroupLimitedRouter,
    GShardRouter,
    HashRouter,
    NoisyTopKRouter,
    Router,
    Routing,
    SoftMoERouter,
    SwitchRouter,
    TopKRouter,
)
from .utils import book_file, count_flops, resolve_device, seed_everything, to_device

__version__ = "0.1.0"

#: Subpackages loaded on first attribute access (``moe_lib.book``, ``from moe_lib import book``).
_LAZY_MODULES = ("applications", "bench", "book", "classic", "distributed", "interop", "kernels", "models",
                 "practice")
#: Top-level names that live in a lazily loaded subpackage.
_LAZY_NAMES = {"from_transformers": "interop", "patch_transformers": "interop", "unpatch_transformers": "interop",
               "routing_report": "interop", "ExpertParallelMoE": "distributed"}


def __getattr__(name: str):
    import importlib

    if name in _LAZY_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_MODULES) | set(_LAZY_NAMES))

__all__ = [
    # the layer and what it returns
    "MoELayer", "MoEInfo", "Routing", "DispatchPlan", "make_plan",
    "Dispatcher", "TokenDispatcher", "SlotDispatcher",
    # registries and their members
    "ROUTERS", "EXPERTS", "BACKENDS",
    "Router", "DenseRouter", "TopKRouter", "NoisyTopKRouter", "SwitchRouter", "GShardRouter",
    "ExpertChoiceRouter", "HashRouter", "BaseRouter", "SoftMoERouter", "AuxFreeRouter",
    "GroupLimitedRouter", "GroupCapacityRouter",
    "ExpertBank", "LinearExperts", "MLPExperts", "SwiGLUExperts", "GLUExperts",
    # interop, scale-out, helpers
    "from_transformers", "patch_transformers", "unpatch_transformers", "routing_report",
    "ExpertParallelMoE", "count_flops", "seed_everything", "resolve_device", "to_device", "book_file",
    # modules
    "applications", "backends", "book", "classic", "dispatch", "distributed", "experts", "interop",
    "losses", "metrics", "models", "practice", "routers", "training", "utils",
]
