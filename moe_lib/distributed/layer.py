"""``ExpertParallelMoE``: an :class:`~moe_lib.MoELayer` whose experts are sharded across ranks, through the
:class:`AllToAllDispatcher` plugged into the layer's one forward pass.

Expert parallelism (Lepikhin et al. 2021, §2.3; Fedus et al. 2022, §2.2): with ``W`` ranks and ``E``
experts, rank ``r`` holds experts ``r·E/W … (r+1)·E/W − 1``; the router is replicated. Each rank routes
its *own* tokens, then

1. plans them with :func:`moe_lib.make_plan` (rows grouped by expert, hence by owning rank; capacity is
   applied to the rank's local batch, as in GShard's per-group capacity);
2. exchanges row counts per expert, then the rows themselves, with an uneven ``all_to_all_single``;
3. runs its local experts on the rows it received, through the same backends as ``MoELayer``;
4. sends the outputs back with the reverse all-to-all and combines them with
   :func:`moe_lib.dispatch.combine`.

So the output on rank ``r`` equals ``MoELayer`` applied to rank ``r``'s tokens alone, and the expert
gradients equal those of ``MoELayer`` on every rank's tokens. The router is replicated like any
data-parallel parameter: :meth:`ExpertParallelMoE.sync_router_grads` all-reduces its gradients.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._validate import check_bool
from ..dispatch import Dispatcher, DispatchPlan, TokenDispatcher, combine
from ..layer import MoELayer
from .comm import all_to_all, exchange_counts


def shard_range(num_experts: int, world_size: int, rank: int) -> tuple[int, int]:
    """Experts ``[start, stop)`` held by ``rank``. Raises ``ValueError`` unless ``E`` is divisible by ``W``."""
    if world_size < 1 or num_experts % world_size:
        raise ValueError(
            f"num_experts={num_experts} must be divisible by the world size {world_size} for expert "
            f"parallelism (each rank holds num_experts/world_size experts); use a world size among "
            f"{[w for w in range(1, num_experts + 1) if num_experts % w == 0]}"
        )
    per_rank = num_experts // world_size
    return rank * per_rank, (rank + 1) * per_rank


def _local_bank(bank: nn.Module, start: int, stop: int) -> nn.Module:
    """A copy of an expert bank keeping experts ``start … stop−1`` (every parameter is stacked ``[E, ...]``)."""
    local = copy.copy(bank)
    local._parameters = {}
    local._buffers = dict(bank._buffers)
    local._modules = dict(bank._modules)
    for name, p in bank.named_parameters(recurse=False):
        local._parameters[name] = nn.Parameter(p.detach()[start:stop].clone(), requires_grad=p.requires_grad)
    local.num_experts = stop - start
    return local


def _config(layer: MoELayer, world_size: int) -> dict:
    return {
        "num_experts": layer.num_experts, "top_k": layer.top_k, "d_model": layer.d_model, "d_ff": layer.d_ff,
        "d_out": layer.d_out, "router": layer.router.name, "expert": layer.experts.kind,
        "capacity_factor": layer.capacity_factor, "world_size": world_size,
    }


class AllToAllDispatcher(Dispatcher):
    """Expert parallelism as a dispatcher: it wraps a local :class:`~moe_lib.dispatch.TokenDispatcher` (the
    plan and its capacity, applied to this rank's tokens as GShard's per-group capacity) and moves the
    planned rows to the ranks that own their experts and back.

    Per forward pass: plan locally → exchange the row counts per expert → ``all_to_all_single`` of the
    rows (grouped by expert, hence by owning rank) → the backend runs this rank's experts on the rows it
    received → the reverse all-to-all → the local plan's weighted combine. The expert bank beside it
    holds ``E / W`` experts (:meth:`num_local_experts`).

    Attributes:
        local: the wrapped token dispatcher.
        group, world_size, rank: the process group and this rank's place in it.
        last_traffic: after each forward, the rows and bytes this rank sent and received in the dispatch
            all-to-all (the combine moves the same rows back): ``sent_rows`` / ``recv_rows`` per peer rank,
            ``sent_remote_bytes`` (rows to *other* ranks × ``d_model`` × element size) and
            ``recv_remote_bytes``.
    """

    name = "all_to_all"

    def __init__(self, local: TokenDispatcher | None = None, group=None):
        super().__init__()
        if local is None:
            local = TokenDispatcher()
        if not isinstance(local, TokenDispatcher):
            raise TypeError(f"local must be a moe_lib.dispatch.TokenDispatcher (rows planned per token), got "
                            f"{type(local).__name__}; Soft MoE's slots have no per-token assignment to shard")
        if not dist.is_initialized():
            raise RuntimeError("AllToAllDispatcher needs an initialised process group "
                               "(moe_lib.distributed.init_distributed() under torchrun)")
        self.local = local
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.last_traffic: dict | None = None

    @property
    def capacity_factor(self) -> float | None:
        return self.local.capacity_factor

    def num_local_experts(self, num_experts: int) -> int:
        start, stop = shard_range(num_experts, self.world_size, self.rank)
        return stop - start

    def forward(self, experts, tokens, routing, backend):
        plan = self.local.plan(routing)
        W, m = self.world_size, plan.num_experts // self.world_size
        # 1. counts: how many rows this rank sends to each (rank, local expert); receive the transposed view.
        recv_counts = exchange_counts(plan.counts, self.group).view(W, m)
        send_rows = plan.counts.view(W, m).sum(1).tolist()
        recv_rows = recv_counts.sum(1).tolist()
        # 2. dispatch: rows are already grouped by expert, hence by destination rank.
        received = all_to_all(tokens[plan.token_index], recv_rows, send_rows, self.group)
        # 3. this rank's experts on the received rows, regrouped by local expert, through the backend.
        local_id = torch.arange(m, device=tokens.device).repeat(W).repeat_interleave(recv_counts.reshape(-1))
        expert_out = backend(experts, received, _identity_plan(local_id, m))
        # 4. combine: send outputs back along the same routes, then the local plan's weighted combine.
        returned = all_to_all(expert_out, send_rows, recv_rows, self.group)
        y = combine(returned, plan, tokens.shape[0])
        row_bytes = tokens.shape[-1] * tokens.element_size()
        self.last_traffic = {
            "sent_rows": send_rows, "recv_rows": recv_rows,
            "sent_remote_bytes": (sum(send_rows) - send_rows[self.rank]) * row_bytes,
            "recv_remote_bytes": (sum(recv_rows) - recv_rows[self.rank]) * row_bytes,
        }
        return y, plan

    def extra_repr(self) -> str:
        return f"rank={self.rank}/{self.world_size}"


class ExpertParallelMoE(MoELayer):
    """The expert-parallel twin of a :class:`~moe_lib.MoELayer`: the same layer with this rank's share of
    the experts and an :class:`AllToAllDispatcher` plugged into it. Build it with :meth:`from_layer`.

    Its forward is :meth:`MoELayer.forward` itself (same router, same auxiliary losses on this rank's
    tokens, same :class:`~moe_lib.MoEInfo`, ``token_ids`` for hash routing); only the dispatcher differs.

    Attributes:
        router: a replicated copy of the layer's router.
        experts: this rank's slice of the expert bank (``E/W`` experts).
        dispatcher: the :class:`AllToAllDispatcher`.
        expert_offset: global id of this rank's first expert; ``local_experts`` = ``E/W``.
        last_traffic: the dispatcher's traffic of the last forward (see :class:`AllToAllDispatcher`).
        last_plan: the local dispatch plan of the last forward (drops counted on this rank).
    """

    def __init__(self, layer: MoELayer, group=None, check_config: bool = True):
        if not isinstance(layer, MoELayer):
            raise TypeError(f"layer must be a moe_lib.MoELayer, got {type(layer).__name__}")
        check_bool("check_config", check_config)
        if not dist.is_initialized():
            raise RuntimeError("ExpertParallelMoE needs an initialised process group "
                               "(moe_lib.distributed.init_distributed() under torchrun)")
        if not isinstance(layer.dispatcher, TokenDispatcher):
            raise ValueError(f"router={layer.router.name!r} uses a {type(layer.dispatcher).__name__}, which has no "
                             "per-token assignment to shard (Soft MoE mixes all tokens into every slot); "
                             "accepted: layers whose dispatcher is a TokenDispatcher (every other router in "
                             "moe_lib.ROUTERS)")
        world_size, rank = dist.get_world_size(group), dist.get_rank(group)
        start, stop = shard_range(layer.num_experts, world_size, rank)
        if check_config:
            _check_same_config(_config(layer, world_size), group, world_size, rank)
        super().__init__(
            layer.d_model, layer.d_ff, layer.num_experts, router=copy.deepcopy(layer.router),
            expert=_local_bank(layer.experts, start, stop), backend=layer.backend,
            dispatcher=AllToAllDispatcher(copy.deepcopy(layer.dispatcher), group),
            aux_loss_coef=layer.aux_loss_coef, z_loss_coef=layer.z_loss_coef,
            importance_loss_coef=layer.importance_loss_coef, load_loss_coef=layer.load_loss_coef,
        )
        self.expert_offset = start

    @classmethod
    def from_layer(cls, layer: MoELayer, group=None, check_config: bool = True) -> "ExpertParallelMoE":
        """Shard ``layer`` over the ranks of ``group``: every rank passes the same layer (same seed or same
        state dict) and keeps its own experts. Checks that every rank agrees on the layer's shape
        (``ValueError`` naming the differing fields otherwise)."""
        return cls(layer, group=group, check_config=check_config)

    @property
    def group(self):
        return self.dispatcher.group

    @property
    def world_size(self) -> int:
        return self.dispatcher.world_size

    @property
    def rank(self) -> int:
        return self.dispatcher.rank

    @property
    def local_experts(self) -> int:
        return self.experts.num_experts

    @property
    def last_traffic(self) -> dict | None:
        return self.dispatcher.last_traffic

    @property
    def last_plan(self) -> DispatchPlan | None:
        return None if self.last_info is None else self.last_info.plan

    def extra_repr(self) -> str:
        return (f"rank={self.rank}/{self.world_size}, experts {self.expert_offset}..."
                f"{self.expert_offset + self.local_experts - 1} of {self.num_experts}, top_k={self.top_k}")

    def sync_router_grads(self) -> None:
        """All-reduce (sum) the replicated router's gradients, as data parallelism would."""
        for p in self.router.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=self.group)

    def full_expert_state(self) -> dict[str, Tensor]:
        """Gather every rank's expert slice: the expert bank's parameters ``[E, ...]`` on every rank — what a
        single-process checkpoint of the layer's experts holds (``MoELayer.experts.load_state_dict``)."""
        out = {}
        for name, p in self.experts.named_parameters(recurse=False):
            parts = [torch.empty_like(p.detach()) for _ in range(self.world_size)]
            dist.all_gather(parts, p.detach().contiguous(), group=self.group)
            out[name] = torch.cat(parts)
        return out


