#include "nn/layers.h"

namespace mxn::nn {

int linear(Graph& g, int x, const std::string& name, int64_t in, int64_t out) {
  const int w = g.param(name + ".weight", {in, out}, true);
  const int b = g.param(name + ".bias", {out}, false);
  return g.add_bias(g.matmul(x, w), b);
}

int layer_norm(Graph& g, int x, const std::string& name, int64_t width, float eps) {
  const int w = g.param(name + ".weight", {width}, false);
  const int b = g.param(name + ".bias", {width}, false);
  return g.layernorm(x, w, b, eps);
}

int causal_self_attention(Graph& g, int x, const std::string& name, int64_t width, int64_t heads,
                          int64_t T) {
  const int qkv = linear(g, x, name + ".c_attn", width, 3 * width);
  AttentionSpec a;
  a.heads = a.kv_heads = heads;
  a.head_dim = width / heads;
  a.T = T;
  a.k_col = width;
  a.v_col = 2 * width;
  const int y = g.attention(qkv, qkv, qkv, a);
  return linear(g, y, name + ".c_proj", width, width);
}

int mlp(Graph& g, int x, const std::string& name, int64_t width) {
  const int h = g.gelu(linear(g, x, name + ".c_fc", width, 4 * width));
  return linear(g, h, name + ".c_proj", 4 * width, width);
}

}  // namespace mxn::nn
