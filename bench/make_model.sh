#!/usr/bin/env bash
# Makes a benchmark model folder once (config, random weights from transformers in the test venv,
# GPT-2's tokenizer files): gpt2 (GPT-2 124M) or llama1b (a LLaMA-shaped 1.2B: 2048 wide, 22
# layers, 32 heads, 4 KV heads, 5632 FFN, GPT-2's 50257-token vocabulary), or qwen3moe (a
# Qwen3-MoE shape scaled to this machine's memory: 2048 wide, 12 layers, 16 heads / 4 KV heads of
# 128, 32 experts of width 768, 8 a token; 2.1B parameters, 0.65B active a token; random N(0,
# 0.02) weights written here with numpy, per-expert tensors as Qwen3-MoE checkpoints name them).
# usage: bench/make_model.sh NAME DIR
set -euo pipefail
cd "$(dirname "$0")/.."
name="$1" dir="$2"
[[ -f "$dir/config.json" ]] && exit 0
scripts/test-venv >&2
if [[ $name == qwen3moe ]]; then
  build/test-venv/bin/python - "$dir" <<'PY' >&2
import json, os, shutil, sys
import numpy as np
from safetensors.numpy import save_file
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
C, L, H, G, D, E, K, F, V = 2048, 12, 16, 4, 128, 32, 8, 768, 50257
cfg = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=V, hidden_size=C,
           num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=G, head_dim=D,
           intermediate_size=6144, moe_intermediate_size=F, num_experts=E, num_experts_per_tok=K,
           norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=4096,
           rms_norm_eps=1e-6, rope_theta=1000000.0, hidden_act="silu", tie_word_embeddings=False,
           torch_dtype="float32")
rng = np.random.default_rng(0)
r = lambda *s: (rng.standard_normal(s, dtype=np.float32) * 0.02)
index, shard = {}, 0
def write(t):
    global shard
    name = f"model-{shard:05d}.safetensors"
    save_file(t, os.path.join(out, name))
    index.update({k: name for k in t})
    shard += 1
write({"model.embed_tokens.weight": r(V, C), "lm_head.weight": r(V, C), "model.norm.weight": np.ones(C, np.float32)})
for l in range(L):
    p = f"model.layers.{l}."
    t = {p + "input_layernorm.weight": np.ones(C, np.float32), p + "post_attention_layernorm.weight": np.ones(C, np.float32),
         p + "self_attn.q_proj.weight": r(H * D, C), p + "self_attn.k_proj.weight": r(G * D, C),
         p + "self_attn.v_proj.weight": r(G * D, C), p + "self_attn.o_proj.weight": r(C, H * D),
         p + "self_attn.q_norm.weight": np.ones(D, np.float32), p + "self_attn.k_norm.weight": np.ones(D, np.float32),
         p + "mlp.gate.weight": r(E, C)}
    for e in range(E):
        q = f"{p}mlp.experts.{e}."
        t.update({q + "gate_proj.weight": r(F, C), q + "up_proj.weight": r(F, C), q + "down_proj.weight": r(C, F)})
    write(t)
with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": index}, f)
with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(cfg, f)
shutil.copy("../shared/data/gpt2-bpe/encoder.json", f"{out}/vocab.json")
shutil.copy("../shared/data/gpt2-bpe/vocab.bpe", f"{out}/merges.txt")
PY
  exit 0
fi
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
