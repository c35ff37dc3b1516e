#pragma once
// The CUDA kernels of ABI 2's ops, as the OpenCL ones: the general attention with one thread per
// query row (forward, dQ) or key row (dK, dV) and an online softmax, nothing of size T x S kept;
// RMSNorm, RoPE, SiLU, SwiGLU and SET_ROWS. Correct first; issue "the CUDA backend on a real
// GPU" makes them fast.
#include <cstdint>

#include "backend/cuda/kernels.cuh"
#include "backend/op_shapes.h"

namespace mxn::cuda {

struct Att {  // AttentionShape's numbers, for device code
  int64_t B, H, G, hd, T, S, kv_rows, q_pos0, ldq, ldk, ldv, q_col, k_col, v_col, P;
  int mask, has_prefix;
  float scale;
  int64_t bs, tw;  // mask 5: block size, table width
};

inline Att att_of(const AttentionShape& a) {
  return {a.B,
          a.H,
          a.G,
          a.hd,
          a.T,
          a.S,
          a.kv_rows,
          a.q_pos0,
          a.ldq,
          a.ldk,
          a.ldv,
          a.q_col,
          a.k_col,
          a.v_col,
          a.P,
          a.mask,
          a.has_prefix ? 1 : 0,
          a.scale,
          a.bs,
          a.tw};
}

__device__ inline int64_t att_visible(const Att& a, int64_t t, int64_t prefix) {
  if (a.mask == MXN_MASK_NONE) return a.S;
  int64_t n = a.q_pos0 + t + 1;
  if (a.mask == MXN_MASK_PREFIX && prefix > n) n = prefix;
  return n < a.S ? n : a.S;
}
// Mask 3 (packed rows): the first key query t sees, its segment's start (at most itself).
__device__ inline int64_t att_first(const Att& a, const int32_t* pre, int64_t b, int64_t t,
                                    int64_t n) {
  if (a.mask == MXN_MASK_CACHED) {
    const int64_t lo = pre[(b * a.T + t) * 2];
    return lo < 0 ? 0 : lo < n - 1 ? lo : n - 1;
  }
  if (a.mask != MXN_MASK_SEGMENTS) return 0;
  const int64_t lo = pre[b * a.T + t];
  return lo < 0 ? 0 : lo < n - 1 ? lo : n - 1;
}
__device__ inline int64_t att_prefix(const Att& a, const int32_t* pre, int64_t b) {
  return a.has_prefix && a.mask == MXN_MASK_PREFIX ? pre[b] : 0;
}
// Mask 4: the end of query (b, t)'s own key range; else the usual visibility.
__device__ inline int64_t att_end(const Att& a, const int32_t* pre, int64_t b, int64_t t,
                                  int64_t prefix) {
  if (a.mask == MXN_MASK_PAGED) {  // paged keys: the count heads the query's block table
    const int64_t n = pre[t * a.tw], most = (a.tw - 1) * a.bs;
    return n < 1 ? 1 : n < most ? n : most;
  }
  if (a.mask != MXN_MASK_CACHED) return att_visible(a, t, prefix);
  const int64_t hi = pre[(b * a.T + t) * 2 + 1];
  return hi < 1 ? 1 : hi < a.S ? hi : a.S;
}
__device__ inline int64_t att_q(const Att& a, int64_t b, int64_t t, int64_t h) {
  return (b * a.T + t) * a.ldq + a.q_col + h * a.hd;
}
__device__ inline int64_t att_k(const Att& a, int64_t b, int64_t j, int64_t g) {
  return (b * a.kv_rows + j) * a.ldk + a.k_col + g * a.hd;
}
__device__ inline int64_t att_v(const Att& a, int64_t b, int64_t j, int64_t g) {
  return (b * a.kv_rows + j) * a.ldv + a.v_col + g * a.hd;
}
__device__ inline int64_t att_y(const Att& a, int64_t b, int64_t t, int64_t h) {
  return (b * a.T + t) * a.H * a.hd + h * a.hd;
}

// Mask 5: the k/v row of query t's key j (its block table); else j.
__device__ inline int64_t att_row(const Att& a, const int32_t* pre, int64_t t, int64_t j) {
  if (a.mask != MXN_MASK_PAGED) return j;
  const int64_t blk = pre[t * a.tw + 1 + j / a.bs], nblk = a.kv_rows / a.bs;
  return (blk < 0 ? 0 : blk < nblk ? blk : nblk - 1) * a.bs + j % a.bs;
}
// Key jj of a query: jj < 0 is row P + jj of the shared prefix (pk, pv: (P, G*hd)).
__device__ inline const float* att_key(const Att& a, const float* k, const float* pk, int64_t b,
                                       int64_t jj, int64_t g) {
  return jj < 0 ? pk + (a.P + jj) * a.G * a.hd + g * a.hd : k + att_k(a, b, jj, g);
}
__device__ inline const float* att_val(const Att& a, const float* v, const float* pv, int64_t b,
                                       int64_t jj, int64_t g) {
  return jj < 0 ? pv + (a.P + jj) * a.G * a.hd + g * a.hd : v + att_v(a, b, jj, g);
}

__global__ void k_attn_fwd(Att a, const float* q, const float* k, const float* v, const float* pk,
                           const float* pv, const int32_t* pre, float* y, float* lse) {
  MXN_LOOP(i, a.B * a.T * a.H) {
    const int64_t h = i % a.H, t = i / a.H % a.T, b = i / (a.H * a.T), g = h / (a.H / a.G);
    const int64_t n = att_end(a, pre, b, t, att_prefix(a, pre, b)), lo = att_first(a, pre, b, t, n);
    const float* qr = q + att_q(a, b, t, h);
    float* yr = y + att_y(a, b, t, h);
    for (int64_t c = 0; c < a.hd; ++c) yr[c] = 0.f;
    float mx = -INFINITY, sum = 0.f;
    for (int64_t j = -a.P; j < n; ++j) {
      if (j >= 0 && j < lo) j = lo;
      if (j >= n) break;
      const float* kr = att_key(a, k, pk, b, j < 0 ? j : att_row(a, pre, t, j), g);
      const float* vr = att_val(a, v, pv, b, j < 0 ? j : att_row(a, pre, t, j), g);
      float s = 0.f;
      for (int64_t c = 0; c < a.hd; ++c) s += qr[c] * kr[c];
      s *= a.scale;
      const float m2 = fmaxf(mx, s), corr = expf(mx - m2), p = expf(s - m2);
      sum = sum * corr + p;
      for (int64_t c = 0; c < a.hd; ++c) yr[c] = yr[c] * corr + p * vr[c];
      mx = m2;
    }
    const float inv = 1.f / sum;
    for (int64_t c = 0; c < a.hd; ++c) yr[c] *= inv;
    if (lse) lse[(b * a.T + t) * a.H + h] = mx + logf(sum);
  }
}

__global__ void k_attn_bwd_dq(Att a, const float* dy, const float* q, const float* k,
                              const float* v, const float* y, const float* lse, const float* pk,
                              const float* pv, const int32_t* pre, float* dq) {
  MXN_LOOP(i, a.B * a.T * a.H) {
    const int64_t h = i % a.H, t = i / a.H % a.T, b = i / (a.H * a.T), g = h / (a.H / a.G);
    const int64_t n = att_visible(a, t, att_prefix(a, pre, b)), lo = att_first(a, pre, b, t, n);
    const float *qr = q + att_q(a, b, t, h), *dyr = dy + att_y(a, b, t, h),
                *yr = y + att_y(a, b, t, h);
    float* dqr = dq + att_q(a, b, t, h);
    const float m = lse[(b * a.T + t) * a.H + h];
    float D = 0.f;
    for (int64_t c = 0; c < a.hd; ++c) D += dyr[c] * yr[c];
    for (int64_t c = 0; c < a.hd; ++c) dqr[c] = 0.f;
    for (int64_t j = -a.P; j < n; ++j) {
      if (j >= 0 && j < lo) j = lo;
      if (j >= n) break;
      const float *kr = att_key(a, k, pk, b, j, g), *vr = att_val(a, v, pv, b, j, g);
      float s = 0.f, dp = 0.f;
      for (int64_t c = 0; c < a.hd; ++c) {
        s += qr[c] * kr[c];
        dp += dyr[c] * vr[c];
      }
      const float ds = expf(s * a.scale - m) * (dp - D) * a.scale;
      for (int64_t c = 0; c < a.hd; ++c) dqr[c] += ds * kr[c];
    }
  }
}

// Query (b, t, h)'s share of one key's dK and dV: p = exp(s - lse), dS = p (dY.V - dY.Y) scale;
// dK += dS q, dV += p dY. Shared by the sequence's keys and the prefix's.
__device__ inline void att_dkv_add(const Att& a, const float* dy, const float* q, const float* y,
                                   const float* lse, int64_t b, int64_t t, int64_t h,
                                   const float* kr, const float* vr, float* dkr, float* dvr) {
  const float *qr = q + att_q(a, b, t, h), *dyr = dy + att_y(a, b, t, h),
              *yr = y + att_y(a, b, t, h);
  float s = 0.f, dp = 0.f, D = 0.f;
  for (int64_t c = 0; c < a.hd; ++c) {
    s += qr[c] * kr[c];
    dp += dyr[c] * vr[c];
    D += dyr[c] * yr[c];
  }
  const float p = expf(s * a.scale - lse[(b * a.T + t) * a.H + h]), ds = p * (dp - D) * a.scale;
  for (int64_t c = 0; c < a.hd; ++c) {
    dkr[c] += ds * qr[c];
    dvr[c] += p * dyr[c];
  }
}

__global__ void k_attn_bwd_dkv(Att a, const float* dy, const float* q, const float* k,
                               const float* v, const float* y, const float* lse, const int32_t* pre,
                               float* dk, float* dv) {
  MXN_LOOP(i, a.B * a.kv_rows * a.G) {
    const int64_t g = i % a.G, j = i / a.G % a.kv_rows, b = i / (a.G * a.kv_rows);
    const float *kr = k + att_k(a, b, j, g), *vr = v + att_v(a, b, j, g);
    float *dkr = dk + att_k(a, b, j, g), *dvr = dv + att_v(a, b, j, g);
    for (int64_t c = 0; c < a.hd; ++c) dkr[c] = dvr[c] = 0.f;
    if (j >= a.S) continue;
    const int64_t prefix = att_prefix(a, pre, b), grp = a.H / a.G;
    for (int64_t h = g * grp; h < (g + 1) * grp; ++h)
      for (int64_t t = 0; t < a.T; ++t) {
        const int64_t n = att_visible(a, t, prefix);
        if (n <= j || j < att_first(a, pre, b, t, n)) continue;
        att_dkv_add(a, dy, q, y, lse, b, t, h, kr, vr, dkr, dvr);
      }
  }
}

// dPK and dPV for one shared prefix row (p, g), summed over sequences, the group's heads and
// every query, in a fixed order.
__global__ void k_attn_bwd_dprefix(Att a, const float* dy, const float* q, const float* y,
                                   const float* lse, const float* pk, const float* pv, float* dpk,
                                   float* dpv) {
  MXN_LOOP(i, a.P * a.G) {
    const int64_t g = i % a.G, p = i / a.G, grp = a.H / a.G, off = p * a.G * a.hd + g * a.hd;
    const float *kr = pk + off, *vr = pv + off;
    float *dkr = dpk + off, *dvr = dpv + off;
    for (int64_t c = 0; c < a.hd; ++c) dkr[c] = dvr[c] = 0.f;
    for (int64_t b = 0; b < a.B; ++b)
      for (int64_t h = g * grp; h < (g + 1) * grp; ++h)
        for (int64_t t = 0; t < a.T; ++t) {
          att_dkv_add(a, dy, q, y, lse, b, t, h, kr, vr, dkr, dvr);
        }
  }
}

__global__ void k_rmsnorm(const float* x, const float* w, float* y, float* rstd, int64_t rows,
                          int64_t cols, float eps) {
  MXN_LOOP(r, rows) {
    const float* xr = x + r * cols;
    float ss = 0.f;
    for (int64_t c = 0; c < cols; ++c) ss += xr[c] * xr[c];
    const float rs = rsqrtf(ss / float(cols) + eps);
    for (int64_t c = 0; c < cols; ++c) y[r * cols + c] = xr[c] * rs * w[c];
    rstd[r] = rs;
  }
}
__global__ void k_rmsnorm_dx(const float* dy, const float* x, const float* w, const float* rstd,
                             float* dx, int64_t rows, int64_t cols) {
  MXN_LOOP(r, rows) {
    const float *xr = x + r * cols, *d = dy + r * cols;
    const float rs = rstd[r];
    float m = 0.f;
    for (int64_t c = 0; c < cols; ++c) m += d[c] * w[c] * xr[c];
    m /= float(cols);
    for (int64_t c = 0; c < cols; ++c) dx[r * cols + c] = rs * (d[c] * w[c] - xr[c] * rs * rs * m);
  }
}
__global__ void k_rmsnorm_dw(const float* dy, const float* x, const float* rstd, float* dw,
                             int64_t rows, int64_t cols) {
  MXN_LOOP(c, cols) {
    float s = 0.f;
    for (int64_t r = 0; r < rows; ++r) s += dy[r * cols + c] * x[r * cols + c] * rstd[r];
    dw[c] = s;
  }
}
__global__ void k_rope(const float* x, const int32_t* pos, float* y, const float* inv_freq,
                       int64_t rows, int64_t ld, int64_t col0, int64_t heads, int64_t hd,
                       int64_t rot, int interleaved, float sign) {
  MXN_LOOP(r, rows) {
    const float* xr = x + r * ld;
    float* yr = y + r * ld;
    if (xr != yr)
      for (int64_t c = 0; c < ld; ++c) yr[c] = xr[c];
    const float p = float(pos[r]);
    const int64_t half = rot / 2;
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < half; ++i) {
        const float ang = p * inv_freq[i], cs = cosf(ang), sn = sign * sinf(ang);
        const int64_t base = col0 + h * hd;
        const int64_t i1 = base + (interleaved ? 2 * i : i),
                      i2 = base + (interleaved ? 2 * i + 1 : i + half);
        const float va = xr[i1], vb = xr[i2];
        yr[i1] = va * cs - vb * sn;
        yr[i2] = vb * cs + va * sn;
      }
  }
}
__device__ inline uint64_t dropout_mix_d(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
__global__ void k_dropout(const float* x, float* y, int64_t n, uint64_t seed, uint64_t first,
                          float p, float scale) {
  MXN_LOOP(i, n) {
    const float u =
        float(dropout_mix_d(seed + dropout_mix_d(first + uint64_t(i))) >> 40) * (1.f / 16777216.f);
    y[i] = u >= p ? x[i] * scale : 0.f;
  }
}
__global__ void k_silu(const float* x, float* y, int64_t n) {
  MXN_LOOP(i, n) y[i] = x[i] / (1.f + expf(-x[i]));
}
__global__ void k_silu_bwd(const float* dy, const float* x, float* dx, int64_t n) {
  MXN_LOOP(i, n) {
    const float s = 1.f / (1.f + expf(-x[i]));
    dx[i] = dy[i] * s * (1.f + x[i] * (1.f - s));
  }
}
__global__ void k_swiglu(const float* g, int64_t lg, const float* u, int64_t lu, float* y,
                         int64_t n, int64_t F) {
  MXN_LOOP(i, n) {
    const int64_t r = i / F, c = i % F;
    const float gv = g[r * lg + c];
    y[i] = gv / (1.f + expf(-gv)) * u[r * lu + c];
  }
}
__global__ void k_swiglu_bwd(const float* dy, const float* g, int64_t lg, const float* u,
                             int64_t lu, float* dg, float* du, int64_t n, int64_t F) {
  MXN_LOOP(i, n) {
    const int64_t r = i / F, c = i % F;
    const float gv = g[r * lg + c], uv = u[r * lu + c], s = 1.f / (1.f + expf(-gv));
    du[r * lu + c] = dy[i] * gv * s;
    dg[r * lg + c] = dy[i] * uv * s * (1.f + gv * (1.f - s));
  }
}
__global__ void k_set_rows(const float* src, float* dst, const int32_t* idx, int64_t total,
                           int64_t n, int64_t R, int64_t at, int64_t W, int64_t ld) {
  MXN_LOOP(i, total) {
    const int64_t c = i % W, row = i / W, b = row / n, t = row % n;
    const int64_t to = idx ? int64_t(idx[row]) : b * R + at + t;
    dst[to * W + c] = src[row * ld + c];
  }
}

}  // namespace mxn::cuda
