#pragma once
// Each op's parameters as a named struct: the one place that knows where they sit in an op call's
// ip[] and fp[] (backend_abi.h documents the positions). Graph builders, autograd and the runners
// write parameters only through these; the backends read them only through these. encode() writes
// the positions it owns (others are left as they were); decode() reads them back.
// Plain C++17 with no allocation, usable from nvcc and hipcc and from a vendor's plugin.
#include <cmath>
#include <cstdint>
#include <utility>

#include "mxn/backend_abi.h"

#ifndef MXN_HD  // a method device code calls too (nvcc, hipcc)
#if defined(__CUDACC__) || defined(__HIPCC__)
#define MXN_HD __host__ __device__
#else
#define MXN_HD
#endif
#endif

namespace mxn {

// MATMUL: C = alpha op(A) op(B) (+ C).
struct MatmulParams {
  bool ta = false, tb = false, accumulate = false;
  int32_t compute = MXN_DTYPE_F32;  // f32, or bf16 operands with f32 accumulation
  float alpha = 1.f;
  void encode(int64_t* ip, float* fp) const {
    ip[0] = ta;
    ip[1] = tb;
    ip[2] = accumulate;
    ip[3] = compute;
    fp[0] = alpha;
  }
  static MatmulParams decode(const int64_t* ip, const float* fp) {
    return {ip[0] != 0, ip[1] != 0, ip[2] != 0, int32_t(ip[3]), fp[0]};
  }
};

// SUM_ROWS and SUM_SQUARES: add into the output instead of overwriting it.
struct SumParams {
  bool accumulate = false;
  void encode(int64_t* ip, float*) const { ip[0] = accumulate; }
  static SumParams decode(const int64_t* ip, const float*) { return {ip[0] != 0}; }
};

// SCALE's factor and FILL's value.
struct ScalarParams {
  float value = 0.f;
  void encode(int64_t*, float* fp) const { fp[0] = value; }
  static ScalarParams decode(const int64_t*, const float* fp) { return {fp[0]}; }
};

// LAYERNORM and RMSNORM.
struct NormParams {
  float eps = 1e-5f;
  void encode(int64_t*, float* fp) const { fp[0] = eps; }
  static NormParams decode(const int64_t*, const float* fp) { return {fp[0]}; }
};

// ATTENTION and ATTENTION_BWD (the backward takes the forward's parameters).
struct AttentionParams {
  int64_t heads = 1, kv_heads = 1, head_dim = 1;
  int64_t T = 1;  // queries per sequence
  int64_t S = 0;  // keys per sequence (0: T)
  // Which keys each query sees: none, causal, prefix (GLM's Part A, bidirectional), segments
  // (packed rows), and serving's cached and paged keys.
  mxn_attention_mask mask = MXN_MASK_CAUSAL;
  int64_t q_col = 0, k_col = 0, v_col = 0;  // column windows, for fused projections
  int64_t kv_rows = 0;  // rows per sequence in k and v (0: S), e.g. a KV cache's capacity
  int64_t q_pos0 = 0;   // key index of the first query (S - T when decoding with a cache)
  int64_t P = 0;        // shared prefix keys and values seen by every query (P-Tuning v2)
  int64_t block = 0;    // paged keys: the KV block size
  float scale = 0.f;    // 0: 1/sqrt(head_dim)

  int64_t keys() const { return S > 0 ? S : T; }
  void encode(int64_t* ip, float* fp) const {
    const int64_t s = keys();
    const int64_t v[13] = {heads,  kv_heads, head_dim, T,     s,
                           mask,   q_col,    k_col,    v_col, kv_rows > 0 ? kv_rows : s,
                           q_pos0, P,        block};
    for (int i = 0; i < 13; ++i) ip[i] = v[i];
    fp[0] = scale > 0 ? scale : 1.f / std::sqrt(float(head_dim));
  }
  static AttentionParams decode(const int64_t* ip, const float* fp) {
    AttentionParams a;
    a.heads = ip[0];
    a.kv_heads = ip[1];
    a.head_dim = ip[2];
    a.T = ip[3];
    a.S = ip[4];
    a.mask = mxn_attention_mask(ip[5]);
    a.q_col = ip[6];
    a.k_col = ip[7];
    a.v_col = ip[8];
    a.kv_rows = ip[9];
    a.q_pos0 = ip[10];
    a.P = ip[11];
    a.block = ip[12];
    a.scale = fp[0];
    return a;
  }
};

// ROPE.
struct RopeParams {
  int64_t col0 = 0, heads = 1, head_dim = 1, rot = 0;  // rot 0: the whole head
  bool interleaved = false;                            // GLM's (2i, 2i+1) pairs
  int scaling = 0;                                     // 0 none, 1 linear, 2 llama3, 3 yarn (ABI 9)
  bool backward = false;                               // rotate backwards (the gradient)
  float theta = 10000.f, factor = 1.f, low_freq_factor = 1.f, high_freq_factor = 4.f,
        original_max_position = 8192.f;
  float beta_fast = 32.f, beta_slow = 1.f;  // yarn's correction range, in rotations

