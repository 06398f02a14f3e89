"""Expert parallelism (``moe_lib.distributed.layer``) inside the pytest process.

``test_distributed.py`` checks real multi-process behaviour: gloo ranks spawned by
:func:`moe_lib.distributed.launch`. Mutation testing maps tests to functions by tracing the pytest process
only, so it never sees those ranks run ``ExpertParallelMoE``. The tests here run the ranks *inside* this
process:

* as threads joined by torch's threaded process group (the one torch's own ``MultiThreadedTestCase`` uses:
  ``torch.testing._internal.distributed.multi_threaded_pg``; it implements the uneven
  ``all_to_all_single``, ``all_gather``, ``all_gather_object`` and ``all_reduce`` the layer needs), with
  2 and 4 ranks and with two independent expert-parallel groups of 2 inside a world of 4;
* as a single gloo rank (``world_size=1``), the real backend.

Every rank's result is compared with one :class:`~moe_lib.MoELayer` on the same tokens, computed in the
main thread: outputs, input gradients, expert gradients (the slice of the gradient of the sum of every
rank's loss), router gradients after ``sync_router_grads``, the auxiliary loss, the gathered expert state
and the all-to-all traffic. Shard boundaries and the remote fraction are pinned by hand values.
"""
from __future__ import annotations

import copy
import math
import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist

from moe_lib import MoELayer, kernels
from moe_lib.distributed.layer import ExpertParallelMoE, expected_remote_fraction, shard_range

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")

TOL = dict(rtol=1e-5, atol=1e-6)  # fp32; the batched matmuls pad differently on one rank and on W ranks


# ------------------------------------------------------------------------------------- threaded ranks


def run_ranks(fn, world_size: int, *args, timeout_s: float = 30.0) -> list:
    """``fn(rank, world_size, *args)`` on ``world_size`` threads joined by torch's threaded process group;
    returns the results by rank. Re-raises the first rank's exception; a rank stuck in a collective (a
    peer failed or called a different collective) is released and reported instead of hanging."""
    from torch.testing._internal.distributed.multi_threaded_pg import (
        ProcessLocalGroup, _install_threaded_pg, _uninstall_threaded_pg)

    hook = sys.excepthook  # init_process_group wraps it per rank; restore it afterwards
    torch._C._distributed_c10d._set_thread_isolation_mode(True)
    _install_threaded_pg()
    store = dist.HashStore()
    results, errors = [None] * world_size, [None] * world_size

    def worker(rank):
        dist.init_process_group(backend="threaded", rank=rank, world_size=world_size, store=store)
        try:
            results[rank] = fn(rank, world_size, *args)
        except BaseException as exc:  # SystemExit too: the threaded group releases waiting ranks with it
            errors[rank] = exc
            ProcessLocalGroup.exception_handle(exc)  # wake the peers waiting in a collective
        finally:
            dist.destroy_process_group()

    threads = [threading.Thread(target=worker, args=(r,), daemon=True) for r in range(world_size)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + timeout_s
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, t in enumerate(threads) if t.is_alive()]
        if hung:
            ProcessLocalGroup.exception_handle(TimeoutError())
            for t in threads:
                t.join(5.0)
    finally:
        ProcessLocalGroup.reset()
        _uninstall_threaded_pg()
        torch._C._distributed_c10d._set_thread_isolation_mode(False)
        sys.excepthook = hook
    real = [e for e in errors if e is not None and not isinstance(e, SystemExit)]
    if real:
        raise real[0]
    if hung or any(e is not None for e in errors):
        raise AssertionError(f"ranks {hung} hung, errors {errors}")
    return results


# ------------------------------------------------------------------------------------------- hand values


