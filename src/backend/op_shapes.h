#pragma once
// What every backend derives from an op call before it launches anything: element counts and
// the shapes of MATMUL and ATTENTION, checked once here for the CPU, OpenCL and CUDA backends
// (and for a vendor's plugin, which may include this header). Plain C++17 over mxn_tensor, no
// allocation, usable from nvcc and hipcc.
#include <cmath>
#include <cstdint>

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
  MatmulShape m;
  m.ta = k.ip[0] != 0;
  m.tb = k.ip[1] != 0;
  m.accumulate = k.ip[2] != 0;
  m.bf16 = k.ip[3] == MXN_DTYPE_BF16;
  m.alpha = k.fp[0];
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
  return m;
}

// ATTENTION / ATTENTION_BWD: qkv is (B*T, 3C), head h of q the column block [h*hd, (h+1)*hd),
// k at +C, v at +2C (leading dimension ld = 3C); y and dy are (B*T, C); probs (B, H, T, T).
// The offsets, in elements, of each (batch, head) block.
struct AttentionShape {
  int64_t B = 0, H = 0, T = 0, C = 0, hd = 0, ld = 0;
  float scale = 1.f;  // 1 / sqrt(hd)
  const char* error = nullptr;
  int64_t q(int64_t b, int64_t h) const { return b * T * ld + h * hd; }
  int64_t k(int64_t b, int64_t h) const { return q(b, h) + C; }
  int64_t v(int64_t b, int64_t h) const { return q(b, h) + 2 * C; }
  int64_t y(int64_t b, int64_t h) const { return b * T * C + h * hd; }
  int64_t p(int64_t b, int64_t h) const { return (b * H + h) * T * T; }
};

inline AttentionShape attention_shape(const mxn_op_call& k, bool backward) {
  const mxn_tensor& qkv = k.inputs[backward ? 1 : 0];
  AttentionShape s;
  s.H = k.ip[0];
  s.T = k.ip[1];
  s.C = qkv.ndim == 2 ? qkv.shape[1] / 3 : 0;
  if (s.H <= 0 || s.T <= 0 || s.C <= 0 || s.C % s.H || qkv.shape[1] != 3 * s.C ||
      qkv.shape[0] % s.T) {
    s.error = "attention: heads must divide the width and T the rows";
    return s;
  }
  s.B = qkv.shape[0] / s.T;
  s.hd = s.C / s.H;
  s.ld = 3 * s.C;
  s.scale = 1.f / std::sqrt(float(s.hd));
  return s;
}

}  // namespace mxn
