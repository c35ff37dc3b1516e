#pragma once
// What the decoder's builders share (decoder.cpp, mla.cpp): the names a family's checkpoints
// give each weight, and the Builder that makes weights, linears (with LoRA), norms and RoPE
// parameters for one graph. Private to src/models.
#include <algorithm>
#include <string>
#include <vector>

#include "models/decoder.h"

namespace mxn {

// The names a family's checkpoints give each weight (without ".weight"/".bias").
struct Names {
  std::string embed, pos, layers, final_norm, lm_head;
  std::string ln1, ln2, qkv, q, k, v, o, fc, gate, up, gate_up, down;
  // Mixture of experts: the block, its router and its experts' gate, up and down (stacked as
  // <block>experts.<leaf>.weight (E, rows, cols); checkpoints name each <block>experts.<e>.<leaf>).
  std::string moe = "mlp.", router = "gate", e_gate = "gate_proj", e_up = "up_proj",
              e_down = "down_proj", shared = "shared_expert.";
  std::string q_norm = "self_attn.q_norm", k_norm = "self_attn.k_norm";
};

inline Names names_for(Arch a) {
  switch (a) {
    case Arch::gpt2:
      return {"transformer.wte",
              "transformer.wpe",
              "transformer.h.",
              "transformer.ln_f",
              "",
              "ln_1",
              "ln_2",
              "attn.c_attn",
              "",
              "",
              "",
              "attn.c_proj",
              "mlp.c_fc",
              "",
              "",
              "",
              "mlp.c_proj"};
    case Arch::chatglm:
      return {"transformer.embedding.word_embeddings",
              "",
              "transformer.encoder.layers.",
              "transformer.encoder.final_layernorm",
              "transformer.output_layer",
              "input_layernorm",
              "post_attention_layernorm",
              "self_attention.query_key_value",
              "",
              "",
              "",
              "self_attention.dense",
              "",
              "",
              "",
              "mlp.dense_h_to_4h",
              "mlp.dense_4h_to_h"};
    default: {  // llama, qwen2, glm and the MoE families (transformers' names)
      Names n{"model.embed_tokens",
              "",
              "model.layers.",
              "model.norm",
              "lm_head",
              "input_layernorm",
              "post_attention_layernorm",
              "",
              "self_attn.q_proj",
              "self_attn.k_proj",
              "self_attn.v_proj",
              "self_attn.o_proj",
              "",
              "mlp.gate_proj",
              "mlp.up_proj",
              "mlp.gate_up_proj",
              "mlp.down_proj"};
      if (a == Arch::glm4_moe || a == Arch::deepseek) n.shared = "shared_experts.";
      if (a == Arch::mixtral) {
        n.moe = "block_sparse_moe.";
        n.e_gate = "w1";
        n.e_up = "w3";
        n.e_down = "w2";
      }
      return n;
    }
  }
}

struct Builder {
  Graph& g;
  const DecoderConfig& c;
  const DecoderOptions& o;
  std::vector<std::string> modules;  // every linear's last name component, once
  std::vector<bool> lora_hit;        // per target of o.lora: matched a module
  int64_t dropouts = 0;              // DROPOUT nodes so far: each one's mask tag
  DecoderGraph* m = nullptr;         // serving LoRA: its mask and stacked inputs

