#!/usr/bin/env bash
# Heterogeneous efficiency: the same GPT-2 job (4x128, context 256, 64 sequences per step, f32)
# timed on each device alone, each pinned to its own core with one thread (before and after the
# mixed job, averaged), and on all of them at once as one mixed job (mxn train --devices ..., one rank per device, each bound to its own core,
# the split chosen by measured speed). Prints each figure, the mixed job's predicted and measured
# step time, and, last, 'heterogeneous efficiency: X.XX' = mixed tokens/s / sum of standalone.
# Not a test: timings are noisy. Run scripts/setup first.
# Environment: DEVICES (default cpu,opencl:0), STEPS (timed steps, default 6), BATCH (default 64),
# BUILD_DIR (default build). MOE=1: the same shape as a Mixtral-style mixture of experts (16
# experts of width 128, top-2), the mixed job run twice: data parallel (every rank all experts)
# and expert parallel (--ep over the devices: experts and rows placed by measured speed).
# TP=1: a LLaMA shape to split (4 layers of 256, 8 heads of 32, context 256), the mixed job
# run three times: data parallel, and tensor parallel (--tp over the devices) with even shares and
# with shares by measured speed (auto).
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
     --data data/kjv.bin --dtype f32)
moe="${MOE:-0}"
if [[ $moe == 1 ]]; then
  job+=(--arch mixtral --n_kv_head 4 --experts 16 --top_k 2 --moe_ffn 128 --router_aux_coef 0)
fi
tp="${TP:-0}"
if [[ $tp == 1 ]]; then
  job+=(--arch llama --n_embd 256 --n_head 8 --n_kv_head 8)
fi
tps() {  # tokens/s from the median step time, the first (warm-up) step left out
  /usr/bin/python3 - "$1/metrics.jsonl" "$((batch * 256))" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])][1:]
print(f"{int(sys.argv[2]) / statistics.median(r['step_s'] for r in rows):.1f}")
PY
}

shape="GPT-2 4x128"
[[ $moe == 1 ]] && shape="Mixtral-style MoE 4x128, 16 experts x 128, top-2"
[[ $tp == 1 ]] && shape="LLaMA 4x256, 8 heads"
echo "$shape, context 256, $batch sequences/step, f32, 1 thread per device; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
alone() {  # device index, run name -> tokens/s of that device alone on its own core
  taskset -c "$1" "$mxn" train "${job[@]}" --device "${devs[$1]}" --out "$tmp/$2" > /dev/null
  tps "$tmp/$2"
}
# The machine's speed drifts over minutes (a VM, boost clocks), so each device is measured alone
# before and after the mixed job, and its standalone figure is the mean of the two.
declare -a before after
for i in "${!devs[@]}"; do before[$i]=$(alone "$i" "before$i"); done
"$mxn" train "${job[@]}" --devices "$devices" --out "$tmp/mixed" > "$tmp/mixed.log"
mixed=$(tps "$tmp/mixed")
if [[ $moe == 1 ]]; then
  "$mxn" train "${job[@]}" --devices "$devices" --ep "${#devs[@]}" --out "$tmp/ep" > "$tmp/ep.log"
  ep=$(tps "$tmp/ep")
fi
if [[ $tp == 1 ]]; then
  for split in even auto; do
    "$mxn" train "${job[@]}" --devices "$devices" --tp "${#devs[@]}" --tp_split "$split" \
      --out "$tmp/tp_$split" > "$tmp/tp_$split.log"
  done
  tp_even=$(tps "$tmp/tp_even") tp_auto=$(tps "$tmp/tp_auto")
fi
for i in "${!devs[@]}"; do after[$i]=$(alone "$i" "after$i"); done
sum=0
for i in "${!devs[@]}"; do
  t=$(/usr/bin/python3 -c "print(f'{(${before[$i]} + ${after[$i]}) / 2:.1f}')")
  printf '  %-10s alone on core %d: %10.1f tokens/s (before %.1f, after %.1f)\n' "${devs[$i]}" "$i" \
    "$t" "${before[$i]}" "${after[$i]}"
  sum=$(/usr/bin/python3 -c "print($sum + $t)")
done
grep -E '^    rank |predicted step time|^plan:' "$tmp/mixed.log" | sed 's/^ */  /'
printf '  sum of standalone:          %10.1f tokens/s\n' "$sum"
printf '  mixed job (%s): %10.1f tokens/s\n' "$devices" "$mixed"
if [[ $moe == 1 ]]; then
  grep -E '^  plan: expert|^    rank |^expert parallel:' "$tmp/ep.log" | sed 's/^ */  /'
  printf '  expert parallel (--ep %d): %10.1f tokens/s\n' "${#devs[@]}" "$ep"
  /usr/bin/python3 -c "print(f'heterogeneous efficiency, data parallel: {$mixed / $sum:.2f}')"
  /usr/bin/python3 -c "print(f'heterogeneous efficiency, expert parallel: {$ep / $sum:.2f}')"
  exit 0
fi
if [[ $tp == 1 ]]; then
  for split in even auto; do
    grep -E '^  plan: tensor|^tensor parallel:' "$tmp/tp_$split.log" | sed 's/^ */  /'
  done
  printf '  tensor parallel (--tp %d), even shares:   %10.1f tokens/s\n' "${#devs[@]}" "$tp_even"
  printf '  tensor parallel (--tp %d), shares by speed: %10.1f tokens/s\n' "${#devs[@]}" "$tp_auto"
  /usr/bin/python3 -c "print(f'heterogeneous efficiency, data parallel: {$mixed / $sum:.2f}')"
  /usr/bin/python3 -c "print(f'heterogeneous efficiency, tensor parallel even: {$tp_even / $sum:.2f}')"
  /usr/bin/python3 -c "print(f'heterogeneous efficiency, tensor parallel by speed: {$tp_auto / $sum:.2f}')"
  exit 0
fi
/usr/bin/python3 -c "print(f'heterogeneous efficiency: {$mixed / $sum:.2f}')"
