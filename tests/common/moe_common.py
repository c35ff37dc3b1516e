"""Tiny mixture-of-experts models for the tests (and dense Qwen3): transformers' Mixtral and
Qwen2-MoE, and Hugging Face folders written here for the families the test venv's transformers
lacks (Qwen3, Qwen3-MoE, GLM-4.5, DeepSeek-V3): their config.json and random weights with the
checkpoints' names."""
import json, os

from hf_common import torch  # (may re-exec in the venv)
from safetensors.numpy import save_file
from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM


def make_hf(family, odd):
    if family == "mixtral":
        kw = dict(hidden_size=40, num_attention_heads=5, num_key_value_heads=1, intermediate_size=37,
                  num_local_experts=7, num_experts_per_tok=3, tie_word_embeddings=True) if odd else \
             dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, intermediate_size=29,
                  num_local_experts=5, num_experts_per_tok=2)
        return MixtralForCausalLM(MixtralConfig(num_hidden_layers=2, vocab_size=101 if odd else 128,
                                                max_position_embeddings=128, sliding_window=None, **kw))
    kw = dict(hidden_size=40, num_attention_heads=5, num_key_value_heads=1, intermediate_size=45,
              moe_intermediate_size=19, shared_expert_intermediate_size=23, num_experts=9,
              num_experts_per_tok=3, norm_topk_prob=True, decoder_sparse_step=2, num_hidden_layers=3,
              mlp_only_layers=[], tie_word_embeddings=True) if odd else \
         dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
              moe_intermediate_size=21, shared_expert_intermediate_size=29, num_experts=6,
              num_experts_per_tok=4, norm_topk_prob=False, num_hidden_layers=3, mlp_only_layers=[1])
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(vocab_size=101 if odd else 128, max_position_embeddings=128,
                                              use_sliding_window=False, **kw))


def qwen3_config(moe, odd):
    """A Qwen3 / Qwen3-MoE config.json as transformers writes one (head_dim apart from hidden)."""
    c = dict(architectures=["Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"],
             model_type="qwen3_moe" if moe else "qwen3", vocab_size=101 if odd else 128,
             hidden_size=40 if odd else 48, num_hidden_layers=2, num_attention_heads=5 if odd else 4,
             num_key_value_heads=1 if odd else 2, head_dim=14 if odd else 16,
             intermediate_size=43 if odd else 64, max_position_embeddings=128, rms_norm_eps=1e-6,
             rope_theta=1000000.0, hidden_act="silu", attention_bias=False,
             # yarn on whole heads (its attention factor 0.1 ln 2 + 1 on cos and sin)
             rope_scaling=dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=16) if odd and not moe
             else None,
             tie_word_embeddings=odd, eos_token_id=0)
    if moe:
        c.update(num_experts=7 if odd else 8, num_experts_per_tok=3 if odd else 2,
                 moe_intermediate_size=17 if odd else 24, norm_topk_prob=True, decoder_sparse_step=1,
                 mlp_only_layers=[0] if odd else [])
    return c


def glm4_moe_config(odd):
    """A GLM-4.5 (Glm4MoeForCausalLM) config.json: one dense layer first, then MoE layers."""
    return dict(architectures=["Glm4MoeForCausalLM"], model_type="glm4_moe", vocab_size=101 if odd else 128,
                hidden_size=40 if odd else 48, num_hidden_layers=3, num_attention_heads=5 if odd else 4,
                num_key_value_heads=1 if odd else 2, head_dim=12 if odd else 16, partial_rotary_factor=0.5,
                intermediate_size=43 if odd else 64, moe_intermediate_size=17 if odd else 24,
                n_routed_experts=9 if odd else 8, num_experts_per_tok=3 if odd else 2, n_shared_experts=1,
                n_group=3 if odd else 1, topk_group=2 if odd else 1, routed_scaling_factor=2.5 if odd else 1.8,
                first_k_dense_replace=1, norm_topk_prob=not odd, attention_bias=True, use_qk_norm=odd,
                max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
                tie_word_embeddings=False, eos_token_id=0)


def deepseek_config(odd):
    """A DeepSeek-V3 config.json: multi-head latent attention (with and without the query's
    bottleneck), the sigmoid router with groups, shared experts, one dense layer first."""
    return dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=101 if odd else 128,
                hidden_size=40 if odd else 48, num_hidden_layers=3, num_attention_heads=5 if odd else 4,
                num_key_value_heads=5 if odd else 4, q_lora_rank=None if odd else 24, kv_lora_rank=13 if odd else 16,
                qk_nope_head_dim=7 if odd else 8, qk_rope_head_dim=4 if odd else 6, v_head_dim=9 if odd else 8,
                intermediate_size=43 if odd else 64, moe_intermediate_size=17 if odd else 24,
                n_routed_experts=9 if odd else 8, num_experts_per_tok=3 if odd else 2,
                n_shared_experts=1 if odd else 2, n_group=3 if odd else 4, topk_group=2,
                routed_scaling_factor=2.5 if odd else 1.5, first_k_dense_replace=1, norm_topk_prob=True,
                scoring_func="sigmoid", topk_method="noaux_tc", moe_layer_freq=1, attention_bias=False,
                max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0, rope_interleave=True,
                # yarn as DeepSeek-V3 has it (mscale = mscale_all_dim), stretched from 16 positions
                rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=16, beta_fast=32,
                                  beta_slow=1, mscale=1.0, mscale_all_dim=1.0) if odd else None, hidden_act="silu", tie_word_embeddings=False, eos_token_id=0)