def test_shard_range_hand_values():
    # rank r holds experts r·E/W … (r+1)·E/W − 1, as Python ints
    assert [shard_range(8, 4, r) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [shard_range(8, 2, r) for r in range(2)] == [(0, 4), (4, 8)]
    assert [shard_range(6, 3, r) for r in range(3)] == [(0, 2), (2, 4), (4, 6)]
    assert shard_range(8, 1, 0) == (0, 8)  # one rank holds everything
    assert shard_range(8, 8, 7) == (7, 8)
    assert all(type(v) is int for w in (1, 2, 4, 8) for r in range(w) for v in shard_range(8, w, r))
    for world_size in (3, 5, 0, -1):  # 8 experts on 3 ranks: not a whole number of experts per rank
        with pytest.raises(ValueError, match=r"divisible.*\[1, 2, 4, 8\]"):
            shard_range(8, world_size, 0)


def test_expected_remote_fraction_hand_values():
    assert expected_remote_fraction(1) == 0.0
    assert expected_remote_fraction(2) == 0.5
    assert expected_remote_fraction(4) == 0.75
    assert expected_remote_fraction(8) == 0.875
    assert math.isnan(expected_remote_fraction(0))
    assert math.isnan(expected_remote_fraction(-2))


# -------------------------------------------------------------------------------- against one process

# Layer configurations: every CPU backend (loop, torch, grouped_mm), every auxiliary-loss term, capacity
# drops, and routers whose routing has non-assignments (expert choice, group capacity).
CASES = [
    dict(d_model=8, d_ff=12, num_experts=4, top_k=2, router="topk", aux_loss_coef=0.01, z_loss_coef=0.001,
         importance_loss_coef=0.1),
    dict(d_model=8, d_ff=12, num_experts=4, top_k=2, router="noisy_topk", expert="mlp", capacity_factor=1.0,
         aux_loss_coef=0.01, z_loss_coef=0.001, importance_loss_coef=0.1, load_loss_coef=0.1),
    dict(d_model=8, d_ff=12, num_experts=4, router="switch", capacity_factor=1.0, backend="loop",
         aux_loss_coef=0.3),
    dict(d_model=8, d_ff=12, num_experts=4, top_k=2, router="expert_choice", backend="grouped_mm", d_out=4,
         aux_loss_coef=0.05, z_loss_coef=0.01),
    # a router that owns its capacity (one token per group here, so it never drops): the layer's
    # capacity_factor must not be applied a second time to the plan
    dict(d_model=8, d_ff=12, num_experts=4, router="group_capacity", capacity_factor=1.0,
         router_options={"group_size": 1}),
    # a router that drops by marking entries not valid: the load-balancing term counts valid entries only
    dict(d_model=8, d_ff=12, num_experts=4, top_k=2, router="group_capacity", router_options={"expert_capacity": 2},
         aux_loss_coef=0.5),
]


def _setup(cases, world_size, seed=0, shape=None, prepare=None):
    """Layers (one copy per rank, made before any forward), inputs, and the single-process reference."""
    layers, per_rank, refs = [], [], []
    for c, kw in enumerate(cases):
        torch.manual_seed(seed + c)
        layer = MoELayer(**kw)
        with torch.no_grad():
            for p in layer.router.parameters():
                p.normal_(0.0, 1.0)  # a sharp, unbalanced routing: real drops and unequal traffic
            if prepare is not None:
                prepare(layer)
        layer.eval()  # the noisy router adds no noise: identical routing on every rank and in the reference
        copies = [copy.deepcopy(layer) for _ in range(world_size)]
        inputs = []
        for r in range(world_size):
            g = torch.Generator().manual_seed(100 * (seed + c) + r)
            n = 10 + 3 * r  # uneven token counts, never d_model
            lead = (n,) if shape is None else shape(r)
            inputs.append((torch.randn(*lead, layer.d_model, generator=g),
                           torch.randn(*lead, layer.d_out, generator=g)))
        xs = [x.clone().requires_grad_(True) for x, _ in inputs]
        total, outs = 0.0, []
        for x, (_, target) in zip(xs, inputs):
            y, info = layer(x, return_info=True)
            outs.append((y.detach(), info.aux_loss.detach(), info.plan.counts.clone(), info.plan.dropped_assignments))
            total = total + (y * target).sum()
        total.backward()
        refs.append(dict(
            outs=outs, grad_x=[x.grad for x in xs],
            experts={n: p.grad.clone() for n, p in layer.experts.named_parameters()},
            router=[None if p.grad is None else p.grad.clone() for p in layer.router.parameters()],
            state={n: p.detach().clone() for n, p in layer.experts.named_parameters()},
        ))
        layers.append(copies)
        per_rank.append(inputs)
    return layers, per_rank, refs


def _ep_rank(rank, world_size, layers, per_rank, group_ranks=None):
    group = None
    if group_ranks is not None:  # every rank creates every group, in the same order
        groups = [dist.new_group(ranks) for ranks in group_ranks]
        group = next(g for g, ranks in zip(groups, group_ranks) if rank in ranks)
    out = []
    for copies, inputs in zip(layers, per_rank):
        ep = ExpertParallelMoE.from_layer(copies[rank], group=group).eval()
        fresh = (ep.last_traffic, ep.last_plan)
        me = rank if group is None else dist.get_rank(group)
        x = inputs[me][0].clone().requires_grad_(True)
        y, info = ep(x, return_info=True)  # the layer's MoEInfo
        routing, plan, aux = info.routing, info.plan, info.aux_loss
        last_plan, traffic = ep.last_plan, ep.last_traffic
        plain = ep(x)  # return_info=False: the output alone
        (y * inputs[me][1]).sum().backward()
        ep.sync_router_grads()
        out.append(dict(
            fresh=fresh, y=y.detach(), plain=plain.detach(), aux=aux.detach(), grad_x=x.grad,
            experts={n: p.grad for n, p in ep.experts.named_parameters()},
            router=[p.grad for p in ep.router.parameters()], state=ep.full_expert_state(),
            traffic=traffic, last_plan=last_plan, plan=plan, routing=routing,
            offset=ep.expert_offset, local=ep.local_experts, bank_size=ep.experts.num_experts,
            repr=ep.extra_repr(), world=(ep.rank, ep.world_size),
        ))
    return out


def _check(results, refs, cases, world_size):
    """``results[i]`` is rank ``i`` of the expert-parallel group; ``refs`` come from :func:`_setup`."""
    for i, rank_results in enumerate(results):
        for kw, ref, r in zip(cases, refs, rank_results):
            y_ref, aux_ref, counts_ref, dropped_ref = ref["outs"][i]
            E, m = kw["num_experts"], kw["num_experts"] // world_size
            lo, hi = i * m, (i + 1) * m
            assert r["fresh"] == (None, None), kw
            assert r["world"] == (i, world_size), kw
            assert (r["offset"], r["local"], r["bank_size"]) == (lo, m, m), kw
            assert r["repr"] == f"rank={i}/{world_size}, experts {lo}...{hi - 1} of {E}, top_k={kw.get('top_k', 1)}"
            assert r["y"].shape == y_ref.shape, kw
            torch.testing.assert_close(r["y"], y_ref, **TOL, msg=str(kw))
            torch.testing.assert_close(r["plain"], y_ref, **TOL, msg=str(kw))
            torch.testing.assert_close(r["grad_x"], ref["grad_x"][i], **TOL, msg=str(kw))
            torch.testing.assert_close(r["aux"], aux_ref, rtol=1e-6, atol=1e-9, msg=str(kw))
            assert r["experts"].keys() == ref["experts"].keys()
            for name, grad in r["experts"].items():
                torch.testing.assert_close(grad, ref["experts"][name][lo:hi], **TOL, msg=f"{kw} {name}")
            assert len(r["router"]) == len(ref["router"])
            assert any(g is not None for g in ref["router"]), kw  # the router really gets a gradient
            for grad, grad_ref in zip(r["router"], ref["router"]):  # summed over the ranks
                assert (grad is None) == (grad_ref is None), kw  # (the noise weights get none in eval)
                if grad is not None:
                    torch.testing.assert_close(grad, grad_ref, **TOL, msg=str(kw))
            assert r["state"].keys() == ref["state"].keys()
            for name, full in r["state"].items():
                assert torch.equal(full, ref["state"][name]), (kw, name)
            assert r["last_plan"] is r["plan"], kw
            assert torch.equal(r["plan"].counts, counts_ref) and r["plan"].dropped_assignments == dropped_ref, kw
            # rows to each rank = kept assignments to that rank's experts; bytes exclude the rank's own rows
            sent = counts_ref.view(world_size, m).sum(1).tolist()
            recv = [ref["outs"][j][2].view(world_size, m).sum(1).tolist()[i] for j in range(world_size)]
            d = kw["d_model"]
            assert r["traffic"] == {"sent_rows": sent, "recv_rows": recv,
                                    "sent_remote_bytes": (sum(sent) - sent[i]) * d * 4,
                                    "recv_remote_bytes": (sum(recv) - recv[i]) * d * 4}, kw


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_threaded_ranks_equal_single_process(world_size):
    layers, per_rank, refs = _setup(CASES, world_size)
    # the cases really exercise drops and remote traffic
    assert any(out[3] > 0 for ref in refs for out in ref["outs"])
    results = run_ranks(_ep_rank, world_size, layers, per_rank)
    _check(results, refs, CASES, world_size)
    if world_size > 1:
        assert all(r["traffic"]["sent_remote_bytes"] > 0 for rank in results for r in rank)


def test_batched_and_single_token_inputs():
    """``x [..., d_model]``: a [2, n, d] batch and a single token [d] give MoELayer's output shape and values."""
    cases = CASES[:1]
    for shape in (lambda r: (2, 5 + r), lambda r: ()):
        layers, per_rank, refs = _setup(cases, 2, seed=7, shape=shape)
        _check(run_ranks(_ep_rank, 2, layers, per_rank), refs, cases, 2)


def test_experts_nobody_picks():
    """The last two experts get no token on any rank: the rank holding them receives rows for only two of
    its four local experts."""
    cases = [dict(d_model=8, d_ff=12, num_experts=8, top_k=1, router_bias=True)]

    def never_last_two(layer):
        layer.router.gate.bias[-2:] = -1e4

    layers, per_rank, refs = _setup(cases, 2, seed=9, prepare=never_last_two)
    assert all(out[2][-2:].sum() == 0 and out[2][4:6].sum() > 0 for out in refs[0]["outs"])
    _check(run_ranks(_ep_rank, 2, layers, per_rank), refs, cases, 2)


def test_two_groups_in_one_world():
    """Ranks {0,1} and {2,3} shard two *different* layers in their own groups: every collective (config
    check, counts, dispatch, combine, router all-reduce, state gather) stays inside the group."""
    cases_a = [CASES[0]]
    cases_b = [dict(CASES[2], d_model=12, num_experts=8)]
    layers_a, inputs_a, refs_a = _setup(cases_a, 2, seed=3)
    layers_b, inputs_b, refs_b = _setup(cases_b, 2, seed=5)

    def fn(rank, world_size):
        if rank < 2:
            return _ep_rank(rank, world_size, [[*layers_a[0], None, None]], inputs_a, [[0, 1], [2, 3]])
        return _ep_rank(rank, world_size, [[None, None, *layers_b[0]]], inputs_b, [[0, 1], [2, 3]])

    results = run_ranks(fn, 4)
    _check(results[:2], refs_a, cases_a, 2)
    _check(results[2:], refs_b, cases_b, 2)


# ------------------------------------------------------------------------------------ construction


def _mismatch(rank, world_size, kwargs_by_rank, how):
    layer = MoELayer(**kwargs_by_rank[rank])
    try:
        if how == "init":
            ExpertParallelMoE(layer)
        elif how == "unchecked":
            ExpertParallelMoE.from_layer(layer, check_config=False)
            ExpertParallelMoE(layer, check_config=False)
            return None
        else:
            ExpertParallelMoE.from_layer(layer)
    except ValueError as exc:
        return str(exc)
    return None


BASE = dict(d_model=8, d_ff=12, num_experts=4, top_k=1, d_out=8)
MISMATCHES = [  # (rank 1's change, the field list rank 0 reports)
    (dict(num_experts=8), "num_experts: rank 0 has 4, rank 1 has 8"),
    (dict(top_k=2), "top_k: rank 0 has 1, rank 1 has 2"),
    (dict(d_model=12), "d_model: rank 0 has 8, rank 1 has 12"),
    (dict(d_ff=16), "d_ff: rank 0 has 12, rank 1 has 16"),
    (dict(d_out=4), "d_out: rank 0 has 8, rank 1 has 4"),
    (dict(router="switch"), "router: rank 0 has 'topk', rank 1 has 'switch'"),
    (dict(expert="mlp"), "expert: rank 0 has 'swiglu', rank 1 has 'mlp'"),
    (dict(capacity_factor=1.25), "capacity_factor: rank 0 has None, rank 1 has 1.25"),
    (dict(d_model=12, d_ff=16), "d_model: rank 0 has 8, rank 1 has 12, d_ff: rank 0 has 12, rank 1 has 16"),
]


@pytest.mark.parametrize("change, fields", MISMATCHES, ids=[",".join(change) for change, _ in MISMATCHES])
def test_ranks_that_disagree_are_named(change, fields):
    kwargs = [BASE, {**BASE, **change}]
    msgs = run_ranks(_mismatch, 2, kwargs, "from_layer")
    assert msgs[0] is not None and f"configuration ({fields});" in msgs[0], msgs
    assert msgs[1] is not None and "rank 1 has" in msgs[1] and "rank 0 has" in msgs[1], msgs


def test_config_check_defaults_and_opt_out():
    kwargs = [BASE, {**BASE, "capacity_factor": 2.0}]
    assert all("disagree" in m for m in run_ranks(_mismatch, 2, kwargs, "init"))       # on by default
    assert run_ranks(_mismatch, 2, kwargs, "unchecked") == [None, None]              # check_config=False
    assert run_ranks(_mismatch, 2, [BASE, BASE], "from_layer") == [None, None]       # agreeing ranks pass


def _construction(rank, world_size):
    layer = MoELayer(d_model=8, d_ff=12, num_experts=4, top_k=2)
    with pytest.raises(TypeError, match=r"\bcheck_config must be True or False"):
        ExpertParallelMoE.from_layer(layer, check_config="yes")
    with pytest.raises(ValueError, match=r"router='soft'"):
        ExpertParallelMoE.from_layer(MoELayer(d_model=8, d_ff=12, num_experts=4, router="soft"))
    for name in ("topk", "switch", "expert_choice", "hash"):  # every other router is accepted
        ExpertParallelMoE.from_layer(MoELayer(d_model=8, d_ff=12, num_experts=4, router=name))
    ep = ExpertParallelMoE.from_layer(layer)
    # the router is a copy: training the expert-parallel one leaves the layer alone
    for p, q in zip(ep.router.parameters(), layer.router.parameters()):
        assert p is not q and p.data_ptr() != q.data_ptr() and torch.equal(p, q)
    with torch.no_grad():
        next(ep.router.parameters()).add_(1.0)
    assert not torch.equal(next(ep.router.parameters()), next(layer.router.parameters()))
    # the local bank is an ordinary module: state dict, dtype moves
    state = ep.state_dict()
    m = 4 // world_size
    assert {k: tuple(v.shape) for k, v in state.items() if k.startswith("experts.")} == {
        "experts.w_gate": (m, 8, 12), "experts.w_up": (m, 8, 12), "experts.w_down": (m, 12, 8)}
    assert [n for n, _ in ep.experts.named_modules()] == [""] and list(ep.experts.buffers()) == []
    ep.double()
    assert all(p.dtype == torch.float64 for p in ep.parameters())
    # frozen experts stay frozen in the shard
    layer.experts.requires_grad_(False)
    frozen = ExpertParallelMoE.from_layer(layer)
    assert [p.requires_grad for p in frozen.experts.parameters()] == [False] * 3
    assert all(p.requires_grad for p in frozen.router.parameters())
    # bad inputs fail before any collective, as MoELayer's do
    with pytest.raises(TypeError, match="torch.Tensor"):
        frozen([[0.0] * 8])
    for bad in (torch.zeros(()), torch.zeros(3, 7), torch.zeros(8, 3)):
        with pytest.raises(ValueError, match="d_model=8"):
            frozen(bad)
    return True


@pytest.mark.parametrize("world_size", [1, 2])
def test_construction_and_bad_input(world_size):
    assert run_ranks(_construction, world_size) == [True] * world_size


def _sync_rank(rank, world_size):
    ep = ExpertParallelMoE.from_layer(MoELayer(d_model=8, d_ff=12, num_experts=4, top_k=1, router_bias=True))
    ep.sync_router_grads()  # no gradients yet: nothing to reduce, no error
    gate = ep.router.gate
    gate.weight.grad = torch.full_like(gate.weight, float(rank + 1))
    gate.bias.grad = None  # a parameter without a gradient is skipped (it is None on every rank)
    ep.sync_router_grads()
    return gate.weight.grad.clone(), gate.bias.grad


def test_sync_router_grads_sums_over_ranks():
    results = run_ranks(_sync_rank, 4)
    for weight_grad, bias_grad in results:
        assert torch.equal(weight_grad, torch.full_like(weight_grad, 1.0 + 2.0 + 3.0 + 4.0))
        assert bias_grad is None


# ----------------------------------------------------------------------------------- one gloo rank


@pytest.fixture
def gloo_rank(tmp_path):
    """This process as the only rank of a gloo group, for the duration of one test."""
    if not dist.is_gloo_available():
        pytest.skip("needs gloo")
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_single_gloo_rank_equals_layer(gloo_rank):
    """The real gloo backend, one rank: the expert-parallel layer is the layer itself."""
    layers, per_rank, refs = _setup(CASES, 1, seed=11)
    _check([_ep_rank(0, 1, layers, per_rank)], refs, CASES, 1)


@pytest.mark.skipif(not kernels.available(), reason="triton is not installed")
def test_single_gloo_rank_triton_backend(gloo_rank):
    """The Triton backend reads the plan fields the other backends ignore (``slot_index``, ``kept``). Its
    interpreter is not thread-safe, so this runs on the main thread, forward only (the interpreter is slow)."""
    torch.manual_seed(0)
    layer = MoELayer(d_model=8, d_ff=12, num_experts=4, top_k=2, backend="triton").eval()
    x = torch.randn(6, 8)
    with torch.no_grad():
        y_ref = layer(x)
        y = ExpertParallelMoE.from_layer(layer)(x)
    torch.testing.assert_close(y, y_ref, **TOL)


def _ep_rank_default_meta(rank, world_size, layers, per_rank):
    with torch.device("meta"):
        return _ep_rank(rank, world_size, layers, per_rank)


def test_tensors_follow_the_input_device_not_the_default_device(gloo_rank):
    """Every tensor the expert-parallel layer creates goes on the input's device: under ``meta`` as the
    default device (as ``torch.set_default_device("cuda")`` would be) a tensor made without ``device=``
    breaks the forward pass or its result."""
    layers, per_rank, refs = _setup(CASES, 1, seed=11)
    _check([_ep_rank_default_meta(0, 1, layers, per_rank)], refs, CASES, 1)
