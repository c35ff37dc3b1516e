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
  double qkv = C * (H + 2 * G) * D, o = H * D * C, mlp = (c.swiglu() ? 3 : 2) * C * F;
  double attn_extra =
      (c.qkv_bias ? (H + 2 * G) * D : 0) + (c.o_bias ? C : 0) + (c.qk_norm() ? 2 * D : 0);
  double dqk = D, dv = D;  // the dims each head's scores and weighted sum run over
  if (c.mla()) {           // absorbed: one kv head of the latent and the RoPE key (decoder.h)
    const double R = double(c.kv_lora_rank), dr = double(c.qk_rope_dim), Q = D,
                 Rq = double(c.q_lora_rank);
    qkv = (Rq > 0 ? C * Rq + Rq * H * Q : C * H * Q) + C * (R + dr) +
          H * (double(c.qk_nope_dim) + double(c.v_head_dim)) * R;
    o = H * double(c.v_head_dim) * C;
    attn_extra = (Rq > 0 ? Rq : 0) + R;
    dqk = R + dr, dv = R;
  }
  // A mixture of experts keeps every expert (memory) and computes top_k of them a token (FLOPs);
  // layers may differ (dense ones first): the per-layer figures are the mean over the layers.
  const double E = double(c.experts), Fm = double(c.moe_ffn), Fs = double(c.shared_ffn);
  const double moe =
      E * 3 * C * Fm + E * C + (c.router_bias ? E : 0) + 3 * C * Fs + (c.shared_gate ? C : 0);
  const double moe_active =
      double(c.top_k) * 3 * C * Fm + E * C + 3 * C * Fs + (c.shared_gate ? C : 0);
  double mlp_params = 0, mlp_flops = 0, mlp_width = 0;
  for (int64_t l = 0; l < c.layers; ++l) {
    const bool sparse = c.moe_layer(l);
    mlp_params += sparse ? moe : mlp + (c.mlp_bias ? (c.swiglu() ? 2 * F : F) + C : 0);
    mlp_flops += 2 * (sparse ? moe_active : mlp);
    mlp_width += sparse ? double(c.top_k) * Fm + Fs : F;
  }
  const double L = double(c.layers);
  m.layer_params = qkv + o + attn_extra + mlp_params / L + (c.gpt2() ? 4 : 2) * C;
  m.embed_params = V * C + (c.gpt2() ? double(c.max_pos) * C : 0);
  m.head_params = (c.gpt2() ? 2 : 1) * C + (c.tie_embeddings ? 0 : V * C);
  // Scores and the weighted sum: 2 x T x H x (dqk + dv) per token over all keys, half of them
  // causal.
  m.layer_flops = 2 * (qkv + o) + mlp_flops / L + T * H * (dqk + dv);
  m.head_flops = 2 * C * V;
  const double Fa = mlp_width / L;  // the MLP's hidden width a token goes through

  const double a = job.dtype == "bf16" ? 2 : 4;
  // Kept for the backward, per token: the two norms' inputs and outputs, q/k/v before and after
  // the rotation, the attention output and its log-sum-exp, the MLP's two (three) hidden
  // tensors and their product, the residual sums; plus one layer's backward working set, since
  // the arena holds the gradients of the layer being differentiated beside the saved ones.
  const double saved = 6 * C + 2 * (H + 2 * G) * D + 2 * H * D + H + (c.swiglu() ? 4 : 3) * Fa;
  m.act_bytes = a * saved;
  m.act_shared_bytes = a * 6 * C;
  m.heads = c.heads;
  m.kv_heads = c.n_kv_heads();
  // Read and written by one forward's non-GEMM ops, per token: two norms (in, out), two
  // residual sums (two in, one out), the rotation of q and k (in, out), the MLP's activation
  // (gate and up in, product out; GELU: in, out); unfused attention adds the scores' scale +
  // mask + softmax (in, out) and dropout (in, out, a byte of mask) over (heads, T) a token.
  m.ew_bytes = a * (4 * C + 6 * C + 2 * (H + G) * D + (c.swiglu() ? 3 : 2) * Fa);
  m.ew_shared_bytes = a * 10 * C;
  if (!job.flash_attention) m.ew_bytes += (4 * a + 1) * H * T;
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
