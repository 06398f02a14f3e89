"""Compile every (kernel, configuration) the GPU run can launch, for a Hopper GPU (sm_90), without a GPU.

The configurations are not written by hand: :func:`collect` runs the real entry points — ``fused_moe``
(router, metadata, expert FFN), ``MoELayer(backend="triton")``'s path (``metadata_from_plan`` +
``expert_ffn``) and the layer with :class:`~moe_lib.kernels.FusedTopKRouter` and
:class:`~moe_lib.kernels.KernelDispatcher` (the benchmark's ``moe_lib_fused``), forward and forward + backward — at each benchmark shape and token count on tensors of
PyTorch's ``meta`` device (shapes and dtypes, no memory), with :meth:`JITFunction.run` intercepted: each
launch ``kernel[grid](...)`` is bound and specialised by Triton's own binder for the CUDA backend (argument
types, the integers equal to 1 or divisible by 16, 16-byte aligned pointers, the constexprs, ``num_warps``
and ``num_stages``) and recorded instead of run. So the list follows the launchers when their blocks or
kernels change. Each unique record is then compiled with ``triton.compile`` (Triton lowers to PTX, ``ptxas``
assembles it; neither needs a device) and reported: registers per thread, spilled bytes, shared memory,
whether the matrix products became Hopper's asynchronous warpgroup MMA (``wgmma`` in the PTX).

    python -m moe_lib.kernels.compile_check                 # the table; exit status 1 on a failure or a spill
    python -m moe_lib.kernels.compile_check --json out.json # also every row as JSON
    python -m moe_lib.kernels.compile_check --quick         # GEMMs and router, the others' largest blocks
    python -m moe_lib.kernels.compile_check --warm          # on the GPU: fill Triton's cache before timing

``--warm`` compiles the same records for the device's own target in a pool of processes; the compiled
kernels land in Triton's on-disk cache under the key the launch computes, so the timed run loads them
instead of compiling (``benchmarks/run_h200.sh`` does this before the benchmark).

It must run where ``TRITON_INTERPRET`` is not ``1`` (interpreted kernels cannot be compiled):
:func:`run_in_subprocess` takes care of that.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

#: Hopper's shared memory per thread block (H100/H200: 227 KiB usable of 228 KiB per SM).
SMEM_LIMIT = 227 * 1024
MODES = ("fwd", "fwdbwd")
#: ``fused_moe``; ``moe_layer``: MoELayer(backend="triton") after make_plan; ``kernel_layer``: MoELayer with
#: FusedTopKRouter + KernelDispatcher (the benchmark's moe_lib_fused; its router scores in float32)
ENTRY_POINTS = ("fused_moe", "moe_layer", "kernel_layer")


# ------------------------------------------------------------------------------------------ what to cover
def token_counts() -> list[int]:
    """The token counts the GPU run uses at every shape: the harness's prefill and decode ``T`` and the device
    check's."""
    from ..bench.shapes import DECODE_T, PREFILL_T
    from .gpu_check import TOKENS as CHECK_T

    return sorted({*PREFILL_T, *DECODE_T, CHECK_T})


def coverage_cases() -> list[tuple]:
    """``(shape, T, mode, entry point)`` of the GPU run, bf16: the five benchmark shapes at :func:`token_counts`,
    forward and forward + backward, through each of :data:`ENTRY_POINTS`; the device
    check's shapes with the fewer experts it may check (:func:`gpu_check.experts_checked`); the preflight's."""
    from ..bench.shapes import SHAPES, Shape
    from .gpu_check import TOKENS as CHECK_T, experts_checked
    from .preflight import preflight_cases

    cases = [(s, T, mode, entry) for s in SHAPES.values() for T in token_counts() for mode in MODES
             for entry in ENTRY_POINTS]
    for s in SHAPES.values():
        e = experts_checked(s.d, s.f, s.E, s.k, element_size=2)
        if e != s.E:
            cases += [(Shape(f"{s.name}[E={e}]", s.d, s.f, e, s.k), CHECK_T, mode, "fused_moe") for mode in MODES]
    return cases + preflight_cases()


