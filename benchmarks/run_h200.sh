#!/usr/bin/env bash
# The H200 run of the MoE-layer benchmark, about 7 minutes of GPU time: a correctness pass of every
# implementation on tiny shapes, then the full harness within a time budget. Everything it writes goes to
# $OUT (default benchmarks/results/): gpu_check.json (the kernels' device check), h200_<date>.json (the
# results), cuda_smoke_<date>.json (the correctness pass) and run_h200.log (the console output).
#
#   bash benchmarks/run_h200.sh                     # from the repository root, on the GPU machine
#   OUT=/tmp/out BUDGET_S=300 PYTHON=python3 bash benchmarks/run_h200.sh
#   MOE_LIB_GIT_COMMIT=<sha> bash benchmarks/run_h200.sh   # where the copy has no .git (recorded in the JSON)
#
# Needs torch with CUDA, triton and (for the Hugging Face peers) transformers; moe_lib is imported from
# this checkout, nothing is installed. See benchmarks/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
PY="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-280}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
{
  echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) commit ${MOE_LIB_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>/dev/null || true
  "$PY" -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name())" || exit 3

  echo "== 0/2 the Triton path on this GPU: bf16 vs float64 (fwd + all gradients), bitwise determinism, no host sync"
  timeout 180 "$PY" -m moe_lib.kernels.gpu_check --out "$OUT/gpu_check.json" || status=1

  echo "== 1/2 correctness: every implementation on the smoke shapes, bf16, against the fp32 reference"
  timeout 180 "$PY" -m moe_lib.bench --smoke --device cuda --no-ceilings --warmup-ms 5 --rep-ms 20 \
    --budget-s 150 --out "$OUT" || status=1

  echo "== 2/2 benchmark: five shapes, prefill + decode, fwd + fwd+bwd, three routings, budget ${BUDGET_S} s"
  timeout $((BUDGET_S + 150)) "$PY" -m moe_lib.bench --budget-s "$BUDGET_S" --out "$OUT" || status=1
  echo "== done (status $status); files in $OUT:"
  ls -l "$OUT"
  exit $status
} 2>&1 | tee "$OUT/run_h200.log"
exit "${PIPESTATUS[0]}"
