#include "io/gguf_model.h"

#include <sentencepiece_processor.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>

#include "core/error.h"
#include "core/fs.h"
#include "core/json_num.h"

namespace mxn {
namespace fs = std::filesystem;
namespace {

using T = GgufType;

const char* gguf_arch(Arch a) {
  switch (a) {
    case Arch::gpt2:
      return "gpt2";
    case Arch::llama:
      return "llama";
    case Arch::qwen2:
      return "qwen2";
    case Arch::mixtral:
      return "llama";  // llama.cpp's llama with experts
    case Arch::qwen2_moe:
      return "qwen2moe";
    case Arch::qwen3:
      return "qwen3";
    case Arch::qwen3_moe:
      return "qwen3moe";
    case Arch::deepseek:
      return "deepseek2";  // DeepSeek-V2 and V3: multi-head latent attention as llama.cpp's MQA
    case Arch::glm4_moe:
      return "glm4moe";
    default:
      return "chatglm";  // llama.cpp's name for ChatGLM2/3, GLM-4 and GlmForCausalLM
  }
}

// LLaMA's checkpoints (and Mixtral's) order q/k rows for rotary on the two halves.
bool permuted_qk(const DecoderConfig& c) {
  return c.arch == Arch::llama || c.arch == Arch::mixtral;
}

struct NamePair {
  std::string hf, gg;
};

// Hugging Face name stems (no .weight/.bias) and llama.cpp's, for a layer-independent table.
// GLM's separate q/k/v are fused into "self_attn.qkv_proj" before this mapping (see fuse_glm_qkv).
std::vector<NamePair> name_pairs(const DecoderConfig& c) {
  std::vector<NamePair> p;
  std::string layer;
  std::vector<std::pair<const char*, const char*>> blk;
  switch (c.arch) {
    case Arch::gpt2:
      p = {{"transformer.wte", "token_embd"},
           {"transformer.wpe", "position_embd"},
           {"transformer.ln_f", "output_norm"},
           {"lm_head", "output"}};
      layer = "transformer.h.";
      blk = {{"ln_1", "attn_norm"}, {"attn.c_attn", "attn_qkv"}, {"attn.c_proj", "attn_output"},
             {"ln_2", "ffn_norm"},  {"mlp.c_fc", "ffn_up"},      {"mlp.c_proj", "ffn_down"}};
      break;
    case Arch::chatglm:
      p = {{"transformer.embedding.word_embeddings", "token_embd"},
           {"transformer.encoder.final_layernorm", "output_norm"},
           {"transformer.output_layer", "output"}};
      layer = "transformer.encoder.layers.";
      blk = {
          {"input_layernorm", "attn_norm"},        {"self_attention.query_key_value", "attn_qkv"},
          {"self_attention.dense", "attn_output"}, {"post_attention_layernorm", "ffn_norm"},
          {"mlp.dense_h_to_4h", "ffn_up"},         {"mlp.dense_4h_to_h", "ffn_down"}};
      break;
    default:
      p = {{"model.embed_tokens", "token_embd"},
           {"model.norm", "output_norm"},
           {"lm_head", "output"}};
      layer = "model.layers.";
      blk = {{"input_layernorm", "attn_norm"},
             {"self_attn.q_proj", "attn_q"},
             {"self_attn.k_proj", "attn_k"},
             {"self_attn.v_proj", "attn_v"},
             {"self_attn.qkv_proj", "attn_qkv"},
             {"self_attn.o_proj", "attn_output"},
             {"post_attention_layernorm", "ffn_norm"},
             {"mlp.gate_proj", "ffn_gate"},
             {"mlp.up_proj", "ffn_up"},
             {"mlp.gate_up_proj", "ffn_up"},
             {"mlp.down_proj", "ffn_down"}};
      if (c.qk_norm())
        blk.insert(blk.end(),
                   {{"self_attn.q_norm", "attn_q_norm"}, {"self_attn.k_norm", "attn_k_norm"}});
      if (c.arch == Arch::glm4_moe)  // llama.cpp's glm4moe names the MLP's norm as GLM-4's
        for (auto& [h, g] : blk)
          if (std::string(h) == "post_attention_layernorm") g = "post_attention_norm";
      if (c.mla())  // DeepSeek's latent attention: k_b_proj goes out transposed (attn_k_b)
        blk.insert(blk.end(), {{"self_attn.q_a_proj", "attn_q_a"},
                               {"self_attn.q_a_layernorm", "attn_q_a_norm"},
                               {"self_attn.q_b_proj", "attn_q_b"},
                               {"self_attn.kv_a_proj_with_mqa", "attn_kv_a_mqa"},
                               {"self_attn.kv_a_layernorm", "attn_kv_a_norm"},
                               {"self_attn.k_b_proj", "attn_k_b"},
                               {"self_attn.v_b_proj", "attn_v_b"}});
      if (c.arch == Arch::deepseek || c.arch == Arch::glm4_moe)  // the bias: no .weight/.bias
        blk.insert(blk.end(), {{"mlp.gate", "ffn_gate_inp"},
                               {"mlp.gate.e_score_correction_bias", "exp_probs_b.bias"},
                               {"mlp.experts.gate_proj", "ffn_gate_exps"},
                               {"mlp.experts.up_proj", "ffn_up_exps"},
                               {"mlp.experts.down_proj", "ffn_down_exps"},
                               {"mlp.shared_experts.gate_proj", "ffn_gate_shexp"},
                               {"mlp.shared_experts.up_proj", "ffn_up_shexp"},
                               {"mlp.shared_experts.down_proj", "ffn_down_shexp"}});
      else if (c.arch == Arch::mixtral)  // each expert's stacked weights, and the router
        blk.insert(blk.end(), {{"block_sparse_moe.gate", "ffn_gate_inp"},
                               {"block_sparse_moe.experts.w1", "ffn_gate_exps"},
                               {"block_sparse_moe.experts.w3", "ffn_up_exps"},
                               {"block_sparse_moe.experts.w2", "ffn_down_exps"}});
      else if (c.experts > 0)
        blk.insert(blk.end(), {{"mlp.gate", "ffn_gate_inp"},
                               {"mlp.experts.gate_proj", "ffn_gate_exps"},
                               {"mlp.experts.up_proj", "ffn_up_exps"},
                               {"mlp.experts.down_proj", "ffn_down_exps"},
                               {"mlp.shared_expert.gate_proj", "ffn_gate_shexp"},
                               {"mlp.shared_expert.up_proj", "ffn_up_shexp"},
                               {"mlp.shared_expert.down_proj", "ffn_down_shexp"},
                               {"mlp.shared_expert_gate", "ffn_gate_inp_shexp"}});
  }
  for (int64_t i = 0; i < c.layers; ++i)
    for (auto [h, g] : blk)
      p.push_back({layer + std::to_string(i) + "." + h, "blk." + std::to_string(i) + "." + g});
  return p;
}

bool gpt2_conv1d(const DecoderConfig& c, const std::string& gg) {
  return c.gpt2() && gg.starts_with("blk.") &&
         (gg.ends_with("attn_qkv.weight") || gg.ends_with("attn_output.weight") ||
          gg.ends_with("ffn_up.weight") || gg.ends_with("ffn_down.weight"));
}

HostTensor transpose2d(const HostTensor& t) {
  HostTensor o({t.shape[1], t.shape[0]}, DType::f32);
  for (int64_t r = 0; r < t.shape[0]; ++r)
    for (int64_t k = 0; k < t.shape[1]; ++k)
      o.f32()[k * t.shape[0] + r] = t.f32()[r * t.shape[1] + k];
  return o;
}

// (H, a, b) -> (H, b, a): MLA's per-head key up-projection as llama.cpp's attn_k_b takes it.
HostTensor transpose_heads(const HostTensor& t) {
  const int64_t H = t.shape[0], A = t.shape[1], B = t.shape[2];
  HostTensor o({H, B, A}, DType::f32);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t i = 0; i < A; ++i)
      for (int64_t j = 0; j < B; ++j) o.f32()[(h * B + j) * A + i] = t.f32()[(h * A + i) * B + j];
  return o;
}

// The tensor kinds a name pair comes in; "" for a name used as it is (the router's bias).
constexpr const char* kKinds[] = {".weight", ".bias", ""};

// LLaMA's checkpoints order each head's q/k rows for rotary on the two halves; llama.cpp rotates
// adjacent pairs, so its converter permutes rows (h, 2, hd/2) -> (h, hd/2, 2). `back` undoes it.
HostTensor permute_rows(const HostTensor& t, int64_t heads, bool back) {
  const int64_t rows = t.shape[0], cols = t.numel() / rows, half = rows / heads / 2;
  HostTensor o(t.shape, DType::f32);
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t s = 0; s < 2; ++s)
      for (int64_t j = 0; j < half; ++j) {
        const int64_t hf = (h * 2 + s) * half + j, gg = (h * half + j) * 2 + s;
        std::copy_n(t.f32() + (back ? gg : hf) * cols, cols, o.f32() + (back ? hf : gg) * cols);
      }
  return o;
}

