"""Command line of ``python -m moe_lib.bench`` (see :mod:`moe_lib.bench.harness` for what it measures)."""
from __future__ import annotations

import argparse
import datetime as _dt
import re
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from . import shapes as S
from .harness import DEFERRED_IMPLS, impl_registry, make_cases, run
from .report import format_summary

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _choices(parser: argparse.ArgumentParser, flag: str, value: str, accepted: Sequence[str], allow_all: bool = True) -> list[str]:
    """Split a comma-separated list and check every item; ``all`` selects every accepted value."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        parser.error(f"argument {flag}: empty list; accepted: {', '.join(accepted)}" + (", all" if allow_all else ""))
    if allow_all and items == ["all"]:
        return list(accepted)
    bad = [v for v in items if v not in accepted]
    if bad:
        parser.error(f"argument {flag}: invalid choice {bad[0]!r}; accepted: {', '.join(accepted)}"
                     + (", all" if allow_all else ""))
    return list(dict.fromkeys(items))


def _ints(parser: argparse.ArgumentParser, flag: str, value: str) -> list[int]:
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        items = []
    if not items or any(v < 1 for v in items):
        parser.error(f"argument {flag}: expected comma-separated positive integers (e.g. 4096,16384), got {value!r}")
    return items


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m moe_lib.bench",
        description="Benchmark one MoE FFN layer (SwiGLU experts): moe_lib against a dense GEMM of equal FLOPs, "
                    "torch._grouped_mm, Hugging Face transformers and a naive loop. Prints a table and writes JSON.")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes (d<=64, E<=8, T<=128) and few repeats; on the CPU in float32 unless --device says")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, cpu with --smoke)")
    ap.add_argument("--dtype", default=None, help=f"one of {', '.join(DTYPES)} (default: bfloat16 on cuda, float32 on cpu)")
    ap.add_argument("--shapes", default="all", help=f"comma-separated, or all: {', '.join(S.SHAPES)} "
                                                    f"(with --smoke: {', '.join(S.SMOKE_SHAPES)})")
    ap.add_argument("--phases", default="all", help=f"comma-separated, or all: {', '.join(S.PHASES)}")
    ap.add_argument("--modes", default="all", help=f"comma-separated, or all: {', '.join(S.MODES)} "
                                                   "(fwdbwd = forward + backward; decode is fwd only)")
    ap.add_argument("--routings", default="all", help=f"comma-separated, or all: {', '.join(S.ROUTINGS)} "
                                                      "(the first one listed is run first)")
    ap.add_argument("--impls", default="all", help="comma-separated, or all; see --list")
    ap.add_argument("--prefill-T", default=None, help=f"prefill token counts (default {','.join(map(str, S.PREFILL_T))}; "
                                                      f"smoke {','.join(map(str, S.SMOKE_PREFILL_T))})")
    ap.add_argument("--decode-T", default=None, help=f"decode token counts (default {','.join(map(str, S.DECODE_T))}; "
                                                     f"smoke {','.join(map(str, S.SMOKE_DECODE_T))})")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget in seconds; cases not started in time are listed as skipped "
                         "(default 400 on cuda, 120 on cpu)")
    ap.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warm-up (CUDA), ms")
    ap.add_argument("--rep-ms", type=float, default=100.0, help="do_bench measurement window (CUDA), ms")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: 1 with --smoke, torch's default otherwise)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--zipf-s", type=float, default=1.2, help="Zipf exponent of the skewed routing")
    ap.add_argument("--max-loop-experts-bwd", type=int, default=64,
                    help="skip the per-expert Python loops (naive_loop, hf_eager) in fwdbwd above this many experts")
    ap.add_argument("--memory-fraction", type=float, default=0.5,
                    help="CUDA: the share of the free GPU memory a runner may take for temporaries")
    ap.add_argument("--defer-impls", default=None,
                    help="comma-separated implementations run only after every case, while time remains, or none "
                         f"(default on cuda: {','.join(DEFERRED_IMPLS)}, peers the committed anchors hold; cpu: none)")
    ap.add_argument("--no-ceilings", action="store_true", help="do not measure the dense and copy ceilings")
    ap.add_argument("--out", default=".", help="JSON file (*.json) or folder (default: current folder; file name "
                                               "h200_<date>.json on an H200, cpu_smoke_<date>.json with --smoke)")
    ap.add_argument("--list", action="store_true", help="list the shapes and implementations and exit")
    return ap


def output_path(out: str, device: torch.device, smoke: bool, date: str) -> Path:
    """``out`` itself if it ends in ``.json``, else ``out/<machine>_<date>.json``."""
    path = Path(out)
    if path.suffix == ".json":
        return path
    if smoke:
        machine = f"{device.type}_smoke"
    elif device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        machine = "h200" if "H200" in name.upper() else re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    else:
        machine = "cpu"
    return path / f"{machine}_{date}.json"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and validate; errors exit with status 2 and name the argument and the accepted values."""
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.device is None:
        a.device = "cuda" if torch.cuda.is_available() and not a.smoke else "cpu"
    cpu = a.device == "cpu" and not a.smoke  # the CPU shapes' default token count
    table = S.SMOKE_SHAPES if a.smoke else {**S.SHAPES, **S.CPU_SHAPES}
    if a.shapes == "all" and not a.smoke:  # "all": the five production shapes (the CPU shapes by name)
        table = S.SHAPES
    a.shape_list = [table[n] for n in _choices(ap, "--shapes", a.shapes, list(table))]
    a.phase_list = _choices(ap, "--phases", a.phases, list(S.PHASES))
    a.mode_list = _choices(ap, "--modes", a.modes, list(S.MODES))
    a.routing_list = _choices(ap, "--routings", a.routings, list(S.ROUTINGS))
    registry = impl_registry()
    a.impl_list = [registry[n] for n in _choices(ap, "--impls", a.impls, list(registry))]
    if a.defer_impls is not None and a.defer_impls.strip() == "none":
        a.defer_list = []
    elif a.defer_impls is not None:
        a.defer_list = _choices(ap, "--defer-impls", a.defer_impls, list(registry) + ["none"],
                                allow_all=False)
        if "none" in a.defer_list:
            ap.error("argument --defer-impls: 'none' cannot be combined with implementation names")
    a.prefill = _ints(ap, "--prefill-T", a.prefill_T) if a.prefill_T else list(
        S.SMOKE_PREFILL_T if a.smoke else S.CPU_PREFILL_T if cpu else S.PREFILL_T)
    a.decode = _ints(ap, "--decode-T", a.decode_T) if a.decode_T else list(S.SMOKE_DECODE_T if a.smoke else S.DECODE_T)
    if a.device not in ("cpu", "cuda"):
        ap.error(f"argument --device: invalid choice {a.device!r}; accepted: cpu, cuda")
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("argument --device: cuda requested but torch.cuda.is_available() is False; accepted here: cpu")
    if a.defer_impls is None:
        a.defer_list = list(DEFERRED_IMPLS) if a.device == "cuda" else []
    if a.dtype is None:
        a.dtype = "float32" if a.device == "cpu" else "bfloat16"
    if a.dtype not in DTYPES:
        ap.error(f"argument --dtype: invalid choice {a.dtype!r}; accepted: {', '.join(DTYPES)}")
    if a.budget_s is None:
        a.budget_s = 400.0 if a.device == "cuda" else 120.0
    if a.threads is None and a.smoke:
        a.threads = 1
    if a.threads is not None and a.threads < 1:
        ap.error(f"argument --threads: must be a positive integer, got {a.threads}")
    for flag, value in (("--budget-s", a.budget_s), ("--warmup-ms", a.warmup_ms), ("--rep-ms", a.rep_ms),
                        ("--zipf-s", a.zipf_s), ("--memory-fraction", a.memory_fraction)):
        if not value > 0:
            ap.error(f"argument {flag}: must be > 0, got {value}")
    if a.smoke and any(s.d > 64 or s.E > 8 for s in a.shape_list):  # pragma: no cover - smoke table is tiny
        ap.error("argument --smoke: smoke shapes must have d <= 64 and E <= 8")
    if a.device == "cpu" and not a.smoke and not a.list and any(s.name not in S.CPU_SHAPES for s in a.shape_list):
        ap.error("argument --device: the production shapes need a GPU (DeepSeek-V3's experts alone are 22.5 GB in "
                 f"bf16); on the CPU use --smoke or --shapes {','.join(S.CPU_SHAPES)}, or --device cuda on a "
                 "CUDA machine")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    if a.list:
        for s in (S.SMOKE_SHAPES if a.smoke else S.SHAPES).values():
            print(f"shape {s.name:16s} d={s.d:<5d} f={s.f:<6d} E={s.E:<4d} k={s.k}" + ("  fine-grained" if s.fine_grained else ""))
        for impl in impl_registry().values():
            print(f"impl  {impl.name:18s} [{impl.family}] {impl.description}")
        return 0
    device = torch.device(a.device)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    cases = make_cases(a.shape_list, a.phase_list, a.mode_list, a.routing_list, a.prefill, a.decode, full=not a.smoke)
    if not cases:
        print("no cases selected (decode is forward only: --phases decode needs --modes fwd)", file=sys.stderr)
        return 2
    date = _dt.date.today().isoformat()
    out = output_path(a.out, device, a.smoke, date)
    timing = ({"warmup_ms": a.warmup_ms, "rep_ms": a.rep_ms} if device.type == "cuda"
              else {"cpu_reps": 3, "cpu_max_s": 0.2} if a.smoke else {"cpu_reps": 5, "cpu_max_s": 1.0})
    config = {"argv": list(sys.argv[1:] if argv is None else argv), "shapes": [s.as_dict() for s in a.shape_list],
              "phases": a.phase_list, "modes": a.mode_list, "routings": a.routing_list,
              "prefill_T": a.prefill, "decode_T": a.decode}
    print(f"{len(cases)} cases x {len(a.impl_list)} implementations on {device.type} ({a.dtype}), "
          f"budget {a.budget_s:.0f} s -> {out}", flush=True)
    t0 = time.monotonic()
    result = run(cases, a.impl_list, device=device, dtype=DTYPES[a.dtype], smoke=a.smoke, budget_s=a.budget_s,
                 out=out, seed=a.seed, zipf_s=a.zipf_s, ceilings=not a.no_ceilings, timing=timing,
                 max_loop_experts_bwd=a.max_loop_experts_bwd, memory_fraction=a.memory_fraction, config=config,
                 deferred=a.defer_list, log=lambda line: print(line, flush=True))
    print(format_summary(result))
    print(f"wrote {out} ({len(result['cases'])} cases, {time.monotonic() - t0:.1f} s, "
          f"{'complete' if result['complete'] else 'INCOMPLETE: budget spent'})")
    return 0
