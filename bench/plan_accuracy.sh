#!/usr/bin/env bash
# The planner's predicted step time against the measured one, for every layout this machine can
# run: the default model (GPT-2, 4 layers, width 128, context 128, global batch 16), on the CPU
# and on PoCL's OpenCL device, data parallel, pipelined (2 and 4 stages), tensor parallel (--tp
# 2, alone and with --pp 2 or data parallelism) and mixes, each trained RUNS times for STEPS
# steps: a run's step time is its median step after the first two, a layout's the median of its
# runs, and the spread (slowest - fastest run, over the median) says how much of an error is
# this machine's noise. Predictions are `mxn plan --layout` with --recompute all (mxn's pipeline
# recomputes every stage) over a cluster file measured at the start of the same run: `mxn plan
# --cluster here --save-cluster` (each device's rate from a few training steps of the model on
# it alone), then `mpirun -np 2 mxn plan --measure-links` (the link's latency and bandwidth by
# an MPI ping-pong). Then the planner's own first choice beside the measured fastest. Not a
# test: timings.
# Everything in f32 (--dtype f32 pinned: auto, the default, would take bf16 where it is faster).
# Environment: STEPS (20), RUNS (5), BUILD_DIR (build).
set -euo pipefail
cd "$(dirname "$0")/.."
mxn="${BUILD_DIR:-build}/mxn" steps="${STEPS:-20}" runs="${RUNS:-5}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mpirun=(mpirun --oversubscribe --bind-to none)
[[ $(id -u) == 0 ]] && mpirun+=(--allow-run-as-root)
cluster="$tmp/here.toml"
"$mxn" plan --cluster here --model default --dtype f32 --save-cluster "$cluster" > /dev/null
"${mpirun[@]}" -np 2 "$mxn" plan --cluster "$cluster" --measure-links --save-cluster "$cluster" | grep '^links'
grep -E '^source' "$cluster"
echo
common=(--steps "$steps" --eval_every 0 --ckpt_every 0 --log_every 1000 --dtype f32)

median_step() {
  /usr/bin/python3 -c "import json,statistics,sys; r=[json.loads(l)['step_s'] for l in open(sys.argv[1])]; print(statistics.median(r[2:] or r))" "$1/metrics.jsonl"
}

echo "| layout | plan --layout | predicted s/step | measured s/step (median of $runs) | spread of runs | error |"
echo "|---|---|--:|--:|--:|--:|"
run() {  # NAME LAYOUT MICRO -- launcher and train arguments
  local name="$1" layout="$2" micro="$3"
  shift 4
  local pred
  pred=$("$mxn" plan --cluster "$cluster" --model default --dtype f32 --layout "$layout" --micro-batch "$micro" \
         --recompute all | sed -n 's/^predicted step \([0-9.e+-]*\) s.*/\1/p')
  local all=()
  for ((i = 0; i < runs; i++)); do
    rm -rf "$tmp/run"
    "$@" "${common[@]}" --out "$tmp/run" > "$tmp/log" 2>&1 || { cat "$tmp/log"; exit 1; }
    all+=("$(median_step "$tmp/run")")
  done
  local got
  got=$(/usr/bin/python3 -c "import statistics,sys; print(statistics.median(map(float, sys.argv[1:])))" "${all[@]}")
  /usr/bin/python3 -c "import sys; p,g=float(sys.argv[3]),float(sys.argv[4]); r=[float(x) for x in sys.argv[5:]]; print(f'| {sys.argv[1]} | \`{sys.argv[2]}\` | {p:.4f} | {g:.4f} | {100*(max(r)-min(r))/g:.1f}% | {100*(p-g)/g:+.1f}% |')" \
    "$name" "$layout" "$pred" "$got" "${all[@]}"
  echo "$got|$name" >> "$tmp/measured"
}

run "CPU alone" "cpu:0" 16 -- "$mxn" train
run "OpenCL alone" "opencl:0" 16 -- "$mxn" train --device opencl:0
run "DP: CPU + OpenCL" "cpu:0,opencl:0" 1 -- "$mxn" train --devices cpu,opencl:0
run "DP: 2 CPU ranks" "cpu:0,cpu:0" 1 -- "${mpirun[@]}" -np 2 "$mxn" train --threads 1
run "PP 2: 2 CPU ranks (2+2)" "cpu:0@2+cpu:0@2" 4 -- "${mpirun[@]}" -np 2 "$mxn" train --threads 1 --pp 2 --micro 4
run "PP 2: CPU + OpenCL (3+1)" "cpu:0@3+opencl:0@1" 4 -- "$mxn" train --devices cpu,opencl:0 --pp 2 --stages 3,1 --micro 4
run "PP 4: 4 CPU ranks (1 each)" "cpu:0@1+cpu:0@1+cpu:0@1+cpu:0@1" 2 -- "${mpirun[@]}" -np 4 "$mxn" train --threads 1 --pp 4 --micro 2
run "PP 2 x DP 2: CPU + OpenCL" "cpu:0@3+opencl:0@1,cpu:0@3+opencl:0@1" 2 -- \
  "$mxn" train --devices cpu,opencl:0,cpu,opencl:0 --pp 2 --stages 3,1 --micro 2
run "TP 2: 2 CPU ranks" "cpu:0*2" 16 -- "${mpirun[@]}" -np 2 "$mxn" train --threads 1 --tp 2
run "TP 2 x DP 2: 4 CPU ranks" "cpu:0*2,cpu:0*2" 8 -- "${mpirun[@]}" -np 4 "$mxn" train --threads 1 --tp 2
run "TP 2 x PP 2: 4 CPU ranks (2+2)" "cpu:0*2@2+cpu:0*2@2" 4 -- "${mpirun[@]}" -np 4 "$mxn" train --threads 1 --tp 2 --pp 2 --micro 4

echo
"$mxn" plan --cluster "$cluster" --model default --dtype f32 | grep -E '^chosen|left out'
fastest=$(sort -g "$tmp/measured" | head -1)
echo "measured fastest: ${fastest#*|} (${fastest%%|*} s/step)"
