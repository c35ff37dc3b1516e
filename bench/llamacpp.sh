#!/usr/bin/env bash
# Builds llama.cpp once from the sources bundled in the llama-cpp-python package (PyPI sdist),
# into BENCH_DIR (default build/bench/llama.cpp), and prints the path of its llama-bench (or of
# the TARGET named, e.g. llama-server). Used by bench/decode_vs_llamacpp.sh and bench/serve.sh;
# not part of setup or the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${BENCH_DIR:-build/bench}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
target="${TARGET:-llama-bench}"
if [[ ! -x "$dir/llama.cpp/build/bin/$target" ]]; then
  if [[ ! -d "$dir/llama.cpp" ]]; then
    python3 -m pip download --quiet --no-deps --no-binary :all: llama-cpp-python -d "$dir/sdist" >&2
    tar -xzf "$dir"/sdist/llama_cpp_python-*.tar.gz -C "$dir/sdist"
    mv "$dir"/sdist/llama_cpp_python-*/vendor/llama.cpp "$dir/llama.cpp"
    rm -rf "$dir/sdist"
  fi
  cmake -S "$dir/llama.cpp" -B "$dir/llama.cpp/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON >&2
  cmake --build "$dir/llama.cpp/build" --target "$target" >&2
fi
echo "$dir/llama.cpp/build/bin/$target"
