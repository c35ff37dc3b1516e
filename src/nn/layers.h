#pragma once
// Layers as graph builders. Weight layouts follow Hugging Face GPT-2 (Conv1D: weight is (in, out)).
#include <string>

#include "graph/graph.h"

namespace mxn::nn {

// x (N, in) -> x W + b with W `name.weight` (in, out) and b `name.bias` (out).
int linear(Graph& g, int x, const std::string& name, int64_t in, int64_t out);
int layer_norm(Graph& g, int x, const std::string& name, int64_t width, float eps = 1e-5f);
// Causal multi-head self-attention as GPT-2 has it: c_attn -> attention -> c_proj.
int causal_self_attention(Graph& g, int x, const std::string& name, int64_t width, int64_t heads,
                          int64_t T);
int mlp(Graph& g, int x, const std::string& name, int64_t width);

}  // namespace mxn::nn
