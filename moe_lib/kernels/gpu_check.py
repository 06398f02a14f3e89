"""Check the Triton path on the device it will be timed on: accuracy, determinism, no host synchronisation.

The interpreter tests (``tests/test_kernels.py``) cover the logic on the CPU in float32/float16; this check
covers what only a GPU can show, at the shapes of the benchmark (``T`` small enough to run in seconds):

* **accuracy** in bfloat16 against a float64 reference on the same (rounded) inputs — output, ``dx``, the
  routing-weight gradient and the three weight gradients, ‖got − ref‖ / ‖ref‖ (bf16 lands near 1e-3 to
  1e-2; the limit is 2e-2);
* **determinism** — two forward + backward passes give bitwise equal results (no atomics);
* **no host synchronisation** — ``route``, ``permute_metadata`` and the forward of ``expert_ffn`` run under
  ``torch.cuda.set_sync_debug_mode("error")``, which raises on any device→host wait;
* every output element finite (the slot buffers are allocated uninitialised: an unwritten row would show).

    python -m moe_lib.kernels.gpu_check              # on a CUDA machine; JSON with --out
    python -m moe_lib.kernels.gpu_check --smoke      # tiny shapes; on a CPU in the interpreter (CI)

The JSON (``--out``) is rewritten after every shape (``"complete": false`` until the last), so a run
stopped by a time limit keeps the shapes it checked. Exit status 1 if any check fails.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from ..bench.shapes import SHAPES, SMOKE_SHAPES
from ..utils import relative_norm_error

LIMIT = 2e-2
#: Tokens per shape on the GPU (T·k from 1,024 to 4,096 assignments: block_m 16 to 64).
TOKENS = 512


def experts_checked(d: int, f: int, num_experts: int, top_k: int, element_size: int,
                    max_weight_gb: float = 4.0) -> int:
    """Experts :func:`check_shape` keeps: all, unless their weights exceed ``max_weight_gb`` (at least ``k``)."""
    return max(top_k, min(num_experts, int(max_weight_gb * 1e9 // (3 * d * f * element_size))))


def check_shape(name, d, f, num_experts, top_k, num_tokens, dtype, device, seed=0, max_weight_gb=4.0) -> dict:
    """One shape: accuracy, determinism, host syncs. Returns a flat dict (``ok`` says if all passed).

    The float64 reference keeps a copy of the weights and their gradients, so a layer whose expert
    weights exceed ``max_weight_gb`` (bf16) is checked with fewer experts, of the same ``d`` and ``f``
    (recorded as ``E_checked``)."""
    from . import expert_ffn, permute_metadata, route

    num_experts = experts_checked(d, f, num_experts, top_k, torch.tensor([], dtype=dtype).element_size(),
                                  max_weight_gb)

    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(num_tokens, d, generator=g).to(device, dtype)
    w_router = (torch.randn(num_experts, d, generator=g) / d**0.5).to(device, dtype)
    ws = [(torch.randn(num_experts, d, f, generator=g) / d**0.5).to(device, dtype),
          (torch.randn(num_experts, d, f, generator=g) / d**0.5).to(device, dtype),
          (torch.randn(num_experts, f, d, generator=g) / f**0.5).to(device, dtype)]
    gy = torch.randn(num_tokens, d, generator=g).to(device, dtype)
    row = {"shape": name, "T": num_tokens, "d": d, "f": f, "E_checked": num_experts, "k": top_k, "dtype": str(dtype)}

    def run(impl, inputs):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        xl, wl, *wsl = leaves
        meta = permute_metadata(experts, num_experts, impl=impl)
        y = expert_ffn(xl, wl, meta, *wsl, impl=impl)
        y.backward(gy.to(y.dtype))
        return [y.detach()] + [t.grad for t in leaves]

    logits = x @ w_router.t()
    sync = "n/a (no CUDA)"
    if device.type == "cuda":
        torch.cuda.synchronize()
        try:
            torch.cuda.set_sync_debug_mode("error")
            weights, experts = route(logits, top_k)
            meta = permute_metadata(experts, num_experts)
            with torch.no_grad():
                expert_ffn(x, weights, meta, *ws)
            sync = "none"
        except RuntimeError as err:
            sync = f"SYNC: {str(err)[:200]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
    weights, experts = route(logits, top_k)
    row["host_syncs_forward"] = sync
    inputs = [x, weights, *ws]
    t0 = time.perf_counter()
    got = run("triton", inputs)
    again = run("triton", inputs)
    row["seconds_two_runs"] = round(time.perf_counter() - t0, 3)
    row["deterministic"] = all(torch.equal(a, b) for a, b in zip(got, again))
    del again
    ref = run("torch", [t.double() for t in inputs])  # float64 on the device, same rounded inputs
    names = ["y", "dx", "dweights", "dw_gate", "dw_up", "dw_down"]
    for n, a, r in zip(names, got, ref):
        row[f"relerr_{n}"] = relative_norm_error(a.cpu(), r.cpu())
    row["finite"] = all(bool(torch.isfinite(a).all()) for a in got)
    row["ok"] = (row["finite"] and row["deterministic"] and sync in ("none", "n/a (no CUDA)")
                 and all(row[f"relerr_{n}"] < LIMIT for n in names))
    return row


def write(path, meta: dict, rows: list, complete: bool) -> None:
    """Write the results so far (atomically: a temporary file renamed)."""
    import os

    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump({"meta": meta, "rows": rows, "complete": complete}, fh, indent=1)
    os.replace(tmp, path)


def main(argv: list[str] | None = None, check=None) -> int:
    """``check``: the per-shape function (default :func:`check_shape`; tests pass a fake)."""
    check = check or check_shape
    parser = argparse.ArgumentParser(description="Check moe_lib's Triton kernels on this device.")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (the CPU runs them in the interpreter)")
    parser.add_argument("--tokens", type=int, default=None,
                        help=f"tokens per shape (default {TOKENS}; 48 with --smoke)")
    parser.add_argument("--out", default=None, help="write the results as JSON to this file (after every shape)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        parser.error("without CUDA only --smoke is possible (the kernels run in Triton's interpreter)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = (SMOKE_SHAPES if args.smoke else SHAPES).values()
    num_tokens = args.tokens or (48 if args.smoke else TOKENS)
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "dtype": str(dtype), "tokens": num_tokens, "limit": LIMIT}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    rows = []
    for shape in shapes:
        try:
            rows.append(check(shape.name, shape.d, shape.f, shape.E, shape.k, num_tokens, dtype, device))
        except Exception as err:  # report every shape
            rows.append({"shape": shape.name, "ok": False, "error": f"{type(err).__name__}: {str(err)[:300]}"})
        r = rows[-1]
        errs = " ".join(f"{k[7:]}={v:.1e}" for k, v in r.items() if k.startswith("relerr_"))
        print(f"{r['shape']:14} {'ok  ' if r['ok'] else 'FAIL'} {errs} deterministic={r.get('deterministic')} "
              f"host_syncs={r.get('host_syncs_forward')} {r.get('error', '')}", flush=True)
        if args.out:
            write(args.out, meta, rows, complete=False)
    if args.out:
        write(args.out, meta, rows, complete=True)
    return 0 if all(r["ok"] for r in rows) else 1

if __name__ == "__main__":
    sys.exit(main())
