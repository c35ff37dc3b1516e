"""Shared by the tests that compare mxn with transformers: the test venv, tiny random models of
each family, and the ChatGLM2/3 checkpoint layout written from a GLM model."""
import json, os, sys

try:
    import transformers  # noqa: F401
except ImportError:  # re-run inside the test venv that scripts/test makes
    venv = os.environ.get("MXN_TEST_VENV", os.path.join(os.path.dirname(os.path.abspath(sys.argv[1])), "test-venv"))
    py = os.path.join(venv, "bin", "python")
    if not os.path.exists(py):
        sys.exit(f"transformers is missing: run scripts/test-venv (looked in {venv})")
    os.execv(py, [py] + sys.argv)

import numpy as np
import torch
from safetensors.numpy import save_file
from transformers import (GPT2Config, GPT2LMHeadModel, GlmConfig, GlmForCausalLM, LlamaConfig,
                          LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def perturb(model, seed, std=0.08):
    """Random weights everywhere (biases and norm gains too), so every path carries signal; the
    embeddings larger so greedy decoding has clear winners."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            s = 0.5 if "embed" in name or "wte" in name or "lm_head" in name else std
            base = 1.0 if ("norm" in name or "ln_" in name) and name.endswith("weight") else 0.0
            p.copy_(base + torch.randn(p.shape, generator=g) * s)
    return model


def make(family, odd):
    if family == "gpt2":
        cfg = GPT2Config(n_layer=2, n_head=3 if odd else 4, n_embd=57 if odd else 64,
                         vocab_size=101 if odd else 128, n_positions=96)
        return GPT2LMHeadModel(cfg)
    if family == "llama":
        kw = dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=1,
                  intermediate_size=77, tie_word_embeddings=True,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}) if odd else \
             dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96)
        return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, vocab_size=101 if odd else 128,
                                            max_position_embeddings=128, rope_theta=500000.0 if odd else 10000.0,
                                            **kw))
    if family == "qwen2":
        kw = dict(hidden_size=40, num_attention_heads=5, num_key_value_heads=1, intermediate_size=70,
                  tie_word_embeddings=True) if odd else \
             dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=80)
        return Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=2, vocab_size=101 if odd else 128,
                                            max_position_embeddings=128, pad_token_id=None, **kw))
    if family in ("glm", "chatglm"):
        kw = dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=3, head_dim=12,
                  intermediate_size=70) if odd else \
             dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  intermediate_size=96)
        return GlmForCausalLM(GlmConfig(num_hidden_layers=2, vocab_size=101 if odd else 128,
                                        max_position_embeddings=128, pad_token_id=None, **kw))
    raise ValueError(family)


# --- ChatGLM2/3 layout -------------------------------------------------------------------------
def to_chatglm(model, folder):
    """Writes the GLM model as a ChatGLM2/3 checkpoint (GLM.md's names and config)."""
    c = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {"transformer.embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
           "transformer.encoder.final_layernorm.weight": sd["model.norm.weight"],
           "transformer.output_layer.weight": sd["lm_head.weight"]}
    for l in range(c.num_hidden_layers):
        s, d = f"model.layers.{l}.", f"transformer.encoder.layers.{l}."
        out[d + "input_layernorm.weight"] = sd[s + "input_layernorm.weight"]
        out[d + "post_attention_layernorm.weight"] = sd[s + "post_attention_layernorm.weight"]
        for t in ("weight", "bias"):
            out[d + f"self_attention.query_key_value.{t}"] = np.concatenate(
                [sd[s + f"self_attn.{p}_proj.{t}"] for p in "qkv"], 0)
        out[d + "self_attention.dense.weight"] = sd[s + "self_attn.o_proj.weight"]
        out[d + "mlp.dense_h_to_4h.weight"] = sd[s + "mlp.gate_up_proj.weight"]
        out[d + "mlp.dense_4h_to_h.weight"] = sd[s + "mlp.down_proj.weight"]
    os.makedirs(folder, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in out.items()},
              os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    cfg = {"architectures": ["ChatGLMModel"], "model_type": "chatglm",
           "padded_vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
           "num_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
           "kv_channels": c.head_dim, "multi_query_attention": True,
           "multi_query_group_num": c.num_key_value_heads, "ffn_hidden_size": c.intermediate_size,
           "seq_length": c.max_position_embeddings, "layernorm_epsilon": c.rms_norm_eps,
           "rmsnorm": True, "add_qkv_bias": True, "add_bias_linear": False,
           "post_layer_norm": True, "apply_residual_connection_post_layernorm": False,
           "rope_ratio": 1.0}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}, cfg


# --- running mxn against a reference ------------------------------------------------------------
def run_dump(dump, folder, ids, tmp):
    """tests/tools/decoder_dump on a (B, T) batch: its logits, loss, gradients (and routers)."""
    import subprocess
    from safetensors.numpy import load_file
    save_file({"tokens": ids.numpy().astype(np.int32)}, os.path.join(tmp, "in.safetensors"))
    out = os.path.join(tmp, "out.safetensors")
    r = subprocess.run([dump, folder, os.path.join(tmp, "in.safetensors"), out], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return load_file(out)


def greedy_mxn(mxn, folder, prompt, n):
    """n greedy tokens from `mxn generate` (the KV cache) after `prompt`."""
    import subprocess
    r = subprocess.run([mxn, "generate", "--model", folder, "--prompt-ids", ",".join(str(int(t)) for t in prompt),
                        "--max-tokens", str(n), "--temperature", "0", "--ignore-eos", "--print-ids"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return [int(t) for t in r.stdout.split()]


def greedy_ref(fn, prompt, n):
    """n greedy tokens of a reference forward `fn` (ids (1, T) -> logits), recomputed each step."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(fn(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]

