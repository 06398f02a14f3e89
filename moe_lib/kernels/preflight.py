"""A short gate before a GPU run: does the Triton path work on this machine, at one real shape?

Checks, in order, stopping at the first failure:

1. the installed Triton has what the kernels use (:mod:`.features`), and on a GPU the kernels are compiled,
   not interpreted (``TRITON_INTERPRET`` unset or 0);
2. ``route`` (the fused router) against :func:`~moe_lib.kernels.reference.route_ref`;
3. ``permute_metadata`` on both of its paths — the one-program sort (``N ≤ 4096``, decode) and the
   four-kernel counting sort (prefill) — against the reference, exactly (integers);
4. ``route → permute_metadata → expert_ffn``, forward and backward, at :data:`PREFLIGHT_SHAPE` with
   :data:`FFN_TOKENS` tokens in bfloat16, against a float64 reference on the same rounded inputs (output,
   ``dx``, routing-weight and all three weight gradients, limit 2e-2), bitwise determinism and no host
   synchronisation (:func:`moe_lib.kernels.gpu_check.check_shape`).

On a GPU it first compiles the kernels it will launch in parallel processes (:func:`compile_check.warm`),
then runs; the whole takes well under 30 s on an H200. Exit status 0 when every check passed, 1 when one
failed (the verdict says which, and what the benchmark can still measure without Triton), 2 on bad
arguments.

    python -m moe_lib.kernels.preflight                   # on the GPU machine (benchmarks/run_h200.sh step 1)
    python -m moe_lib.kernels.preflight --out pre.json    # also the verdict as JSON
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from ..bench.shapes import SHAPES, Shape

#: A benchmark shape with real widths whose float64 reference fits easily (OLMoE: d=2048, f=1024, E=64, k=8).
PREFLIGHT_SHAPE: Shape = SHAPES["olmoe-1b-7b"]
#: Tokens of the FFN check: T·k = 4096 assignments, the one-program metadata path; 64 rows per expert on
#: average, so block_m = 64 (Hopper's warpgroup MMA tiles).
FFN_TOKENS = 512
#: Tokens of the second metadata check: T·k = 8192 > 4096, the counting-sort path of prefill.
METADATA_TOKENS = 1024


def preflight_cases(shape: Shape = PREFLIGHT_SHAPE, ffn_tokens: int = FFN_TOKENS,
                    metadata_tokens: int = METADATA_TOKENS) -> list[tuple]:
    """What the preflight launches, as :func:`compile_check.collect` cases: the FFN check's forward (its
    host-sync pass) and forward + backward, and the counting-sort metadata check."""
    return [(shape, ffn_tokens, "fwd", "fused_moe"), (shape, ffn_tokens, "fwdbwd", "fused_moe"),
            (shape, metadata_tokens, "fwd", "fused_moe")]


class PreflightError(RuntimeError):
    """A failed check; the message names it."""


def _check_environment(device: torch.device) -> dict:
    from . import available, interpreting
    from .features import feature_error

    if (msg := feature_error()) is not None:
        raise PreflightError(msg)
    if not available():
        from . import _IMPORT_ERROR

        raise PreflightError(f"moe_lib.kernels cannot run impl='triton': {_IMPORT_ERROR}")
    if device.type == "cuda" and interpreting():
        raise PreflightError("TRITON_INTERPRET=1 on a CUDA machine: the kernels would run in the interpreter; "
                             "unset it (or set 0) before running")
    import triton

    return {"triton": triton.__version__, "interpreting": interpreting()}


def check_route(shape: Shape, num_tokens: int, device, dtype, seed: int = 0) -> dict:
    """The fused router against the reference on logits of the run's dtype: experts equal for all but a ``1e-3``
    share of tokens (near-ties may round differently), weights within ``1e-4`` where the experts agree."""
    from . import reference, route

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, shape.E, generator=g).to(device, dtype)
    w, e = route(logits, shape.k)
    w_ref, e_ref = reference.route_ref(logits, shape.k)
    same = (e == e_ref).all(-1)
    mismatch = 1.0 - same.float().mean().item()
    werr = (w - w_ref)[same].abs().max().item() if same.any() else float("inf")
    if mismatch > 1e-3 or not werr <= 1e-4:
        raise PreflightError(f"route: experts differ for {mismatch:.2%} of tokens, max weight error {werr:.2e}")
    return {"route_mismatch": mismatch, "route_max_weight_err": werr}


def check_metadata(shape: Shape, num_tokens: int, device, seed: int = 0) -> dict:
    """``permute_metadata`` (triton) equals the reference bit for bit on a random routing of ``num_tokens``."""
    from ..routers import synthetic_routing
    from . import permute_metadata

    routing = synthetic_routing(num_tokens, shape.E, shape.k, generator=torch.Generator().manual_seed(seed))
    experts = routing.experts.to(torch.int32).to(device)
    got = permute_metadata(experts, shape.E)
    ref = permute_metadata(experts, shape.E, block_m=got.block_m, impl="torch")
    for name in ("counts", "offsets", "row_assignment", "tile_expert", "tile_row"):
        a, b = getattr(got, name), getattr(ref, name)
        if a.shape != b.shape or not torch.equal(a.cpu().long(), b.cpu().long()):
            raise PreflightError(f"permute_metadata (N={num_tokens * shape.k}, block_m={got.block_m}): {name} "
                                 "differs from the reference")
    return {f"metadata_N{num_tokens * shape.k}": "equal", f"metadata_N{num_tokens * shape.k}_block_m": got.block_m}


def check_ffn(shape: Shape, num_tokens: int, device, dtype) -> dict:
    """Forward + backward against float64, determinism, host syncs (:func:`gpu_check.check_shape`)."""
    from .gpu_check import check_shape

    row = check_shape(shape.name, shape.d, shape.f, shape.E, shape.k, num_tokens, dtype, device)
    if not row["ok"]:
        bad = {k: v for k, v in row.items() if k.startswith("relerr_") or k in ("deterministic", "finite",
                                                                                "host_syncs_forward")}
        raise PreflightError(f"expert_ffn at {shape.name} T={num_tokens} {dtype}: {bad}")
    return {k: v for k, v in row.items() if k not in ("shape", "dtype")}


def run(shape: Shape = PREFLIGHT_SHAPE, ffn_tokens: int = FFN_TOKENS, metadata_tokens: int = METADATA_TOKENS,
        device=None, dtype=None, warm: bool = True, log=print) -> dict:
    """Every check; ``{"ok", "failed" (the check's message or None), "checks": {...}, "seconds"}``. Never raises
    for a failing check (the exception text goes into ``failed``)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    t0 = time.perf_counter()
    result = {"ok": False, "failed": None, "shape": shape.as_dict(), "ffn_tokens": ffn_tokens,
              "metadata_tokens": metadata_tokens, "device": str(device), "dtype": str(dtype), "checks": {}}
    step = "environment"
    try:
        result["checks"].update(_check_environment(device))
        if warm and device.type == "cuda":
            step = "compile"
            from .compile_check import collect, compile_records

            major, minor = torch.cuda.get_device_capability(device)
            records = collect(preflight_cases(shape, ffn_tokens, metadata_tokens), arch=10 * major + minor)
            rows = compile_records(records, 10 * major + minor)
            failed = [r for r in rows if not r["ok"]]
            if failed:
                raise PreflightError(f"compiling {failed[0]['kernel']} ({failed[0]['example']}): {failed[0]['error']}")
            result["checks"]["compiled"] = len(rows)
            log(f"preflight: {len(rows)} kernel configurations compiled in {time.perf_counter() - t0:.1f} s")
        for step, fn in (("route", lambda: check_route(shape, ffn_tokens, device, dtype)),
                         ("metadata", lambda: check_metadata(shape, ffn_tokens, device)),
                         ("metadata", lambda: check_metadata(shape, metadata_tokens, device)),
                         ("expert_ffn", lambda: check_ffn(shape, ffn_tokens, device, dtype))):
            result["checks"].update(fn())
            log(f"preflight: {step} ok ({time.perf_counter() - t0:.1f} s)")
        result["ok"] = True
    except Exception as err:  # the verdict names the step; a crash is a failure too
        msg = str(err) if isinstance(err, PreflightError) else f"{type(err).__name__}: {err}"
        result["failed"] = f"{step}: {msg[:1500]}"
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def without_triton() -> str:
    """What the benchmark can still measure when the Triton path fails: its implementations that do not run
    Triton kernels, and the command for them."""
    from ..bench.harness import impl_registry

    names = [name for name, impl in impl_registry().items() if not impl.uses_triton]
    return ("Without Triton the benchmark can still measure: " + ", ".join(names) + ".\n"
            "The committed anchors (benchmarks/anchors/) already hold naive_loop, torch_grouped_mm, hf_grouped_mm, "
            "hf_eager and dense_equal_flops on an H200, so such a run adds little; if it is wanted:\n"
            f"  python -m moe_lib.bench --impls {','.join(names)} --budget-s 200 --out <dir>")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Triton preflight: route, metadata and expert FFN fwd+bwd at one "
                                                 "real shape against the reference; exit status 1 on failure.")
    parser.add_argument("--tokens", type=int, default=FFN_TOKENS,
                        help=f"tokens of the FFN check (default {FFN_TOKENS})")
    parser.add_argument("--no-warm", action="store_true", help="do not compile ahead in parallel (GPU)")
    parser.add_argument("--out", default=None, help="write the verdict as JSON to this file")
    args = parser.parse_args(argv)
    if args.tokens < 1:
        parser.error(f"argument --tokens: must be a positive integer, got {args.tokens}")
    if not torch.cuda.is_available():
        parser.error("no CUDA device: the preflight checks the compiled kernels on a GPU (on the CPU the tests "
                     "run them in the interpreter: tests/test_gpu_run.py)")
    result = run(ffn_tokens=args.tokens, warm=not args.no_warm, log=lambda s: print(s, flush=True))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1, default=str)
    s = result["shape"]
    where = f"{s['name']} (d={s['d']}, f={s['f']}, E={s['E']}, k={s['k']}) T={result['ffn_tokens']} {result['dtype']}"
    if result["ok"]:
        c = result["checks"]
        errs = " ".join(f"{k[7:]}={v:.1e}" for k, v in c.items() if k.startswith("relerr_"))
        print(f"PREFLIGHT PASSED in {result['seconds']} s: route, metadata (both paths), expert_ffn fwd+bwd at {where} "
              f"vs float64: {errs}; deterministic={c.get('deterministic')}, host syncs: {c.get('host_syncs_forward')}")
        return 0
    print(f"PREFLIGHT FAILED after {result['seconds']} s at {where}\n  {result['failed']}\n{without_triton()}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
