#include "models/gpt2/gpt2.h"

#include <cmath>

#include "core/error.h"
#include "models/decoder.h"
#include "nn/layers.h"

namespace mxn {

void GPT2Config::validate() const {
  auto need = [](bool ok, const std::string& msg) {
    if (!ok) throw Error("invalid model config: " + msg);
  };
  need(n_layer >= 1 && n_layer <= 1024,
       "n_layer = " + std::to_string(n_layer) + ", expected 1..1024");
  need(n_embd >= 1 && n_embd <= 65536,
       "n_embd = " + std::to_string(n_embd) + ", expected 1..65536");
  need(n_head >= 1 && n_embd % n_head == 0,
       "n_head = " + std::to_string(n_head) +
           " must be >= 1 and divide n_embd = " + std::to_string(n_embd));
  need(vocab_size >= 2 && vocab_size <= (1 << 24),
       "vocab_size = " + std::to_string(vocab_size) + ", expected 2..16777216");
  need(n_ctx >= 1 && n_ctx <= 65536, "n_ctx = " + std::to_string(n_ctx) + ", expected 1..65536");
}

int64_t GPT2Config::param_count() const {
  const int64_t C = n_embd;
  return vocab_size * C + n_ctx * C + n_layer * (12 * C * C + 13 * C) + 2 * C;
}

DecoderConfig gpt2_decoder_config(const GPT2Config& c) {
  DecoderConfig d;
  d.arch = Arch::gpt2;
  d.vocab_size = c.vocab_size;
  d.hidden = c.n_embd;
  d.layers = c.n_layer;
  d.heads = c.n_head;
  d.max_pos = c.n_ctx;
  d.tie_embeddings = true;
  return d;
}

GPT2Graph build_gpt2(Graph& g, const GPT2Config& cfg, int64_t B, int64_t T, bool with_loss) {
  MXN_CHECK(T <= cfg.n_ctx, "sequence longer than the context");
  const int64_t C = cfg.n_embd, N = B * T;
  GPT2Graph m;
  m.tokens = g.input("tokens", {N}, DType::i32);
  m.positions = g.input("positions", {N}, DType::i32);
  const int wte = g.param("transformer.wte.weight", {cfg.vocab_size, C}, true);
  const int wpe = g.param("transformer.wpe.weight", {cfg.n_ctx, C}, true);
  int x = g.add(g.embedding(m.tokens, wte), g.embedding(m.positions, wpe));
  for (int64_t l = 0; l < cfg.n_layer; ++l) {
    const std::string p = "transformer.h." + std::to_string(l);
    const int a = nn::causal_self_attention(g, nn::layer_norm(g, x, p + ".ln_1", C), p + ".attn", C,
                                            cfg.n_head, T);
    x = g.add(x, a);
    x = g.add(x, nn::mlp(g, nn::layer_norm(g, x, p + ".ln_2", C), p + ".mlp", C));
  }
  x = nn::layer_norm(g, x, "transformer.ln_f", C);
  m.logits = g.matmul(x, wte, false, true);  // tied LM head
  if (with_loss) {
    m.targets = g.input("targets", {N}, DType::i32);
    m.loss = g.cross_entropy(m.logits, m.targets);
    g.mark_output(m.loss);
  }
  g.mark_output(m.logits);
  return m;
}

std::vector<float> gpt2_init_param(const std::string& name, int64_t count, const GPT2Config& cfg,
                                   uint64_t seed) {
  auto ends_with = [&](const std::string& s) {
    return name.size() >= s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0;
  };
  std::vector<float> out(size_t(count), 0.f);
  if (ends_with(".bias")) return out;
  if (name.find(".ln_") != std::string::npos) {
    std::fill(out.begin(), out.end(), 1.f);
    return out;
  }
  uint64_t h = seed;
  for (char c : name) h = mix64(h ^ uint64_t(uint8_t(c)));
  Rng rng(h);
  double std = 0.02;
  if (ends_with("c_proj.weight")) std /= std::sqrt(2.0 * double(cfg.n_layer));
  for (auto& v : out) v = float(rng.normal() * std);
  return out;
}

}  // namespace mxn