// Rows of a, then b, then c (GLM's q, k, v into one qkv), or split back.
HostTensor concat_rows(const std::vector<const HostTensor*>& parts) {
  Shape s = parts[0]->shape;
  s[0] = 0;
  for (const HostTensor* p : parts) s[0] += p->shape[0];
  HostTensor o(s, DType::f32);
  size_t at = 0;
  for (const HostTensor* p : parts) {
    std::copy_n(p->f32(), p->numel(), o.f32() + at);
    at += size_t(p->numel());
  }
  return o;
}

void fuse_glm_qkv(const DecoderConfig& c, TensorMap& w) {
  for (int64_t i = 0; i < c.layers; ++i)
    for (const char* kind : {".weight", ".bias"}) {
      const std::string base = "model.layers." + std::to_string(i) + ".self_attn.";
      auto q = w.find(base + "q_proj" + kind), k = w.find(base + "k_proj" + kind),
           v = w.find(base + "v_proj" + kind);
      if (q == w.end() || k == w.end() || v == w.end()) continue;
      w[base + "qkv_proj" + kind] = concat_rows({&q->second, &k->second, &v->second});
      w.erase(base + "q_proj" + kind), w.erase(base + "k_proj" + kind),
          w.erase(base + "v_proj" + kind);
    }
}