# ------------------------------------------------------------------------------------------------ records
@dataclass
class Record:
    """One launch configuration: what Triton's binder makes of a ``kernel[grid](...)`` call."""

    module: str
    qualname: str
    signature: dict  # argument name -> type ("*bf16", "i32", "constexpr", ...)
    constexprs: dict  # argument path (tuple) -> value
    attrs: dict  # argument path (tuple) -> [["tt.divisibility", 16]]
    launch_options: dict  # num_warps, num_stages, debug, ... (what parse_options receives)
    seen_in: list = field(default_factory=list)  # "shape/T/mode/entry" that launched it

    @property
    def kernel(self) -> str:
        return self.qualname.lstrip("_").removesuffix("_kernel")

    def key(self) -> str:
        return json.dumps([self.module, self.qualname, self.signature, sorted(map(repr, self.constexprs.items())),
                           sorted(map(repr, self.attrs.items())), sorted(map(repr, self.launch_options.items()))])

    def constexpr_values(self) -> dict:
        """Constexpr name -> value (the specialised integers equal to 1 included)."""
        names = list(self.signature)
        return {names[path[0]]: value for path, value in self.constexprs.items() if len(path) == 1}

    def to_json(self) -> dict:
        return {"module": self.module, "qualname": self.qualname, "signature": self.signature,
                "constexprs": [[list(k), v] for k, v in self.constexprs.items()],
                "attrs": [[list(k), v] for k, v in self.attrs.items()],
                "launch_options": self.launch_options, "seen_in": self.seen_in}

    @classmethod
    def from_json(cls, d: dict) -> "Record":
        return cls(d["module"], d["qualname"], d["signature"], {tuple(k): v for k, v in d["constexprs"]},
                   {tuple(k): v for k, v in d["attrs"]}, d["launch_options"], list(d.get("seen_in", [])))


