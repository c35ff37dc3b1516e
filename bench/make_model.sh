#!/usr/bin/env bash
# Makes a benchmark model folder once (config, random weights from transformers in the test venv,
# GPT-2's tokenizer files): gpt2 (GPT-2 124M) or llama1b (a LLaMA-shaped 1.2B: 2048 wide, 22
# layers, 32 heads, 4 KV heads, 5632 FFN, GPT-2's 50257-token vocabulary).
# usage: bench/make_model.sh NAME DIR
set -euo pipefail
cd "$(dirname "$0")/.."
name="$1" dir="$2"
[[ -f "$dir/config.json" ]] && exit 0
scripts/test-venv >&2
build/test-venv/bin/python - "$name" "$dir" <<'PY' >&2
import shutil, sys, torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
name, out = sys.argv[1:3]
torch.manual_seed(0)
if name == "gpt2":
    m = GPT2LMHeadModel(GPT2Config())
else:
    m = LlamaForCausalLM(LlamaConfig(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                                     num_key_value_heads=4, intermediate_size=5632, vocab_size=50257,
                                     max_position_embeddings=2048, tie_word_embeddings=False))
m.save_pretrained(out, safe_serialization=True, max_shard_size="2GB")
shutil.copy("../shared/data/gpt2-bpe/encoder.json", f"{out}/vocab.json")
shutil.copy("../shared/data/gpt2-bpe/vocab.bpe", f"{out}/merges.txt")
PY