def _check_same_config(mine: dict, group, world_size: int, rank: int) -> None:
    configs: list = [None] * world_size
    dist.all_gather_object(configs, mine, group=group)
    for r, other in enumerate(configs):
        diff = {k: (mine[k], other[k]) for k in mine if mine[k] != other[k]}
        if diff:
            fields = ", ".join(f"{k}: rank {rank} has {a!r}, rank {r} has {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"the ranks disagree on the MoE layer's configuration ({fields}); every rank "
                             f"must build the same layer before sharding it")


def _identity_plan(local_id: Tensor, num_experts: int) -> DispatchPlan:
    """A plan that groups ``R`` received rows by local expert with weight 1, so a backend returns each
    row's expert output in the received order."""
    order = torch.sort(local_id, stable=True).indices
    counts = torch.bincount(local_id, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=local_id.device)
    offsets[1:] = torch.cumsum(counts, 0)
    n = local_id.shape[0]
    return DispatchPlan(
        token_index=order, expert_index=local_id[order], slot_index=torch.zeros_like(order),
        weights=torch.ones(n, device=local_id.device), counts=counts, offsets=offsets, requested=counts,
        kept=torch.ones(n, 1, dtype=torch.bool, device=local_id.device), capacity=None,
    )


def expected_remote_fraction(world_size: int) -> float:
    """Share of assignments that leave their rank under uniform routing: ``1 − 1/W``."""
    return 1.0 - 1.0 / world_size if world_size >= 1 else math.nan