@contextlib.contextmanager
def recording(arch: int = 90):
    """Within the block, ``kernel[grid](...)`` records a :class:`Record` (into the yielded list) and launches
    nothing. Binding and specialisation are Triton's own (:func:`create_function_from_signature` and
    ``JITFunction._pack_args`` for the CUDA backend of ``sm_<arch>``), so a record is what a real launch
    would compile."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    binders = {}
    records: list[Record] = []
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        # the same defaults JITFunction.run adds before binding
        kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
        if id(self) not in binders:
            binders[id(self)] = create_function_from_signature(self.signature, self.params, backend)
        bound, specialization, options = binders[id(self)](*args, **kwargs)
        _, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, specialization, options)
        names = {p.name for p in self.params}
        launch_options = {k: v for k, v in kwargs.items() if k not in names}
        records.append(Record(self.fn.__module__, self.fn.__qualname__, dict(signature), dict(constexprs),
                              {k: v for k, v in attrs.items() if v}, launch_options))
        return None

    JITFunction.run = run
    try:
        yield records
    finally:
        JITFunction.run = original


def _drive(shape, T: int, mode: str, entry: str, dtype) -> None:
    """Run one entry point on ``meta`` tensors (inside :func:`recording`)."""
    from types import SimpleNamespace

    import torch

    from .. import kernels as K

    dev = "meta"
    grad = mode == "fwdbwd"
    E, d, f, k = shape.E, shape.d, shape.f, shape.k
    x = torch.empty(T, d, device=dev, dtype=dtype, requires_grad=grad)
    ws = [torch.empty(E, d, f, device=dev, dtype=dtype, requires_grad=grad),
          torch.empty(E, d, f, device=dev, dtype=dtype, requires_grad=grad),
          torch.empty(E, f, d, device=dev, dtype=dtype, requires_grad=grad)]
    with torch.set_grad_enabled(grad):
        if entry == "fused_moe":
            router = torch.empty(E, d, device=dev, dtype=dtype, requires_grad=grad)
            y = K.fused_moe(x, router, *ws, k)
        elif entry == "kernel_layer":  # MoELayer(router=FusedTopKRouter, dispatcher=KernelDispatcher)
            from ..layer import MoELayer
            from .parts import FusedTopKRouter, KernelDispatcher

            with torch.device(dev):
                layer = MoELayer(d, f, E, router=FusedTopKRouter(d, E, k), dispatcher=KernelDispatcher(),
                                 backend="triton", aux_loss_coef=0.0)
            y = layer.requires_grad_(grad)(x)
        else:  # MoELayer(backend="triton") after make_plan: metadata_from_plan + expert_ffn
            from ..backends import triton_backend

            n = T * k
            i64 = dict(device=dev, dtype=torch.int64)
            plan = SimpleNamespace(
                kept=torch.empty(T, k, device=dev, dtype=torch.bool), token_index=torch.empty(n, **i64),
                slot_index=torch.empty(n, **i64), counts=torch.empty(E, **i64), offsets=torch.empty(E + 1, **i64),
                weights=torch.empty(n, device=dev, dtype=torch.float32, requires_grad=grad), num_experts=E)
            bank = SimpleNamespace(kind="swiglu", d_out=d, activation="silu", w_gate=ws[0], w_up=ws[1], w_down=ws[2])
            y = triton_backend(bank, x, plan)
        if grad:
            y.backward(torch.empty_like(y))


def collect(cases=None, arch: int = 90, dtype=None) -> list[Record]:
    """Unique launch records of ``cases`` (default :func:`coverage_cases`), first-seen order; each lists
    the cases that launched it in ``seen_in``."""
    import torch

    dtype = dtype or torch.bfloat16
    cases = coverage_cases() if cases is None else cases
    unique: dict[str, Record] = {}
    with recording(arch) as records:
        for shape, T, mode, entry in cases:
            start = len(records)
            _drive(shape, T, mode, entry, dtype)
            for rec in records[start:]:
                rec = unique.setdefault(rec.key(), rec)
                rec.seen_in.append(f"{shape.name}/T={T}/{mode}/{entry}")
    for rec in unique.values():
        rec.seen_in = list(dict.fromkeys(rec.seen_in))
    return list(unique.values())


#: Kernels besides the grouped GEMMs that the quick set keeps whole: the router holds a ``BT × BE`` tile and
#: ``k`` rounds in registers, and its register use depends on more than its blocks (its ``BT=64, BE=64`` tile
#: spilled at ``E=45``, the device check's DeepSeek-V3, and not at OLMoE's ``E=64``).
QUICK_WHOLE = ("_router_kernel",)


def quick_subset(records: list[Record]) -> list[Record]:
    """A cheaper set (about a third of the compile time) that keeps what can spill: each grouped-GEMM
    configuration once whatever its integer arguments' divisibility, every router record
    (:data:`QUICK_WHOLE`), and of every other kernel only the record with the largest blocks
    (``BN·BE·BT·BS·BB``, then ``BE``). The full set stays the reference: a spill can depend on the
    divisibility the quick set ignores."""
    from . import triton_kernels as tk

    gemm = {k.fn.__qualname__ for k in tk.GEMM_KERNELS.values()}
    chosen: dict = {}
    for rec in records:
        c = rec.constexpr_values()
        if rec.qualname in QUICK_WHOLE:
            chosen.setdefault(rec.key(), rec)
            continue
        if rec.qualname in gemm:
            key = (rec.qualname, repr(sorted(c.items())), repr(sorted(rec.launch_options.items())))
            chosen.setdefault(key, rec)
            continue
        size = 1
        for name in ("BN", "BE", "BT", "BS", "BB"):
            size *= c.get(name) if isinstance(c.get(name), int) else 1
        best = chosen.get(rec.qualname)
        if best is None or (size, c.get("BE") or 0) > best[0]:
            chosen[rec.qualname] = ((size, c.get("BE") or 0), rec)
    return [v[1] if isinstance(v, tuple) else v for v in chosen.values()]


# ------------------------------------------------------------------------------------------------ compile
_PTXAS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")


def _kernel_fn(rec: Record):
    import importlib

    return getattr(importlib.import_module(rec.module), rec.qualname)


def _plain(constexprs: dict) -> dict:
    """The constexprs a table row records (numbers, strings, ``None``; not functions or dtypes)."""
    return {k: v for k, v in constexprs.items() if isinstance(v, (int, float, bool, str)) or v is None}


def compile_record(rec: Record, arch: int = 90) -> dict:
    """Compile one record for ``sm_<arch>``; a row with ``ok``, ``regs``, ``spill_bytes``, ``shared_bytes``,
    ``wgmma``... (``error`` instead when it fails). Registers and spills come from ``ptxas -v`` (Triton's
    ``dump_ptxas_log``), so the record must not already be in Triton's cache for them to be known."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cvals = rec.constexpr_values()
    opts = rec.launch_options
    row = {"kernel": rec.kernel, "arch": f"sm_{arch}",
           "BM": cvals.get("BM"), "BN": cvals.get("BN"), "BK": cvals.get("BK"), "BE": cvals.get("BE"),
           "num_warps": opts.get("num_warps", 4), "num_stages": opts.get("num_stages", 3),
           "constexprs": _plain(cvals),
           "regs": None, "spill_bytes": None, "stack_bytes": None, "cases": len(rec.seen_in),
           "example": rec.seen_in[0] if rec.seen_in else None}
    t0 = time.perf_counter()
    try:
        src = ASTSource(fn=_kernel_fn(rec), signature=rec.signature, constexprs=rec.constexprs, attrs=rec.attrs)
        log = io.StringIO()
        old = knobs.nvidia.dump_ptxas_log
        knobs.nvidia.dump_ptxas_log = True
        try:
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(opts))
        finally:
            knobs.nvidia.dump_ptxas_log = old
        text = log.getvalue()
        if m := _PTXAS.search(text):
            row["regs"] = int(m.group(1))
        if m := _SPILL.search(text):
            row["spill_bytes"] = int(m.group(1)) + int(m.group(2))
        if m := _STACK.search(text):
            row["stack_bytes"] = int(m.group(1))
        ptx = compiled.asm["ptx"]
        row.update(ok=True, shared_bytes=int(compiled.metadata.shared), wgmma="wgmma.mma_async" in ptx,
                   mma="mma.sync" in ptx or "wgmma.mma_async" in ptx,
                   async_copies=compiled.asm["ttgir"].count("async_copy_global_to_local"))
    except Exception as err:  # report, do not stop: the table shows every configuration
        row.update(ok=False, error=f"{type(err).__name__}: {str(err)[:600]}")
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    return row


