#!/usr/bin/env bash
# Training memory: GPT-2 124M (12 layers, width 768, 12 heads), context 1024, batch 4, vocab
# 50257, AdamW, f32 or bf16 (DTYPE); peak resident memory of mxn and of PyTorch training the same
# model (the newest PyTorch from PyPI in a bench venv, build/bench-torch, made here when missing;
# and Debian's torch 1.13 for reference), with their tokens/s. mxn's defaults recompute layer
# norms and GELUs and, in bf16, keep the MLP's pre-activation and q, k, v in bf16
# (RECOMPUTE=0 and MXN_BF16_ACTS=0 turn them off). Not a test.
# Environment: STEPS (2), THREADS (all cores), DTYPE (f32), RECOMPUTE (1).
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${STEPS:-2}" threads="${THREADS:-$(nproc)}" mxn="${BUILD_DIR:-build}/mxn"
dtype="${DTYPE:-f32}" recompute="${RECOMPUTE:-1}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
if [[ ! -x build/bench-torch/bin/python ]]; then
  python3 -m venv build/bench-torch
  build/bench-torch/bin/pip install -q torch numpy
fi
shard=build/bench/kjv-gpt2.bin
[[ -f "$shard" ]] || "$mxn" prepare data/kjv.txt --out "$shard" --tokenizer ../shared/data/gpt2-bpe/encoder.json > /dev/null
shape=(--n_layer 12 --n_embd 768 --n_head 12 --n_ctx 1024 --batch 4 --vocab_size 50257)
echo "GPT-2 124M, context 1024, batch 4, vocab 50257, $dtype, AdamW; $threads threads; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
out=$("$mxn" train "${shape[@]}" --data "$shard" --steps "$steps" --threads "$threads" --eval_every 0 \
      --ckpt_every 0 --log_every 1 --dtype "$dtype" --recompute "$recompute" --out "$tmp/run")
grep 'memory on' <<<"$out"
mxn_gib=$(grep -o 'peak resident memory: [0-9.]*' <<<"$out" | awk '{print $4}')
mxn_all=$(grep -o '[0-9.]* GiB with evaluation' <<<"$out" | awk '{print $1}')
mxn_tps=$(/usr/bin/python3 -c "import json,statistics; r=[json.loads(l) for l in open('$tmp/run/metrics.jsonl')]; print(f\"{4*1024/statistics.median(x['step_s'] for x in r[1:] or r):.1f}\")")
echo "mxn                  peak resident memory: $mxn_gib GiB, $mxn_tps tokens/s ($mxn_all GiB with the final evaluation and checkpoint)"
for py in build/bench-torch/bin/python /usr/bin/python3; do
  r=$("$py" bench/torch_gpt.py --layers 12 --width 768 --heads 12 --ctx 1024 --batch 4 --vocab 50257 \
      --steps 1 --threads "$threads" --dtype "$dtype")
  v=$(grep -o 'torch [^ ]* peak' <<<"$r" | awk '{print $2}')
  printf "torch %-14s peak resident memory: %s GiB, %s tokens/s\n" "$v" \
    "$(grep -o 'memory: [0-9.]*' <<<"$r" | awk '{print $2}')" "$(tail -1 <<<"$r" | awk '{print $NF}')"
done
