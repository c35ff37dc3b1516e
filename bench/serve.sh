#!/usr/bin/env bash
# Serving throughput and latency on the CPU: mxn serve against llama.cpp's llama-server (built from
# the sources in the llama-cpp-python package, bench/llamacpp.sh), GPT-2 124M with the same
# weights (mxn reads the model folder; llama.cpp the GGUF that mxn converts from it), the same
# cores. bench/serve_load.py sends a fixed mix (KJV prompts of 16-256 words, 64 greedy tokens
# each, ignore_eos, streamed) at CLIENTS concurrent clients, 2 x clients requests (at least 16),
# after one warm-up request. Prints a table row per concurrency, then the ratio at 32 clients.
# Not a test: timings are noisy. Environment: CLIENTS ("1 8 32 64"), THREADS (all cores),
# GEN (64), TYPE (f32: mxn's f32 weights and an f32 GGUF; bf16: `mxn serve --weights bf16`, whose
# many-row GEMMs run on the bf16 units as llama.cpp's do with a bf16 GGUF), WORK (build/bench).
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${THREADS:-$(nproc)}" gen="${GEN:-64}" type="${TYPE:-f32}"
work="${WORK:-build/bench}" mxn="${BUILD_DIR:-build}/mxn"
mkdir -p "$work"
server="$(TARGET=llama-server bench/llamacpp.sh)"
bench/make_model.sh gpt2 "$work/gpt2"
gguf="$work/gpt2-$type.gguf"
[[ -f "$gguf" ]] || "$mxn" convert "$work/gpt2" "$gguf" --type "$type" >&2
[[ -s data/kjv.txt ]] || { echo "data/kjv.txt is missing: run scripts/setup" >&2; exit 1; }
py=build/test-venv/bin/python
clients="${CLIENTS:-1 8 32 64}"
most=$(tr ' ' '\n' <<<"$clients" | sort -n | tail -1)
ctx=1024  # per request: GPT-2's context (the longest prompt is about 500 tokens, then 64 more)

wait_up() {  # $1: url; the server answers /health with 200
  for _ in $(seq 600); do
    curl -sf "$1/health" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "the server at $1 did not come up" >&2
  return 1
}
run() {  # $1: name -> one JSON line per concurrency in $work/serve-$1.jsonl
  local port=$((18000 + RANDOM % 1000)) pid
  if [[ $1 == mxn ]]; then
    "$mxn" serve --model gpt2="$work/gpt2" --port "$port" --slots "$most" --ctx "$ctx" \
      --threads "$threads" --weights "$type" >"$work/serve-$1.log" 2>&1 &
  else
    "$server" -m "$gguf" --port "$port" -np "$most" -c $((most * ctx)) -t "$threads" \
      -tb "$threads" >"$work/serve-$1.log" 2>&1 &
  fi
  pid=$!
  wait_up "http://127.0.0.1:$port"
  : >"$work/serve-$1.jsonl"
  for c in $clients; do
    n=$((2 * c < 16 ? 16 : 2 * c))
    "$py" bench/serve_load.py "http://127.0.0.1:$port" gpt2 "$c" "$n" "$gen" data/kjv.txt \
      >>"$work/serve-$1.jsonl"
  done
  kill "$pid"
  wait "$pid" 2>/dev/null || true
}
run mxn
run llamacpp
echo "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $threads threads; GPT-2 124M, $gen tokens a request; $type weights"
"$py" - "$work/serve-mxn.jsonl" "$work/serve-llamacpp.jsonl" <<'PY'
import json, sys
m = [json.loads(l) for l in open(sys.argv[1])]
l = {r["concurrency"]: r for r in (json.loads(x) for x in open(sys.argv[2]))}
print("| clients | mxn tok/s | llama.cpp tok/s | ratio | TTFT p50 / p99 ms: mxn | llama.cpp | TPOT p50 / p99 ms: mxn | llama.cpp | errors |")
print("|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
for a in m:
    b = l[a["concurrency"]]
    print(f"| {a['concurrency']} | {a['tokens_per_s']:.1f} | {b['tokens_per_s']:.1f} | {a['tokens_per_s'] / b['tokens_per_s']:.2f} "
          f"| {a['ttft_p50_ms']:.0f} / {a['ttft_p99_ms']:.0f} | {b['ttft_p50_ms']:.0f} / {b['ttft_p99_ms']:.0f} "
          f"| {a['tpot_p50_ms']:.1f} / {a['tpot_p99_ms']:.1f} | {b['tpot_p50_ms']:.1f} / {b['tpot_p99_ms']:.1f} "
          f"| {a['errors']} / {b['errors']} |")
for a in m:
    if a["concurrency"] == 32:
        b = l[32]
        print(f"mxn/llama.cpp at 32 clients: throughput {a['tokens_per_s'] / b['tokens_per_s']:.2f}x, "
              f"p99 time to first token {a['ttft_p99_ms'] / b['ttft_p99_ms']:.2f}x")
PY
