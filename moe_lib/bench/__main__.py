"""``python -m moe_lib.bench``: benchmark one MoE FFN layer against its peers; prints a table, writes JSON.

  python -m moe_lib.bench --out benchmarks/results/          # on a CUDA machine, bf16, ~6-7 minutes
  python -m moe_lib.bench --smoke --out /tmp/smoke.json       # tiny shapes on the CPU, float32, < 30 s
  python -m moe_lib.bench --shapes qwen3-30b-a3b --phases prefill --modes fwd --impls dense_equal_flops,moe_lib_triton

See benchmarks/README.md for the protocol and the JSON schema.
"""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
