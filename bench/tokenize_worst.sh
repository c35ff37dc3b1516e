#!/usr/bin/env bash
# BPE's worst case (issue 24): one word of 32 KB and of 1 MiB (random letters: no merge makes a
# long token, so every merge leaves many pairs), and 1 MiB of random text, tokenized by mxn
# (`mxn tokenize --file`, GPT-2's vocab.json + merges.txt) and by Hugging Face `tokenizers`
# (Rust, the same files) in the same run, alternating; mxn's time is the process's wall time less
# that of an empty file (loading the tokenizer). MXN_OLD=path/to/an/older/mxn adds its figure.
# Usage: bench/tokenize_worst.sh [build/mxn]
set -euo pipefail
cd "$(dirname "$0")/.."
mxn="${1:-build/mxn}"
py="${MXN_TEST_VENV:-build/test-venv}/bin/python"
[ -x "$py" ] || scripts/test-venv "${MXN_TEST_VENV:-build/test-venv}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp ../shared/data/gpt2-bpe/encoder.json "$work/vocab.json"
cp ../shared/data/gpt2-bpe/vocab.bpe "$work/merges.txt"
"$py" - "$mxn" "$work" "${MXN_OLD:-}" <<'PY'
import os, random, subprocess, sys, time
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
mxn, work, old = sys.argv[1], sys.argv[2], sys.argv[3]
random.seed(0)
letters = "abcdefghijklmnopqrstuvwxyz"
cases = {"word 32 KB": "".join(random.choice(letters) for _ in range(32 << 10)),
         "word 1 MiB": "".join(random.choice(letters) for _ in range(1 << 20)),
         "text 1 MiB": " ".join("".join(random.choice(letters) for _ in range(random.randint(1, 12)))
                                for _ in range(150000))[: 1 << 20]}
tk = Tokenizer(models.BPE.from_file(f"{work}/vocab.json", f"{work}/merges.txt"))
tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tk.decoder = decoders.ByteLevel()
open(f"{work}/empty.txt", "w").close()

def run(binary, path):
    t0 = time.perf_counter()
    out = subprocess.run([binary, "tokenize", "--tokenizer", work, "--file", path], capture_output=True,
                         text=True, check=True).stdout
    return time.perf_counter() - t0, len(out.replace(",", " ").split())

base = min(run(mxn, f"{work}/empty.txt")[0] for _ in range(5))
print(f"{'case':12} {'mxn s':>8} {'(process)':>10} {'tokenizers s':>13} {'ratio':>7} {'tokens':>8}"
      + ("   older mxn s" if old else ""))
for name, text in cases.items():
    path = f"{work}/{name.replace(' ', '_')}.txt"
    with open(path, "w") as f:
        f.write(text)
    ours, theirs, n = [], [], 0
    for _ in range(3):  # alternating
        t, n = run(mxn, path)
        ours.append(t)
        t0 = time.perf_counter()
        ref = tk.encode(text).ids
        theirs.append(time.perf_counter() - t0)
    assert n == len(ref), (name, n, len(ref))
    net = max(min(ours) - base, 1e-3)
    line = f"{name:12} {net:8.3f} {min(ours):10.3f} {min(theirs):13.3f} {net / min(theirs):6.2f}x {n:8d}"
    if old and "1 MiB" not in name:  # the quadratic one takes minutes on 1 MiB
        line += f"   {run(old, path)[0] - base:10.2f}"
    print(line, flush=True)
print(f"(mxn s: the process's wall time less {base:.3f} s for an empty file: start and tokenizer loading)")
PY
