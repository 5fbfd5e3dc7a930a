#!/usr/bin/env bash
# Build, test and measure fastdistill on a CUDA machine (H100/H200 class), everything logged in OUTDIR:
#
#   benchmarks/gpu_check.sh OUTDIR
#
# Steps: nvidia-smi, `pip install --no-build-isolation --no-deps -e .`, `python -m fastdistill info`,
# `pytest -m gpu`, every benchmarks/bench_*.py (JSON lines appended to benchmarks/results/, copied to
# OUTDIR/results/), benchmarks/kernel_report.py. Needs no network: torch, triton, nvcc, pybind11, ninja,
# pytest and numpy are expected to be installed.
#
# Every step runs even when an earlier one failed, so a failing test does not lose the benchmark
# numbers; the script exits 1 at the end when any step failed. Each step has its own time limit and all
# of them share a budget (GPU_CHECK_BUDGET_S, default 570 s) so the whole run ends within 10 minutes.
#
# OUTDIR gets <step>.log for each step, steps.tsv (step, exit status, seconds), junit.xml,
# kernel_report.json and results/<bench>.jsonl.
set -euo pipefail
shopt -s nullglob

if [[ $# -ne 1 ]]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
mkdir -p "$1/results"
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."  # the repository root: pip, pytest and the benchmarks run from here
PY=${PYTHON:-python}
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET_S:-570}))
FAILED=()
printf 'step\texit\tseconds\n' >"$OUT/steps.tsv"

# step NAME LIMIT_S SHOW CMD...: run CMD with stdout+stderr in OUT/NAME.log, for at most LIMIT_S seconds
# (less when the budget runs out). On success SHOW=1 prints the whole log (tables), SHOW=0 its last
# line; a failure prints the log's tail.
step() {
  local name=$1 limit=$2 show=$3
  shift 3
  local left=$((DEADLINE - SECONDS)) t0=$SECONDS rc=0
  ((left < limit)) && limit=$left
  if ((limit <= 0)); then
    echo "== $name: SKIPPED, the ${GPU_CHECK_BUDGET_S:-570} s budget is spent"
    FAILED+=("$name")
    printf '%s\tskipped\t0\n' "$name" >>"$OUT/steps.tsv"
    return 0
  fi
  echo "== $name: $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
  local took=$((SECONDS - t0))
  printf '%s\t%s\t%s\n' "$name" "$rc" "$took" >>"$OUT/steps.tsv"
  if ((rc == 0)); then
    echo "   ok in ${took} s"
    if ((show)); then cat "$OUT/$name.log"; else tail -n 1 "$OUT/$name.log"; fi
  else
    FAILED+=("$name")
    if ((rc == 124)); then
      echo "   FAILED: timed out after ${limit} s; last lines of $name.log:"
    else
      echo "   FAILED (exit $rc) in ${took} s; last lines of $name.log:"
    fi
    tail -n 40 "$OUT/$name.log"
  fi
}

# Read-only queries: clocks, power and modes are left as they are.
step nvidia_smi 30 1 bash -c "nvidia-smi --query-gpu=index,name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv && nvidia-smi"
step build 300 0 "$PY" -m pip install --no-build-isolation --no-deps -e .
step info 60 1 "$PY" -m fastdistill info
step tests 180 0 "$PY" -m pytest -m gpu -q --junitxml="$OUT/junit.xml"
for bench in benchmarks/bench_*.py; do
  # bench_attention's full run (32k-token workloads, FlexAttention compiles) takes minutes; the others
  # are quick. A bench cut off by its limit keeps the tables and JSON lines of finished workloads.
  limit=120
  [[ $(basename "$bench") == bench_attention.py ]] && limit=300
  [[ $(basename "$bench") == bench_jvp.py ]] && limit=150
  step "$(basename "$bench" .py)" "$limit" 1 "$PY" "$bench"
done
results=(benchmarks/results/*.jsonl)
if ((${#results[@]})); then cp "${results[@]}" "$OUT/results/"; fi
step kernel_report 120 1 "$PY" benchmarks/kernel_report.py --json "$OUT/kernel_report.json"

echo
column -t -s $'\t' "$OUT/steps.tsv" 2>/dev/null || cat "$OUT/steps.tsv"
if ((${#FAILED[@]})); then
  echo "FAILED steps: ${FAILED[*]} (logs in $OUT)"
  exit 1
fi
echo "all steps passed (logs in $OUT)"