void split_glm_qkv(const DecoderConfig& c, TensorMap& w) {
  const int64_t q = c.heads * c.hd(), kv = c.n_kv_heads() * c.hd();
  for (int64_t i = 0; i < c.layers; ++i)
    for (const char* kind : {".weight", ".bias"}) {
      const std::string base = "model.layers." + std::to_string(i) + ".self_attn.";
      auto it = w.find(base + "qkv_proj" + kind);
      if (it == w.end()) continue;
      const HostTensor& t = it->second;
      const int64_t cols = t.numel() / t.shape[0];
      int64_t at = 0;
      for (auto [name, rows] : {std::pair{"q_proj", q}, {"k_proj", kv}, {"v_proj", kv}}) {
        Shape s = t.shape;
        s[0] = rows;
        HostTensor o(s, DType::f32);
        std::copy_n(t.f32() + at * cols, rows * cols, o.f32());
        at += rows;
        w[base + name + kind] = std::move(o);
      }
      w.erase(it);
    }
}

// Llama 3's frequency scaling, as llama.cpp takes it: one factor per rotated pair.
std::vector<float> llama3_rope_factors(const DecoderConfig& c) {
  std::vector<float> f;
  const double lo_wave = c.rope_orig_max_pos / c.rope_low_freq,
               hi_wave = c.rope_orig_max_pos / c.rope_high_freq;
  for (int64_t i = 0; i < c.rope_dims(); i += 2) {
    const double freq = 1.0 / std::pow(double(c.rope_theta), double(i) / double(c.rope_dims()));
    const double wave = 2 * M_PI / freq;
    if (wave < hi_wave) {
      f.push_back(1.f);
    } else if (wave > lo_wave) {
      f.push_back(c.rope_factor);
    } else {
      const double smooth =
          (c.rope_orig_max_pos / wave - c.rope_low_freq) / (c.rope_high_freq - c.rope_low_freq);
      f.push_back(float(1.0 / ((1 - smooth) / c.rope_factor + smooth)));
    }
  }
  return f;
}

nlohmann::json parse_json(const std::string& path, const char* what) {
  try {
    return nlohmann::json::parse(read_file(path, what));
  } catch (const nlohmann::json::exception& e) {
    throw Error(path + ": not valid JSON (" + e.what() + ")");
  }
}

