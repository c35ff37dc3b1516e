#pragma once
// What every backend derives from an op call before it launches anything: element counts and
// the shapes of MATMUL and ATTENTION, checked once here for the CPU, OpenCL and CUDA backends
// (and for a vendor's plugin, which may include this header). Plain C++17 over mxn_tensor, no
// allocation, usable from nvcc and hipcc.
#include <cmath>
#include <cstdint>

#include "backend/op_params.h"
#include "mxn/backend_abi.h"

namespace mxn {

inline int64_t count(const mxn_tensor& t) {
  int64_t n = 1;
  for (int i = 0; i < t.ndim; ++i) n *= t.shape[i];
  return n;
}
inline int64_t last(const mxn_tensor& t) { return t.ndim > 0 ? t.shape[t.ndim - 1] : 1; }

// A MATMUL call as `batch` row-major GEMMs: C_i (M x N) = alpha op(A_i) (M x K) op(B_i) (K x N),
// element strides sa / sb / sc between batches. Three forms: both operands 3-D (batched); B 2-D
// and A not transposed (A's leading dims fold into M); both 2-D. `error` is null when it holds.
struct MatmulShape {
  bool ta = false, tb = false, accumulate = false, bf16 = false;
  int64_t batch = 1, M = 0, N = 0, K = 0, sa = 0, sb = 0, sc = 0;
  float alpha = 1.f;
  const char* error = nullptr;
  int64_t lda() const { return ta ? M : K; }
  int64_t ldb() const { return tb ? K : N; }
};

inline MatmulShape matmul_shape(const mxn_op_call& k) {
  const mxn_tensor &a = k.inputs[0], &b = k.inputs[1], &o = k.outputs[0];
  const MatmulParams p = params_of<MatmulParams>(k);
  MatmulShape m;
  m.ta = p.ta;
  m.tb = p.tb;
  m.accumulate = p.accumulate;
  m.bf16 = p.compute == MXN_DTYPE_BF16;
  m.alpha = p.alpha;
  m.N = last(o);
  if (a.ndim == 3 && b.ndim == 3) {
    m.batch = a.shape[0];
    m.M = m.ta ? a.shape[2] : a.shape[1];
    m.K = m.ta ? a.shape[1] : a.shape[2];
    m.sa = a.shape[1] * a.shape[2];
    m.sb = b.shape[1] * b.shape[2];
    m.sc = o.ndim == 3 ? o.shape[1] * o.shape[2] : 0;
    if (b.shape[0] != m.batch || o.ndim != 3 || o.shape[0] != m.batch) {
      m.error = "matmul: batch sizes differ";
      return m;
    }
  } else if (b.ndim == 2 && !m.ta && a.ndim >= 2) {
    m.K = last(a);
    m.M = m.K > 0 ? count(a) / m.K : 0;
  } else if (a.ndim == 2 && b.ndim == 2) {
    m.M = m.ta ? a.shape[1] : a.shape[0];
    m.K = m.ta ? a.shape[0] : a.shape[1];
  } else {
    m.error = "matmul: operands must both be 2-D or both 3-D";
    return m;
  }
  const int64_t bk = m.tb ? b.shape[b.ndim - 1] : b.shape[b.ndim - 2];
  const int64_t bn = m.tb ? b.shape[b.ndim - 2] : b.shape[b.ndim - 1];
  if (bk != m.K || bn != m.N || count(o) != m.batch * m.M * m.N)
    m.error = "matmul: shapes do not agree";
  else if (k.n_inputs > 2 && (m.batch != 1 || m.accumulate || count(k.inputs[2]) != m.N))
    m.error = "matmul: a bias needs a 2-D product without accumulate and N values";
  return m;
}

// ATTENTION / ATTENTION_BWD (see the op's comment in backend_abi.h). Element offsets of one
// query row's head, one key or value row's kv head, and the visible keys of each query.
struct AttentionShape {
  int64_t B = 0, H = 0, G = 0, hd = 0, T = 0, S = 0, kv_rows = 0, q_pos0 = 0;
  int64_t ldq = 0, ldk = 0, ldv = 0, q_col = 0, k_col = 0, v_col = 0;
  int64_t P = 0;           // shared prefix keys and values (P-Tuning v2), seen by every query
  int64_t bs = 0, tw = 0;  // mask 5: the block size and each query's table width (1 + blocks)
  int mask = MXN_MASK_NONE;
  bool has_prefix = false;  // the optional i32 input (prefix lengths or segment starts) is there
  int extra = -1;           // its input index
  int pkv = -1;             // the input index of the prefix keys (values follow)
  float scale = 1.f;
  const char* error = nullptr;
  int64_t group() const { return H / G; }  // query heads per kv head
  int64_t q(int64_t b, int64_t t, int64_t h) const { return (b * T + t) * ldq + q_col + h * hd; }
  int64_t k(int64_t b, int64_t j, int64_t g) const {
    return (b * kv_rows + j) * ldk + k_col + g * hd;
  }
  int64_t v(int64_t b, int64_t j, int64_t g) const {
    return (b * kv_rows + j) * ldv + v_col + g * hd;
  }
  int64_t y(int64_t b, int64_t t, int64_t h) const { return (b * T + t) * H * hd + h * hd; }
  int64_t lse(int64_t b, int64_t t, int64_t h) const { return (b * T + t) * H + h; }
  // Keys [first, visible) are seen by query t of sequence b. `extra` is the op's optional i32
  // input: mask 2, each sequence's prefix length; mask 3, each query's segment start.
  int64_t visible(int64_t t, int64_t prefix = 0) const {
    if (mask == MXN_MASK_NONE) return S;
    int64_t n = q_pos0 + t + 1;
    if (mask == MXN_MASK_PREFIX && prefix > n) n = prefix;
    return n < S ? n : S;
  }
  int64_t prefix_of(const int32_t* extra, int64_t b) const {
    return mask == MXN_MASK_PREFIX && extra ? int64_t(extra[b]) : 0;
  }
  // Mask 4: each query's own key range [first, last) from the (B*T, 2) input (serving).
  int64_t range_end(const int32_t* extra, int64_t b, int64_t t) const {
    const int64_t hi = extra[(b * T + t) * 2 + 1];
    return hi < 1 ? 1 : hi < S ? hi : S;
  }
  int64_t first(const int32_t* extra, int64_t b, int64_t t) const {
    if (mask == MXN_MASK_CACHED) {
      const int64_t lo = extra[(b * T + t) * 2], hi = range_end(extra, b, t) - 1;
      return lo < 0 ? 0 : lo < hi ? lo : hi;
    }
    if (mask != MXN_MASK_SEGMENTS) return 0;
    const int64_t lo = extra[b * T + t], hi = visible(t) - 1;  // a query always sees itself
    return lo < 0 ? 0 : lo < hi ? lo : hi;
  }
  // Mask 5: the number of keys query (b, t) sees, and the k/v row of its key j.
  int64_t paged_n(const int32_t* table, int64_t b, int64_t t) const {
    const int64_t n = table[(b * T + t) * tw], most = (tw - 1) * bs;
    return n < 1 ? 1 : n < most ? n : most;
  }
  int64_t paged_row(const int32_t* table, int64_t b, int64_t t, int64_t j) const {
    const int64_t blk = table[(b * T + t) * tw + 1 + j / bs], nblk = kv_rows / bs;
    return (blk < 0 ? 0 : blk < nblk ? blk : nblk - 1) * bs + j % bs;
  }
};

inline int64_t rows_of(const mxn_tensor& t) { return last(t) > 0 ? count(t) / last(t) : 0; }

inline AttentionShape attention_shape(const mxn_op_call& k, bool backward) {
  const int o = backward ? 1 : 0;  // the backward's inputs start with dy
  const mxn_tensor &q = k.inputs[o], &kk = k.inputs[o + 1], &v = k.inputs[o + 2];
  const AttentionParams a = params_of<AttentionParams>(k);
  AttentionShape s;
  s.H = a.heads;
  s.G = a.kv_heads;
  s.hd = a.head_dim;
  s.T = a.T;
  s.S = a.S;
  s.mask = int(a.mask);
  s.q_col = a.q_col;
  s.k_col = a.k_col;
  s.v_col = a.v_col;
  s.kv_rows = a.kv_rows > 0 ? a.kv_rows : s.S;
  s.q_pos0 = a.q_pos0;
  s.scale = a.scale;
  s.ldq = last(q);
  s.ldk = last(kk);
  s.ldv = last(v);
  s.P = a.P;
  s.bs = a.block;
  const int base = (backward ? 6 : 3) + (s.P > 0 ? 2 : 0);
  if (s.P > 0) s.pkv = backward ? 6 : 3;
  s.has_prefix = k.n_inputs == base + 1;
  if (s.has_prefix) s.extra = base;
  if (s.P < 0 || k.n_inputs < base || k.n_inputs > base + 1) {
    s.error = "attention: expects q, k, v, [prefix keys, values when P > 0], [i32 input]";
    return s;
  }
  if (s.H <= 0 || s.G <= 0 || s.H % s.G || s.hd <= 0 || s.T <= 0 || s.S <= 0 || s.S > s.kv_rows ||
      rows_of(q) % s.T) {
    s.error = "attention: needs H, G, hd, T, S > 0, G dividing H, S <= kv_rows and T the q rows";
    return s;
  }
  s.B = rows_of(q) / s.T;
  if (rows_of(kk) != s.B * s.kv_rows || rows_of(v) != s.B * s.kv_rows)
    s.error = "attention: k and v must have kv_rows rows per sequence";
  else if (s.q_col < 0 || s.q_col + s.H * s.hd > s.ldq || s.k_col < 0 ||
           s.k_col + s.G * s.hd > s.ldk || s.v_col < 0 || s.v_col + s.G * s.hd > s.ldv)
    s.error = "attention: a head's columns lie outside q, k or v";
  else if (s.mask < MXN_MASK_NONE || s.mask > MXN_MASK_PAGED ||
           (s.mask >= MXN_MASK_PREFIX && !s.has_prefix))
    s.error =
        "attention: mask must be 0 (none), 1 (causal), 2 (prefix, with its lengths), 3 (causal "
        "within segments, with each query's segment start), 4 (each query's key range) or 5 "
        "(paged keys, with each query's block table)";
  else if (s.mask >= MXN_MASK_CACHED && backward)
    s.error = "attention: masks 4 and 5 (serving) are for inference; they have no backward";
  else if (s.mask == MXN_MASK_PAGED &&
           (s.bs < 1 || s.kv_rows % s.bs || s.B != 1 || count(k.inputs[s.extra]) % s.T ||
            count(k.inputs[s.extra]) / s.T < 2))
    s.error =
        "attention: mask 5 needs a block size dividing kv_rows, one sequence, and a (T, "
        "1 + blocks) table";
  else if (s.P > 0 && (count(k.inputs[s.pkv]) != s.P * s.G * s.hd ||
                       count(k.inputs[s.pkv + 1]) != s.P * s.G * s.hd))
    s.error = "attention: the prefix keys and values must be (P, G*hd)";
  else if (s.has_prefix && s.mask != MXN_MASK_PAGED &&
           count(k.inputs[s.extra]) != (s.mask == MXN_MASK_CACHED     ? 2 * s.B * s.T
                                        : s.mask == MXN_MASK_SEGMENTS ? s.B * s.T
                                                                      : s.B))
    s.error =
        "attention: the i32 input holds B prefix lengths (mask 2), B*T segment starts (3) or "
        "B*T key ranges (4)";
  else if (s.mask != MXN_MASK_NONE && (s.q_pos0 < 0 || s.q_pos0 + s.T > s.S))
    s.error = "attention: causal queries must lie within the keys (q_pos0 + T <= S)";
  if (s.mask == MXN_MASK_PAGED && !s.error) s.tw = count(k.inputs[s.extra]) / s.T;
  return s;
}

// DROPOUT's mask (backend_abi.h): splitmix64's mix of (seed, index), 24 bits compared in float.
inline uint64_t dropout_mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
inline bool dropout_keep(uint64_t seed, uint64_t index, float p) {
  return float(dropout_mix(seed + dropout_mix(index)) >> 40) * (1.f / 16777216.f) >= p;
}
inline const char* dropout_error(const mxn_op_call& k) {
  const float p = params_of<DropoutParams>(k).p;
  if (!(p >= 0.f && p < 1.f) || count(k.inputs[0]) != count(k.outputs[0]))
    return "dropout: needs 0 <= p < 1 and an output the input's size";
  return nullptr;
}

inline const char* rope_error(const mxn_op_call& k) {
  const RopeParams r = params_of<RopeParams>(k);
  const int64_t col0 = r.col0, heads = r.heads, hd = r.head_dim, rot = r.rot;
  if (heads <= 0 || hd <= 0 || rot <= 0 || rot > hd || rot % 2 || col0 < 0 ||
      col0 + (heads - 1) * hd + rot > last(k.inputs[0]) || r.theta <= 0 ||
      count(k.inputs[1]) != rows_of(k.inputs[0]))
    return "rope: needs 0 < rot <= hd (even), the rotated dims within the row, theta > 0, one "
           "position per row";
  return nullptr;
}

// SWIGLU / SWIGLU_BWD: both column windows of F = out's (or dy's) width inside their rows.
inline const char* swiglu_error(const mxn_op_call& k, bool backward) {
  const int o = backward ? 1 : 0;
  const mxn_tensor &g = k.inputs[o], &u = k.inputs[o + 1], &y = k.inputs[0];
  const int64_t F = backward ? last(y) : last(k.outputs[0]);
  const int64_t rows = backward ? rows_of(y) : rows_of(k.outputs[0]);
  const SwigluParams p = params_of<SwigluParams>(k);
  if (p.gate_col < 0 || p.up_col < 0 || p.gate_col + F > last(g) || p.up_col + F > last(u) ||
      rows_of(g) != rows || rows_of(u) != rows)
    return "swiglu: the gate and up windows must lie inside rows matching the output";
  return nullptr;
}

// SET_ROWS: n rows of each of B sequences written at row `at` of R rows per sequence, read from
// columns [col, col + W) of src's rows of ld elements.
struct SetRowsShape {
  int64_t B = 0, n = 0, R = 0, at = 0, W = 0, col = 0, ld = 0;
  bool has_idx = false;  // an i32 input names each src row's dst row (a batch of KV caches)
  int64_t dst_rows = 0;
  const char* error = nullptr;
};
inline SetRowsShape set_rows_shape(const mxn_op_call& k) {
  const SetRowsParams p = params_of<SetRowsParams>(k);
  SetRowsShape s;
  s.at = p.at;
  s.R = p.R;
  s.col = p.col;
  s.W = last(k.outputs[0]);
  s.ld = last(k.inputs[0]);
  const int64_t dst_rows = rows_of(k.outputs[0]), src_rows = rows_of(k.inputs[0]);
  s.dst_rows = dst_rows;
  s.has_idx = k.n_inputs > 1;
  if (s.has_idx) {  // row i of src goes to row idx[i] of dst
    s.B = 1;
    s.n = src_rows;
    if (count(k.inputs[1]) != src_rows || s.col < 0 || s.col + s.W > s.ld)
      s.error = "set_rows: one destination row per src row, and dst's width a window of src's";
    return s;
  }
  if (s.R <= 0 || dst_rows % s.R || s.col < 0 || s.col + s.W > s.ld) {
    s.error = "set_rows: dst must be whole sequences of R rows, its width a window of src's";
    return s;
  }
  s.B = dst_rows / s.R;
  s.n = s.B > 0 ? src_rows / s.B : 0;
  if (s.n * s.B != src_rows || s.at < 0 || s.at + s.n > s.R)
    s.error = "set_rows: the rows written must fit each sequence";
  return s;
}

// MOE_ROUTE / MOE_ROUTE_BWD: N tokens over E experts, K each; the forward's optional bias, the
// backward's optional d(aux) (its inputs: dw, logits, ids, [daux]).
struct MoeRouteShape {
  int64_t N = 0, E = 0, K = 0, n_group = 1, topk_group = 1;
  int bias = -1, daux = -1;  // input indexes, -1: none
  bool aux = false;          // the forward's aux output
  const char* error = nullptr;
};
inline MoeRouteShape moe_route_shape(const mxn_op_call& k, bool backward) {
  const MoeRouteParams p = params_of<MoeRouteParams>(k);
  MoeRouteShape s;
  const mxn_tensor& logits = k.inputs[backward ? 1 : 0];
  s.E = last(logits);
  s.N = rows_of(logits);
  s.K = p.k;
  s.n_group = p.n_group > 0 ? p.n_group : 1;
  s.topk_group = p.topk_group > 0 ? p.topk_group : s.n_group;
  if (backward ? k.n_inputs < 3 || k.n_inputs > 4 : k.n_inputs < 1 || k.n_inputs > 2)
    s.error = "moe_route: inputs are logits and [bias]; backward: dw, logits, ids and [d(aux)]";
  if (!backward && k.n_inputs > 1) s.bias = 1;
  if (backward && k.n_inputs > 3) s.daux = 3;
  if ((s.bias >= 0 && count(k.inputs[s.bias]) != s.E) ||
      (s.daux >= 0 && count(k.inputs[s.daux]) != 1))
    s.error = "moe_route: the bias is (E), d(aux) (1)";
  s.aux = !backward && k.n_outputs > 4;
  const bool ok_groups =
      s.E % s.n_group == 0 && s.topk_group <= s.n_group && s.K <= s.topk_group * (s.E / s.n_group);
  if (s.error) return s;
  if (s.E < 1 || s.K < 1 || s.K > s.E || !ok_groups)
    s.error =
        "moe_route: needs 1 <= K <= E experts, groups dividing E, topk_group <= n_group and K "
        "within the chosen groups";
  else if (backward ? (k.n_outputs < 1 || count(k.outputs[0]) != s.N * s.E ||
                       count(k.inputs[0]) != s.N * s.K || count(k.inputs[2]) != s.N * s.K)
                    : (k.n_outputs < 4 || count(k.outputs[0]) != s.N * s.K ||
                       count(k.outputs[1]) != s.N * s.K || count(k.outputs[2]) != s.N * s.K ||
                       count(k.outputs[3]) != s.E + 1 || (s.aux && count(k.outputs[4]) != 1)))
    s.error = backward ? "moe_route_bwd: expected dw (N,K), logits (N,E), ids (N,K); out dlogits "
                         "(N,E)"
                       : "moe_route: expected logits (N,E); out w (N,K), ids (N,K), pos (N*K), "
                         "offsets (E+1), [aux (1)]";
  return s;
}

// MOE_PERMUTE, MOE_UNPERMUTE(_BWD): N tokens of C columns, K slots each.
struct MoePermuteShape {
  int64_t N = 0, C = 0, K = 0;
  bool weighted = false;
  const char* error = nullptr;
};
inline MoePermuteShape moe_permute_shape(const mxn_op_call& k) {
  MoePermuteShape s;
  const bool permute = k.op == MXN_OP_MOE_PERMUTE, bwd = k.op == MXN_OP_MOE_UNPERMUTE_BWD;
  const mxn_tensor& tok = permute ? k.inputs[0] : bwd ? k.inputs[0] : k.outputs[0];
  const mxn_tensor& slots = permute ? k.outputs[0] : k.inputs[bwd ? 1 : 0];
  const mxn_tensor& pos = k.inputs[bwd ? 2 : 1];
  s.C = last(tok);
  s.N = rows_of(tok);
  s.K = s.N > 0 ? count(pos) / s.N : 0;
  s.weighted = !bwd && k.n_inputs > 2;
  if (k.n_inputs < (bwd ? 3 : 2) || k.n_outputs < 1 || s.K < 1 || s.K * s.N != count(pos) ||
      last(slots) != s.C || rows_of(slots) != s.N * s.K ||
      (s.weighted && count(k.inputs[2]) != s.N * s.K) || (bwd && count(k.outputs[0]) != s.N * s.K))
    s.error = "moe_permute: expected tokens (N,C), slots (N*K,C), pos (N*K) and w (N*K)";
  return s;
}

// GROUPED_MATMUL: E experts; rows: out (M, N) = a (M, K) op(b[e]); weight_grad: out (E, P, Q) from
// a (M, P) and b (M, Q).
struct GroupedMatmulShape {
  int64_t E = 0, M = 0, N = 0, K = 0;  // weight_grad: N = P, K = Q
  bool tb = true, weight_grad = false, accumulate = false;
  const char* error = nullptr;
};
inline GroupedMatmulShape grouped_matmul_shape(const mxn_op_call& k) {
  const GroupedMatmulParams p = params_of<GroupedMatmulParams>(k);
  GroupedMatmulShape s;
  s.tb = p.tb;
  s.weight_grad = p.weight_grad;
  s.accumulate = p.accumulate;
  const mxn_tensor &a = k.inputs[0], &b = k.inputs[1], &off = k.inputs[2], &o = k.outputs[0];
  s.E = count(off) - 1;
  if (k.n_inputs < 3 || k.n_outputs < 1 || s.E < 1) {
    s.error = "grouped_matmul: expected a, b, offsets (E+1) and one output";
    return s;
  }
  s.M = rows_of(a);
  if (s.weight_grad) {
    s.N = last(a);
    s.K = last(b);
    if (rows_of(b) != s.M || o.ndim != 3 || o.shape[0] != s.E || o.shape[1] != s.N ||
        o.shape[2] != s.K)
      s.error = "grouped_matmul: a weight's gradient is (E, P, Q) from a (M, P) and b (M, Q)";
    return s;
  }
  s.K = last(a);
  s.N = last(o);
  if (b.ndim != 3 || b.shape[0] != s.E || b.shape[s.tb ? 1 : 2] != s.N ||
      b.shape[s.tb ? 2 : 1] != s.K || rows_of(o) != s.M)
    s.error = "grouped_matmul: expected a (M, K), b (E, N, K) (tb) or (E, K, N), out (M, N)";
  return s;
}

// The rows [lo, hi) of expert e under offsets clamped to [0, M] and made non-decreasing.
inline void expert_rows(const int32_t* off, int64_t e, int64_t M, int64_t* lo, int64_t* hi) {
  auto clamp = [M](int64_t v) { return v < 0 ? 0 : v > M ? M : v; };
  *lo = clamp(off[e]);
  *hi = clamp(off[e + 1]);
  if (*hi < *lo) *hi = *lo;
}

// STRIDED_COPY: every position it reads and writes inside its tensor (the largest is at the index
// space's last corner, strides being non-negative).
inline const char* strided_copy_error(const mxn_op_call& k) {
  const StridedCopyParams p = params_of<StridedCopyParams>(k);
  if (k.n_inputs < 1 || k.n_outputs < 1) return "strided_copy: expected one input and one output";
  for (int d = 0; d < 3; ++d)
    if (p.n[d] < 1 || p.in_stride[d] < 0 || p.out_stride[d] < 0)
      return "strided_copy: sizes must be >= 1 and strides >= 0";
  if (p.in_offset < 0 || p.out_offset < 0 || p.in_at(p.count() - 1) >= count(k.inputs[0]) ||
      p.out_at(p.count() - 1) >= count(k.outputs[0]))
    return "strided_copy: a position lies outside its tensor";
  return nullptr;
}

}  // namespace mxn
