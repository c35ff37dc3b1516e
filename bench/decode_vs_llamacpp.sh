#!/usr/bin/env bash
# Batch-1 decoding and prompt processing on the CPU: mxn against llama.cpp on the same GGUF file,
# which mxn writes (`mxn convert`). Models: GPT-2 124M and a LLaMA-shaped 1.2B (2048 wide, 22
# layers, 32 heads, 4 KV heads, 5632 FFN; TinyLlama's shape with GPT-2's 50257-token vocabulary),
# random weights made by transformers in the test venv. llama.cpp is built from the sources in
# the llama-cpp-python package (bench/llamacpp.sh). Each figure is the median of RUNS runs, the
# two engines alternating; prints a table row per model and type, then 'mxn/llama.cpp' ratios.
# MODELS=qwen3moe: a mixture of experts (bench/make_model.sh: 2.1B parameters, 0.65B active).
# Not a test: timings are noisy. Environment: RUNS (3), THREADS (all cores), MODELS ("gpt2
# llama1b"), TYPES ("f32 bf16"), PROMPT (128), GEN (64), WORK (build/bench).
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${RUNS:-3}" threads="${THREADS:-$(nproc)}" prompt="${PROMPT:-128}" gen="${GEN:-64}"
work="${WORK:-build/bench}" mxn="${BUILD_DIR:-build}/mxn"
mkdir -p "$work"
bench="$(bench/llamacpp.sh)"
scripts/test-venv >&2
py=build/test-venv/bin/python
make_model() { bench/make_model.sh "$1" "$work/$1"; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ids=$(seq -s, 100 $((99 + prompt)))
echo "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $threads threads; prompt $prompt, generate $gen; median of $runs"
printf "| model | type | mxn decode tok/s | llama.cpp decode tok/s | ratio | mxn prompt tok/s | llama.cpp prompt tok/s | ratio |\n|---|---|--:|--:|--:|--:|--:|--:|\n"
for model in ${MODELS:-gpt2 llama1b}; do
  make_model "$model"
  for type in ${TYPES:-f32 bf16}; do
    file="$work/$model-$type.gguf"
    [[ -f "$file" ]] || "$mxn" convert "$work/$model" "$file" --type "$type" >&2
    md=() mp=() ld=() lp=()
    for ((r = 0; r < runs; r++)); do
      line=$("$mxn" generate --model "$file" --prompt-ids "$ids" --max-tokens "$gen" --temperature 0 \
             --ignore-eos --timings --threads "$threads" 2>&1 >/dev/null | tail -1)
      mp+=("$(sed -E 's/.*prompt [0-9]+ tokens in [0-9.]+ s \(([0-9.]+) tokens.*/\1/' <<<"$line")")
      md+=("$(sed -E 's/.*decode [0-9]+ tokens in [0-9.]+ s \(([0-9.]+) tokens.*/\1/' <<<"$line")")
      json=$("$bench" -m "$file" -t "$threads" -p "$prompt" -n "$gen" -r 1 -o json 2>/dev/null)
      lp+=("$("$py" -c 'import json,sys; print([r["avg_ts"] for r in json.load(sys.stdin) if r["n_prompt"]][0])' <<<"$json")")
      ld+=("$("$py" -c 'import json,sys; print([r["avg_ts"] for r in json.load(sys.stdin) if r["n_gen"]][0])' <<<"$json")")
    done
    a=$(printf "%s\n" "${md[@]}" | median) b=$(printf "%s\n" "${ld[@]}" | median)
    c=$(printf "%s\n" "${mp[@]}" | median) d=$(printf "%s\n" "${lp[@]}" | median)
    awk -v m="$model" -v t="$type" -v a="$a" -v b="$b" -v c="$c" -v d="$d" \
      'BEGIN { printf "| %s | %s | %.1f | %.1f | %.2f | %.1f | %.1f | %.2f |\n", m, t, a, b, a / b, c, d, c / d }'
  done
done
