"""moe_lib — the library behind the MoE Book.

One data path for every mixture in the book, from the 1991 mixture of local experts to Mixtral::

    x [..., d] -> router -> dispatch (group by expert, capacity) -> expert bank -> weighted combine -> y

Start with :class:`MoELayer`.
"""
from . import backends, dispatch, experts, losses, metrics, routers, utils
from .backends import BACKENDS
from .dispatch import DispatchPlan, make_plan
from .experts import EXPERTS, ExpertBank, LinearExperts, MLPExperts, SwiGLUExperts
from .layer import MoEInfo, MoELayer
from .routers import ROUTERS, DenseRouter, Router, Routing, TopKRouter
from .utils import count_flops, seed_everything

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "EXPERTS", "ROUTERS", "DenseRouter", "DispatchPlan", "ExpertBank", "LinearExperts",
    "MLPExperts", "MoEInfo", "MoELayer", "Router", "Routing", "SwiGLUExperts", "TopKRouter",
    "backends", "count_flops", "dispatch", "experts", "losses", "make_plan", "metrics", "routers",
    "seed_everything", "utils",
]
