"""moe_lib — the library behind the MoE Book.

One data path for every mixture in the book, from the 1991 mixture of local experts to Mixtral::

    x [..., d] -> router -> dispatch (group by expert, capacity) -> expert bank -> weighted combine -> y

Start with :class:`MoELayer`. Subpackages: :mod:`moe_lib.classic` (the 1991 mixture's losses, hierarchical
mixtures and EM), :mod:`moe_lib.tasks` (the multi-domain task of Part II), :mod:`moe_lib.data`.
"""
from . import backends, classic, data, dispatch, experts, losses, metrics, routers, tasks, training, utils
from .backends import BACKENDS
from .dispatch import DispatchPlan, make_plan
from .experts import EXPERTS, ExpertBank, LinearExperts, MLPExperts, SwiGLUExperts
from .layer import MoEInfo, MoELayer
from .routers import (
    ROUTERS,
    AuxFreeRouter,
    BaseRouter,
    DenseRouter,
    ExpertChoiceRouter,
    GShardRouter,
    HashRouter,
    NoisyTopKRouter,
    Router,
    Routing,
    SoftMoERouter,
    SwitchRouter,
    TopKRouter,
)
from .utils import count_flops, seed_everything

__version__ = "0.1.0"

__all__ = [
    # the layer and what it returns
    "MoELayer", "MoEInfo", "Routing", "DispatchPlan", "make_plan",
    # registries and their members
    "ROUTERS", "EXPERTS", "BACKENDS",
    "Router", "DenseRouter", "TopKRouter", "NoisyTopKRouter", "SwitchRouter", "GShardRouter",
    "ExpertChoiceRouter", "HashRouter", "BaseRouter", "SoftMoERouter", "AuxFreeRouter",
    "ExpertBank", "LinearExperts", "MLPExperts", "SwiGLUExperts",
    # helpers
    "count_flops", "seed_everything",
    # modules
    "backends", "classic", "data", "dispatch", "experts", "losses", "metrics", "routers", "tasks",
    "training", "utils",
]
