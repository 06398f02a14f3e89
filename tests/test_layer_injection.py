"""A ready-made router or expert bank plugged into MoELayer (issue 16): the layer uses the very objects it is
given, computes what a layer built by name with the same weights computes, and refuses — naming the
argument — a part of the wrong size or an option that would configure a part it did not build."""
from __future__ import annotations

import pytest
import torch

from moe_lib import MoELayer
from moe_lib.experts import EXPERTS
from moe_lib.practice import DropoutExperts
from moe_lib.routers import ROUTERS, Router


@pytest.mark.parametrize("router, expert", [("switch", "mlp"), ("topk", "swiglu"), ("expert_choice", "glu"),
                                            ("soft", "linear"), ("noisy_topk", "swiglu")])
def test_ready_parts_compute_what_the_named_layer_computes(router, expert):
    torch.manual_seed(0)
    named = MoELayer(8, 16, 4, router=router, expert=expert, load_loss_coef=0.1 if router == "noisy_topk" else 0.0)
    ready = MoELayer(8, 16, 4, router=named.router, expert=named.experts,
                     load_loss_coef=0.1 if router == "noisy_topk" else 0.0)
    assert ready.router is named.router and ready.experts is named.experts
    assert ready.top_k == named.top_k and ready.capacity_factor == named.capacity_factor
    x = torch.randn(2, 6, 8)
    torch.manual_seed(1)
    y_named, info_named = named(x, return_info=True)
    torch.manual_seed(1)
    y_ready, info_ready = ready(x, return_info=True)
    torch.testing.assert_close(y_ready, y_named, rtol=0, atol=0)
    torch.testing.assert_close(info_ready.aux_loss, info_named.aux_loss, rtol=0, atol=0)
    assert repr(ready) == repr(named)


