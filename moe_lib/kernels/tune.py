"""Fill the tuned block table of this GPU: run on the GPU session, commit what it writes.

    python -m moe_lib.kernels.tune                          # every benchmark shape, prefill + decode T
    python -m moe_lib.kernels.tune --shapes olmoe-1b-7b --tokens 16384 64 --out /tmp/t.json

For each shape of :mod:`moe_lib.bench.shapes` and token count it builds one routing (random logits through
the real router and metadata, so ``block_m`` is the one the layer picks) and times, for each grouped GEMM of
the layer — ``up``, ``down`` (forward), ``dh``, ``dx``, ``wgrad_gu``, ``wgrad_down`` (backward, prefill token
counts only) — every candidate of :func:`config.autotune_configs` with ``triton.testing.do_bench``, through the
real launchers (:func:`config.override` forces the candidate), and checks each candidate's output against the
heuristic blocks' output. Per GEMM key (:func:`config.table_key`) the fastest candidate over the cases that
share it wins. The table (``tuned/<device>.json``, e.g. ``tuned/h200.json``) records the device, its SM
count and capability, the Triton and torch versions, the command, and every candidate's time; it is read by
:func:`config.gemm_meta` on a device of the same name only. Nothing here runs without a GPU: a table is
measured or absent, never invented.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import sys
import time
from pathlib import Path

import torch

from . import config

FORWARD_OPS = ("up", "down")
BACKWARD_OPS = ("dh", "dx", "wgrad_gu", "wgrad_down")


def device_slug(name: str) -> str:
    """File stem for a device name: ``"NVIDIA H200"`` → ``"h200"``."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower().replace("nvidia", "")).strip("_") or "device"


def gemm_keys(d: int, f: int, block_m: int) -> dict[str, tuple[int, int, int]]:
    """``op → (block_m, k, n)`` of the layer's grouped GEMMs (the launchers' keys, see :func:`config.table_key`)."""
    return {"up": (block_m, d, f), "down": (block_m, f, d), "dh": (block_m, d, f), "dx": (block_m, 2 * f, d),
            "wgrad_gu": (0, d, 2 * f), "wgrad_down": (0, f, d)}


def tune_case(shape, num_tokens: int, bench, candidates: dict | None = None, backward: bool = True,
              dtype=torch.bfloat16, device: str = "cuda", seed: int = 0) -> list[dict]:
    """Time every candidate of every GEMM of ``shape`` at ``num_tokens``; one row per (op, candidate):
    ``{"op", "block_m", "k", "n", "config", "ms"}`` (``ms`` is ``None`` for a candidate that failed to
    launch or whose output differs from the heuristic blocks' output, with ``"error"``).

    ``bench(fn) -> ms`` times a call (``triton.testing.do_bench`` on the GPU); ``candidates`` maps a kernel
    kind to its configs (default :func:`config.autotune_configs`)."""
    from . import interleave_gate_up, ops, permute_metadata, route

    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=g) * scale).to(device=device, dtype=dtype)

    d, f, num_experts, top_k = shape.d, shape.f, shape.E, shape.k
    x = randn(num_tokens, d)
    weights, experts = route(torch.randn(num_tokens, num_experts, generator=g).to(device), top_k)
    meta = permute_metadata(experts, num_experts)
    wflat = weights.reshape(-1).contiguous()
    w_gu = interleave_gate_up(randn(num_experts, d, f, scale=d ** -0.5), randn(num_experts, d, f, scale=d ** -0.5))
    w_down = randn(num_experts, f, d, scale=f ** -0.5)
    h, gu = ops.up(x, w_gu, meta, "silu", save_gu=True)
    dy = randn(num_tokens, d)
    dgu, _ = ops.dh(dy, gu, w_down, wflat, meta, "silu")
    calls = {
        "up": lambda: ops.up(x, w_gu, meta, "silu", save_gu=True)[1],
        "down": lambda: ops.down(h, w_down, wflat, meta),
        "dh": lambda: ops.dh(dy, gu, w_down, wflat, meta, "silu")[0],
        "dx": lambda: ops.dx_slots(dgu, w_gu, meta),
        "wgrad_gu": lambda: ops.wgrad(x, dgu, torch.empty_like(w_gu), wflat, meta, True, False, False),
        "wgrad_down": lambda: ops.wgrad(h, dy, torch.empty_like(w_down), wflat, meta, False, True, True),
    }
    rows = []
    for op, (block_m, k, n) in gemm_keys(d, f, meta.block_m).items():
        if op in BACKWARD_OPS and not backward:
            continue
        kind = config.TUNED_OPS[op]
        expected = calls[op]().float()
        for cfg in (candidates or {}).get(kind) or config.autotune_configs(kind):
            row = {"op": op, "block_m": block_m, "k": k, "n": n, "config": dict(cfg), "ms": None}
            try:
                with config.override(op, block_m, k, n, cfg):
                    got = calls[op]().float()
                    if not torch.allclose(got, expected, rtol=2e-2, atol=2e-2 * float(expected.abs().max())):
                        raise ValueError("output differs from the heuristic blocks' output")
                    row["ms"] = float(bench(calls[op]))
            except Exception as err:  # noqa: BLE001 - out of shared memory, a compile error: skip the candidate
                row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
            rows.append(row)
    return rows