// tokenizer.ggml.* from the folder's tokenizer files: byte-level BPE (tokenizer.json or
// vocab.json + merges.txt) as llama.cpp's "gpt2" model, SentencePiece as its "llama" model.
// GLM-4's tiktoken file is not exported (llama.cpp rebuilds its merges from the ranks).
bool add_tokenizer(GgufFile& f, const DecoderConfig& c, const std::string& dir) {
  const fs::path d(dir);
  std::vector<std::string> tokens;
  std::vector<int32_t> types;
  nlohmann::json merges = nlohmann::json::array();
  auto put = [&](int64_t id, const std::string& s, int32_t type) {
    if (id < 0 || id > (int64_t(1) << 24)) return;
    if (int64_t(tokens.size()) <= id)
      tokens.resize(size_t(id) + 1), types.resize(size_t(id) + 1, 0);
    tokens[size_t(id)] = s, types[size_t(id)] = type;
  };
  if (fs::exists(d / "tokenizer.json") || fs::exists(d / "vocab.json")) {
    nlohmann::json vocab, added = nlohmann::json::array();
    if (fs::exists(d / "tokenizer.json")) {
      const nlohmann::json j = parse_json((d / "tokenizer.json").string(), "tokenizer");
      if (j.value("/model/type"_json_pointer, std::string()) != "BPE") return false;
      vocab = j["model"]["vocab"];
      for (const auto& m : j["model"].value("merges", nlohmann::json::array()))
        if (m.is_array() && m.size() == 2)
          merges.push_back(m[0].get<std::string>() + " " + m[1].get<std::string>());
        else
          merges.push_back(m.get<std::string>());  // a type error if neither
      added = j.value("added_tokens", nlohmann::json::array());
    } else {
      vocab = parse_json((d / "vocab.json").string(), "tokenizer vocabulary");
      std::ifstream in(d / "merges.txt");
      for (std::string line; std::getline(in, line);)
        if (!line.empty() && !line.starts_with("#version")) merges.push_back(line);
    }
    for (auto& [s, id] : vocab.items())
      put(json_number<int64_t>(id, "token id of '" + s + "'"), s, 1);
    for (const auto& a : added)
      put(a.value("id", int64_t(-1)), a.value("content", ""), a.value("special", false) ? 3 : 4);
    f.set("tokenizer.ggml.model", T::string, "gpt2");
    const bool qwen = c.arch == Arch::qwen2 || c.arch == Arch::qwen2_moe || c.arch == Arch::qwen3 ||
                      c.arch == Arch::qwen3_moe;
    const char* pre = c.arch == Arch::gpt2                               ? "gpt-2"
                      : qwen                                             ? "qwen2"
                      : c.arch == Arch::llama || c.arch == Arch::mixtral ? "llama-bpe"
                                                                         : "chatglm-bpe";
    f.set("tokenizer.ggml.pre", T::string, fs::exists(d / "vocab.json") ? "gpt-2" : pre);
  } else if (fs::exists(d / "tokenizer.model")) {
    sentencepiece::SentencePieceProcessor sp;
    if (!sp.Load((d / "tokenizer.model").string()).ok()) return false;  // tiktoken format
    std::vector<float> scores;
    for (int i = 0; i < sp.GetPieceSize(); ++i) {
      const int32_t type = sp.IsUnknown(i)   ? 2
                           : sp.IsControl(i) ? 3
                           : sp.IsUnused(i)  ? 5
                           : sp.IsByte(i)    ? 6
                                             : 1;
      put(i, sp.IdToPiece(i), type);
      scores.push_back(sp.GetScore(i));
    }
    scores.resize(std::max(size_t(c.vocab_size), scores.size()), -1000.f);
    f.set("tokenizer.ggml.model", T::string, "llama");
    f.set("tokenizer.ggml.scores", T::array, scores, T::f32);
    if (sp.bos_id() >= 0) f.set("tokenizer.ggml.bos_token_id", T::u32, sp.bos_id());
    if (sp.unk_id() >= 0) f.set("tokenizer.ggml.unknown_token_id", T::u32, sp.unk_id());
  } else {
    return false;
  }
  // The embedding may have more rows than the tokenizer has tokens (padded vocabularies).
  for (size_t i = 0; i < size_t(std::max<int64_t>(c.vocab_size, int64_t(tokens.size()))); ++i)
    if (i >= tokens.size() || types[i] == 0) put(int64_t(i), "[PAD" + std::to_string(i) + "]", 5);
  // The special ids always written (llama.cpp falls back to id 11, ",", as the end of text
  // without one): the model's own, else tokenizer_config.json's, else the tokenizer's own
  // tokens (GPT-2's <|endoftext|>); each marked a control token.
  nlohmann::json tc = nlohmann::json::object();
  if (fs::exists(d / "tokenizer_config.json")) {
    tc = parse_json((d / "tokenizer_config.json").string(), "tokenizer config");
    if (!tc.is_object()) tc = nlohmann::json::object();
  }
  auto id_of = [&](std::vector<std::string> texts, const char* key) {
    if (tc.contains(key)) {  // a string, or {"content": ...}
      const nlohmann::json& v = tc[key];
      if (v.is_string()) texts.insert(texts.begin(), v.get<std::string>());
      if (v.is_object() && v.value("content", nlohmann::json()).is_string())
        texts.insert(texts.begin(), v["content"].get<std::string>());
    }
    for (const std::string& t : texts)
      for (size_t i = 0; i < tokens.size(); ++i)
        if (tokens[i] == t) return int64_t(i);
    return int64_t(-1);
  };
  auto special = [&](const char* key, int64_t id) {
    if (id < 0 || size_t(id) >= tokens.size()) return false;
    f.set(key, T::u32, id);
    if (types[size_t(id)] == 1) types[size_t(id)] = 3;
    return true;
  };
  if (!f.find("tokenizer.ggml.bos_token_id"))
    special("tokenizer.ggml.bos_token_id", id_of({"<|begin_of_text|>"}, "bos_token"));
  special("tokenizer.ggml.eot_token_id", id_of({"<|eot_id|>", "<|im_end|>"}, "eot_token"));
  special("tokenizer.ggml.padding_token_id", id_of({}, "pad_token"));
  const int64_t eos =
      !c.eos.empty() ? c.eos[0] : id_of({"<|endoftext|>", "</s>", "<|im_end|>"}, "eos_token");
  if (!special("tokenizer.ggml.eos_token_id", eos)) {
    std::fprintf(stderr,
                 "warning: %s: no end-of-text token (the config has no eos_token_id and the "
                 "tokenizer no <|endoftext|> or </s>): generation from this GGUF stops only at "
                 "its length limit\n",
                 dir.c_str());
  }
  f.set("tokenizer.ggml.tokens", T::array, tokens, T::string);
  f.set("tokenizer.ggml.token_type", T::array, types, T::i32);
  if (!merges.empty()) f.set("tokenizer.ggml.merges", T::array, merges, T::string);
  // The chat template goes along, so that a GGUF alone chats (llama.cpp reads it too).
  if (tc.contains("chat_template") && tc["chat_template"].is_string())
    f.set("tokenizer.chat_template", T::string, tc["chat_template"].get<std::string>());
  return true;
}