def test_a_capacity_owned_by_the_router_comes_from_it():
    router = ROUTERS["expert_choice"](8, 4, 2, capacity_factor=0.5)
    layer = MoELayer(8, 16, 4, router=router)
    assert layer.capacity_factor == 0.5
    assert MoELayer(8, 16, 4, router=router, capacity_factor=0.5).capacity_factor == 0.5
    with pytest.raises(ValueError, match=r"capacity_factor=2\.0: the ready-made ExpertChoiceRouter enforces its "
                                         r"own \(capacity_factor=0\.5\)"):
        MoELayer(8, 16, 4, router=router, capacity_factor=2.0)
    with pytest.raises(ValueError, match="capacity_factor has no effect on router='soft'"):
        MoELayer(8, 16, 4, router=ROUTERS["soft"](8, 4, 4), capacity_factor=1.0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(normalize_weights=True), r"normalize_weights=True configures a router built by name; router= is a "
                                   r"ready-made TopKRouter: set it there"),
    (dict(router_bias=True), r"router_bias=True configures a router"),
    (dict(router_dtype="bfloat16"), r"router_dtype='bfloat16' configures a router"),
    (dict(router_options={"x": 1}), r"router_options=\{'x': 1\} configures a router"),
    (dict(top_k=1), r"top_k=1 differs from the ready-made router's top_k=2; leave top_k None"),
])
def test_options_that_configure_a_router_are_refused_with_a_ready_one(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoELayer(8, 16, 4, router=ROUTERS["topk"](8, 4, 2), **kwargs)


def test_parts_of_the_wrong_size_are_refused_by_name():
    with pytest.raises(ValueError, match="router has d_model=6, the layer d_model=8"):
        MoELayer(8, 16, 4, router=ROUTERS["topk"](6, 4, 2))
    with pytest.raises(ValueError, match="router has num_experts=5, the layer num_experts=4"):
        MoELayer(8, 16, 4, router=ROUTERS["topk"](8, 5, 2))
    with pytest.raises(ValueError, match="expert bank has num_experts=3, the layer num_experts=4"):
        MoELayer(8, 16, 4, expert=EXPERTS["mlp"](3, 8, 16))
    with pytest.raises(ValueError, match="expert bank has d_model=6, the layer d_model=8"):
        MoELayer(8, 16, 4, expert=EXPERTS["mlp"](4, 6, 16))
    with pytest.raises(ValueError, match="expert bank has d_ff=32, the layer d_ff=16"):
        MoELayer(8, 16, 4, expert=EXPERTS["swiglu"](4, 8, 32))
    with pytest.raises(ValueError, match="expert bank has d_out=8, the layer d_out=5"):
        MoELayer(8, 16, 4, expert=EXPERTS["swiglu"](4, 8, 16), d_out=5)
    with pytest.raises(ValueError, match="activation='relu' configures experts built by name"):
        MoELayer(8, 16, 4, expert=EXPERTS["mlp"](4, 8, 16), activation="relu")
    # linear experts have no hidden width: d_ff is not compared
    assert MoELayer(8, 99, 4, expert=EXPERTS["linear"](4, 8, 16)).experts.kind == "linear"
    with pytest.raises(ValueError, match="unknown router 'nope'"):
        MoELayer(8, 16, 4, router="nope")


def test_a_ready_bank_the_backend_cannot_run_is_refused_at_construction():
    bank = DropoutExperts(EXPERTS["swiglu"](4, 8, 16), 0.1)
    with pytest.raises(ValueError, match=r"backend='grouped_mm' cannot run DropoutExperts"):
        MoELayer(8, 16, 4, expert=bank, backend="grouped_mm")
    layer = MoELayer(8, 16, 4, expert=bank, backend="loop")
    assert layer.experts is bank and layer.d_out == 8


# ------------------------------------------------------------------------------------ the dispatcher seam
from moe_lib.dispatch import Dispatcher, SlotDispatcher, TokenDispatcher  # noqa: E402


def test_each_router_picks_its_dispatcher_and_the_layer_reports_its_capacity():
    assert isinstance(MoELayer(8, 16, 4, router="soft").dispatcher, SlotDispatcher)
    switch = MoELayer(8, 16, 4, router="switch", capacity_factor=1.25)
    assert isinstance(switch.dispatcher, TokenDispatcher) and switch.dispatcher.capacity_factor == 1.25
    assert switch.capacity_factor == 1.25
    choice = MoELayer(8, 16, 4, router="expert_choice", capacity_factor=0.5)
    assert choice.dispatcher.capacity_factor is None  # the router enforces it: the plan must not apply it twice
    assert choice.capacity_factor == 0.5
    assert "capacity_factor=1.25" in repr(switch) and "(dispatcher): TokenDispatcher(capacity_factor=1.25)" in repr(switch)


def test_a_ready_dispatcher_computes_what_the_capacity_argument_computes():
    torch.manual_seed(0)
    named = MoELayer(8, 16, 4, router="switch", capacity_factor=0.75)
    ready = MoELayer(8, 16, 4, router=named.router, expert=named.experts, dispatcher=TokenDispatcher(0.75))
    x = torch.randn(40, 8)
    y_named, info_named = named(x, return_info=True)
    y_ready, info_ready = ready(x, return_info=True)
    assert info_ready.plan.dropped_assignments == info_named.plan.dropped_assignments > 0
    torch.testing.assert_close(y_ready, y_named, rtol=0, atol=0)


class _Recording(Dispatcher):
    """A new way of dispatching is one class: this one wraps token dispatch and records what it planned."""

    def __init__(self, capacity_factor=None):
        super().__init__()
        self.inner, self.calls = TokenDispatcher(capacity_factor), []

    @property
    def capacity_factor(self):
        return self.inner.capacity_factor

    def forward(self, experts, tokens, routing, backend):
        y, plan = self.inner(experts, tokens, routing, backend)
        self.calls.append((tokens.shape[0], int(plan.counts.sum())))
        return 2 * y, plan


def test_the_layer_forward_goes_through_the_dispatcher_it_holds():
    torch.manual_seed(0)
    plain = MoELayer(8, 16, 4, top_k=2)
    recording = MoELayer(8, 16, 4, router=plain.router, expert=plain.experts, dispatcher=_Recording())
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(recording(x), 2 * plain(x), rtol=0, atol=0)
    assert recording.dispatcher.calls == [(15, 30)]


class _Half(TokenDispatcher):
    def num_local_experts(self, num_experts):
        return num_experts // 2


def test_a_ready_dispatcher_is_checked_with_the_options_and_the_bank():
    with pytest.raises(TypeError, match="dispatcher must be a moe_lib.dispatch.Dispatcher or None, got str"):
        MoELayer(8, 16, 4, dispatcher="all_to_all")
    with pytest.raises(ValueError, match=r"capacity_factor=1\.0 configures the dispatcher the layer builds; "
                                         r"dispatcher= is a ready-made TokenDispatcher: set it there"):
        MoELayer(8, 16, 4, capacity_factor=1.0, dispatcher=TokenDispatcher(1.0))
    with pytest.raises(ValueError, match=r"expert bank has num_experts=4, the _Half needs 2 of the layer's "
                                         r"num_experts=4"):
        MoELayer(8, 16, 4, dispatcher=_Half())
    half = MoELayer(8, 16, 4, expert=EXPERTS["swiglu"](2, 8, 16), dispatcher=_Half())
    assert half.experts.num_experts == 2 and half.num_experts == 4


def test_router_specific_state_lives_with_the_router():
    """Issue 16: fields one router produces are on its own Routing subclass; the layer asks the router
    (FLOPs, load loss) and the dispatcher (what the experts see) instead of branching on names."""
    from moe_lib.routers import NoisyRouting, Routing, SoftRouting

    x = torch.randn(6, 8)
    plain = MoELayer(8, 16, 4, router="topk")(x, return_info=True)[1].routing
    noisy = MoELayer(8, 16, 4, router="noisy_topk")(x, return_info=True)[1].routing
    soft_layer = MoELayer(8, 16, 4, router="soft", router_options={"slots_per_expert": 2})
    soft = soft_layer(x, return_info=True)[1].routing
    assert type(plain) is Routing and not hasattr(plain, "noise_std") and not hasattr(plain, "dispatch")
    assert isinstance(noisy, NoisyRouting) and noisy.noise_std.shape == (6, 4)
    assert isinstance(soft, SoftRouting) and soft.is_soft and not plain.is_soft and soft.slots_per_expert == 2
    slots = soft_layer.dispatcher.expert_inputs(x, soft)
    torch.testing.assert_close(slots, soft.dispatch.t() @ x)
    assert MoELayer(8, 16, 4).dispatcher.expert_inputs(x, plain) is x
    with pytest.raises(ValueError, match=r"load_loss_coef > 0 needs a router with Shazeer's smooth load .*"
                                         r"router in \['noisy_topk'\], got router='switch'"):
        MoELayer(8, 16, 4, router="switch", load_loss_coef=0.1)
    assert soft_layer.active_flops_per_token(num_tokens=4) == (
        soft_layer.router.flops_per_token() + 8 / 4 * soft_layer.experts.flops_per_token())


@pytest.mark.parametrize("router, coef", [("topk", 0.01), ("switch", 0.01), ("noisy_topk", 0.01), ("gshard", 0.01),
                                          ("dense", 0.0), ("expert_choice", 0.0), ("hash", 0.0), ("base", 0.0),
                                          ("soft", 0.0), ("auxfree", 0.0), ("group_limited", 0.0)])
def test_the_load_balancing_default_is_the_routers(router, coef):
    """Issue 16: 0.01 applied by default to routers the Switch loss cannot balance (dense: the loss is the
    constant 1) or that balance otherwise; now each router class says what its default is."""
    layer = MoELayer(8, 16, 4, router=router)
    assert layer.aux_loss_coef == coef == ROUTERS[router].default_aux_loss_coef
    assert MoELayer(8, 16, 4, router=router, aux_loss_coef=0.5).aux_loss_coef == 0.5  # an explicit value wins
    _, info = layer(torch.randn(5, 8), return_info=True, token_ids=torch.arange(5))
    assert info.aux_losses.computed() == (("load_balance",) if coef else ())


class _SigmoidTopK(Router):
    """A new top-k router is one class: sigmoid scores, top-k, renormalised (DeepSeek-V3 without groups or
    bias). Nothing else in the library changes to use it."""

    name = "sigmoid_topk"

    def forward(self, x, token_ids=None):
        from moe_lib.routers import Routing

        logits = self.scores(x)
        scores = logits.sigmoid()
        top, experts = scores.topk(self.top_k, dim=-1)
        return Routing(logits=logits, probs=scores / scores.sum(-1, keepdim=True), experts=experts,
                       weights=top / top.sum(-1, keepdim=True))


def test_a_new_router_is_one_class():
    torch.manual_seed(0)
    router = _SigmoidTopK(8, 4, 2)
    layer = MoELayer(8, 16, 4, router=router, capacity_factor=1.0)
    x = torch.randn(10, 8, requires_grad=True)
    y, info = layer(x, return_info=True)
    reference = MoELayer(8, 16, 4, router=router, expert=layer.experts, capacity_factor=1.0, backend="loop")
    torch.testing.assert_close(y, reference(x))
    assert info.aux_loss > 0 and set(info.aux_losses.computed()) == {"load_balance"}  # Router's default 0.01
    assert info.stats()["tokens"] == 10 and info.plan.capacity == 5
    (y.square().sum() + info.aux_loss).backward()
    assert router.gate.weight.grad.abs().sum() > 0