def build_table(rows_by_case: dict[str, list[dict]], device_info: dict) -> dict:
    """The table from :func:`tune_case` rows of several cases: per key, the candidate with the least time
    summed over the cases that measured that key (a candidate that failed in any of them is out)."""
    totals: dict[str, dict[str, list]] = {}
    for case, rows in rows_by_case.items():
        for r in rows:
            key = config.table_key(r["op"], r["block_m"], r["k"], r["n"])
            slot = totals.setdefault(key, {}).setdefault(json.dumps(r["config"], sort_keys=True),
                                                           [r, 0.0, True, []])
            slot[1] += r["ms"] if r["ms"] is not None else 0.0
            slot[2] = slot[2] and r["ms"] is not None
            slot[3].append({"case": case, "ms": r["ms"], **({"error": r["error"]} if "error" in r else {})})
    entries = []
    for key, by_cfg in sorted(totals.items()):
        valid = [(total, cfg, r) for cfg, (r, total, ok, _) in by_cfg.items() if ok]
        if not valid:
            continue
        total, best_cfg, r = min(valid, key=lambda v: v[0])
        entries.append({"op": r["op"], "block_m": r["block_m"], "k": r["k"], "n": r["n"],
                        "config": json.loads(best_cfg), "ms_total": total,
                        "candidates": [{"config": json.loads(c), "runs": runs}
                                       for c, (_, _, _, runs) in by_cfg.items()]})
    return {"format": config.TABLE_FORMAT, **device_info, "entries": entries}


def _device_info() -> dict:
    import triton

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"device": torch.cuda.get_device_name(), "capability": f"{props.major}.{props.minor}",
            "sms": props.multi_processor_count, "triton": triton.__version__, "torch": torch.__version__,
            "cuda": torch.version.cuda, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "python -m moe_lib.kernels.tune " + " ".join(sys.argv[1:])}


def main(argv: list[str] | None = None) -> int:
    from ..bench.shapes import DECODE_T, PREFILL_T, SHAPES

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES), metavar="SHAPE",
                        help=f"benchmark shapes (default: all of {list(SHAPES)})")
    parser.add_argument("--tokens", nargs="+", type=int, default=[*PREFILL_T, *DECODE_T],
                        help="token counts (default: the benchmark's prefill and decode T)")
    parser.add_argument("--backward-from", type=int, default=min(PREFILL_T), metavar="T",
                        help="tune the backward GEMMs at token counts >= T (default %(default)s)")
    parser.add_argument("--out", default=None, help="output JSON (default: moe_lib/kernels/tuned/<device>.json)")
    args = parser.parse_args(argv)
    if config.interpreting() or not torch.cuda.is_available():
        print("tune: needs a CUDA GPU (Triton compiled, not interpreted); nothing written", file=sys.stderr)
        return 2
    import triton.testing

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=10, rep=40)

    info = _device_info()
    out = Path(args.out) if args.out else config.TUNED_DIR / f"{device_slug(info['device'])}.json"
    rows_by_case = {}
    start = time.perf_counter()
    for name in args.shapes:
        for num_tokens in args.tokens:
            case = f"{name}/T={num_tokens}"
            rows_by_case[case] = tune_case(SHAPES[name], num_tokens, bench, backward=num_tokens >= args.backward_from)
            best = {}
            for r in rows_by_case[case]:
                if r["ms"] is not None and r["ms"] < best.get(r["op"], (float("inf"),))[0]:
                    best[r["op"]] = (r["ms"], r["config"])
            print(f"{case:32s} {time.perf_counter() - start:7.1f} s  "
                  + "  ".join(f"{op} {ms:.3f} ms" for op, (ms, _) in best.items()), flush=True)
            torch.cuda.empty_cache()
    table = build_table(rows_by_case, {**info, "shapes": args.shapes, "tokens": args.tokens})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {len(table['entries'])} entries to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