def _compile_json(args):
    rec, arch = args
    return compile_record(Record.from_json(rec), arch)


def compile_records(records: list[Record], arch: int = 90, workers: int | None = None) -> list[dict]:
    """Compile every record; ``workers > 1``: in that many processes (``ptxas`` and Triton's passes are CPU
    bound and hold the GIL in parts, so processes, not threads)."""
    workers = workers or min(len(records), os.cpu_count() or 1) or 1
    jobs = [(r.to_json(), arch) for r in records]
    if workers <= 1 or len(jobs) <= 1:
        return [_compile_json(j) for j in jobs]
    import multiprocessing as mp

    ctx = mp.get_context("fork") if sys.platform != "win32" else None
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        return list(pool.map(_compile_json, jobs))


def problems(rows: list[dict]) -> list[str]:
    """What the compile test refuses: a failure, a spill (or any local-memory stack frame), shared memory
    above :data:`SMEM_LIMIT`, registers that ``ptxas`` did not report."""
    out = []
    for r in rows:
        where = (f"{r['kernel']} BM={r['BM']} BN={r['BN']} BK={r['BK']} BE={r['BE']} warps={r['num_warps']} "
                 f"stages={r['num_stages']} (e.g. {r['example']})")
        if not r["ok"]:
            out.append(f"{where}: FAILED {r['error']}")
            continue
        if r["regs"] is None or r["spill_bytes"] is None:
            out.append(f"{where}: ptxas did not report registers/spills (compiled from Triton's cache?)")
        elif r["spill_bytes"] or r["stack_bytes"]:
            out.append(f"{where}: spills {r['spill_bytes']} B, stack {r['stack_bytes']} B with {r['regs']} registers")
        if r["shared_bytes"] > SMEM_LIMIT:
            out.append(f"{where}: {r['shared_bytes']} B shared memory > {SMEM_LIMIT} B")
    return out


def check(arch: int = 90, quick: bool = False, workers: int | None = None) -> dict:
    """:func:`collect` (``quick``: then :func:`quick_subset`) and :func:`compile_records`: ``{"rows", "problems",
    "configs", "collect_s", "compile_s"}``."""
    t0 = time.perf_counter()
    records = collect(arch=arch)
    if quick:
        records = quick_subset(records)
    t1 = time.perf_counter()
    rows = compile_records(records, arch, workers)
    return {"arch": arch, "quick": quick, "configs": len(rows), "rows": rows, "problems": problems(rows),
            "collect_s": round(t1 - t0, 2), "compile_s": round(time.perf_counter() - t1, 2),
            "provenance": provenance()}


def provenance() -> dict:
    """Where a compile table comes from: the date, the versions of Triton and torch, the CPU that ran
    ``ptxas``, and the git commit of the kernels (``git_dirty`` counts changes under ``moe_lib/kernels``)."""
    import datetime
    import platform

    import torch
    import triton

    from ..utils import git_state

    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "triton": triton.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), **git_state(["moe_lib/kernels"])}


