#!/usr/bin/env bash
# Perplexity of the same GGUF file on the same text: `mxn eval --perplexity` (the GGUF's own
# tokenizer, chunks of CTX tokens, each one's second half scored) beside llama.cpp's
# llama-perplexity (built from the llama-cpp-python package's sources, bench/llamacpp.sh), for
# each type mxn writes. The model is GPT-2 124M's shape with random weights (bench/make_model.sh),
# so the perplexity itself is near the vocabulary's size; what is compared is the two engines'
# figure on identical input: tokenization, chunking and the forward pass in each weight type.
# First, llama.cpp's llama-tokenize and `mxn tokenize` on the GGUF alone: the same ids or not.
# Not a test (it needs llama.cpp built). Environment: TYPES ("f32 bf16 q8_0 q4_0"), CTX (512), BYTES
# (60000: the first bytes of the KJV), WORK (build/bench), THREADS (all cores).
set -euo pipefail
cd "$(dirname "$0")/.."
work="${WORK:-build/bench}" mxn="${BUILD_DIR:-build}/mxn" ctx="${CTX:-512}"
threads="${THREADS:-$(nproc)}"
mkdir -p "$work"
ppl="$(TARGET=llama-perplexity bench/llamacpp.sh)"
tokenize="$(TARGET=llama-tokenize bench/llamacpp.sh)"
bench/make_model.sh gpt2 "$work/gpt2"
text="$work/kjv-${BYTES:-60000}.txt"
head -c "${BYTES:-60000}" data/kjv.txt > "$text"
# The tokenizer first: llama.cpp's and mxn's ids for the whole text from the GGUF alone.
[[ -f "$work/gpt2-f32.gguf" ]] || "$mxn" convert "$work/gpt2" "$work/gpt2-f32.gguf" --type f32 >&2
"$tokenize" -m "$work/gpt2-f32.gguf" -f "$text" --ids --log-disable 2>/dev/null | tail -1 |
  tr -d '[],' | tr ' ' '\n' | grep -v '^$' > "$work/ids-llama.txt"
"$mxn" tokenize --tokenizer "$work/gpt2-f32.gguf" --file "$text" > "$work/ids-mxn.txt"
if cmp -s "$work/ids-llama.txt" "$work/ids-mxn.txt"; then
  echo "tokens: $(wc -l < "$work/ids-mxn.txt") ids, identical in llama-tokenize and mxn tokenize"
else
  echo "tokens: DIFFER (llama.cpp $(wc -l < "$work/ids-llama.txt"), mxn $(wc -l < "$work/ids-mxn.txt"))"
fi
echo "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $threads threads; context $ctx; $(wc -c < "$text") bytes of the KJV"
printf "| type | mxn perplexity | llama.cpp perplexity | difference | chunks (mxn / llama.cpp) |\n|---|--:|--:|--:|--:|\n"
for type in ${TYPES:-f32 bf16 q8_0 q4_0}; do
  file="$work/gpt2-$type.gguf"
  [[ -f "$file" ]] || "$mxn" convert "$work/gpt2" "$file" --type "$type" >&2
  m=$("$mxn" eval --model "$file" --data "$text" --perplexity --ctx "$ctx" --threads "$threads")
  l=$("$ppl" -m "$file" -f "$text" -c "$ctx" -t "$threads" 2>&1)
  mp=$(sed -nE 's/^perplexity: ([0-9.]+).*/\1/p' <<<"$m")
  mc=$(sed -nE 's/.* ([0-9]+) chunks of .*/\1/p' <<<"$m")
  lp=$(sed -nE 's/.*Final estimate: PPL = ([0-9.]+).*/\1/p' <<<"$l")
  lc=$(sed -nE 's/.*calculating perplexity over ([0-9]+) chunks.*/\1/p' <<<"$l")
  python3 -c "import sys; a,b=float(sys.argv[2]),float(sys.argv[3]); print(f'| {sys.argv[1]} | {a:.4f} | {b:.4f} | {100*(a-b)/b:+.4f}% | {sys.argv[4]} / {sys.argv[5]} |')" \
    "$type" "$mp" "$lp" "$mc" "$lc"
done
