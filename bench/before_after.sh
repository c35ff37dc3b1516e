#!/usr/bin/env bash
# A change that should leave speed alone, checked: this build's mxn against another (OLD, e.g.
# one built from the commit before the change), on the same cores, alternating, median of RUNS.
# Three figures, one per part a reshaping touches: batch-1 decoding and prompt processing of GPT-2
# 124M (random weights, f32 GGUF; the generator), 32 prompts through the serving engine with 8
# slots (scheduler, runner, post-processing; `mxn generate --prompts-file`), and training steps
# of a 6 x 384 GPT-2 in bf16 (the trainer and optimizer). Prints each figure, old and new, and
# their ratio. Not a test: timings are noisy.
# usage: bench/before_after.sh OLD_MXN      Environment: RUNS (3), WORK (build/bench), BUILD_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
old="$1" new="${BUILD_DIR:-build}/mxn" runs="${RUNS:-3}" work="${WORK:-build/bench}"
mkdir -p "$work"
bench/make_model.sh gpt2 "$work/gpt2"
gguf="$work/gpt2-f32.gguf"
[[ -f "$gguf" ]] || "$new" convert "$work/gpt2" "$gguf" --type f32 >&2
ids=$(seq -s, 100 227)
for i in $(seq 32); do seq -s, $((i * 7)) $((i * 7 + 40 + i)); done > "$work/prompts32.txt"
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
decode() {  # mxn -> "decode_tok/s prompt_tok/s"
  "$1" generate --model "$gguf" --prompt-ids "$ids" --max-tokens 64 --temperature 0 --timings \
    --ignore-eos 2>&1 >/dev/null | sed -n 's/.*prompt [0-9]* tokens in [0-9.]* s (\([0-9.]*\) tokens\/s) | decode [0-9]* tokens in [0-9.]* s (\([0-9.]*\) tokens\/s).*/\2 \1/p'
}
engine() {  # mxn -> seconds for 32 prompts x 32 tokens, 8 slots
  local t0 t1
  t0=$(date +%s.%N)
  "$1" generate --model "$gguf" --prompts-file "$work/prompts32.txt" --slots 8 --max-tokens 32 \
    --temperature 0 --ignore-eos > /dev/null || { echo "before_after: $1 failed" >&2; exit 1; }
  t1=$(date +%s.%N)
  echo "$t1 - $t0" | bc -l
}
train() {  # mxn -> tokens/s of the last of 8 steps
  local out="$work/before_after_run"
  rm -rf "$out"
  "$1" train --n_layer 6 --n_embd 384 --n_head 6 --n_ctx 256 --batch 8 --dtype bf16 --steps 8 \
    --eval_every 0 --ckpt_every 0 --log_every 1 --out "$out" > /dev/null 2>&1
  tail -n 1 "$out/metrics.jsonl" | sed 's/.*"tokens_per_s":\([0-9.e+]*\).*/\1/'
}
declare -A f
for ((r = 0; r < runs; r++)); do
  for who in old new; do
    bin=$([[ $who == old ]] && echo "$old" || echo "$new")
    read -r d p <<< "$(decode "$bin")"
    f[$who.decode]+="$d " f[$who.prompt]+="$p "
    f[$who.engine]+="$(engine "$bin") "
    f[$who.train]+="$(train "$bin") "
  done
done
echo "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) threads; median of $runs"
printf "| figure | old | new | new/old |\n|---|--:|--:|--:|\n"
for k in "decode:GPT-2 decode tok/s" "prompt:GPT-2 prompt tok/s" \
         "engine:engine, 32 prompts x 32 tokens, s (lower is better)" "train:train 6x384 bf16 tok/s"; do
  key=${k%%:*} name=${k#*:}
  o=$(tr ' ' '\n' <<< "${f[old.$key]}" | grep . | median)
  n=$(tr ' ' '\n' <<< "${f[new.$key]}" | grep . | median)
  printf "| %s | %.3f | %.3f | %.3f |\n" "$name" "$o" "$n" "$(echo "$n / $o" | bc -l)"
done
