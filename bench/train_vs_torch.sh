#!/usr/bin/env bash
# mxn against PyTorch on the same cores, in one run: GPT-2 with 6 layers, width 384, 6 heads,
# context 256, batch 8, vocab 256, trained with AdamW. Prints tokens/s of each (median step time
# after two warm-up steps) in f32 and bf16 and, last, the line 'mxn/torch bf16 ratio: X.XX'.
# Not a test: timings are noisy. Run scripts/setup first.
# Environment: STEPS (default 10), THREADS (default: all cores), BUILD_DIR (default build).
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${STEPS:-10}"
threads="${THREADS:-$(nproc)}"
mxn="${BUILD_DIR:-build}/mxn"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

model=(--n_layer 6 --n_embd 384 --n_head 6 --n_ctx 256 --batch 8 --vocab_size 256)
mxn_tps() {  # median tokens/s over steps 3.. from the run's metrics
  "$mxn" train "${model[@]}" --dtype "$1" --threads "$threads" --steps $((steps + 2)) \
    --eval_every 0 --eval_batches 1 --ckpt_every 0 --log_every 1000 --data data/kjv.bin \
    --out "$tmp/$1" > /dev/null
  /usr/bin/python3 - "$tmp/$1/metrics.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])][2:]
print(f"{8 * 256 / statistics.median(r['step_s'] for r in rows):.1f}")
PY
}
torch_tps() {
  /usr/bin/python3 bench/torch_gpt.py --dtype "$1" --threads "$threads" --steps "$steps" | awk '{print $NF}'
}

echo "GPT-2 6x384, 6 heads, context 256, batch 8, vocab 256; $threads threads; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
declare -A r
for dt in f32 bf16; do
  m=$(mxn_tps "$dt"); t=$(torch_tps "$dt")
  r[$dt]=$(/usr/bin/python3 -c "print(f'{$m / $t:.2f}')")
  printf "%-5s mxn %9.1f tokens/s | torch %9.1f tokens/s | mxn/torch %s\n" "$dt" "$m" "$t" "${r[$dt]}"
done
echo "mxn/torch f32 ratio: ${r[f32]}"
echo "mxn/torch bf16 ratio: ${r[bf16]}"
