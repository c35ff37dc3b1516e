#pragma once
// GPT-2: learned positions, pre-LayerNorm blocks, GELU MLP, LM head tied to the token embedding.
// Parameter names are Hugging Face's (transformer.h.0.attn.c_attn.weight, ...).
#include <string>
#include <vector>

#include "core/rng.h"
#include "graph/graph.h"

namespace mxn {

struct GPT2Config {
  int64_t n_layer = 4;
  int64_t n_head = 4;
  int64_t n_embd = 128;
  int64_t vocab_size = 256;
  int64_t n_ctx = 128;
  // Throws an Error naming the bad field and what it must be.
  void validate() const;
  int64_t param_count() const;
};

struct GPT2Graph {
  int tokens = -1, positions = -1, targets = -1;  // inputs, (B*T) i32
  int logits = -1;                                // (B*T, vocab)
  int loss = -1;                                  // (1), when built with targets
};

// The same model as one configuration of the parametric decoder (models/decoder.h).
struct DecoderConfig;
DecoderConfig gpt2_decoder_config(const GPT2Config& c);

GPT2Graph build_gpt2(Graph& g, const GPT2Config& cfg, int64_t B, int64_t T, bool with_loss);

// GPT-2's initialisation: N(0, 0.02); residual projections (c_proj) scaled by 1/sqrt(2 n_layer);
// LayerNorm weight 1, biases 0. Deterministic in `seed` and the parameter's name.
std::vector<float> gpt2_init_param(const std::string& name, int64_t count, const GPT2Config& cfg,
                                   uint64_t seed);

}  // namespace mxn