  // A model weight: trained, or frozen under an adapter. 2-D ones are stored as o.weights says.
  int w(const std::string& name, Shape shape, bool decay) {
    // (experts' stacks (E, rows, cols) too: the CPU's grouped GEMM takes them in bf16)
    const bool stack = shape.size() == 3 && name.find(".experts.") != std::string::npos;
    const DType dt = shape.size() == 2 || stack ? o.weights : DType::f32;
    return o.freeze ? g.frozen(name, std::move(shape), dt) : g.param(name, shape, decay, dt);
  }
  // x (N, in) -> (N, out): GPT-2's Conv1D stores (in, out); every other family nn.Linear's
  // (out, in).
  int linear(int x, const std::string& name, int64_t in, int64_t out, bool bias) {
    const int wt = w(name + ".weight", c.gpt2() ? Shape{in, out} : Shape{out, in}, true);
    const int y = g.linear(x, wt, bias ? w(name + ".bias", {out}, false) : -1, !c.gpt2());
    return adapted(
        y, x, name, {}, in, out, m ? m->lora_mask : -1,
        [&](int rows, int mat, float alpha) { return g.matmul(rows, mat, false, true, alpha); });
  }
  // Every expert's linear at once: x's rows in expert order (offsets: each expert's first row)
  // times the stack `name`.weight (experts, out, in). LoRA's pairs are stacks too, (experts, r,
  // in) and (experts, out, r), each expert its own pair as PEFT's per-expert nn.Linear
  // (checkpoints split them as `experts.<e>.<leaf>.lora_A.weight`); served adapters' rows are
  // under `mask`, lora_mask's rows in x's order.
  int expert_linear(int x, const std::string& name, int64_t experts, int64_t in, int64_t out,
                    int offsets, int mask) {
    const int y = g.grouped_matmul(x, w(name + ".weight", {experts, out, in}, true), offsets);
    return adapted(y, x, name, {experts}, in, out, mask, [&](int rows, int mat, float alpha) {
      const int p = g.grouped_matmul(rows, mat, offsets);
      return alpha == 1.f ? p : g.scale(p, alpha);
    });
  }
  // y plus the module's adapters on its input x: LoRA being trained (y + alpha/r B(A x)), or
  // the served adapters' stacked ranks under each row's mask. `lead` prefixes the pairs' shapes
  // (an experts' stack); mul(rows, mat, alpha) is alpha rows mat^T, as the module multiplies.
  template <typename Mul>
  int adapted(int y, int x, const std::string& name, Shape lead, int64_t in, int64_t out, int mask,
              Mul mul) {
    const std::string leaf = name.substr(name.rfind('.') + 1);
    if (std::find(modules.begin(), modules.end(), leaf) == modules.end()) modules.push_back(leaf);
    auto shape = [&](int64_t rows, int64_t cols) {
      Shape s = lead;
      s.push_back(rows);
      s.push_back(cols);
      return s;
    };
    if (o.lora.r > 0 && lora_targets(name)) {
      const int a = g.param(lora_a_name(name), shape(o.lora.r, in), true);
      const int b = g.param(lora_b_name(name), shape(out, o.lora.r), true);
      const int xin = o.lora.dropout > 0 ? g.dropout(x, o.lora.dropout, dropouts++) : x;
      y = g.add(y, mul(mul(xin, a, 1.f), b, o.lora.alpha / float(o.lora.r)));
    }
    if (o.serve_lora > 0 && lora_targets(name)) {
      const int a = g.input(lora_a_name(name), shape(o.serve_lora, in), DType::f32);
      const int b = g.input(lora_b_name(name), shape(out, o.serve_lora), DType::f32);
      m->lora_inputs.emplace_back(lora_a_name(name), a);
      m->lora_inputs.emplace_back(lora_b_name(name), b);
      y = g.add(y, mul(g.mul(mul(x, a, 1.f), mask), b, 1.f));
    }
    return y;
  }
  bool lora_targets(const std::string& name) {
    bool any = false;
    for (size_t i = 0; i < o.lora.targets.size(); ++i) {
      const std::string& t = o.lora.targets[i];
      const bool hit = name == t || (name.size() > t.size() &&
                                     name.compare(name.size() - t.size(), t.size(), t) == 0 &&
                                     name[name.size() - t.size() - 1] == '.');
      if (hit) lora_hit[i] = true;
      any = any || hit;
    }
    return any;
  }
  int norm(int x, const std::string& name) {
    const int wt = w(name + ".weight", {c.hidden}, false);
    if (c.rms_norm()) return g.rmsnorm(x, wt, c.norm_eps);
    return g.layernorm(x, wt, w(name + ".bias", {c.hidden}, false), c.norm_eps);
  }
  RopeParams rope(int64_t col0, int64_t heads) const {
    RopeParams r;
    r.col0 = col0;
    r.heads = heads;
    r.head_dim = c.hd();
    r.rot = c.rope_dims();
    r.interleaved = c.rope_interleaved();
    r.scaling = c.rope_scaling;
    r.theta = c.rope_theta;
    r.factor = c.rope_factor;
    r.low_freq_factor = c.rope_low_freq;
    r.high_freq_factor = c.rope_high_freq;
    r.original_max_position = c.rope_orig_max_pos;
    r.beta_fast = c.rope_beta_fast;
    r.beta_slow = c.rope_beta_slow;
    return r;
  }
};

// With a KV cache (generation, serving): this step's keys and values into the layer's caches,
// and k, v and `at` pointed at them (decoder.cpp). `width`: a cache row's values (0: the
// family's kv heads x head dim); `shared`: one cache both keys and values read (MLA's latent).
void cache_kv(Builder& b, DecoderGraph& m, const std::string& p, int64_t B, int& k, int& v,
              AttentionParams& at, int64_t width = 0, bool shared = false);

// Multi-head latent attention (DeepSeek-V2/V3, mla.cpp): from the normed residual h (B*T, C) to
// the attention block's output (B*T, C), o_proj included. `at` carries the mask, T and the
// sequence layout; `extra` is attention's i32 input (prefix or key ranges), or -1.
int mla_attention(Builder& b, DecoderGraph& m, const std::string& p, int h, int64_t B,
                  AttentionParams at, int extra);

}  // namespace mxn
