// Hugging Face config.json <-> DecoderConfig, for the families of decoder.h.
#include <cmath>

#include "core/error.h"
#include "models/decoder.h"

namespace mxn {
namespace {

const char* kSupported =
    "GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, GlmForCausalLM, "
    "ChatGLMModel, ChatGLMForConditionalGeneration, MixtralForCausalLM, Qwen2MoeForCausalLM, "
    "Qwen3ForCausalLM, Qwen3MoeForCausalLM, Glm4MoeForCausalLM, DeepseekV3ForCausalLM, "
    "DeepseekV2ForCausalLM";

struct Family {
  const char* hf;
  Arch arch;
  const char* model_type;
};
// The LLaMA-shaped families transformers names, and mxn's arch for each.
const Family kLlamaShaped[] = {{"LlamaForCausalLM", Arch::llama, "llama"},
                               {"MistralForCausalLM", Arch::llama, "mistral"},
                               {"Qwen2ForCausalLM", Arch::qwen2, "qwen2"},
                               {"GlmForCausalLM", Arch::glm, "glm"},
                               {"MixtralForCausalLM", Arch::mixtral, "mixtral"},
                               {"Qwen2MoeForCausalLM", Arch::qwen2_moe, "qwen2_moe"},
                               {"Qwen3ForCausalLM", Arch::qwen3, "qwen3"},
                               {"Qwen3MoeForCausalLM", Arch::qwen3_moe, "qwen3_moe"},
                               {"Glm4MoeForCausalLM", Arch::glm4_moe, "glm4_moe"},
                               {"DeepseekV3ForCausalLM", Arch::deepseek, "deepseek_v3"},
                               {"DeepseekV2ForCausalLM", Arch::deepseek, "deepseek_v2"}};

struct Reader {
  const nlohmann::json& j;
  const std::string& path;
  [[noreturn]] void bad(const std::string& key, const std::string& want) const {
    throw Error(path + ": field '" + key + "' " +
                (j.contains(key) ? "is " + j[key].dump() + ", " : "is missing, ") + "expected " +
                want);
  }
  int64_t i(const std::string& key, int64_t lo = 1) const {
    if (!j.contains(key) || !j[key].is_number_integer() || j[key].get<int64_t>() < lo)
      bad(key, "an integer >= " + std::to_string(lo));
    return j[key].get<int64_t>();
  }
  int64_t i_or(const std::string& key, int64_t dflt, int64_t lo = 1) const {
    return j.contains(key) && !j[key].is_null() ? i(key, lo) : dflt;
  }
  float f_or(const std::string& key, float dflt) const {
    if (!j.contains(key) || j[key].is_null()) return dflt;
    if (!j[key].is_number() || !(j[key].get<double>() > 0) || j[key].get<double>() > 3e38)
      bad(key, "a number > 0");
    return float(j[key].get<double>());
  }
  bool b_or(const std::string& key, bool dflt) const {
    if (!j.contains(key) || j[key].is_null()) return dflt;
    if (!j[key].is_boolean()) bad(key, "true or false");
    return j[key].get<bool>();
  }
};

void read_rope_scaling(const Reader& r, DecoderConfig& c) {
  if (!r.j.contains("rope_scaling") || r.j["rope_scaling"].is_null()) return;
  const nlohmann::json& s = r.j["rope_scaling"];
  if (!s.is_object()) r.bad("rope_scaling", "an object or null");
  const std::string type = s.value("rope_type", s.value("type", std::string("default")));
  const Reader sr{s, r.path};
  if (type == "default") return;
  if (type == "linear") {
    c.rope_scaling = 1;
    c.rope_factor = sr.f_or("factor", 1.f);
  } else if (type == "llama3") {
    c.rope_scaling = 2;
    c.rope_factor = sr.f_or("factor", 8.f);
    c.rope_low_freq = sr.f_or("low_freq_factor", 1.f);
    c.rope_high_freq = sr.f_or("high_freq_factor", 4.f);
    c.rope_orig_max_pos = float(sr.i_or("original_max_position_embeddings", 8192));
  } else if (type == "yarn") {
    c.rope_scaling = 3;
    c.rope_factor = sr.f_or("factor", 1.f);
    c.rope_orig_max_pos = float(sr.i_or("original_max_position_embeddings", c.max_pos));
    c.rope_beta_fast = sr.f_or("beta_fast", 32.f);
    c.rope_beta_slow = sr.f_or("beta_slow", 1.f);
    c.yarn_mscale =
        s.contains("mscale") && s["mscale"].is_number() ? float(s["mscale"].get<double>()) : 0.f;
    c.yarn_mscale_all_dim = s.contains("mscale_all_dim") && s["mscale_all_dim"].is_number()
                                ? float(s["mscale_all_dim"].get<double>())
                                : 0.f;
  } else {
    r.bad("rope_scaling", "type default, linear, llama3 or yarn (got '" + type + "')");
  }
}

// yarn's factor on cos and sin (transformers' attention_factor) and DeepSeek's on the softmax
// scale (mscale_all_dim): 0.1 m ln(factor) + 1.
float yarn_mscale(float factor, float m) {
  return factor <= 1.f ? 1.f : 0.1f * m * std::log(factor) + 1.f;
}

// Where yarn scales cos and sin by attention_factor, a fully rotated head's scores scale by its
// square: folded into the attention's scale. MLA's (DeepSeek) softmax scale takes mscale_all_dim's.
void yarn_attention_scale(const Reader& r, DecoderConfig& c) {
  if (c.rope_scaling != 3) return;
  const float m = c.yarn_mscale, m_all = c.yarn_mscale_all_dim;
  const float af = m > 0 && m_all > 0
                       ? yarn_mscale(c.rope_factor, m) / yarn_mscale(c.rope_factor, m_all)
                       : yarn_mscale(c.rope_factor, 1.f);
  const float head = float(c.hd());
  if (c.mla()) {
    if (std::fabs(af - 1.f) > 1e-6f)
      r.bad("rope_scaling",
            "yarn with mscale equal to mscale_all_dim for multi-head latent attention");
    const float s = m_all > 0 ? yarn_mscale(c.rope_factor, m_all) : 1.f;
    c.attn_scale = s * s / std::sqrt(head);
    return;
  }
  if (c.rope_dims() != c.hd() && std::fabs(af - 1.f) > 1e-6f)
    r.bad("rope_scaling",
          "yarn on whole heads (partial_rotary_factor 1) unless its attention factor is 1");
  c.attn_scale = af * af / std::sqrt(head);
}

const Family* llama_shaped(const std::string& archs) {
  for (const Family& f : kLlamaShaped)
    if (archs == f.hf) return &f;
  return nullptr;
}

// The mixture-of-experts fields of Mixtral, Qwen2-MoE and Qwen3-MoE.
void read_moe(const Reader& r, DecoderConfig& c) {
  const nlohmann::json& j = r.j;
  if (c.arch == Arch::mixtral) {
    c.experts = r.i("num_local_experts");
    c.moe_ffn = c.ffn;
    c.norm_topk = true;
  } else if (c.arch == Arch::qwen2_moe || c.arch == Arch::qwen3_moe) {
    c.experts = r.i("num_experts");
    c.moe_ffn = r.i("moe_intermediate_size");
    c.norm_topk = r.b_or("norm_topk_prob", c.arch == Arch::qwen3_moe);
    c.sparse_step = r.i_or("decoder_sparse_step", 1);
    if (c.arch == Arch::qwen2_moe) {
      c.shared_ffn = r.i_or("shared_expert_intermediate_size", 0, 0);
      c.shared_gate = true;
    }
    if (j.contains("mlp_only_layers") && !j["mlp_only_layers"].is_null()) {
      if (!j["mlp_only_layers"].is_array()) r.bad("mlp_only_layers", "a list of layer indexes");
      for (const auto& l : j["mlp_only_layers"]) {
        if (!l.is_number_integer()) r.bad("mlp_only_layers", "a list of layer indexes");
        c.dense_layers.push_back(l.get<int64_t>());
      }
    }
  } else if (c.arch == Arch::glm4_moe || c.arch == Arch::deepseek) {
    // DeepSeek-V3's router and shared experts (V2's: softmax scores, no bias)
    c.experts = r.i("n_routed_experts");
    c.moe_ffn = r.i("moe_intermediate_size");
    c.norm_topk = r.b_or("norm_topk_prob", true);
    c.shared_ffn = c.moe_ffn * r.i_or("n_shared_experts", 1, 0);
    const std::string scoring = j.value("scoring_func", std::string("sigmoid"));
    if (scoring != "sigmoid" && scoring != "softmax") r.bad("scoring_func", "sigmoid or softmax");
    c.sigmoid_router = scoring == "sigmoid";
    const std::string method = j.value("topk_method", std::string("noaux_tc"));
    if (method != "noaux_tc" && method != "greedy" && method != "group_limited_greedy")
      r.bad("topk_method", "noaux_tc, greedy or group_limited_greedy");
    c.router_bias = method == "noaux_tc";  // e_score_correction_bias
    if (r.i_or("moe_layer_freq", 1) != 1) r.bad("moe_layer_freq", "1");
    c.n_group = method == "greedy" ? 1 : r.i_or("n_group", 1);
    c.topk_group = method == "greedy" ? 1 : r.i_or("topk_group", 1);
    c.routed_scale = r.f_or("routed_scaling_factor", 1.f);
    c.use_qk_norm = r.b_or("use_qk_norm", false);
    for (int64_t l = 0; l < r.i_or("first_k_dense_replace", 0, 0) && l < c.layers; ++l)
      c.dense_layers.push_back(l);
  } else {
    return;
  }
  c.top_k = r.i("num_experts_per_tok");
  if (c.top_k > c.experts)
    r.bad("num_experts_per_tok",
          "at most the number of experts (" + std::to_string(c.experts) + ")");
  // transformers adds the load-balancing loss only when output_router_logits is set.
  if (r.b_or("output_router_logits", false))
    c.router_aux_coef = r.f_or("router_aux_loss_coef", 0.001f);
}

// DeepSeek's multi-head latent attention.
void read_mla(const Reader& r, DecoderConfig& c) {
  c.q_lora_rank = r.i_or("q_lora_rank", 0, 0);
  c.kv_lora_rank = r.i("kv_lora_rank");
  c.qk_nope_dim = r.i("qk_nope_head_dim");
  c.qk_rope_dim = r.i("qk_rope_head_dim");
  c.v_head_dim = r.i("v_head_dim");
  c.head_dim = c.qk_nope_dim + c.qk_rope_dim;  // the query's head
  c.kv_heads = c.heads;
  c.rope_fraction = float(c.qk_rope_dim) / float(c.head_dim);
  if (r.b_or("attention_bias", false)) r.bad("attention_bias", "false");
}

DecoderConfig read_hf(const nlohmann::json& j, const std::string& path) {
  const Reader r{j, path};
  if (!j.is_object()) throw Error(path + ": not a JSON object");
  std::string archs;
  if (j.contains("architectures") && j["architectures"].is_array() && !j["architectures"].empty() &&
      j["architectures"][0].is_string())
    archs = j["architectures"][0].get<std::string>();
  DecoderConfig c;
  if (archs == "GPT2LMHeadModel") {
    c.arch = Arch::gpt2;
    c.vocab_size = r.i("vocab_size", 2);
    c.hidden = r.i("n_embd");
    c.layers = r.i("n_layer");
    c.heads = r.i("n_head");
    c.max_pos = r.i_or("n_positions", r.i_or("n_ctx", 1024));
    c.ffn = r.i_or("n_inner", 0, 0);
    c.norm_eps = r.f_or("layer_norm_epsilon", 1e-5f);
    const std::string act = j.value("activation_function", std::string("gelu_new"));
    if (act != "gelu_new" && act != "gelu_pytorch_tanh")
      r.bad("activation_function", "gelu_new (the tanh approximation)");
    c.tie_embeddings = true;
  } else if (const Family* fam = llama_shaped(archs)) {
    c.arch = fam->arch;
    c.vocab_size = r.i("vocab_size", 2);
    c.hidden = r.i("hidden_size");
    c.layers = r.i("num_hidden_layers");
    c.heads = r.i("num_attention_heads");
    c.kv_heads = r.i_or("num_key_value_heads", c.heads);
    c.head_dim = r.i_or("head_dim",
                        c.arch == Arch::glm || c.arch == Arch::glm4_moe ? 128 : c.hidden / c.heads);
    c.ffn = r.i("intermediate_size");
    c.max_pos = r.i_or("max_position_embeddings", 2048);
    c.norm_eps = r.f_or("rms_norm_eps", 1e-6f);
    c.rope_theta = r.f_or("rope_theta", 10000.f);
    c.rope_fraction = r.f_or("partial_rotary_factor",
                             c.arch == Arch::glm || c.arch == Arch::glm4_moe ? 0.5f : 1.f);
    c.tie_embeddings = r.b_or("tie_word_embeddings", false);
    const bool bias = r.b_or("attention_bias", c.arch == Arch::glm);
    c.qkv_bias = c.arch == Arch::qwen2 || c.arch == Arch::qwen2_moe || bias;
    c.o_bias = c.arch == Arch::llama && bias;
    c.mlp_bias = r.b_or("mlp_bias", false);
    const std::string act = j.value("hidden_act", std::string("silu"));
    if (act != "silu") r.bad("hidden_act", "silu");
    read_rope_scaling(r, c);
    read_moe(r, c);
    if (c.arch == Arch::deepseek) read_mla(r, c);
    yarn_attention_scale(r, c);
  } else if (archs == "ChatGLMModel" || archs == "ChatGLMForConditionalGeneration") {
    c.arch = Arch::chatglm;
    c.vocab_size = r.i("padded_vocab_size", 2);
    c.hidden = r.i("hidden_size");
    c.layers = r.i("num_layers");
    c.heads = r.i("num_attention_heads");
    c.head_dim = r.i_or("kv_channels", c.hidden / c.heads);
    c.kv_heads = r.b_or("multi_query_attention", false) ? r.i("multi_query_group_num") : c.heads;
    c.ffn = r.i("ffn_hidden_size");
    c.max_pos = r.i_or("seq_length", 2048);
    c.norm_eps = r.f_or("layernorm_epsilon", 1e-5f);
    c.rope_theta = 10000.f * r.f_or("rope_ratio", 1.f);
    c.rope_fraction = 0.5f;
    c.tie_embeddings = false;
    c.qkv_bias = r.b_or("add_qkv_bias", false);
    c.o_bias = c.mlp_bias = r.b_or("add_bias_linear", false);
    if (!r.b_or("rmsnorm", true))
      r.bad("rmsnorm", "true (ChatGLM-6B v1's LayerNorm is not supported)");
    if (r.b_or("apply_residual_connection_post_layernorm", false))
      r.bad("apply_residual_connection_post_layernorm", "false");
  } else {
    throw Error(path + ": architectures " +
                (j.contains("architectures") ? j["architectures"].dump() : std::string("missing")) +
                " is not supported; supported: " + kSupported);
  }
  // eos_token_id: one id or a list (Llama 3 lists several).
  if (j.contains("eos_token_id") && !j["eos_token_id"].is_null()) {
    const nlohmann::json& e = j["eos_token_id"];
    for (const nlohmann::json& id : e.is_array() ? e : nlohmann::json::array({e})) {
      if (!id.is_number_integer()) r.bad("eos_token_id", "an integer or a list of integers");
      if (id.get<int64_t>() >= 0 && id.get<int64_t>() < c.vocab_size)
        c.eos.push_back(id.get<int32_t>());
    }
  }
  c.validate();
  return c;
}

}  // namespace

DecoderConfig decoder_config_from_hf(const nlohmann::json& j, const std::string& path) {
  try {
    return read_hf(j, path);
  } catch (const nlohmann::json::exception& e) {  // a nested field of the wrong type
    throw Error(path + ": not a model config mxn can read (" + e.what() + ")");
  }
}

nlohmann::json decoder_config_to_hf(const DecoderConfig& c) {
  nlohmann::json j;
  switch (c.arch) {
    case Arch::gpt2:
      return {{"architectures", {"GPT2LMHeadModel"}},
              {"model_type", "gpt2"},
              {"vocab_size", c.vocab_size},
              {"n_embd", c.hidden},
              {"n_layer", c.layers},
              {"n_head", c.heads},
              {"n_positions", c.max_pos},
              {"n_ctx", c.max_pos},
              {"n_inner", c.ffn > 0 ? nlohmann::json(c.ffn) : nlohmann::json(nullptr)},
              {"layer_norm_epsilon", c.norm_eps},
              {"activation_function", "gelu_new"},
              {"tie_word_embeddings", true}};
    case Arch::chatglm:
      return {{"architectures", {"ChatGLMModel"}},
              {"model_type", "chatglm"},
              {"padded_vocab_size", c.vocab_size},
              {"hidden_size", c.hidden},
              {"num_layers", c.layers},
              {"num_attention_heads", c.heads},
              {"kv_channels", c.hd()},
              {"multi_query_attention", c.n_kv_heads() != c.heads},
              {"multi_query_group_num", c.n_kv_heads()},
              {"ffn_hidden_size", c.ffn_width()},
              {"seq_length", c.max_pos},
              {"layernorm_epsilon", c.norm_eps},
              {"rope_ratio", c.rope_theta / 10000.f},
              {"rmsnorm", true},
              {"add_qkv_bias", c.qkv_bias},
              {"add_bias_linear", c.o_bias},
              {"post_layer_norm", true},
              {"apply_residual_connection_post_layernorm", false}};
    default:
      break;
  }
  const Family* fam = nullptr;
  for (const Family& f : kLlamaShaped)
    if (f.arch == c.arch && !fam) fam = &f;
  j = {{"architectures", {fam->hf}},
       {"eos_token_id", c.eos.size() == 1 ? nlohmann::json(c.eos[0]) : nlohmann::json(c.eos)},
       {"model_type", fam->model_type},
       {"pad_token_id", nullptr},  // transformers' GLM default (151329) lies outside small vocabs
       {"vocab_size", c.vocab_size},
       {"hidden_size", c.hidden},
       {"num_hidden_layers", c.layers},
       {"num_attention_heads", c.heads},
       {"num_key_value_heads", c.n_kv_heads()},
       {"head_dim", c.hd()},
       {"intermediate_size", c.ffn_width()},
       {"max_position_embeddings", c.max_pos},
       {"rms_norm_eps", c.norm_eps},
       {"rope_theta", c.rope_theta},
       {"hidden_act", "silu"},
       {"tie_word_embeddings", c.tie_embeddings},
       {"attention_bias", c.arch == Arch::llama ? c.o_bias : c.qkv_bias},
       {"mlp_bias", c.mlp_bias}};
  if (c.arch == Arch::glm || c.arch == Arch::glm4_moe) j["partial_rotary_factor"] = c.rope_fraction;
  if (c.arch == Arch::deepseek) {
    j["q_lora_rank"] = c.q_lora_rank > 0 ? nlohmann::json(c.q_lora_rank) : nlohmann::json(nullptr);
    j["kv_lora_rank"] = c.kv_lora_rank;
    j["qk_nope_head_dim"] = c.qk_nope_dim;
    j["qk_rope_head_dim"] = c.qk_rope_dim;
    j["v_head_dim"] = c.v_head_dim;
    j["topk_method"] = c.router_bias   ? "noaux_tc"
                       : c.n_group > 1 ? "group_limited_greedy"
                                       : "greedy";
    j["moe_layer_freq"] = 1;
    j["rope_interleave"] = true;
    j.erase("head_dim");
    j.erase("partial_rotary_factor");
  }
  if (c.arch == Arch::glm4_moe || c.arch == Arch::deepseek) {
    j["n_routed_experts"] = c.experts;
    j["n_shared_experts"] = c.moe_ffn > 0 ? c.shared_ffn / c.moe_ffn : 0;
    j["scoring_func"] = c.sigmoid_router ? "sigmoid" : "softmax";
    j["n_group"] = c.n_group;
    j["topk_group"] = c.topk_group;
    j["routed_scaling_factor"] = c.routed_scale;
    j["use_qk_norm"] = c.use_qk_norm;
    j["first_k_dense_replace"] = c.dense_layers.size();
  }
  if (c.experts > 0) {
    if (c.arch != Arch::glm4_moe)
      j[c.arch == Arch::mixtral ? "num_local_experts" : "num_experts"] = c.experts;
    j["num_experts_per_tok"] = c.top_k;
    j["output_router_logits"] = c.router_aux_coef > 0;
    j["router_aux_loss_coef"] = c.router_aux_coef > 0 ? c.router_aux_coef : 0.001f;
    if (c.arch != Arch::mixtral) {
      j["moe_intermediate_size"] = c.moe_ffn;
      j["norm_topk_prob"] = c.norm_topk;
    }
    if (c.arch == Arch::qwen2_moe || c.arch == Arch::qwen3_moe) {
      j["decoder_sparse_step"] = c.sparse_step;
      j["mlp_only_layers"] = c.dense_layers;
    }
    if (c.arch == Arch::qwen2_moe) j["shared_expert_intermediate_size"] = c.shared_ffn;
    if (c.arch == Arch::mixtral) j["intermediate_size"] = c.moe_ffn;
  }
  if (c.rope_scaling == 1) j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", c.rope_factor}};
  if (c.rope_scaling == 3) {
    j["rope_scaling"] = {{"rope_type", "yarn"},
                         {"factor", c.rope_factor},
                         {"original_max_position_embeddings", int64_t(c.rope_orig_max_pos)},
                         {"beta_fast", c.rope_beta_fast},
                         {"beta_slow", c.rope_beta_slow}};
    if (c.yarn_mscale > 0) j["rope_scaling"]["mscale"] = c.yarn_mscale;
    if (c.yarn_mscale_all_dim > 0) j["rope_scaling"]["mscale_all_dim"] = c.yarn_mscale_all_dim;
  }
  if (c.rope_scaling == 2)
    j["rope_scaling"] = {{"rope_type", "llama3"},
                         {"factor", c.rope_factor},
                         {"low_freq_factor", c.rope_low_freq},
                         {"high_freq_factor", c.rope_high_freq},
                         {"original_max_position_embeddings", int64_t(c.rope_orig_max_pos)}};
  return j;
}

}  // namespace mxn