uint32_t file_type(GgmlType t) {
  switch (t) {
    case GgmlType::f32:
      return 0;
    case GgmlType::f16:
      return 1;
    case GgmlType::q8_0:
      return 7;
    case GgmlType::q4_0:
      return 2;  // LLAMA_FTYPE_MOSTLY_Q4_0
    case GgmlType::bf16:
      return 32;
  }
  return 0;
}

// DeepSeek's latent attention as llama.cpp's deepseek2 reads it: one kv head of the latent plus
// the RoPE key (key_length R + dr, value_length R), the heads' own widths in the *_mla keys; yarn
// with the softmax scale's mscale as its log multiplier (0.1 mscale_all_dim).
void add_mla_keys(GgufFile& f, const DecoderConfig& c, const std::string& a) {
  f.set(a + ".attention.head_count_kv", T::u32, 1);
  f.set(a + ".attention.q_lora_rank", T::u32, c.q_lora_rank);  // 0: a plain q_proj (V2-Lite)
  f.set(a + ".attention.kv_lora_rank", T::u32, c.kv_lora_rank);
  f.set(a + ".attention.key_length", T::u32, c.kv_lora_rank + c.qk_rope_dim);
  f.set(a + ".attention.value_length", T::u32, c.kv_lora_rank);
  f.set(a + ".attention.key_length_mla", T::u32, c.qk_nope_dim + c.qk_rope_dim);
  f.set(a + ".attention.value_length_mla", T::u32, c.v_head_dim);
  f.set(a + ".rope.dimension_count", T::u32, c.qk_rope_dim);
  if (c.rope_scaling != 3) return;
  f.set(a + ".rope.scaling.type", T::string, "yarn");
  f.set(a + ".rope.scaling.factor", T::f32, c.rope_factor);
  f.set(a + ".rope.scaling.original_context_length", T::u32, int64_t(c.rope_orig_max_pos));
  f.set(a + ".rope.scaling.yarn_beta_fast", T::f32, c.rope_beta_fast);
  f.set(a + ".rope.scaling.yarn_beta_slow", T::f32, c.rope_beta_slow);
  if (c.yarn_mscale_all_dim > 0)
    f.set(a + ".rope.scaling.yarn_log_multiplier", T::f32, 0.1f * c.yarn_mscale_all_dim);
}