def random_weights(c, seed):
    """Random weights with Qwen3's names (Qwen3-MoE's and GLM-4.5's per-expert ones too)."""
    g = torch.Generator().manual_seed(seed)
    C, H, G, V = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["vocab_size"]
    D = c.get("head_dim", 0)

    def r(*shape, s=0.08, base=0.0):
        return base + torch.randn(shape, generator=g, dtype=torch.float64) * s

    W = {"model.embed_tokens.weight": r(V, C, s=0.5), "model.norm.weight": r(C, base=1.0)}
    if not c["tie_word_embeddings"]:
        W["lm_head.weight"] = r(V, C, s=0.5)
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        W.update({p + "input_layernorm.weight": r(C, base=1.0), p + "post_attention_layernorm.weight": r(C, base=1.0)})
        if "kv_lora_rank" in c:  # DeepSeek's multi-head latent attention
            a, R, Rq, dr = p + "self_attn.", c["kv_lora_rank"], c["q_lora_rank"], c["qk_rope_head_dim"]
            Q, dv = c["qk_nope_head_dim"] + dr, c["v_head_dim"]
            if Rq:
                W.update({a + "q_a_proj.weight": r(Rq, C), a + "q_a_layernorm.weight": r(Rq, base=1.0),
                          a + "q_b_proj.weight": r(H * Q, Rq)})
            else:
                W[a + "q_proj.weight"] = r(H * Q, C)
            W.update({a + "kv_a_proj_with_mqa.weight": r(R + dr, C), a + "kv_a_layernorm.weight": r(R, base=1.0),
                      a + "kv_b_proj.weight": r(H * (Q - dr + dv), R), a + "o_proj.weight": r(C, H * dv)})
        else:
            W.update({p + "self_attn.q_proj.weight": r(H * D, C), p + "self_attn.k_proj.weight": r(G * D, C),
                      p + "self_attn.v_proj.weight": r(G * D, C), p + "self_attn.o_proj.weight": r(C, H * D)})
        if "kv_lora_rank" in c:
            pass
        elif c["model_type"] != "glm4_moe" or c["use_qk_norm"]:
            W.update({p + "self_attn.q_norm.weight": r(D, base=1.0), p + "self_attn.k_norm.weight": r(D, base=1.0)})
        if c.get("attention_bias"):
            W.update({p + f"self_attn.{n}_proj.bias": r(k) for n, k in (("q", H * D), ("k", G * D), ("v", G * D))})
        glm = c["model_type"] in ("glm4_moe", "deepseek_v3")
        if ("num_experts" in c and l not in c["mlp_only_layers"]) or (glm and l >= c["first_k_dense_replace"]):
            E, Fm = c.get("num_experts") or c["n_routed_experts"], c["moe_intermediate_size"]
            W[p + "mlp.gate.weight"] = r(E, C, s=0.5)
            if glm:  # the selection bias (small and positive: masked groups then never matter)
                W[p + "mlp.gate.e_score_correction_bias"] = torch.rand(E, generator=g, dtype=torch.float64) * 0.1
                S = Fm * c["n_shared_experts"]
                q = p + "mlp.shared_experts."
                W.update({q + "gate_proj.weight": r(S, C), q + "up_proj.weight": r(S, C), q + "down_proj.weight": r(C, S)})
            for e in range(E):
                q = f"{p}mlp.experts.{e}."
                W.update({q + "gate_proj.weight": r(Fm, C), q + "up_proj.weight": r(Fm, C), q + "down_proj.weight": r(C, Fm)})
        else:
            Fd = c["intermediate_size"]
            W.update({p + "mlp.gate_proj.weight": r(Fd, C), p + "mlp.up_proj.weight": r(Fd, C),
                      p + "mlp.down_proj.weight": r(C, Fd)})
    return W


def own_config(family, odd):
    """The config of a family this module writes itself (not a transformers class here)."""
    if family == "glm4_moe":
        return glm4_moe_config(odd)
    if family == "deepseek":
        return deepseek_config(odd)
    return qwen3_config(family == "qwen3_moe", odd)


def write_folder(folder, cfg, W):
    """config.json and model.safetensors (f32) of weights W (float64 tensors)."""
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.float().numpy() for k, v in W.items()}, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
