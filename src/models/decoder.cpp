#include "models/decoder.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "core/json_num.h"
#include "core/rng.h"
#include "models/builder.h"

namespace mxn {

const char* arch_name(Arch a) {
  switch (a) {
    case Arch::gpt2:
      return "gpt2";
    case Arch::llama:
      return "llama";
    case Arch::qwen2:
      return "qwen2";
    case Arch::glm:
      return "glm";
    case Arch::chatglm:
      return "chatglm";
    case Arch::mixtral:
      return "mixtral";
    case Arch::qwen2_moe:
      return "qwen2_moe";
    case Arch::qwen3:
      return "qwen3";
    case Arch::qwen3_moe:
      return "qwen3_moe";
    case Arch::glm4_moe:
      return "glm4_moe";
    case Arch::deepseek:
      return "deepseek";
  }
  return "?";
}

Arch arch_from_name(const std::string& n) {
  const Arch all[] = {Arch::gpt2,      Arch::llama,    Arch::qwen2,     Arch::glm,
                      Arch::chatglm,   Arch::mixtral,  Arch::qwen2_moe, Arch::qwen3,
                      Arch::qwen3_moe, Arch::glm4_moe, Arch::deepseek};
  std::string names;
  for (Arch a : all) {
    if (n == arch_name(a)) return a;
    names += std::string(names.empty() ? "" : ", ") + arch_name(a);
  }
  throw Error("unknown arch '" + n + "' (expected one of " + names + ")");
}

bool DecoderConfig::moe_layer(int64_t l) const {
  return experts > 0 && (l + 1) % std::max<int64_t>(sparse_step, 1) == 0 &&
         std::find(dense_layers.begin(), dense_layers.end(), l) == dense_layers.end();
}

int64_t DecoderConfig::ffn_width() const {
  if (ffn > 0) return ffn;
  if (!swiglu()) return 4 * hidden;
  const int64_t f = 8 * hidden / 3;  // LLaMA's 2/3 of 4h, rounded up to a multiple of 32
  return (f + 31) / 32 * 32;
}

int64_t DecoderConfig::rope_dims() const {
  const int64_t r = int64_t(std::lround(double(hd()) * rope_fraction));
  return r - r % 2;
}

int64_t DecoderConfig::param_count() const {
  const int64_t C = hidden, D = hd(), H = heads, G = n_kv_heads(), F = ffn_width();
  int64_t qkv = C * (H + 2 * G) * D + (qkv_bias ? (H + 2 * G) * D : 0);
  int64_t o = H * D * C + (o_bias ? C : 0);
  if (mla()) {  // q (through its bottleneck), kv_a, the latent norm, k_b and v_b; o_proj
    const int64_t Q = qk_nope_dim + qk_rope_dim, R = kv_lora_rank;
    qkv = (q_lora_rank > 0 ? C * q_lora_rank + q_lora_rank + q_lora_rank * H * Q : C * H * Q) +
          C * (R + qk_rope_dim) + R + H * (qk_nope_dim + v_head_dim) * R;
    o = H * v_head_dim * C;
  }
  const int64_t mlp = (swiglu() ? 3 : 2) * C * F + (mlp_bias ? (swiglu() ? 2 * F : F) + C : 0);
  const int64_t norms = (gpt2() ? 4 * C : 2 * C) + (qk_norm() ? 2 * D : 0);
  const int64_t moe = experts * (C + 3 * C * moe_ffn) + (router_bias ? experts : 0) +
                      3 * C * shared_ffn + (shared_gate ? C : 0);
  int64_t n = vocab_size * C + layers * (qkv + o + norms) + (gpt2() ? 2 * C : C);
  for (int64_t l = 0; l < layers; ++l) n += moe_layer(l) ? moe : mlp;
  if (gpt2()) n += max_pos * C;
  if (!tie_embeddings) n += vocab_size * C;
  return n + 2 * layers * prefix_len * G * D;
}

void DecoderConfig::validate() const {
  auto need = [](bool ok, const std::string& msg) {
    if (!ok) throw Error("invalid model config: " + msg);
  };
  const std::string s = std::to_string(hidden);
  need(layers >= 1 && layers <= 1024, "n_layer = " + std::to_string(layers) + ", expected 1..1024");
  need(hidden >= 1 && hidden <= 65536, "n_embd = " + s + ", expected 1..65536");
  need(heads >= 1 && (head_dim > 0 || hidden % heads == 0),
       "n_head = " + std::to_string(heads) + " must be >= 1 and divide n_embd = " + s);
  need(n_kv_heads() >= 1 && heads % n_kv_heads() == 0,
       "n_kv_head = " + std::to_string(n_kv_heads()) +
           " must divide n_head = " + std::to_string(heads));
  need(vocab_size >= 2 && vocab_size <= (1 << 24),
       "vocab_size = " + std::to_string(vocab_size) + ", expected 2..16777216");
  need(max_pos >= 1 && max_pos <= (1 << 20),
       "n_ctx = " + std::to_string(max_pos) + ", expected 1..1048576");
  need(gpt2() || rope_dims() >= 2, "the rotary dims per head must be at least 2");
  need(rope_theta > 0, "rope_theta must be > 0");
  need(norm_eps > 0, "the norm's epsilon must be > 0");
  need(prefix_len >= 0 && prefix_len <= 65536,
       "prefix_len = " + std::to_string(prefix_len) + ", expected 0..65536");
  if (mla()) {
    need(qk_nope_dim >= 1 && v_head_dim >= 1 && qk_rope_dim >= 2 && qk_rope_dim % 2 == 0 &&
             q_lora_rank >= 0,
         "multi-head latent attention needs qk_nope_head_dim, v_head_dim >= 1, qk_rope_head_dim "
         "even and >= 2, q_lora_rank >= 0 (0: none)");
    need(prefix_len == 0, "P-Tuning prefixes are not supported with multi-head latent attention");
  }
  if (experts == 0) return;
  const std::string e = std::to_string(experts);
  need(experts >= 1 && experts <= 1024, "num_experts = " + e + ", expected 1..1024");
  need(top_k >= 1 && top_k <= experts && top_k <= 64,
       "num_experts_per_tok = " + std::to_string(top_k) +
           ", expected 1..min(64, num_experts = " + e + ")");
  need(moe_ffn >= 1, "moe_intermediate_size = " + std::to_string(moe_ffn) + ", expected >= 1");
  need(shared_ffn >= 0, "shared_expert_intermediate_size must be >= 0");
  need(sparse_step >= 1,
       "decoder_sparse_step = " + std::to_string(sparse_step) + ", expected >= 1");
}

nlohmann::json DecoderConfig::to_json() const {
  return {{"arch", arch_name(arch)},
          {"vocab_size", vocab_size},
          {"hidden", hidden},
          {"layers", layers},
          {"heads", heads},
          {"kv_heads", kv_heads},
          {"head_dim", head_dim},
          {"ffn", ffn},
          {"max_pos", max_pos},
          {"norm_eps", norm_eps},
          {"rope_theta", rope_theta},
          {"rope_fraction", rope_fraction},
          {"rope_scaling", rope_scaling},
          {"rope_factor", rope_factor},
          {"rope_low_freq", rope_low_freq},
          {"rope_high_freq", rope_high_freq},
          {"rope_orig_max_pos", rope_orig_max_pos},
          {"rope_beta_fast", rope_beta_fast},
          {"rope_beta_slow", rope_beta_slow},
          {"yarn_mscale", yarn_mscale},
          {"yarn_mscale_all_dim", yarn_mscale_all_dim},
          {"tie_embeddings", tie_embeddings},
          {"qkv_bias", qkv_bias},
          {"o_bias", o_bias},
          {"mlp_bias", mlp_bias},
          {"eos", eos},
          {"prefix_len", prefix_len},
          {"experts", experts},
          {"top_k", top_k},
          {"moe_ffn", moe_ffn},
          {"shared_ffn", shared_ffn},
          {"sparse_step", sparse_step},
          {"norm_topk", norm_topk},
          {"router_bias", router_bias},
          {"sigmoid_router", sigmoid_router},
          {"shared_gate", shared_gate},
          {"n_group", n_group},
          {"topk_group", topk_group},
          {"routed_scale", routed_scale},
          {"use_qk_norm", use_qk_norm},
          {"q_lora_rank", q_lora_rank},
          {"kv_lora_rank", kv_lora_rank},
          {"qk_nope_dim", qk_nope_dim},
          {"qk_rope_dim", qk_rope_dim},
          {"v_head_dim", v_head_dim},
          {"attn_scale", attn_scale},
          {"dense_layers", dense_layers},
          {"router_aux_coef", router_aux_coef}};
}

DecoderConfig DecoderConfig::from_json(const nlohmann::json& j) {
  DecoderConfig c;
  const std::string where = "model config";
  if (!j.is_object()) throw Error(where + " is not a JSON object");
  if (j.contains("arch") && !j["arch"].is_string()) throw Error(where + ": 'arch' is not a string");
  c.arch = arch_from_name(j.value("arch", "gpt2"));
  c.vocab_size = json_value(j, "vocab_size", c.vocab_size, where);
  c.hidden = json_value(j, "hidden", c.hidden, where);
  c.layers = json_value(j, "layers", c.layers, where);
  c.heads = json_value(j, "heads", c.heads, where);
  c.kv_heads = json_value(j, "kv_heads", c.kv_heads, where);
  c.head_dim = json_value(j, "head_dim", c.head_dim, where);
  c.ffn = json_value(j, "ffn", c.ffn, where);
  c.max_pos = json_value(j, "max_pos", c.max_pos, where);
  c.norm_eps = json_value(j, "norm_eps", c.norm_eps, where);
  c.rope_theta = json_value(j, "rope_theta", c.rope_theta, where);
  c.rope_fraction = json_value(j, "rope_fraction", c.rope_fraction, where);
  c.rope_scaling = json_value(j, "rope_scaling", c.rope_scaling, where);
  c.rope_factor = json_value(j, "rope_factor", c.rope_factor, where);
  c.rope_low_freq = json_value(j, "rope_low_freq", c.rope_low_freq, where);
  c.rope_high_freq = json_value(j, "rope_high_freq", c.rope_high_freq, where);
  c.rope_orig_max_pos = json_value(j, "rope_orig_max_pos", c.rope_orig_max_pos, where);
  c.rope_beta_fast = json_value(j, "rope_beta_fast", c.rope_beta_fast, where);
  c.rope_beta_slow = json_value(j, "rope_beta_slow", c.rope_beta_slow, where);
  c.yarn_mscale = json_value(j, "yarn_mscale", c.yarn_mscale, where);
  c.yarn_mscale_all_dim = json_value(j, "yarn_mscale_all_dim", c.yarn_mscale_all_dim, where);
  c.tie_embeddings = json_value(j, "tie_embeddings", c.tie_embeddings, where);
  c.qkv_bias = json_value(j, "qkv_bias", c.qkv_bias, where);
  c.o_bias = json_value(j, "o_bias", c.o_bias, where);
  c.mlp_bias = json_value(j, "mlp_bias", c.mlp_bias, where);
  c.prefix_len = json_value(j, "prefix_len", c.prefix_len, where);
  c.experts = json_value(j, "experts", c.experts, where);
  c.top_k = json_value(j, "top_k", c.top_k, where);
  c.moe_ffn = json_value(j, "moe_ffn", c.moe_ffn, where);
  c.shared_ffn = json_value(j, "shared_ffn", c.shared_ffn, where);
  c.sparse_step = json_value(j, "sparse_step", c.sparse_step, where);
  c.norm_topk = json_value(j, "norm_topk", c.norm_topk, where);
  c.router_bias = json_value(j, "router_bias", c.router_bias, where);
  c.sigmoid_router = json_value(j, "sigmoid_router", c.sigmoid_router, where);
  c.shared_gate = json_value(j, "shared_gate", c.shared_gate, where);
  c.n_group = json_value(j, "n_group", c.n_group, where);
  c.topk_group = json_value(j, "topk_group", c.topk_group, where);
  c.routed_scale = json_value(j, "routed_scale", c.routed_scale, where);
  c.use_qk_norm = json_value(j, "use_qk_norm", c.use_qk_norm, where);
  c.q_lora_rank = json_value(j, "q_lora_rank", c.q_lora_rank, where);
  c.kv_lora_rank = json_value(j, "kv_lora_rank", c.kv_lora_rank, where);
  c.qk_nope_dim = json_value(j, "qk_nope_dim", c.qk_nope_dim, where);
  c.qk_rope_dim = json_value(j, "qk_rope_dim", c.qk_rope_dim, where);
  c.v_head_dim = json_value(j, "v_head_dim", c.v_head_dim, where);
  c.attn_scale = json_value(j, "attn_scale", c.attn_scale, where);
  c.router_aux_coef = json_value(j, "router_aux_coef", c.router_aux_coef, where);
  if (j.contains("dense_layers")) {
    if (!j["dense_layers"].is_array()) throw Error(where + ": 'dense_layers' is not a list");
    for (const auto& l : j["dense_layers"])
      c.dense_layers.push_back(json_number<int64_t>(l, where + ": 'dense_layers'"));
  }
  if (j.contains("eos")) {
    if (!j["eos"].is_array()) throw Error(where + ": 'eos' is not a list of token ids");
    c.eos.clear();
    for (const auto& id : j["eos"]) c.eos.push_back(json_number<int32_t>(id, where + ": 'eos'"));
  }
  return c;
}

const char* const kBlockPositions = "glm.block_position_embeddings.weight";
const char* const kRouterBias = "e_score_correction_bias";

std::vector<std::string> lora_default_targets(Arch a) {
  switch (a) {
    case Arch::gpt2:
      return {"c_attn"};
    case Arch::chatglm:
      return {"query_key_value"};
    default:
      return {"q_proj", "v_proj"};
  }
}

std::string lora_a_name(const std::string& module) { return module + ".lora_A.weight"; }
std::string lora_b_name(const std::string& module) { return module + ".lora_B.weight"; }
const char* const kPrefixEncoder = "prefix_encoder.";
std::string prefix_key_name(int64_t l) { return "prefix." + std::to_string(l) + ".key"; }
std::string prefix_value_name(int64_t l) { return "prefix." + std::to_string(l) + ".value"; }

// Serving and generation: each row's key and value into the cache (serving: to its cache row,
// with its own key range); attention then reads keys and values from the cache. MLA's one cache
// (shared) holds each token's latent and RoPE key, which keys and values both read.
void cache_kv(Builder& b, DecoderGraph& m, const std::string& p, int64_t B, int& k, int& v,
              AttentionParams& at, int64_t width, bool shared) {
  Graph& g = b.g;
  const DecoderOptions& o = b.o;
  const int64_t GD = width > 0 ? width : b.c.n_kv_heads() * b.c.hd();
  const int64_t rows = o.serve_rows > 0 ? o.serve_rows : B * o.kv_cache;
  if (rows == 0) return;
  const int kc = g.input(p + (shared ? "kv_cache" : "k_cache"), {rows, GD}, DType::f32);
  const int vc = shared ? kc : g.input(p + "v_cache", {rows, GD}, DType::f32);
  m.caches.push_back(kc);
  if (!shared) m.caches.push_back(vc);
  const int per_seq = o.serve_rows > 0 ? o.serve_rows : o.kv_cache;
  for (auto [src, dst, col] : {std::tuple{k, kc, at.k_col}, std::tuple{v, vc, at.v_col}}) {
    g.set_rows(src, dst, 0, per_seq, col, o.serve_rows > 0 ? m.cache_rows : -1);
    if (o.serve_rows == 0) m.cache_writes.push_back(g.nodes.size() - 1);
    if (shared) break;  // one write for the shared cache
  }
  k = kc;
  v = vc;
  at.k_col = at.v_col = 0;
  if (o.serve_rows > 0) {
    at.kv_rows = at.S = o.serve_rows;
    at.mask = o.serve_block > 0 ? MXN_MASK_PAGED : MXN_MASK_CACHED;
    at.block = o.serve_block;
  } else {  // append this step's keys and values; attend over the cache
    at.kv_rows = o.kv_cache;
  }
}

namespace {
// P-Tuning v2's reparameterising MLP while training: its tanh layer, shared by every layer's
// rows; -1 without one.
int prefix_mlp(Builder& b) {
  Graph& g = b.g;
  const int64_t C = b.c.hidden, Hp = b.o.prefix_projection;
  if (b.c.prefix_len == 0 || Hp == 0) return -1;
  const std::string enc = kPrefixEncoder;
  const int e = g.param(enc + "embedding", {b.c.prefix_len, C}, true);
  const int h = g.matmul(e, g.param(enc + "dense.weight", {Hp, C}, true), false, true);
  return g.tanh(g.add_bias(h, g.param(enc + "dense.bias", {Hp}, false)));
}

// P-Tuning v2's key and value rows for layer l: out of its MLP (prefix_hidden, shared by every
// layer), or trained as they are; {-1, -1} without a prefix.
std::pair<int, int> prefix_rows(Builder& b, int64_t l, int prefix_hidden) {
  Graph& g = b.g;
  const int64_t GD = (b.o.tp.on() ? b.o.tp.kv : b.c.n_kv_heads()) * b.c.hd();  // this rank's
  const std::string enc = kPrefixEncoder;
  if (prefix_hidden >= 0) {  // one output matrix per layer and kind
    int rows[2];
    for (int i = 0; i < 2; ++i) {
      const std::string n = enc + std::to_string(l) + (i ? ".value." : ".key.");
      const int w = g.param(n + "weight", {GD, b.o.prefix_projection}, true);
      rows[i] =
          g.add_bias(g.matmul(prefix_hidden, w, false, true), g.param(n + "bias", {GD}, false));
    }
    return {rows[0], rows[1]};
  }
  if (b.c.prefix_len == 0) return {-1, -1};
  return {g.param(prefix_key_name(l), {b.c.prefix_len, GD}, true),
          g.param(prefix_value_name(l), {b.c.prefix_len, GD}, true)};
}

// A SwiGLU MLP of width F with separate gate, up and down linears named <p>gate_proj etc.
int swiglu_mlp(Builder& b, const std::string& p, int h, int64_t F) {
  const int64_t C = b.c.hidden;
  const int gt = b.linear(h, p + "gate_proj", C, F, false);
  const int up = b.linear(h, p + "up_proj", C, F, false);
  return b.linear(b.g.swiglu(gt, up, 0, 0, F), p + "down_proj", F, C, false);
}

// The routed experts' output y plus the shared expert's on h (under its sigmoid gate: a
// one-expert route, the sigmoid as its weight), if the model has one.
int shared_expert(Builder& b, const Names& nm, const std::string& blk, int h, int y) {
  Graph& g = b.g;
  const DecoderConfig& c = b.c;
  if (c.shared_ffn == 0) return y;
  const int64_t N = g.v_rows(h);
  const int shared = swiglu_mlp(b, blk + nm.shared, h, c.shared_ffn);
  if (!c.shared_gate) return g.add(y, shared);
  const int gate = b.linear(h, blk + "shared_expert_gate", c.hidden, 1, false);
  const MoeRoute s = g.moe_route(gate, -1, MoeRouteParams{1, true, false});
  return g.add(y, g.moe_unpermute(shared, s.pos, N, s.w));
}

// A mixture-of-experts MLP on the normed h: the router's top-k, the tokens into expert order,
// each expert's SwiGLU as grouped GEMMs over all of them at once, the weighted sum back; and the
// shared expert.
int moe_mlp(Builder& b, const Names& nm, DecoderGraph& m, const std::string& p, int h) {
  Graph& g = b.g;
  const DecoderConfig& c = b.c;
  const int64_t C = c.hidden, E = c.experts, F = c.moe_ffn, N = g.v_rows(h);
  const std::string blk = p + nm.moe, ex = blk + "experts.";
  const int logits = b.linear(h, blk + nm.router, C, E, false);
  const bool aux = b.o.with_loss && c.router_aux_coef > 0;
  const int bias =
      c.router_bias ? b.w(blk + nm.router + "." + kRouterBias, {E}, false) : -1;  // no gradient
  const MoeRouteParams rp{c.top_k,   c.sigmoid_router, c.norm_topk,
                          c.n_group, c.topk_group,     c.routed_scale};
  const MoeRoute r = g.moe_route(logits, bias, rp, aux);
  m.router_ids.push_back(r.ids);
  m.router_offsets.push_back(r.offsets);
  if (aux) m.router_aux.push_back(r.aux);
  int xp = g.moe_permute(h, r.pos), offsets = r.offsets, el = E;
  ExpertCut cut;
  if (b.o.expert_cut) {  // expert parallel: the rows cross ranks before and after
    el = b.o.expert_count;
    g.mark_output(xp);
    cut.offsets = r.offsets, cut.xp = xp;
    if (el == 0) {  // no experts here: the rows leave, and their results come back
      for (const std::string& leaf : {nm.e_gate, nm.e_up, nm.e_down})
        b.lora_targets(ex + leaf);  // (LoRA's experts are elsewhere: a target they match is met)
      cut.yp = g.input(blk + "ep.yp", {N * c.top_k, C}, DType::f32);
      m.expert_cuts.push_back(cut);
      return shared_expert(b, nm, blk, h, g.moe_unpermute(cut.yp, r.pos, N, r.w));
    }
    cut.xr = g.input(blk + "ep.xr", {b.o.expert_rows, C}, DType::f32);
    cut.local_offsets = g.input(blk + "ep.offsets", {el + 1}, DType::i32);
    xp = cut.xr;
    offsets = cut.local_offsets;
  }
  // Serving LoRA adapters: each row's adapter mask, in the experts' row order.
  const int mask = b.o.serve_lora > 0 ? g.moe_permute(m.lora_mask, r.pos) : -1;
  const int gt = b.expert_linear(xp, ex + nm.e_gate, el, C, F, offsets, mask);
  const int up = b.expert_linear(xp, ex + nm.e_up, el, C, F, offsets, mask);
  int dn = b.expert_linear(g.swiglu(gt, up, 0, 0, F), ex + nm.e_down, el, F, C, offsets, mask);
  if (cut.xp >= 0) {
    g.mark_output(dn);
    cut.yr = dn;
    cut.yp = dn = g.input(blk + "ep.yp", {N * c.top_k, C}, DType::f32);
    m.expert_cuts.push_back(cut);
  }
  return shared_expert(b, nm, blk, h, g.moe_unpermute(dn, r.pos, N, r.w));
}

// Tensor parallelism's partial output (N rows, a split projection's or the vocabulary's
// embedding) summed over the group: in place (DecoderGraph::tp_sums), or under sequence
// parallelism into this rank's rows (a scatter cut; returns them).
int group_sum(Builder& b, DecoderGraph& m, int part) {
  if (!b.o.tp.seq) {
    m.tp_sums.push_back(part);
    return part;
  }
  const int64_t n = seq_rows(b.o.tp, b.g.v_rows(part))[1];
  const int to = b.g.activation({n, b.g.v(part).shape.back()});  // written by the runner
  m.seq_cuts.push_back({part, to, false});
  return to;
}

// A norm's output `h` read by split projections: its gradient is partial (summed over the group
// in the backward, DecoderGraph::tp_grad_of); under sequence parallelism it holds this rank's
// rows, gathered whole over the group (a gather cut; returns the whole rows, N of them).
int group_rows(Builder& b, DecoderGraph& m, int h, int64_t N) {
  if (!b.o.tp.seq) {
    m.tp_grad_of.push_back(h);
    return h;
  }
  const int to = b.g.activation({N, b.g.v(h).shape.back()});  // written by the runner
  m.seq_cuts.push_back({h, to, true});
  return to;
}

// This rank's rows of a whole (N, C) value under sequence parallelism (a position table's rows
// added to the residual stream); the value itself otherwise.
int own_rows(Builder& b, int x) {
  if (!b.o.tp.seq) return x;
  const int64_t C = b.g.v(x).shape.back();
  const auto [r0, n] = seq_rows(b.o.tp, b.g.v_rows(x));
  StridedCopyParams p;
  p.n[2] = n * C;
  p.in_offset = r0 * C;
  return b.g.strided_copy(x, p, {n, C});
}

// A projection into the residual stream. Under tensor parallelism its input is this rank's share
// (heads or MLP columns): the partial output is summed over the group (group_sum) before the
// bias, which every rank holds whole.
int out_proj(Builder& b, DecoderGraph& m, int y, const std::string& name, int64_t in, bool bias) {
  if (!b.o.tp.on()) return b.linear(y, name, in, b.c.hidden, bias);
  const int part = group_sum(b, m, b.linear(y, name, in, b.c.hidden, false));
  return bias ? b.g.add_bias(part, b.w(name + ".bias", {b.c.hidden}, false)) : part;
}

// The block's MLP on the residual stream x: GELU (GPT-2) or SwiGLU, gate and up fused or not;
// or a mixture of experts. Under tensor parallelism, this rank's columns of it.
int mlp(Builder& b, const Names& nm, DecoderGraph& m, const std::string& p, int x, int64_t l) {
  Graph& g = b.g;
  const DecoderConfig& c = b.c;
  const int64_t C = c.hidden, F = b.o.tp.on() ? b.o.tp.ffn : c.ffn_width();
  int h2 = b.norm(x, p + nm.ln2);
  if (c.moe_layer(l)) return moe_mlp(b, nm, m, p, h2);
  if (b.o.tp.on()) h2 = group_rows(b, m, h2, numel(b.g.v(m.tokens).shape));
  if (!c.swiglu()) {
    int fc = b.linear(h2, p + nm.fc, C, F, true);
    if (b.o.gelu_bf16) fc = g.cast(fc, DType::bf16);
    return out_proj(b, m, g.gelu(fc), p + nm.down, F, true);
  }
  if (c.fused_gate_up()) {
    const int gu = b.linear(h2, p + nm.gate_up, C, 2 * F, c.mlp_bias);
    return out_proj(b, m, g.swiglu(gu, gu, 0, F, F), p + nm.down, F, c.mlp_bias);
  }
  const int gt = b.linear(h2, p + nm.gate, C, F, c.mlp_bias);
  const int up = b.linear(h2, p + nm.up, C, F, c.mlp_bias);
  return out_proj(b, m, g.swiglu(gt, up, 0, 0, F), p + nm.down, F, c.mlp_bias);
}

// router_aux_coef times this graph's MoE layers' load-balancing losses over the model's MoE layer
// count (a pipeline stage's share of their mean); -1 without any.
int router_aux_share(Builder& b, const DecoderGraph& m) {
  if (m.router_aux.empty()) return -1;
  Graph& g = b.g;
  int64_t moe_layers = 0;
  for (int64_t l = 0; l < b.c.layers; ++l) moe_layers += b.c.moe_layer(l);
  int sum = m.router_aux[0];
  for (size_t i = 1; i < m.router_aux.size(); ++i) sum = g.add(sum, m.router_aux[i]);
  return g.scale(sum, b.c.router_aux_coef / float(moe_layers));
}

// The training loss plus router_aux_coef times the mean of the MoE layers' load-balancing losses.
int add_router_aux(Builder& b, const DecoderGraph& m, int loss) {
  const int aux = router_aux_share(b, m);
  return aux < 0 ? loss : b.g.add(loss, aux);
}

// Tensor parallelism's head (training): this rank's vocabulary rows' logits (N, vocab share; none
// kept with the fused head), their stats summed over the group, the whole softmax's loss from
// them; the logits' gradient reaches x partial (summed over the group as the split projections'
// inputs').
void split_head(Builder& b, DecoderGraph& m, int x, int head, int64_t N) {
  Graph& g = b.g;
  const TensorShard& s = b.o.tp;
  MXN_CHECK(b.o.with_loss, "tensor parallelism takes training graphs");
  x = group_rows(b, m, x, N);
  m.targets = g.input("targets", {N}, DType::i32);
  XentParams p{1, s.vocab0, s.rank, s.ranks};
  int loss;
  if (b.o.fused_head && g.v(head).dtype == DType::f32) {  // no logits value (CLASSIFIER_CE)
    const int stats = g.classifier_stats(x, head, m.targets, p);
    m.tp_sums.push_back(stats);
    p.part = 2;
    loss = g.classifier_ce(x, head, m.targets, stats, p);
  } else {
    const int logits = g.matmul(x, head, false, true);
    const int stats = g.xent_stats(logits, m.targets, p);
    m.tp_sums.push_back(stats);
    p.part = 2;
    loss = g.cross_entropy(logits, m.targets, stats, p);
  }
  m.loss = add_router_aux(b, m, loss);
  g.mark_output(m.loss);
}

// The last stage's end: the final norm, the chosen rows, the head and the loss.
void head(Builder& b, const Names& nm, DecoderGraph& m, int x, int wte, int64_t B, int64_t N) {
  Graph& g = b.g;
  const DecoderConfig& c = b.c;
  const DecoderOptions& o = b.o;
  const int64_t C = c.hidden;
  x = b.norm(x, nm.final_norm);
  if (o.last_logits || o.serve_rows > 0) {  // chosen rows only: a gather by row index
    m.last_rows = g.input("last_rows", {o.serve_rows > 0 ? o.logit_rows : B}, DType::i32);
    x = g.embedding(m.last_rows, x);
  }
  for (size_t i = 0; i < o.lora.targets.size(); ++i) {
    if (b.lora_hit[i]) continue;
    std::string names;
    for (const std::string& n : b.modules) names += (names.empty() ? "" : ", ") + n;
    throw Error("LoRA target module '" + o.lora.targets[i] + "' matches no linear layer of this " +
                arch_name(c.arch) + " model (its linear layers: " + names + ")");
  }
  const int64_t V = o.tp.on() ? o.tp.vocab : c.vocab_size;
  const int head = c.tie_embeddings ? wte : b.w(nm.lm_head + ".weight", {V, C}, true);
  if (o.tp.on()) return split_head(b, m, x, head, N);
  // The fused head reads f32 weights: a bf16 base (LoRA on a bf16 model) keeps matmul + loss.
  if (o.with_loss && o.fused_head && !o.last_logits && o.serve_rows == 0 &&
      g.v(head).dtype == DType::f32) {
    m.targets = g.input("targets", {N}, DType::i32);
    m.loss = add_router_aux(b, m, g.classifier_ce(x, head, m.targets));
    g.mark_output(m.loss);
    return;
  }
  m.logits = g.matmul(x, head, false, true);
  if (o.with_loss) {
    m.targets = g.input("targets", {N}, DType::i32);
    m.loss = add_router_aux(b, m, g.cross_entropy(m.logits, m.targets));
    g.mark_output(m.loss);
  }
  g.mark_output(m.logits);
}

// The token embeddings (under tensor parallelism this rank's vocabulary rows).
int token_table(Builder& b, const Names& nm) {
  const int64_t V = b.o.tp.on() ? b.o.tp.vocab : b.c.vocab_size;
  return b.w(nm.embed + ".weight", {V, b.c.hidden}, true);
}

// The tokens' rows of the table; under tensor parallelism those of this rank's vocabulary rows
// (other ids: zero rows), summed over the group.
int embed_tokens(Builder& b, DecoderGraph& m, int wte) {
  if (!b.o.tp.on()) return b.g.embedding(m.tokens, wte);
  return group_sum(b, m, b.g.embedding(m.tokens, wte, EmbeddingParams{b.o.tp.vocab0, true}));
}

// Tensor parallelism splits dense training graphs.
void check_shard(const DecoderConfig& c, const DecoderOptions& o) {
  MXN_CHECK(!o.tp.on() || (!c.mla() && c.experts == 0 && o.serve_rows == 0 && o.kv_cache == 0),
            "tensor parallelism takes dense training graphs");
}

}  // namespace

DecoderGraph build_decoder(Graph& g, const DecoderConfig& c, int64_t B, int64_t T,
                           const DecoderOptions& o) {
  MXN_CHECK(o.kv_cache > 0 || o.serve_rows > 0 || T <= c.max_pos,
            "sequence longer than the context");
  MXN_CHECK(o.serve_rows == 0 || (B == 1 && o.kv_cache == 0),
            "serving takes B = 1 and no kv_cache");
  const Names nm = names_for(c.arch);
  Builder b{g, c, o, {}, std::vector<bool>(o.lora.targets.size(), false), 0, nullptr};
  MXN_CHECK(o.lora.r == 0 || !o.lora.targets.empty(), "LoRA without target modules");
  const int64_t C = c.hidden, N = B * T, D = c.hd();
  const int64_t H = o.tp.on() ? o.tp.heads : c.heads, G = o.tp.on() ? o.tp.kv : c.n_kv_heads();
  check_shard(c, o);
  DecoderGraph m;
  b.m = &m;
  m.tokens = g.input("tokens", {N}, DType::i32);
  if (o.serve_lora > 0) m.lora_mask = g.input("lora_mask", {N, o.serve_lora}, DType::f32);
  m.positions = g.input("positions", {N}, DType::i32);
  if (o.mask == MXN_MASK_PREFIX) m.prefix = g.input("prefix", {B}, DType::i32);
  if (o.mask == MXN_MASK_SEGMENTS) m.prefix = g.input("segments", {N}, DType::i32);
  if (o.serve_rows > 0) {
    m.cache_rows = g.input("cache_rows", {N}, DType::i32);
    m.key_ranges =
        g.input("key_ranges", {N, o.serve_block > 0 ? 1 + o.serve_blocks : 2}, DType::i32);
  }
  const int64_t first_layer = o.first_layer,
                last_layer = o.last_layer < 0 ? c.layers : o.last_layer;
  MXN_CHECK(0 <= first_layer && first_layer < last_layer && last_layer <= c.layers,
            "a stage's layers must be a non-empty range of the model's");
  const bool first = first_layer == 0, last = last_layer == c.layers;
  const int wte = m.embed_table = first || (last && c.tie_embeddings) ? token_table(b, nm) : -1;
  const int x0 = first ? embed_tokens(b, m, wte) : g.input("hidden_in", {N, C}, DType::f32);
  if (!first) m.hidden_in = x0;
  int x = x0;
  if (o.block_positions) {
    m.block_positions = g.input("block_positions", {N}, DType::i32);
    if (c.gpt2()) {  // learned positions: a second learned table (the original GLM's)
      const int table = b.w(kBlockPositions, {c.max_pos + 1, C}, true);
      x = g.add(x, own_rows(b, g.embedding(m.block_positions, table)));
    }
  }
  // RoPE; with block positions, 2-D RoPE (GLM-130B, ChatGLM-6B): the first half of each head's
  // rotated dims turns by the position, the second half by the block position.
  auto rotate = [&](int t, int64_t heads) {
    const RopeParams r = b.rope(0, heads);
    if (!o.block_positions) return g.rope(t, m.positions, r);
    RopeParams r1 = r, r2 = r;
    r1.rot = r2.rot = r.rot / 2;
    r2.col0 = r.rot / 2;
    return g.rope(g.rope(t, m.positions, r1), m.block_positions, r2);
  };
  if (c.gpt2() && first)
    x = g.add(x,
              own_rows(b, g.embedding(m.positions, b.w(nm.pos + ".weight", {c.max_pos, C}, true))));
  AttentionParams at;
  at.scale = c.attn_scale;  // 0: 1/sqrt(head_dim)
  at.heads = H;
  at.kv_heads = G;
  at.head_dim = D;
  at.T = T;
  at.mask = o.mask;
  const int prefix_hidden = prefix_mlp(b);
  for (int64_t l = first_layer; l < last_layer; ++l) {
    const std::string p = nm.layers + std::to_string(l) + ".";
    int h = b.norm(x, p + nm.ln1);
    if (o.tp.on()) h = group_rows(b, m, h, N);
    if (c.mla()) {  // DeepSeek's multi-head latent attention (mla.cpp)
      x = g.add(x, mla_attention(b, m, p, h, B, at, o.serve_rows > 0 ? m.key_ranges : m.prefix));
      x = g.add(x, mlp(b, nm, m, p, x, l));
      continue;
    }
    int q, k, v;
    if (c.fused_qkv()) {
      q = k = v = b.linear(h, p + nm.qkv, C, (H + 2 * G) * D, c.gpt2() || c.qkv_bias);
      if (!c.gpt2()) q = k = v = rotate(q, H + G);  // q and k heads
      at.q_col = 0;
      at.k_col = H * D;
      at.v_col = (H + G) * D;
    } else if (c.qk_norm()) {  // Qwen3: RMSNorm over each head of q and k, then RoPE
      const int qn = b.w(p + nm.q_norm + ".weight", {D}, false);
      const int kn = b.w(p + nm.k_norm + ".weight", {D}, false);
      q = rotate(g.rmsnorm(b.linear(h, p + nm.q, C, H * D, c.qkv_bias), qn, c.norm_eps), H);
      k = rotate(g.rmsnorm(b.linear(h, p + nm.k, C, G * D, c.qkv_bias), kn, c.norm_eps), G);
      v = b.linear(h, p + nm.v, C, G * D, c.qkv_bias);
      at.q_col = at.k_col = at.v_col = 0;
    } else {
      q = rotate(b.linear(h, p + nm.q, C, H * D, c.qkv_bias), H);
      k = rotate(b.linear(h, p + nm.k, C, G * D, c.qkv_bias), G);
      v = b.linear(h, p + nm.v, C, G * D, c.qkv_bias);
      at.q_col = at.k_col = at.v_col = 0;
    }
    if (o.attn_bf16 && o.serve_rows == 0 && o.kv_cache == 0) {  // what the backward keeps
      const int qh = g.cast(q, DType::bf16);
      const int kh = k == q ? qh : g.cast(k, DType::bf16);
      v = v == q ? qh : g.cast(v, DType::bf16);
      q = qh;
      k = kh;
    }
    if (o.serve_rows > 0 || o.kv_cache > 0) cache_kv(b, m, p, B, k, v, at);
    if (o.kv_cache > 0 && o.serve_rows == 0) at.S = T;
    auto [pk, pv] = prefix_rows(b, l, prefix_hidden);
    at.P = c.prefix_len;
    const int y = g.attention(q, k, v, at, o.serve_rows > 0 ? m.key_ranges : m.prefix,
                              o.kv_cache == 0 && o.serve_rows == 0 && o.with_loss, pk, pv);
    if (o.kv_cache > 0) m.cache_reads.push_back(g.nodes.size() - 1);
    x = g.add(x, out_proj(b, m, y, p + nm.o, H * D, c.gpt2() || c.o_bias));
    x = g.add(x, mlp(b, nm, m, p, x, l));
  }
  if (!last) {  // a pipeline stage before the last: its residual stream goes to the next
    m.hidden_out = x;
    g.mark_output(x);
    if (o.with_loss && (m.aux_loss = router_aux_share(b, m)) >= 0) g.mark_output(m.aux_loss);
    return m;
  }
  head(b, nm, m, x, wte, B, N);
  return m;
}

std::vector<float> decoder_init_param(const std::string& name, int64_t count,
                                      const DecoderConfig& c, uint64_t seed) {
  auto ends_with = [&](const std::string& s) {
    return name.size() >= s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0;
  };
  auto has = [&](const char* s) { return name.find(s) != std::string::npos; };
  std::vector<float> out(size_t(count), 0.f);
  if (ends_with(".bias") || ends_with(kRouterBias)) return out;
  if (has(".ln_") || has("norm.") || has("layernorm.") || ends_with("ln_f.weight")) {
    std::fill(out.begin(), out.end(), 1.f);
    return out;
  }
  uint64_t h = seed;
  for (char ch : name) h = mix64(h ^ uint64_t(uint8_t(ch)));
  Rng rng(h);
  double std = 0.02;
  if (ends_with("c_proj.weight") || ends_with("o_proj.weight") || ends_with("down_proj.weight") ||
      ends_with("attention.dense.weight") || ends_with("dense_4h_to_h.weight"))
    std /= std::sqrt(2.0 * double(c.layers));
  for (auto& v : out) v = float(rng.normal() * std);
  return out;
}

}  // namespace mxn
