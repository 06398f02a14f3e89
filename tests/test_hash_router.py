"""Hand-checked cases for :class:`moe_lib.routers.HashRouter` (Roller et al. 2021): the content hash is the
sign pattern ``x · R > 0`` of a fixed random projection read as an integer (bit ``i`` worth ``2^i``), the
outputs follow the input's dtype (float32 at least) and device, and the hash costs ``2 · d · bits``
FLOPs per token. Expected codes are computed here in plain Python from the router's projection ``R``.
"""
from __future__ import annotations

import torch

from moe_lib import MoELayer
from moe_lib.routers import HashRouter


def _codes_by_hand(x: torch.Tensor, projection: torch.Tensor) -> list[int]:
    rows, proj = x.double().tolist(), projection.double().tolist()
    bits = len(proj[0])
    codes = []
    for row in rows:
        dots = [sum(row[j] * proj[j][i] for j in range(len(row))) for i in range(bits)]
        codes.append(sum(2**i for i, v in enumerate(dots) if v > 0))
    return codes


def test_content_ids_are_the_sign_bits_of_the_projection():
    router = HashRouter(6, 4, hash_bits=5)
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    proj = (x.double() @ router.projection.double()).abs()
    assert proj.min() > 1e-4  # no sign is a rounding question
    assert router.content_ids(x).tolist() == _codes_by_hand(x, router.projection)


def test_content_ids_of_small_inputs_still_count_every_positive_projection():
    # |x · R| < 1 everywhere: a threshold other than 0 would lose the bits
    router = HashRouter(6, 4, hash_bits=5)
    x = 0.01 * torch.randn(20, 6, generator=torch.Generator().manual_seed(1))
    assert (x @ router.projection).abs().max() < 1
    codes = router.content_ids(x).tolist()
    assert codes == _codes_by_hand(x, router.projection)
    assert max(codes) > 0


def test_zero_token_has_code_zero():
    # x · R = 0 is not > 0: no bit is set
    router = HashRouter(6, 4, hash_bits=5)
    assert router.content_ids(torch.zeros(3, 6)).tolist() == [0, 0, 0]


def test_outputs_follow_the_input_dtype_float32_at_least():
    router = HashRouter(4, 3)
    for dtype, expected in ((torch.float64, torch.float64), (torch.float32, torch.float32),
                            (torch.bfloat16, torch.float32)):
        for ids in (None, torch.tensor([5, 7])):
            routing = router(torch.randn(2, 4).to(dtype), token_ids=ids)
            assert routing.logits.dtype == expected
            assert routing.probs.dtype == expected
            assert routing.weights.dtype == expected
            assert routing.weights.tolist() == [[1.0], [1.0]]
            torch.testing.assert_close(routing.probs, torch.full((2, 3), 1 / 3, dtype=expected))


def test_outputs_are_on_the_input_device():
    # the meta device stands in for an accelerator: a tensor left on the CPU shows up as device "cpu"
    router = HashRouter(4, 3).to("meta")
    x = torch.empty(5, 4, device="meta")
    for ids in (None, torch.arange(5)):
        routing = router(x, token_ids=ids)
        for name in ("logits", "probs", "experts", "weights"):
            assert getattr(routing, name).device.type == "meta", name


def test_flops_per_token_is_the_projection():
    assert HashRouter(6, 4, hash_bits=5).flops_per_token() == 2 * 6 * 5
    assert HashRouter(3, 4).flops_per_token() == 2 * 3 * 8  # hash_bits defaults to 8
    layer = MoELayer(6, 4, 4, router="hash", expert="linear", router_options={"hash_bits": 5})
    assert layer.top_k == 1
    assert layer.active_flops_per_token() == 60 + 2 * 6 * 6