// DeepSeek's (and GLM-4.5's) router and experts: the first dense layers, shared experts, sigmoid
// or softmax scores, group-limited top-k, the routed scale (llama.cpp's deepseek2 and glm4moe
// keys).
void add_deepseek_moe_keys(GgufFile& f, const DecoderConfig& c, const std::string& a) {
  for (size_t l = 0; l < c.dense_layers.size(); ++l)
    if (c.dense_layers[l] != int64_t(l))
      throw Error(
          "llama.cpp's deepseek2 takes dense layers first only (leading_dense_block_count)");
  f.set(a + ".leading_dense_block_count", T::u32, int64_t(c.dense_layers.size()));
  f.set(a + ".expert_shared_count", T::u32, c.moe_ffn > 0 ? c.shared_ffn / c.moe_ffn : 0);
  if (c.routed_scale != 1.f) f.set(a + ".expert_weights_scale", T::f32, c.routed_scale);
  if (c.norm_topk) f.set(a + ".expert_weights_norm", T::boolean, true);
  f.set(a + ".expert_gating_func", T::u32, c.sigmoid_router ? 2 : 1);
  if (c.n_group > 1) {
    f.set(a + ".expert_group_count", T::u32, c.n_group);
    f.set(a + ".expert_group_used_count", T::u32, c.topk_group);
  }
}

}  // namespace

GgufFile decoder_to_gguf(const DecoderConfig& c, const TensorMap& weights_in, GgmlType type,
                         const std::string& tokenizer_dir, const std::string& name) {
  TensorMap w = weights_in;
  if (c.arch == Arch::glm) fuse_glm_qkv(c, w);
  GgufFile f;
  const std::string a = gguf_arch(c.arch);
  f.set("general.architecture", T::string, a);
  f.set("general.name", T::string, name);
  f.set("general.file_type", T::u32, file_type(type));
  if (ggml_blocked(type)) f.set("general.quantization_version", T::u32, 2);
  f.set("general.alignment", T::u32, 32);
  f.set(a + ".vocab_size", T::u32, c.vocab_size);
  f.set(a + ".context_length", T::u32, c.max_pos);
  f.set(a + ".embedding_length", T::u32, c.hidden);
  f.set(a + ".block_count", T::u32, c.layers);
  f.set(a + ".feed_forward_length", T::u32, c.ffn_width());
  f.set(a + ".attention.head_count", T::u32, c.heads);
  if (c.gpt2()) {
    f.set(a + ".attention.layer_norm_epsilon", T::f32, c.norm_eps);
  } else {
    f.set(a + ".attention.head_count_kv", T::u32, c.n_kv_heads());
    f.set(a + ".attention.layer_norm_rms_epsilon", T::f32, c.norm_eps);
    f.set(a + ".rope.freq_base", T::f32, c.rope_theta);
    f.set(a + ".rope.dimension_count", T::u32, c.rope_dims());
    if (c.mla()) {
      add_mla_keys(f, c, a);
    } else if (c.hd() * c.heads != c.hidden) {
      f.set(a + ".attention.key_length", T::u32, c.hd());
      f.set(a + ".attention.value_length", T::u32, c.hd());
    }
    if (c.rope_scaling == 1) {
      f.set(a + ".rope.scaling.type", T::string, "linear");
      f.set(a + ".rope.scaling.factor", T::f32, c.rope_factor);
    }
    if (c.rope_scaling == 3 && !c.mla())
      throw Error("GGUF with yarn RoPE scaling is written for DeepSeek (deepseek2) only");
  }
  if (c.experts > 0) {  // llama.cpp's MoE keys
    f.set(a + ".expert_count", T::u32, c.experts);
    f.set(a + ".expert_used_count", T::u32, c.top_k);
    if (c.arch != Arch::mixtral) f.set(a + ".expert_feed_forward_length", T::u32, c.moe_ffn);
    if (c.arch == Arch::qwen2_moe)
      f.set(a + ".expert_shared_feed_forward_length", T::u32, c.shared_ffn);
    if (c.arch == Arch::qwen3_moe && !c.norm_topk)
      throw Error(
          "llama.cpp's qwen3moe always renormalises the top-k weights; this model does not");
    if (c.arch == Arch::qwen2_moe && c.norm_topk)
      throw Error("llama.cpp's qwen2moe never renormalises the top-k weights; this model does");
    if (c.arch == Arch::deepseek || c.arch == Arch::glm4_moe) {
      add_deepseek_moe_keys(f, c, a);
    } else if (!c.dense_layers.empty() || c.sparse_step != 1) {
      throw Error("llama.cpp's " + a + " has an MoE MLP in every layer; this model has dense ones");
    }
  }
  f.set("mxn.config", T::string, c.to_json().dump());
  if (!tokenizer_dir.empty()) add_tokenizer(f, c, tokenizer_dir);

  auto add = [&](const std::string& gg, const HostTensor& t) {
    GgufTensor o;
    o.name = gg;
    o.ne.assign(t.shape.rbegin(), t.shape.rend());
    o.type = t.shape.size() < 2 ? GgmlType::f32 : type;
    if (ggml_blocked(o.type) && o.ne[0] % 32 != 0) o.type = GgmlType::f16;
    o.data = ggml_encode(o.type, t.f32(), t.numel());
    f.tensors.push_back(std::move(o));
  };
  for (const NamePair& p : name_pairs(c))
    for (const char* kind : kKinds) {
      auto it = w.find(p.hf + kind);
      if (it == w.end()) continue;
      if (c.tie_embeddings && p.gg == "output") continue;  // llama.cpp reuses token_embd
      if (it->second.dtype != DType::f32)
        throw Error("tensor '" + it->first + "' is not f32 (convert expects f32 weights)");
      const std::string gg = p.gg + kind;
      HostTensor t = it->second;
      if (gpt2_conv1d(c, gg)) t = transpose2d(t);
      if (permuted_qk(c) && (gg.ends_with("attn_q" + std::string(kind))))
        t = permute_rows(t, c.heads, false);
      if (permuted_qk(c) && (gg.ends_with("attn_k" + std::string(kind))))
        t = permute_rows(t, c.n_kv_heads(), false);
      if (gg.ends_with("attn_k_b.weight")) t = transpose_heads(t);
      add(gg, t);
      w.erase(it);
    }
  if (c.rope_scaling == 2) {
    const std::vector<float> r = llama3_rope_factors(c);
    add("rope_freqs.weight", HostTensor({int64_t(r.size())}, DType::f32));
    f.tensors.back().data = ggml_encode(GgmlType::f32, r.data(), int64_t(r.size()));
  }
  for (const auto& [n, t] : w)
    if (!n.ends_with(".attn.bias") && !n.ends_with(".attn.masked_bias") &&
        !n.ends_with("rotary_pos_emb.inv_freq"))
      throw Error("tensor '" + n + "' has no GGUF name for arch " + arch_name(c.arch));
  return f;
}

