#!/usr/bin/env bash
# llama.cpp's greedy tokens on a GGUF, to set beside `mxn generate --print-ids` (a check that a
# GGUF mxn writes means to llama.cpp what it means to mxn; not a test: llama.cpp is not built by
# setup). Builds llama.cpp's library with bench/llamacpp.sh and bench/llama_greedy.cpp against it.
#   bench/llama_greedy.sh MODEL.gguf N ID,ID,...   prints N greedy ids after the prompt, one a line
set -euo pipefail
model="$(realpath "$1")"
shift
cd "$(dirname "$0")/.."
lib="$(dirname "$(TARGET=llama-bench ./bench/llamacpp.sh)")"
src="$(dirname "$lib")/.."
tool="$lib/llama_greedy"
if [[ ! -x "$tool" || bench/llama_greedy.cpp -nt "$tool" ]]; then
  g++ -O2 -std=c++17 bench/llama_greedy.cpp -I"$src/include" -I"$src/ggml/include" -L"$lib" \
    -lllama -lggml -lggml-base -Wl,-rpath,"$lib" -o "$tool"
fi
exec "$tool" "$model" "$@"