def compile_all(arch: int = 90, quick: bool = False, workers: int | None = None) -> list[dict]:
    """The rows of :func:`check`: one per configuration of the GPU run, compiled for ``sm_<arch>``."""
    return check(arch, quick, workers)["rows"]


def run_in_subprocess(arch: int = 90, quick: bool = False, workers: int | None = None, timeout: float = 1800,
                      cache_dir: str | None = None) -> dict:
    """:func:`check` in a fresh interpreter with ``TRITON_INTERPRET=0`` (safe to call from a process that runs
    the kernels in the interpreter). ``cache_dir``: Triton's cache for it (a fresh one makes ``ptxas`` run, so
    registers and spills are reported)."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    if cache_dir:
        env["TRITON_CACHE_DIR"] = str(cache_dir)
    code = ("import json; from moe_lib.kernels.compile_check import check; "
            f"print('@@' + json.dumps(check({arch}, {quick}, {workers})))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("@@")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"compile check failed to run (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][2:])


# ------------------------------------------------------------------------------------ committed tables
#: Where committed compile tables live (``python -m moe_lib.kernels.compile_check --json <this>/compile_sm90_<date>.json``).
TABLES = ("benchmarks", "results")


def table_files() -> list:
    """The committed compile tables, oldest first (``benchmarks/results/compile_sm<arch>_<date>.json``)."""
    from ..utils import book_root

    return sorted((book_root() / Path(*TABLES)).glob("compile_sm*_*.json"))


def load_table(path=None) -> dict:
    """A committed compile table (default: the newest), as :func:`check` returned it. Raises
    ``FileNotFoundError`` naming the folder when there is none, ``ValueError`` when a row lacks a field."""
    if path is None:
        files = table_files()
        if not files:
            raise FileNotFoundError(f"no compile table (compile_sm*_*.json) in {'/'.join(TABLES)}: run python -m "
                                    "moe_lib.kernels.compile_check --json benchmarks/results/compile_sm90_<date>.json")
        path = files[-1]
    with open(path) as fh:
        table = json.load(fh)
    for key in ("arch", "rows", "problems", "provenance"):
        if key not in table:
            raise ValueError(f"{path} is not a compile table: it has no {key!r}")
    table["path"] = str(path)
    return table


def config_key(kernel: str, constexprs: dict, num_warps: int, num_stages: int) -> tuple:
    """What identifies a compiled configuration in a table: the kernel, its constexprs, warps and stages."""
    return (kernel, tuple(sorted((k, v) for k, v in constexprs.items())), num_warps, num_stages)


def row_key(row: dict) -> tuple:
    return config_key(row["kernel"], row["constexprs"], row["num_warps"], row["num_stages"])


def record_key(rec) -> tuple:
    cvals = _plain(rec.constexpr_values())
    opts = rec.launch_options
    return config_key(rec.kernel, cvals, opts.get("num_warps", 4), opts.get("num_stages", 3))


def label(table: dict) -> str:
    """One line on where a table comes from."""
    p = table["provenance"]
    dirty = " (kernels modified)" if p.get("git_dirty") else ""
    return (f"compile table for sm_{table['arch']}: {table['configs']} configurations, compiled on "
            f"{p['date']} with Triton {p['triton']} (ptxas, no GPU), kernels at commit "
            f"{str(p.get('git_commit'))[:10]}{dirty}; {len(table['problems'])} problem(s)")


def summary(table: dict):
    """Per kernel: configurations, the block rows ``BM`` seen, the most registers, spilled bytes, the most
    shared memory (KiB), and how its matrix products compiled — Hopper's warpgroup ``wgmma`` or the older
    ``mma.sync`` — in how many configurations ("-" for a kernel without one). A pandas DataFrame."""
    import pandas as pd

    frame = pd.DataFrame(table["rows"])

    def products(rows) -> str:
        wgmma, mma = int(rows["wgmma"].sum()), int(rows["mma"].sum())
        return "-" if not mma else f"wgmma {wgmma}, mma.sync {mma - wgmma}"

    grouped = frame.groupby("kernel", sort=False)
    out = grouped.agg(
        configurations=("kernel", "size"),
        block_rows=("BM", lambda s: ", ".join(str(int(v)) for v in sorted(set(s.dropna())))),
        max_registers=("regs", "max"),
        spilled_bytes=("spill_bytes", "sum"),
        max_shared_KiB=("shared_bytes", lambda s: round(s.max() / 1024, 1)),
    )
    out["matrix_products"] = [products(rows) for _, rows in grouped]
    return out


# --------------------------------------------------------------------------------------------- warm-up
def warm(arch: int | None = None, workers: int | None = None, log=print) -> list[dict]:
    """Compile every configuration of the run for this machine's GPU into Triton's cache, in parallel.

    Triton keys its cache on the source, the target and the options, the same for :func:`triton.compile` as
    for a launch, so the launches of the timed run find these kernels compiled. Returns the rows."""
    if arch is None:
        import torch

        major, minor = torch.cuda.get_device_capability()
        arch = 10 * major + minor
    t0 = time.perf_counter()
    records = collect(arch=arch)
    log(f"warm-up: {len(records)} configurations for sm_{arch} collected in {time.perf_counter() - t0:.1f} s; "
        f"compiling with {workers or os.cpu_count()} processes")
    rows = compile_records(records, arch, workers)
    failed = [r for r in rows if not r["ok"]]
    log(f"warm-up: {len(rows) - len(failed)}/{len(rows)} compiled in {time.perf_counter() - t0:.1f} s"
        + "".join(f"\n  FAILED {r['kernel']} {r['example']}: {r['error'][:200]}" for r in failed))
    return rows


# ---------------------------------------------------------------------------------------------- output
def _variant(row: dict) -> str:
    """The constexprs besides the blocks, compactly (``SAVE_GU=1 ACT=0``; specialised unit strides as ``s1``)."""
    skip = {"BM", "BN", "BK", "BE", "GROUP"}
    parts = [f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in row.get("constexprs", {}).items()
             if k not in skip and not k.startswith("stride")]
    if any(k.startswith("stride") for k in row.get("constexprs", {})):
        parts.append("s1")
    return " ".join(parts)[:34]


def format_table(rows: list[dict]) -> str:
    head = (f"{'kernel':15} {'BM':>4} {'BN':>5} {'BK':>4} {'BE':>4} {'warps':>5} {'stages':>6} {'regs':>4} "
            f"{'spill':>5} {'smem KiB':>8} {'wgmma':>5} {'cases':>5}  {'other constexprs':34} status")
    lines = [head, "-" * len(head)]
    for r in rows:
        def v(x):
            return "-" if x is None else str(x)
        smem = f"{r['shared_bytes'] / 1024:.1f}" if r.get("ok") else "-"
        status = "ok" if r.get("ok") else "FAILED " + r["error"][:200]
        lines.append(f"{r['kernel']:15} {v(r['BM']):>4} {v(r['BN']):>5} {v(r['BK']):>4} {v(r['BE']):>4} "
                     f"{r['num_warps']:>5} {r['num_stages']:>6} {v(r['regs']):>4} {v(r['spill_bytes']):>5} "
                     f"{smem:>8} {str(r.get('wgmma', '-')):>5} {r['cases']:>5}  {_variant(r):34} {status}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=None,
                        help="compute capability as an integer (default 90; with --warm: this GPU's)")
    parser.add_argument("--quick", action="store_true",
                        help="every grouped-GEMM and router configuration, the largest blocks of the other kernels")
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: the CPU count)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--warm", action="store_true",
                        help="compile for this machine's GPU into Triton's cache (run before timing)")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error(f"argument --workers: must be a positive integer, got {args.workers}")
    if args.warm:
        rows = warm(args.arch, args.workers)
        result = {"arch": args.arch, "configs": len(rows), "rows": rows, "problems": []}
    else:
        import tempfile

        # a fresh Triton cache: a kernel loaded from the cache has no ptxas log, so no registers or spills
        with tempfile.TemporaryDirectory(prefix="moe_lib_compile_") as cache:
            result = run_in_subprocess(args.arch or 90, args.quick, args.workers, cache_dir=cache)
        rows = result["rows"]
        print(format_table(rows))
        regs = [r["regs"] for r in rows if r.get("regs") is not None]
        print(f"\n{len(rows)} configurations for sm_{result['arch']} (collected in {result['collect_s']} s, "
              f"compiled in {result['compile_s']} s); max registers {max(regs) if regs else '-'}; "
              f"{len(result['problems'])} problem(s)")
        for p in result["problems"]:
            print("  " + p)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    ok = all(r["ok"] for r in rows) and not result["problems"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