namespace {
DecoderConfig read_gguf(const GgufFile& f, TensorMap& weights, const std::string& path) {
  auto key = [&](const std::string& k) -> const nlohmann::json& {
    const GgufKV* e = f.find(k);
    if (!e) throw Error(path + ": GGUF metadata has no '" + k + "'");
    return e->value;
  };
  DecoderConfig c;
  if (const GgufKV* m = f.find("mxn.config")) {
    try {
      c = DecoderConfig::from_json(nlohmann::json::parse(m->value.get<std::string>()));
    } catch (const nlohmann::json::exception& e) {
      throw Error(path + ": mxn.config is not a valid model config (" + e.what() + ")");
    }
  } else {
    const std::string a = key("general.architecture").get<std::string>();
    if (a == "gpt2")
      c.arch = Arch::gpt2;
    else if (a == "llama")
      c.arch = Arch::llama;
    else if (a == "qwen2")
      c.arch = Arch::qwen2;
    else if (a == "chatglm")
      c.arch = Arch::chatglm;
    else
      throw Error(path + ": GGUF architecture '" + a +
                  "' is not one mxn runs (expected gpt2, llama, qwen2 or chatglm)");
    auto u = [&](const std::string& k) {
      return json_number<int64_t>(key(a + "." + k), path + ": GGUF '" + a + "." + k + "'");
    };
    auto f32 = [&](const std::string& k) {
      return json_number<float>(key(a + "." + k), path + ": GGUF '" + a + "." + k + "'");
    };
    const GgufTensor* emb = f.tensor("token_embd.weight");
    if (!emb || emb->ne.size() != 2) throw Error(path + ": GGUF has no 2-D token_embd.weight");
    c.vocab_size = emb->ne[1];
    c.hidden = u("embedding_length");
    c.layers = u("block_count");
    c.heads = u("attention.head_count");
    c.ffn = u("feed_forward_length");
    c.max_pos = u("context_length");
    c.tie_embeddings = f.tensor("output.weight") == nullptr;
    if (c.gpt2()) {
      c.norm_eps = f32("attention.layer_norm_epsilon");
    } else {
      c.kv_heads = u("attention.head_count_kv");
      c.norm_eps = f32("attention.layer_norm_rms_epsilon");
      if (f.find(a + ".attention.key_length")) c.head_dim = u("attention.key_length");
      if (f.find(a + ".rope.freq_base")) c.rope_theta = f32("rope.freq_base");
      c.rope_fraction = float(u("rope.dimension_count")) / float(c.hd());
      if (f.tensor("rope_freqs.weight"))
        throw Error(path +
                    ": per-dimension rope factors (rope_freqs) are read only from files mxn wrote");
      if (const GgufKV* s = f.find(a + ".rope.scaling.type"); s && s->value == "linear")
        c.rope_scaling = 1, c.rope_factor = f32("rope.scaling.factor");
      c.qkv_bias = f.tensor("blk.0.attn_qkv.bias") || f.tensor("blk.0.attn_q.bias");
      c.o_bias = f.tensor("blk.0.attn_output.bias") != nullptr;
    }
    if (const GgufKV* e = f.find("tokenizer.ggml.eos_token_id"))
      c.eos = {json_number<int32_t>(e->value, path + ": GGUF 'tokenizer.ggml.eos_token_id'")};
  }
  c.validate();
  weights.clear();
  // The shape each tensor must have in the file, from the decoder's parameters.
  Graph g;
  build_decoder(g, c, 1, 1);
  std::map<std::string, Shape> want;
  for (int id : g.params()) want[g.v(id).name] = g.v(id).shape;
  const int64_t qkv_rows = (c.heads + 2 * c.n_kv_heads()) * c.hd();
  for (const NamePair& p : name_pairs(c))
    for (const char* kind : kKinds) {
      const GgufTensor* t = f.tensor(p.gg + kind);
      if (!t) continue;
      // ffn_up is GLM's fused gate_up_proj, the others' up_proj; attn_qkv is GLM's fused q/k/v.
      if (c.arch == Arch::glm && p.hf.ends_with(".up_proj") && !p.hf.ends_with("gate_up_proj"))
        continue;
      if (c.arch != Arch::glm && (p.hf.ends_with("qkv_proj") || p.hf.ends_with("gate_up_proj")))
        continue;
      const std::string hf_name = p.hf + kind;
      Shape expect;
      if (c.arch == Arch::glm && p.hf.ends_with("qkv_proj")) {
        auto q = want.find(p.hf.substr(0, p.hf.size() - 8) + "q_proj" + kind);
        if (q == want.end()) continue;
        expect = q->second;
        expect[0] = qkv_rows;
      } else if (auto it = want.find(hf_name); it != want.end()) {
        expect = it->second;
        if (gpt2_conv1d(c, p.gg + kind)) std::swap(expect[0], expect[1]);
        if (p.gg.ends_with("attn_k_b")) std::swap(expect[1], expect[2]);
      } else {
        continue;  // not a parameter of this config (a tied head's copy, say)
      }
      Shape s(t->ne.rbegin(), t->ne.rend());
      if (s != expect)
        throw Error(path + ": tensor '" + p.gg + kind + "' has shape " + shape_str(s) +
                    ", expected " + shape_str(expect) + " for this model's config");
      const std::string gg = p.gg + kind;
      const bool rearranged = gpt2_conv1d(c, gg) ||
                              (permuted_qk(c) && (gg.ends_with("attn_q" + std::string(kind)) ||
                                                  gg.ends_with("attn_k" + std::string(kind)))) ||
                              gg.ends_with("attn_k_b.weight") ||
                              (c.arch == Arch::glm && p.hf.ends_with("qkv_proj"));
      if (t->type == GgmlType::bf16 && !rearranged) {  // kept as stored: half of f32's memory
        HostTensor h(s, DType::bf16);
        std::memcpy(h.bytes.data(), t->view().data(), h.bytes.size());
        weights[hf_name] = std::move(h);
        continue;
      }
      HostTensor h(s, DType::f32);
      ggml_decode(t->type, t->view(), t->numel(), h.f32());
      if (gpt2_conv1d(c, gg)) h = transpose2d(h);
      if (permuted_qk(c) && gg.ends_with("attn_q" + std::string(kind)))
        h = permute_rows(h, c.heads, true);
      if (permuted_qk(c) && gg.ends_with("attn_k" + std::string(kind)))
        h = permute_rows(h, c.n_kv_heads(), true);
      if (gg.ends_with("attn_k_b.weight")) h = transpose_heads(h);
      weights[hf_name] = std::move(h);
    }
  if (c.arch == Arch::glm) split_glm_qkv(c, weights);
  return c;
}

}  // namespace

DecoderConfig decoder_from_gguf(const GgufFile& f, TensorMap& weights, const std::string& path) {
  try {
    return read_gguf(f, weights, path);
  } catch (const nlohmann::json::exception& e) {  // a metadata value of the wrong type
    throw Error(path + ": GGUF metadata mxn cannot read (" + e.what() + ")");
  }
}

}  // namespace mxn
