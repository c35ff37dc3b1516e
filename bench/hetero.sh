#!/usr/bin/env bash
# Heterogeneous efficiency: the same GPT-2 job (4x128, context 256, 64 sequences per step, f32)
# timed on each device alone, each pinned to its own core with one thread, then on all of them at
# once as one mixed job (mxn train --devices ..., one rank per device, each bound to its own core,
# the split chosen by measured speed). Prints each figure, the mixed job's predicted and measured
# step time, and, last, 'heterogeneous efficiency: X.XX' = mixed tokens/s / sum of standalone.
# Not a test: timings are noisy. Run scripts/setup first.
# Environment: DEVICES (default cpu,opencl:0), STEPS (timed steps, default 6), BATCH (default 64),
# BUILD_DIR (default build).
set -euo pipefail
cd "$(dirname "$0")/.."
devices="${DEVICES:-cpu,opencl:0}"
steps="${STEPS:-6}"
batch="${BATCH:-64}"
mxn="${BUILD_DIR:-build}/mxn"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
IFS=, read -r -a devs <<< "$devices"
if (( ${#devs[@]} > $(nproc) )); then
  echo "hetero.sh: ${#devs[@]} devices but $(nproc) cores; each device needs a core of its own" >&2
  exit 1
fi
# PoCL runs OpenCL kernels on host threads: one thread, on the core its rank is bound to.
export POCL_MAX_PTHREAD_COUNT=1
job=(--n_layer 4 --n_embd 128 --n_head 4 --n_ctx 256 --batch "$batch" --threads 1
     --steps $((steps + 1)) --eval_every 0 --eval_batches 1 --ckpt_every 0 --log_every 1000
     --data data/kjv.bin)
tps() {  # tokens/s from the median step time, the first (warm-up) step left out
  /usr/bin/python3 - "$1/metrics.jsonl" "$((batch * 256))" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])][1:]
print(f"{int(sys.argv[2]) / statistics.median(r['step_s'] for r in rows):.1f}")
PY
}

echo "GPT-2 4x128, context 256, $batch sequences/step, f32, 1 thread per device; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
sum=0
for i in "${!devs[@]}"; do
  d="${devs[$i]}"
  taskset -c "$i" "$mxn" train "${job[@]}" --device "$d" --out "$tmp/alone$i" > /dev/null
  t=$(tps "$tmp/alone$i")
  printf '  %-10s alone on core %d: %10.1f tokens/s\n' "$d" "$i" "$t"
  sum=$(/usr/bin/python3 -c "print($sum + $t)")
done
"$mxn" train "${job[@]}" --devices "$devices" --out "$tmp/mixed" > "$tmp/mixed.log"
mixed=$(tps "$tmp/mixed")
grep -E '^    rank |predicted step time|^plan:' "$tmp/mixed.log" | sed 's/^ */  /'
printf '  sum of standalone:          %10.1f tokens/s\n' "$sum"
printf '  mixed job (%s): %10.1f tokens/s\n' "$devices" "$mixed"
/usr/bin/python3 -c "print(f'heterogeneous efficiency: {$mixed / $sum:.2f}')"
