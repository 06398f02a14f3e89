"""Compile every kernel for a Hopper GPU (sm_90) without a GPU, and report what the compiler produced.

Triton lowers a kernel to PTX and ``ptxas`` assembles it to a cubin; neither needs a device. This module
builds each kernel with the signature and blocks the launchers use for bf16 and reports, per kernel, the
shared memory it needs, whether its matrix products became Hopper's asynchronous warpgroup MMA
(``wgmma`` in the PTX) and the register spills ``ptxas`` reported. It is the CI's guard that the kernels
tested in the interpreter also build for the GPU the benchmarks run on.

    python -m moe_lib.kernels.compile_check          # a table; exit status 1 if any kernel fails

It must run in a process where ``TRITON_INTERPRET`` is not ``1`` (interpreted kernels cannot be compiled):
:func:`run_in_subprocess` takes care of that.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

BF16 = "*bf16"
I32P = "*i32"
F32P = "*fp32"


#: Integer arguments that are multiples of 16 on real shapes (widths and row strides).
DIVISIBLE = {"d", "f", "d_out", "n_out", "K1", "K2", "M", "stride_x", "stride_we", "stride_wk", "stride_h",
             "stride_gu", "stride_a", "stride_b1e", "stride_b1k", "stride_b2e", "stride_b2k", "stride_out",
             "stride_dy", "stride_wde", "stride_wdf", "stride_dgu", "stride_b", "stride_dwe", "stride_dwm",
             "stride_src", "stride_y", "stride_l", "E"}
#: Strides equal to 1 in the forward launch (Triton specialises an integer argument equal to 1 to a constant).
UNIT_STRIDES = {"up": ("stride_wn",), "down": ("stride_b1n", "stride_b2n"), "dh": ("stride_wdd",),
                "wgrad": ("stride_dwn",), "wgrad:down": ("stride_dwn",)}


def _kernel_specs(block_m: int = 128) -> dict:
    """Kernel name → (argument types in order, constexprs, launch options)."""
    from . import config

    def gemm(kind):
        meta = dict(config.gemm_meta(kind, block_m))
        opts = {"num_warps": meta.pop("num_warps"), "num_stages": meta.pop("num_stages")}
        return meta, opts

    up_meta, up_opts = gemm("up")
    down_meta, down_opts = gemm("down")
    dh_meta, dh_opts = gemm("dh")
    wg_meta, wg_opts = gemm("wgrad")
    return {
        "router": ([BF16, F32P, F32P, I32P, "i32", "i32", "i32"],
                   {"K": 8, "KP": 8, "BT": 16, "BE": 256, "SCORE": 1, "RENORM": True, "HAS_BIAS": True},
                   {"num_warps": 4, "num_stages": 1}),
        "count": ([I32P, I32P, "i32", "i32"], {"BN": 64, "BE": 256}, {"num_warps": 4, "num_stages": 1}),
        "scan": ([I32P, I32P, I32P, "i32", "i32"], {"BB": 64, "BE": 32}, {"num_warps": 4, "num_stages": 1}),
        "schedule": ([I32P, I32P, I32P, I32P, "i32", "i32"], {"BM": block_m, "BE": 256, "BS": 32},
                     {"num_warps": 4, "num_stages": 1}),
        "metadata_small": ([I32P] * 6 + ["i32", "i32", "i32"],
                           {"BN": 1024, "SHIFT": 10, "BE": 64, "BM": 16, "BS": 64}, {"num_warps": 4, "num_stages": 1}),
        "scatter": ([I32P, I32P, I32P, I32P, "i32", "i32"], {"BN": 64}, {"num_warps": 4, "num_stages": 1}),
        "up": ([BF16, BF16, BF16, BF16, BF16, I32P, I32P, I32P, I32P] + ["i32"] * 9,
               {"ACT": 0, "SAVE_GU": True, "BM": block_m, "GROUP": 8, **up_meta}, up_opts),
        "down": ([BF16, BF16, BF16, BF16, F32P, I32P, I32P, I32P, I32P] + ["i32"] * 11,
                 {"TWO_B": True, "SCALE": True, "BM": block_m, "GROUP": 8, **down_meta}, down_opts),
        "dh": ([BF16, BF16, BF16, F32P, BF16, F32P, I32P, I32P, I32P, I32P] + ["i32"] * 10,
               {"ACT": 0, "BM": block_m, "GROUP": 8, **dh_meta}, dh_opts),
        "wgrad": ([BF16, BF16, BF16, BF16, BF16, F32P, I32P, I32P] + ["i32"] * 8,
                  {"GATHER_A": True, "GATHER_B": False, "SCALE_A": False, "TWO_B": True, **wg_meta}, wg_opts),
        "wgrad:down": ([BF16, BF16, BF16, BF16, BF16, F32P, I32P, I32P] + ["i32"] * 8,
                       {"GATHER_A": False, "GATHER_B": True, "SCALE_A": True, "TWO_B": False, **wg_meta}, wg_opts),
        "combine": ([BF16, BF16, "i32", "i32", "i32", "i32", "i32"], {"BT": 16, "BN": 128},
                    {"num_warps": 4, "num_stages": 1}),
    }


def compile_all(arch: int = 90, block_m: int = 128) -> list[dict]:
    """Compile each kernel for ``sm_<arch>``; one result dict per kernel (``ok``, ``error``, ``shared_bytes``,
    ``wgmma``, ``spill_stores``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import triton_kernels as tk

    kernels = {**tk.GEMM_KERNELS, **tk.OTHER_KERNELS}
    results = []
    for name, (types, constexprs, options) in _kernel_specs(block_m).items():
        fn = kernels[name.split(":")[0]]  # "kernel:variant" compiles another constexpr setting
        names = [p.name for p in fn.params if not p.is_constexpr]
        signature = dict(zip(names, types))
        constexprs = dict(constexprs)
        attrs = {}
        for i, arg in enumerate(names):
            # what the launcher's specialisation sees at run time: unit strides become constants, pointers
            # and the model widths and strides are multiples of 16 (every benchmark shape's are)
            if arg in UNIT_STRIDES.get(name, ()):
                signature[arg] = "constexpr"
                constexprs[arg] = 1
            elif signature.get(arg, "").startswith("*") or arg in DIVISIBLE:
                attrs[(i,)] = [["tt.divisibility", 16]]
        signature.update({k: "constexpr" for k in constexprs})
        row = {"kernel": name, "arch": f"sm_{arch}", "block_m": block_m, **options}
        try:
            if len(names) != len(types):
                raise ValueError(f"spec has {len(types)} argument types for {len(names)} arguments {names}")
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                      target=GPUTarget("cuda", arch, 32), options=options)
            ptx = compiled.asm["ptx"]
            row.update(ok=True, shared_bytes=int(compiled.metadata.shared), wgmma="wgmma.mma_async" in ptx,
                       mma="mma.sync" in ptx or "wgmma.mma_async" in ptx,
                       local_memory=".local" in ptx, async_copies=compiled.asm["ttgir"].count("async_copy_global_to_local"))
        except Exception as err:  # report, do not stop: the table shows every kernel
            row.update(ok=False, error=f"{type(err).__name__}: {str(err)[:400]}")
        results.append(row)
    return results


def run_in_subprocess(arch: int = 90, block_m: int = 128, timeout: float = 600) -> list[dict]:
    """:func:`compile_all` in a fresh interpreter with ``TRITON_INTERPRET=0`` (safe to call from a process
    that runs the kernels in the interpreter)."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    code = ("import json, sys; from moe_lib.kernels.compile_check import compile_all; "
            f"print(json.dumps(compile_all({arch}, {block_m})))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"compile check failed to run:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an integer (default 90)")
    parser.add_argument("--block-m", type=int, default=128, choices=(16, 32, 64, 128))
    args = parser.parse_args(argv)
    results = run_in_subprocess(args.arch, args.block_m)
    for r in results:
        status = "ok" if r["ok"] else "FAILED " + r["error"]
        extra = (f"smem {r['shared_bytes'] / 1024:6.1f} KiB  wgmma {str(r['wgmma']):5}  local {r['local_memory']}"
                 if r["ok"] else "")
        print(f"{r['kernel']:14} {r['arch']} BM={r['block_m']:<4} {extra}  {status}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
