#include "plan/cost.h"

#include "core/error.h"

namespace mxn {

double ModelCost::total_params() const {
  return double(layers) * layer_params + embed_params + head_params;
}

ModelCost model_cost(const DecoderConfig& c, const JobSpec& job) {
  if (job.global_batch < 1)
    throw Error("global batch " + std::to_string(job.global_batch) +
                ": expected at least 1 sequence");
  if (job.seq < 1) throw Error("seq " + std::to_string(job.seq) + ": expected at least 1 token");
  if (job.dtype != "f32" && job.dtype != "bf16")
    throw Error("dtype '" + job.dtype + "': expected f32 or bf16");
  const double C = double(c.hidden), D = double(c.hd()), H = double(c.heads),
               G = double(c.n_kv_heads()), F = double(c.ffn_width()), V = double(c.vocab_size),
               T = double(job.seq);
  ModelCost m;
  m.layers = c.layers;
  m.hidden = c.hidden;
  m.vocab = c.vocab_size;
  m.tied = c.tie_embeddings;
  const double qkv = C * (H + 2 * G) * D, o = H * D * C, mlp = (c.swiglu() ? 3 : 2) * C * F;
  m.layer_params = qkv + o + mlp + (c.qkv_bias ? (H + 2 * G) * D : 0) + (c.o_bias ? C : 0) +
                   (c.mlp_bias ? (c.swiglu() ? 2 * F : F) + C : 0) + (c.gpt2() ? 4 : 2) * C;
  m.embed_params = V * C + (c.gpt2() ? double(c.max_pos) * C : 0);
  m.head_params = (c.gpt2() ? 2 : 1) * C + (c.tie_embeddings ? 0 : V * C);
  // Scores and the weighted sum: 2 x 2 x T x H x D per token over all keys, half of them causal.
  m.layer_flops = 2 * (qkv + o + mlp) + 2 * T * H * D;
  m.head_flops = 2 * C * V;

  const double a = job.dtype == "bf16" ? 2 : 4;
  // Kept for the backward, per token: the two norms' inputs and outputs, q/k/v before and after
  // the rotation, the attention output and its log-sum-exp, the MLP's two (three) hidden
  // tensors and their product, the residual sums; plus one layer's backward working set, since
  // the arena holds the gradients of the layer being differentiated beside the saved ones.
  const double saved = 6 * C + 2 * (H + 2 * G) * D + 2 * H * D + H + (c.swiglu() ? 4 : 3) * F;
  m.act_bytes = a * saved;
  m.input_bytes = a * C;
  m.logits_bytes = 4 * 2 * V;
  m.boundary_bytes = a * C;
  if (job.dtype == "bf16") {
    m.weight_bytes = 2;
    m.grad_bytes = 4;
    m.optim_bytes = 12;
  } else {
    m.weight_bytes = 4;
    m.grad_bytes = 4;
    m.optim_bytes = 8;
  }
  return m;
}

}  // namespace mxn
