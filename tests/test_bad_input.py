"""Every bad argument fails loudly, naming the argument and the accepted values."""
import re

import pytest
import torch

from moe_lib import MoELayer

GOOD = dict(d_model=8, d_ff=16, num_experts=4, top_k=2)


@pytest.mark.parametrize(
    "changes, error, words",
    [
        ({"num_experts": 0}, ValueError, ["num_experts", ">= 1"]),
        ({"num_experts": -3}, ValueError, ["num_experts", ">= 1"]),
        ({"top_k": 0}, ValueError, ["top_k", "between 1 and 4"]),
        ({"top_k": 5}, ValueError, ["top_k", "between 1 and 4"]),
        ({"d_model": 0}, ValueError, ["d_model", ">= 1"]),
        ({"d_ff": 0}, ValueError, ["d_ff", ">= 1"]),
        ({"d_model": 8.0}, TypeError, ["d_model", "integer"]),
        ({"d_ff": "16"}, TypeError, ["d_ff", "integer"]),
        ({"num_experts": 4.5}, TypeError, ["num_experts", "integer"]),
        ({"top_k": True}, TypeError, ["top_k", "integer"]),
        ({"router": "nope"}, ValueError, ["router", "'dense'", "'topk'"]),
        ({"expert": "conv"}, ValueError, ["expert", "'linear'", "'mlp'", "'swiglu'"]),
        ({"backend": "cuda"}, ValueError, ["backend", "'loop'", "'torch'"]),
        ({"router": 3}, TypeError, ["router"]),
        ({"capacity_factor": 0}, ValueError, ["capacity_factor", "> 0"]),
        ({"capacity_factor": -1.0}, ValueError, ["capacity_factor", "> 0"]),
        ({"capacity_factor": "1"}, TypeError, ["capacity_factor"]),
        ({"activation": "swish"}, ValueError, ["activation", "'gelu'"]),
        ({"expert": "swiglu", "activation": "relu"}, ValueError, ["activation", "expert='swiglu'", "'glu'", "'mlp'"]),
        ({"router": "dense", "top_k": 2}, ValueError, ["top_k", "num_experts"]),
        ({"aux_loss_coef": -0.1}, ValueError, ["aux_loss_coef"]),
        ({"normalize_weights": "yes"}, TypeError, ["normalize_weights"]),
        ({"z_loss_coef": -1e-3}, ValueError, ["z_loss_coef", ">= 0"]),
        ({"importance_loss_coef": -1.0}, ValueError, ["importance_loss_coef", ">= 0"]),
        ({"load_loss_coef": -1.0}, ValueError, ["load_loss_coef", ">= 0"]),
        ({"load_loss_coef": 0.1}, ValueError, ["load_loss_coef", "noisy_topk", "router='topk'"]),
        ({"aux_loss_coef": "0.01"}, TypeError, ["aux_loss_coef"]),
        ({"router_dtype": "float16"}, ValueError, ["router_dtype", "'float32'", "'bfloat16'"]),
        ({"router_bias": 1}, TypeError, ["router_bias"]),
        ({"router_options": [("hash_bits", 4)]}, TypeError, ["router_options", "dict", "list"]),
        ({"router_options": {"noise": 1}}, ValueError, ["router_options", "'noise'", "router='topk'", "'bias'",
                                                         "'normalize'", "'router_dtype'"]),
        ({"router_options": {"top_k": 1}}, ValueError, ["router_options", "'top_k'"]),
        ({"router_options": {"d_model": 1}}, ValueError, ["router_options", "'d_model'"]),
        ({"router_options": {"self": 1}}, ValueError, ["router_options", "'self'"]),
        ({"router_options": {"num_experts": 1}}, ValueError, ["router_options", "'num_experts'"]),
        ({"expert": "linear", "activation": "relu"}, ValueError, ["expert='linear'"]),
        ({"d_out": 0}, ValueError, ["d_out", ">= 1"]),
        # an option the router would ignore is refused, never dropped silently
        ({"router": "expert_choice", "normalize_weights": True}, ValueError,
         ["normalize_weights", "router='expert_choice'", "'topk'", "'switch'", "'group_limited'"]),
        ({"router": "dense", "top_k": None, "normalize_weights": False}, ValueError,
         ["normalize_weights", "router='dense'"]),
        ({"router": "base", "top_k": 1, "normalize_weights": True}, ValueError, ["normalize_weights"]),
        ({"router": "gshard", "normalize_weights": False}, ValueError,
         ["normalize_weights must be True", "gshard"]),
        ({"router": "hash", "top_k": 1, "router_bias": True}, ValueError, ["router_bias must be False", "hash"]),
        ({"router": "soft", "top_k": None, "capacity_factor": 1.0}, ValueError,
         ["capacity_factor has no effect", "router='soft'"]),
    ],
)
def test_constructor_rejects(changes, error, words):
    with pytest.raises(error) as excinfo:
        MoELayer(**{**GOOD, **changes})
    message = str(excinfo.value)
    for word in words:  # whole words: "XXd_modelXX" does not name d_model
        assert re.search(rf"(?<![A-Za-z0-9_]){re.escape(word)}(?![A-Za-z0-9_])", message), f"{word!r} not in {message!r}"


@pytest.mark.parametrize("shape", [(3, 7), (2, 3, 9), (8,)[:0] + (5, 1)])
def test_forward_rejects_wrong_last_dimension(shape):
    layer = MoELayer(**GOOD)
    with pytest.raises(ValueError, match=r"d_model=8"):
        layer(torch.randn(shape))


def test_forward_rejects_scalar_and_non_tensor():
    layer = MoELayer(**GOOD)
    with pytest.raises(ValueError, match="d_model"):
        layer(torch.tensor(1.0))
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer([[0.0] * 8])


def test_defaults_for_top_k():
    assert MoELayer(8, 16, 4, router="dense").top_k == 4
    assert MoELayer(8, 16, 4).top_k == 2
    assert MoELayer(8, 16, 1).top_k == 1


# ------------------------------------------------------------------ rough edges a user hits (issue 16)
def test_backend_assignment_is_checked_at_once():
    layer = MoELayer(8, 16, 4)
    with pytest.raises(ValueError, match=r"unknown backend 'cuda'; accepted values: 'grouped_mm', 'loop', 'torch', 'triton'"):
        layer.backend = "cuda"
    assert layer.backend == "torch"  # unchanged by the refused assignment
    layer.backend = "loop"
    assert layer.backend == "loop" and "backend='loop'" in repr(layer)


def test_integer_input_is_refused_naming_x():
    layer = MoELayer(8, 16, 4)
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor .*got dtype torch.int64"):
        layer(torch.randint(0, 5, (3, 8)))


@pytest.mark.parametrize("backend", ["grouped_mm", "triton"])
def test_expert_dropout_on_a_backend_it_cannot_use_is_named(backend):
    from moe_lib.practice import add_expert_dropout

    layer = MoELayer(8, 16, 4, backend=backend)
    add_expert_dropout(layer, 0.1)
    with pytest.raises(ValueError, match=rf"backend='{backend}' cannot run DropoutExperts \(expert='swiglu'\); "
                                         r"it runs on backend in \['loop', 'torch'\]"):
        layer(torch.randn(3, 8))
    layer.backend = "torch"
    assert layer(torch.randn(3, 8)).shape == (3, 8)
