"""moe_lib — the library behind the MoE Book.

One data path for every mixture in the book, from the 1991 mixture of local experts to Mixtral::

    x [..., d] -> router -> dispatch (group by expert, capacity) -> expert bank -> weighted combine -> y

Start with :class:`MoELayer`. Subpackages: :mod:`moe_lib.classic` (the 1991 mixture's losses, hierarchical
mixtures and EM), :mod:`moe_lib.tasks` (the multi-domain task of Part II), :mod:`moe_lib.models` (a small
MoE Transformer language model), :mod:`moe_lib.corpus` (its offline byte corpus), :mod:`moe_lib.interop`
(:func:`from_transformers` for Hugging Face MoE blocks), :mod:`moe_lib.distributed` (expert parallelism),
:mod:`moe_lib.serving` and :mod:`moe_lib.business` (decode cost, the cost calculator), :mod:`moe_lib.practice`
(fine-tuning by parameter role, upcycling, merging), :mod:`moe_lib.applications` (MMoE, anomaly detection,
a vision MoE), :mod:`moe_lib.data`.

:mod:`moe_lib.kernels` holds the Triton kernels (chapter 11); without CUDA they run in Triton's interpreter,
which must be chosen before Triton is first imported — so this module sets ``TRITON_INTERPRET=1`` (unless
already set) on a machine without CUDA, before importing anything that may import Triton.
"""
import os as _os

import torch as _torch

if not _torch.cuda.is_available():
    _os.environ.setdefault("TRITON_INTERPRET", "1")

from . import (  # noqa: E402
    applications,
    backends,
    business,
    classic,
    corpus,
    data,
    dispatch,
    distributed,
    experts,
    interop,
    losses,
    metrics,
    models,
    practice,
    routers,
    serving,
    tasks,
    training,
    stats,
    utils,
)
from .backends import BACKENDS
from .dispatch import DispatchPlan, make_plan
from .distributed import ExpertParallelMoE
from .experts import EXPERTS, ExpertBank, GLUExperts, LinearExperts, MLPExperts, SwiGLUExperts
from .interop import from_transformers
from .interop import patch_transformers, routing_report, unpatch_transformers
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

__all__ = [
    # the layer and what it returns
    "MoELayer", "MoEInfo", "Routing", "DispatchPlan", "make_plan",
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
    "applications", "backends", "business", "classic", "corpus", "data", "dispatch", "distributed", "experts", "interop",
    "losses", "metrics", "models", "practice", "routers", "serving", "tasks", "training", "utils",
]
