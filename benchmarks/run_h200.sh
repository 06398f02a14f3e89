#!/usr/bin/env bash
# The H200 run of the MoE-layer benchmark, sized for one device call of at most 600 s: every step has its own
# time-out and the time-outs add up to 480 s (T_TOTAL below). A failing Triton preflight stops the run before
# anything is timed. Everything it writes goes to $OUT (default benchmarks/results/): preflight.json (the
# gate), compile_warmup.json (the kernels compiled ahead), h200_<date>.json (the results), gpu_check.json (the
# kernels' accuracy at the five shapes) and run_h200.log (the console output). Each step rewrites its JSON as
# it goes, so a step stopped by its time-out keeps what it measured.
#
#   bash benchmarks/run_h200.sh                     # from the repository root, on the GPU machine
#   OUT=/tmp/out BUDGET_S=150 PYTHON=python3 bash benchmarks/run_h200.sh
#   MOE_LIB_GIT_COMMIT=<sha> bash benchmarks/run_h200.sh   # where the copy has no .git (recorded in the JSON)
#
# Needs torch with CUDA, triton and (for the Hugging Face peers) transformers; moe_lib is imported from
# this checkout, nothing is installed. See benchmarks/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
PY="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-190}"
# Step time-outs in seconds (tests/test_gpu_run.py checks that they add up to well under 600 s).
T_VERSIONS=15
T_PREFLIGHT=60
T_WARMUP=75
T_BENCH=$((BUDGET_S + 50))   # the harness starts no case after BUDGET_S; 50 s for the case in flight
T_CHECK=90
T_TOTAL=$((T_VERSIONS + T_PREFLIGHT + T_WARMUP + T_BENCH + T_CHECK))
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
{
  echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) commit ${MOE_LIB_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}" \
       "| step time-outs add up to ${T_TOTAL} s"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>/dev/null || true
  timeout "$T_VERSIONS" "$PY" -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name())" || exit 3

  echo "== 1/4 preflight (<= ${T_PREFLIGHT} s): Triton route + metadata + expert FFN fwd+bwd at one real shape vs float64"
  timeout "$T_PREFLIGHT" "$PY" -m moe_lib.kernels.preflight --out "$OUT/preflight.json"
  pre=$?
  if [ "$pre" -ne 0 ]; then
    if [ "$pre" -eq 124 ]; then  # killed by its time-out: it printed no verdict, so say what runs without Triton
      echo "   the preflight ran out of its ${T_PREFLIGHT} s"
      timeout 30 "$PY" -c "from moe_lib.kernels.preflight import without_triton; print(without_triton())" || true
    fi
    echo "== STOP: the Triton preflight failed (exit $pre); nothing was timed. Without Triton the benchmark would"
    echo "   only re-measure what the lines above list (the anchors hold most of it)."
    exit 4
  fi

  echo "== 2/4 compile warm-up (<= ${T_WARMUP} s): every kernel configuration of the run, in parallel, into Triton's cache"
  timeout "$T_WARMUP" "$PY" -m moe_lib.kernels.compile_check --warm --json "$OUT/compile_warmup.json" || status=1

  echo "== 3/4 benchmark (<= ${T_BENCH} s, budget ${BUDGET_S} s): prefill fwd, prefill fwd+bwd, decode T=64, the rest;" \
       "the anchors' peers (naive_loop, hf_eager) last"
  timeout "$T_BENCH" "$PY" -m moe_lib.bench --budget-s "$BUDGET_S" --out "$OUT" || status=1

  echo "== 4/4 kernel check (<= ${T_CHECK} s): the five shapes at T=512, bf16 vs float64, determinism, no host sync"
  timeout "$T_CHECK" "$PY" -m moe_lib.kernels.gpu_check --out "$OUT/gpu_check.json" || status=1

  echo "== done (status $status); files in $OUT:"
  ls -l "$OUT"
  exit $status
} 2>&1 | tee "$OUT/run_h200.log"
exit "${PIPESTATUS[0]}"