  int64_t rotated() const { return rot > 0 ? rot : head_dim; }
  void encode(int64_t* ip, float* fp) const {
    const int64_t v[7] = {col0, heads, head_dim, rotated(), interleaved, scaling, backward};
    for (int i = 0; i < 7; ++i) ip[i] = v[i];
    const float f[7] = {
        theta,     factor,   low_freq_factor, high_freq_factor, original_max_position,
        beta_fast, beta_slow};
    for (int i = 0; i < 7; ++i) fp[i] = f[i];
  }
  static RopeParams decode(const int64_t* ip, const float* fp) {
    RopeParams r;
    r.col0 = ip[0];
    r.heads = ip[1];
    r.head_dim = ip[2];
    r.rot = ip[3];
    r.interleaved = ip[4] == 1;
    r.scaling = int(ip[5]);
    r.backward = ip[6] == 1;
    r.theta = fp[0];
    r.factor = fp[1];
    r.low_freq_factor = fp[2];
    r.high_freq_factor = fp[3];
    r.original_max_position = fp[4];
    r.beta_fast = fp[5];
    r.beta_slow = fp[6];
    return r;
  }
  // The rotation frequency of pair i of the rotated dims, in float as Hugging Face computes it
  // (1 / theta^(2i/rot), then the scaling), so every backend rotates by the same angles.
  float inv_freq(int64_t i) const {
    const float f = factor > 0 ? factor : 1.f;
    float inv = 1.f / std::pow(theta, float(2 * i) / float(rot));
    if (scaling == 1) return inv / f;
    if (scaling == 2) {  // Llama 3: long wavelengths slowed by `factor`, short ones kept, blended
      const float lo = low_freq_factor, hi = high_freq_factor, old_ctx = original_max_position;
      const float wavelen = 2.f * 3.14159265358979323846f / inv;
      if (wavelen < old_ctx / hi) return inv;
      if (wavelen > old_ctx / lo) return inv / f;
      const float smooth = (old_ctx / wavelen - lo) / (hi - lo);
      return (1.f - smooth) * inv / f + smooth * inv;
    }
    if (scaling == 3) {  // yarn (transformers' _compute_yarn_parameters, truncated range)
      const float two_pi = 2.f * 3.14159265358979323846f, dim = float(rot);
      auto correction = [&](float rotations) {
        return dim * std::log(original_max_position / (rotations * two_pi)) /
               (2.f * std::log(theta));
      };
      float lo = std::floor(correction(beta_fast)), hi = std::ceil(correction(beta_slow));
      lo = lo < 0.f ? 0.f : lo;
      hi = hi > dim - 1.f ? dim - 1.f : hi;
      if (lo == hi) hi += 0.001f;
      float ramp = (float(i) - lo) / (hi - lo);
      ramp = ramp < 0.f ? 0.f : ramp > 1.f ? 1.f : ramp;
      const float extrapolate = 1.f - ramp;  // the share of the unscaled frequency
      return inv / f * (1.f - extrapolate) + inv * extrapolate;
    }
    return inv;
  }
};

// SWIGLU and SWIGLU_BWD: the gate's and the up projection's first columns.
struct SwigluParams {
  int64_t gate_col = 0, up_col = 0;
  void encode(int64_t* ip, float*) const {
    ip[0] = gate_col;
    ip[1] = up_col;
  }
  static SwigluParams decode(const int64_t* ip, const float*) { return {ip[0], ip[1]}; }
};

// SET_ROWS: rows [at, at + n) of each sequence of R rows get columns [col, col + W) of src.
struct SetRowsParams {
  int64_t at = 0, R = 0, col = 0;
  void encode(int64_t* ip, float*) const {
    ip[0] = at;
    ip[1] = R;
    ip[2] = col;
  }
  static SetRowsParams decode(const int64_t* ip, const float*) { return {ip[0], ip[1], ip[2]}; }
};

// EMBEDDING(_BWD) of a tensor-parallel rank's share of the vocabulary (ABI 11): the table holds
// rows [first, first + V) of the whole; with `partial`, other ids give zero rows (the group's sum
// adds the owner's) and add nothing to the table's gradient.
struct EmbeddingParams {
  int64_t first = 0;
  bool partial = false;
  void encode(int64_t* ip, float*) const {
    ip[0] = first;
    ip[1] = partial;
  }
  static EmbeddingParams decode(const int64_t* ip, const float*) { return {ip[0], ip[1] != 0}; }
};

// CROSS_ENTROPY(_BWD) over a vocabulary split among `slots` ranks (ABI 11; Megatron-LM's
// vocab-parallel cross-entropy): these logits are columns [vocab0, vocab0 + V) of the whole. Part
// 1 writes each row's (max, sum of exp(l - max), target logit or 0) into slot `slot` of (N, slots,
// 3) and zeros elsewhere, so one sum over the group gathers every slot; part 2 turns the summed
// stats into the loss, and its backward into this slice's dlogits. Part 0: the whole vocabulary.
struct XentParams {
  int part = 0;
  int64_t vocab0 = 0, slot = 0, slots = 0;
  void encode(int64_t* ip, float*) const {
    ip[0] = part;
    ip[1] = vocab0;
    ip[2] = slot;
    ip[3] = slots;
  }
  static XentParams decode(const int64_t* ip, const float*) {
    return {int(ip[0]), ip[1], ip[2], ip[3]};
  }
};

// A row's loss from the slots' stats (N, slots, 3) summed over a group: the log-sum-exp's max M
// and sum S over the slots, and the target's logit. Plain arithmetic, for every backend.
template <typename F>
MXN_HD inline void xent_combine(const F* st, int64_t slots, F* M, F* S, F* target) {
  F m = st[0];
  for (int64_t j = 1; j < slots; ++j) m = st[3 * j] > m ? st[3 * j] : m;
  F s = 0, t = 0;
  for (int64_t j = 0; j < slots; ++j) {
    s += st[3 * j + 1] * exp(st[3 * j] - m);
    t += st[3 * j + 2];
  }
  *M = m, *S = s, *target = t;
}

// DROPOUT: the mask's seed and first element index (set per run), the node's tag (which tells
// the graph's dropout nodes apart; the backend ignores it) and the probability.
struct DropoutParams {
  uint64_t seed = 0, index = 0;
  int64_t tag = 0;
  float p = 0.f;
  void encode(int64_t* ip, float* fp) const {
    ip[0] = int64_t(seed);
    ip[1] = int64_t(index);
    ip[2] = tag;
    fp[0] = p;
  }
  static DropoutParams decode(const int64_t* ip, const float* fp) {
    return {uint64_t(ip[0]), uint64_t(ip[1]), ip[2], fp[0]};
  }
};

// ADAMW: the 1-based step and the hyperparameters; gscale multiplies the gradient (clipping).
struct AdamwParams {
  int64_t step = 1;
  float lr = 0.f, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f, weight_decay = 0.f, gscale = 1.f;
  void encode(int64_t* ip, float* fp) const {
    ip[0] = step;
    const float f[6] = {lr, beta1, beta2, eps, weight_decay, gscale};
    for (int i = 0; i < 6; ++i) fp[i] = f[i];
  }
  static AdamwParams decode(const int64_t* ip, const float* fp) {
    return {ip[0], fp[0], fp[1], fp[2], fp[3], fp[4], fp[5]};
  }
  // The bias corrections, computed once per call on the host and the same on every backend: the
  // step size lr / (1 - b1^t) and sqrt(1 - b2^t).
  float step_size() const { return lr / (1.f - std::pow(beta1, float(step))); }
  float bc2_sqrt() const { return std::sqrt(1.f - std::pow(beta2, float(step))); }
};

// CLASSIFIER_CE: which gradients it makes in the same pass (0 none, 1 dx, 2 dx and dw), the
// compute dtype, rows a block (0: the backend's choice), and (ABI 6) `direct`: the gradients for
// d(loss) = dloss, dw added into its output. (ABI 11) `vocab`: w holds rows [vocab0, vocab0 + V)
// of a vocabulary split over a tensor-parallel group, as CROSS_ENTROPY's parts: part 1 writes the
// stats (N, slots, 3) (out[0]; no gradients), part 2 takes the group's summed stats (in[3]) and
// makes the whole softmax's loss and this slice's gradients.
struct ClassifierParams {
  int grads = 0;
  int32_t compute = MXN_DTYPE_F32;
  int64_t block = 0;
  bool direct = false;
  float dloss = 1.f;
  XentParams vocab = {};
  void encode(int64_t* ip, float* fp) const {
    ip[0] = grads;
    ip[1] = compute;
    ip[2] = block;
    ip[3] = direct;
    fp[0] = dloss;
    vocab.encode(ip + 4, fp);
  }
  static ClassifierParams decode(const int64_t* ip, const float* fp) {
    return {int(ip[0]), int32_t(ip[1]), ip[2], ip[3] != 0, fp[0], XentParams::decode(ip + 4, fp)};
  }
  float scale() const { return direct ? dloss : 1.f; }  // d(loss) the gradients are made for
};

// MOE_ROUTE and MOE_ROUTE_BWD: K experts a token, scored by softmax or sigmoid, picked within the
// best topk_group of n_group groups, weighed by their scores (renormalised with `norm`) times
// `scale`.
struct MoeRouteParams {
  int64_t k = 1;
  bool sigmoid = false;  // scores: softmax over the experts (false) or each one's sigmoid
  bool norm = false;     // the chosen scores divided by their sum (norm_topk_prob)
  int64_t n_group = 1, topk_group = 1;
  float scale = 1.f;  // routed_scaling_factor
  void encode(int64_t* ip, float* fp) const {
    ip[0] = k;
    ip[1] = sigmoid;
    ip[2] = norm;
    ip[3] = n_group;
    ip[4] = topk_group;
    fp[0] = scale;
  }
  static MoeRouteParams decode(const int64_t* ip, const float* fp) {
    return {ip[0], ip[1] != 0, ip[2] != 0, ip[3], ip[4], fp[0]};
  }
};

// GROUPED_MATMUL: rows times their expert's matrix (tb: stored (E, N, K)), or (weight_grad) each
// expert's a^T b over its rows, added into the output with `accumulate`. `compute` as MATMUL's:
// with bf16 matrices, bf16 lets many rows run on the chip's bf16 units, the rows rounded too.
struct GroupedMatmulParams {
  bool tb = true, weight_grad = false, accumulate = false;
  int32_t compute = MXN_DTYPE_F32;
  void encode(int64_t* ip, float*) const {
    ip[0] = tb;
    ip[1] = weight_grad;
    ip[2] = accumulate;
    ip[3] = compute;
  }
  static GroupedMatmulParams decode(const int64_t* ip, const float*) {
    return {ip[0] != 0, ip[1] != 0, ip[2] != 0, int32_t(ip[3])};
  }
};

// STRIDED_COPY: an (n0, n1, n2) index space read from `in` and written to `out` through element
// strides and offsets (a transpose of heads and tokens, a column window, a concatenation).
struct StridedCopyParams {
  int64_t n[3] = {1, 1, 1};
  int64_t in_stride[3] = {0, 0, 1}, in_offset = 0;
  int64_t out_stride[3] = {0, 0, 1}, out_offset = 0;
  void encode(int64_t* ip, float*) const {
    for (int d = 0; d < 3; ++d) {
      ip[d] = n[d];
      ip[3 + d] = in_stride[d];
      ip[7 + d] = out_stride[d];
    }
    ip[6] = in_offset;
    ip[10] = out_offset;
  }
  static StridedCopyParams decode(const int64_t* ip, const float*) {
    StridedCopyParams p;
    for (int d = 0; d < 3; ++d) {
      p.n[d] = ip[d];
      p.in_stride[d] = ip[3 + d];
      p.out_stride[d] = ip[7 + d];
    }
    p.in_offset = ip[6];
    p.out_offset = ip[10];
    return p;
  }
  MXN_HD int64_t count() const { return n[0] * n[1] * n[2]; }
  // The element offsets of index i of the flat index space.
  MXN_HD int64_t in_at(int64_t i) const {
    return in_offset + (i / (n[1] * n[2])) * in_stride[0] + (i / n[2] % n[1]) * in_stride[1] +
           (i % n[2]) * in_stride[2];
  }
  MXN_HD int64_t out_at(int64_t i) const {
    return out_offset + (i / (n[1] * n[2])) * out_stride[0] + (i / n[2] % n[1]) * out_stride[1] +
           (i % n[2]) * out_stride[2];
  }
  // The same copy backwards: out's positions read, in's written.
  StridedCopyParams reversed() const {
    StridedCopyParams r = *this;
    for (int d = 0; d < 3; ++d) std::swap(r.in_stride[d], r.out_stride[d]);
    std::swap(r.in_offset, r.out_offset);
    return r;
  }
};

// An op call's (or anything with ip and fp arrays') parameters, read and written by type.
template <typename P, typename Call>
P params_of(const Call& c) {
  return P::decode(&c.ip[0], &c.fp[0]);
}
template <typename P, typename Call>
void set_params(Call& c, const P& p) {
  p.encode(&c.ip[0], &c.fp[0]);
}
// Reads, changes and writes back: with_params<AttentionParams>(call, [](auto& a) { a.S = 9; }).
template <typename P, typename Call, typename Fn>
void with_params(Call& c, Fn&& change) {
  P p = params_of<P>(c);
  change(p);
  set_params(c, p);
}

}  // namespace mxn
