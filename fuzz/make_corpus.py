#!/usr/bin/python3
"""Writes the seed corpora in fuzz/corpus/ (committed; re-run only to regenerate them).
usage: build/test-venv/bin/python fuzz/make_corpus.py build/mxn"""
import json, os, struct, subprocess, sys, tempfile

import numpy as np
import torch
from safetensors.numpy import save as st_save
from transformers import GPT2Config, GPT2LMHeadModel, GlmConfig, GlmForCausalLM, LlamaConfig, LlamaForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
MXN = sys.argv[1]


def put(kind, name, data):
    d = os.path.join(HERE, "corpus", kind)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


# safetensors
r = np.arange(12, dtype=np.float32).reshape(3, 4)
put("safetensors", "f32", st_save({"a": r, "b": r[0].copy()}, metadata={"format": "pt"}))
put("safetensors", "f16", st_save({"w": r.astype(np.float16)}))
put("safetensors", "i32", st_save({"ids": np.arange(5, dtype=np.int32)}))
full = st_save({"a": r})
put("safetensors", "truncated", full[:-7])
put("safetensors", "empty_header", struct.pack("<Q", 2) + b"{}")
put("safetensors", "bad_offsets", struct.pack("<Q", 60) + b'{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,99]}}'.ljust(60))

# config.json
configs = {
    "gpt2": {"architectures": ["GPT2LMHeadModel"], "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 128, "n_positions": 64},
    "llama3": {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 128, "max_position_embeddings": 128,
               "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "eos_token_id": [1, 2],
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 64}},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 40, "num_hidden_layers": 1, "num_attention_heads": 5,
              "num_key_value_heads": 1, "intermediate_size": 70, "vocab_size": 101, "max_position_embeddings": 64},
    "glm": {"architectures": ["GlmForCausalLM"], "hidden_size": 48, "num_hidden_layers": 1, "num_attention_heads": 6,
            "num_key_value_heads": 3, "head_dim": 12, "intermediate_size": 70, "vocab_size": 101,
            "partial_rotary_factor": 0.5, "attention_bias": True},
    "chatglm": {"architectures": ["ChatGLMModel"], "padded_vocab_size": 101, "hidden_size": 48, "num_layers": 1,
                "num_attention_heads": 6, "kv_channels": 8, "multi_query_attention": True, "multi_query_group_num": 2,
                "ffn_hidden_size": 70, "seq_length": 64, "layernorm_epsilon": 1e-5, "rope_ratio": 1.0,
                "add_qkv_bias": True, "rmsnorm": True},
    "unknown_arch": {"architectures": ["BertModel"], "hidden_size": 8},
}
for k, v in configs.items():
    put("hf_config", k, json.dumps(v))

# tokenizer.json: byte-level BPE, GPT-2's and Llama 3's pre-tokenizers, added tokens
vocab = {c: i for i, c in enumerate("HeloĠwrd!,") }
vocab.update({"He": 10, "ll": 11, "llo": 12, "Hello": 13, "Ġw": 14})
bpe = {"type": "BPE", "vocab": vocab, "merges": ["H e", "l l", "ll o", "He llo", "Ġ w"]}
put("tokenizer_json", "gpt2", json.dumps({"model": bpe, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False},
                                          "added_tokens": [{"id": 15, "content": "<|end|>", "special": True}]}))
split = {"type": "Split", "pattern": {"Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"},
         "behavior": "Isolated", "invert": False}
put("tokenizer_json", "llama3", json.dumps({"normalizer": None, "model": dict(bpe, merges=[["H", "e"], ["l", "l"]], ignore_merges=True),
                                            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, {"type": "ByteLevel", "use_regex": False}]}}))
put("tokenizer_json", "not_bpe", json.dumps({"model": {"type": "Unigram", "vocab": [["a", 0.0]]}}))

# GGUF: tiny models of each family, as mxn writes them
with tempfile.TemporaryDirectory() as tmp:
    torch.manual_seed(0)
    models = {
        "gpt2": GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=16, n_positions=16)),
        "llama": LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                              intermediate_size=32, vocab_size=16, max_position_embeddings=16)),
        "glm": GlmForCausalLM(GlmConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                        head_dim=16, intermediate_size=32, vocab_size=16, pad_token_id=None)),
    }
    for name, m in models.items():
        d = os.path.join(tmp, name)
        m.save_pretrained(d)
        for qt in ("f32", "q8_0"):
            out = os.path.join(tmp, f"{name}-{qt}.gguf")
            subprocess.run([MXN, "convert", d, out, "--type", qt], check=True, capture_output=True)
            put("gguf", f"{name}-{qt}", open(out, "rb").read())
    b = open(os.path.join(tmp, "llama-f32.gguf"), "rb").read()
    put("gguf", "truncated", b[: len(b) // 2])
    put("gguf", "header_only", b[:24])
