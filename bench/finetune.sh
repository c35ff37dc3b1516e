#!/usr/bin/env bash
# Fine-tuning a 0.65B LLaMA-shaped model on this CPU: full fine-tuning, LoRA r=8 (q_proj,
# v_proj, alpha 16) and P-Tuning v2 (prefix 64), f32, context 256, batch 1, on the KJV in GPT-2
# tokens; mxn against PyTorch (+ peft for the adapters) from PyPI in the bench venv
# (build/bench-torch, made here when missing).
# Prints trainable parameters, peak resident memory and tokens/s (median step after the first)
# for each, then the ratios. The model (2048 wide, 10 layers, 32 heads, 4 KV heads, MLP 5632,
# vocab 50257: 0.65B parameters) has random weights made by transformers in the test venv; ~1B
# does not fit a full fine-tune here: mxn's final checkpoint copies weights and moments to host
# (16 + 12 bytes a parameter in all) and this machine has 24 GiB. Not a test.
# Environment: STEPS (3), THREADS (all cores), WORK (build/bench).
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${STEPS:-3}" threads="${THREADS:-$(nproc)}" mxn="${BUILD_DIR:-build}/mxn" work="${WORK:-build/bench}"
mkdir -p "$work"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
if ! build/bench-torch/bin/python -c "import torch, transformers, peft" 2>/dev/null; then
  [[ -x build/bench-torch/bin/python ]] || python3 -m venv build/bench-torch
  build/bench-torch/bin/pip install -q torch numpy transformers peft
fi
scripts/test-venv
model="$work/llama0.65b"
if [[ ! -f "$model/config.json" ]]; then
  build/test-venv/bin/python - "$model" <<'PY'
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
LlamaForCausalLM(LlamaConfig(hidden_size=2048, num_hidden_layers=10, num_attention_heads=32,
                             num_key_value_heads=4, intermediate_size=5632, vocab_size=50257,
                             max_position_embeddings=2048, tie_word_embeddings=False)
                 ).save_pretrained(sys.argv[1], safe_serialization=True, max_shard_size="2GB")
PY
fi
shard="$work/kjv-gpt2.bin"
[[ -f "$shard" ]] || "$mxn" prepare data/kjv.txt --out "$shard" --tokenizer ../shared/data/gpt2-bpe/encoder.json > /dev/null
echo "LLaMA 0.65B (2048 x 10), f32, context 256, batch 1, $steps steps; $threads threads; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
printf "| run | trainable | peak resident GiB | tokens/s |\n|---|--:|--:|--:|\n"
declare -A mem tps
for mode in full lora lora-bf16base ptuning; do
  args=(--model "$model" --data "$shard" --steps "$steps" --batch 1 --n_ctx 256 --threads "$threads"
        --eval_every 0 --eval_batches 1 --ckpt_every 0 --log_every 1 --lr 1e-4 --min_lr 1e-5 --warmup 0 --dtype f32 --out "$tmp/$mode")
  case $mode in
    lora) args+=(--finetune lora --lora_r 8 --lora_alpha 16) ;;
    lora-bf16base) args+=(--finetune lora --lora_r 8 --lora_alpha 16 --base_dtype bf16) ;;
    ptuning) args+=(--finetune ptuning --prefix_len 64) ;;
  esac
  out=$("$mxn" train "${args[@]}")
  mem[mxn-$mode]=$(grep -o 'peak resident memory: [0-9.]*' <<<"$out" | awk '{print $4}')
  tps[mxn-$mode]=$(/usr/bin/python3 -c "import json,statistics; r=[json.loads(l) for l in open('$tmp/$mode/metrics.jsonl')]; print(f\"{256/statistics.median(x['step_s'] for x in r[1:] or r):.1f}\")")
  trainable=$(/usr/bin/python3 -c "
import json, struct
n = 0
for f in ['model.safetensors']:
    with open('$(ls -d "$tmp/$mode"/ckpt-* | tail -1)/' + f, 'rb') as h:
        hdr = json.loads(h.read(struct.unpack('<Q', h.read(8))[0]))
    for k, v in hdr.items():
        if k != '__metadata__':
            c = 1
            for d in v['shape']: c *= d
            n += c
print(n)")
  printf "| mxn %s | %s | %s | %s |\n" "$mode" "$trainable" "${mem[mxn-$mode]}" "${tps[mxn-$mode]}"
  rm -rf "$tmp/$mode"
done
for mode in full lora ptuning; do
  r=$(build/bench-torch/bin/python bench/torch_finetune.py --model "$model" --data "$shard" --mode "$mode" \
      --steps "$steps" --seq 256 --batch 1 --threads "$threads" --alpha 16)
  line=$(tail -1 <<<"$r")
  mem[torch-$mode]=$(grep -o 'memory [0-9.]*' <<<"$line" | awk '{print $2}')
  tps[torch-$mode]=$(awk '{print $(NF-1)}' <<<"$line")
  printf "| %s | %s | %s | %s |\n" "$(cut -d: -f1 <<<"$line")" "$(grep -o 'trainable [0-9]*' <<<"$line" | awk '{print $2}')" \
    "${mem[torch-$mode]}" "${tps[torch-$mode]}"
done
ratio() { /usr/bin/python3 -c "print(f'{$1/$2:.2f}')"; }
echo "mxn LoRA / mxn full peak memory: $(ratio "${mem[mxn-lora]}" "${mem[mxn-full]}") (bf16 base: $(ratio "${mem[mxn-lora-bf16base]}" "${mem[mxn-full]}"))"
echo "mxn/torch tokens/s: full $(ratio "${tps[mxn-full]}" "${tps[torch-full]}"), LoRA $(ratio "${tps[mxn-lora]}" "${tps[torch-lora]}"), P-Tuning v2 $(ratio "${tps[mxn-ptuning]}" "${tps[torch-ptuning]}")"
echo "mxn/torch peak memory: full $(ratio "${mem[mxn-full]}" "${mem[torch-full]}"), LoRA $(ratio "${mem[mxn-lora]}" "${mem[torch-lora]}"), P-Tuning v2 $(ratio "${mem[mxn-ptuning]}" "${mem[torch-ptuning]}")"
