#pragma once
// The OpenCL C kernels of ABI 2's ops: the general attention (one work-item per query row for
// the forward and dQ, one per key row for dK and dV: online softmax, nothing of size T x S
// stored), RMSNorm, RoPE, SiLU, SwiGLU and SET_ROWS. Same conventions as kernels_cl.h.
namespace mxn::opencl {

inline const char* kKernelsLlm = R"CLC(
// backend_abi.h's mxn_attention_mask
#define MXN_MASK_NONE 0
#define MXN_MASK_CAUSAL 1
#define MXN_MASK_PREFIX 2
#define MXN_MASK_SEGMENTS 3
#define MXN_MASK_CACHED 4
#define MXN_MASK_PAGED 5
#define ATT_PARAMS long B, long H, long G, long hd, long T, long S, long kv_rows, long q_pos0, \
  int mask, long ldq, long ldk, long ldv, long q_col, long k_col, long v_col, float scale, \
  int has_prefix, long P, long bs, long tw
#define QOFF(b, t, h) (((b) * T + (t)) * ldq + q_col + (h) * hd)
#define KOFF(b, j, g) (((b) * kv_rows + (j)) * ldk + k_col + (g) * hd)
#define VOFF(b, j, g) (((b) * kv_rows + (j)) * ldv + v_col + (g) * hd)
#define YOFF(b, t, h) (((b) * T + (t)) * H * hd + (h) * hd)

long att_visible(long t, long prefix, int mask, long q_pos0, long S) {
  if (mask == MXN_MASK_NONE) return S;
  long n = q_pos0 + t + 1;
  if (mask == MXN_MASK_PREFIX && prefix > n) n = prefix;
  return n < S ? n : S;
}
// Segments (packed rows): the first key query t sees, its segment's start (at most itself).
long att_first(__global const int* pre, ulong op, long b, long t, long T, int mask, long n) {
  if (mask == MXN_MASK_CACHED) {
    const long lo = pre[op + (b * T + t) * 2];
    return lo < 0 ? 0 : lo < n - 1 ? lo : n - 1;
  }
  if (mask != MXN_MASK_SEGMENTS) return 0;
  const long lo = pre[op + b * T + t];
  return lo < 0 ? 0 : lo < n - 1 ? lo : n - 1;
}
#define ATT_PREFIX(b) (has_prefix && mask == MXN_MASK_PREFIX ? pre[op + (b)] : 0)
// Cached: the end of query (b, t)'s own key range; paged: its number of paged keys; else
// the usual visibility.
long att_end(__global const int* pre, ulong op, long b, long t, long T, int mask, long prefix,
             long q_pos0, long S, long bs, long tw) {
  if (mask == MXN_MASK_PAGED) {
    const long n = pre[op + t * tw], most = (tw - 1) * bs;
    return n < 1 ? 1 : n < most ? n : most;
  }
  if (mask != MXN_MASK_CACHED) return att_visible(t, prefix, mask, q_pos0, S);
  const long hi = pre[op + (b * T + t) * 2 + 1];
  return hi < 1 ? 1 : hi < S ? hi : S;
}
// Paged: the k/v row of query t's key j (its block table); else j.
long att_row(__global const int* pre, ulong op, long t, long j, int mask, long bs, long tw,
             long kv_rows) {
  if (mask != MXN_MASK_PAGED) return j;
  const long blk = pre[op + t * tw + 1 + j / bs], nblk = kv_rows / bs;
  return (blk < 0 ? 0 : blk < nblk ? blk : nblk - 1) * bs + j % bs;
}

// One query row (b, t, h): y = softmax(scale q K^T) V with a running max and sum.
__kernel void attn_fwd(__global const float* q, ulong oq, __global const float* k, ulong ok,
                       __global const float* v, ulong ov, __global const float* pk, ulong opk,
                       __global const float* pv, ulong opv, __global const int* pre, ulong op,
                       __global float* y, ulong oy, __global float* lse, ulong ol, int want_lse,
                       ATT_PARAMS) {
  const long i = get_global_id(0), h = i % H, t = i / H % T, b = i / (H * T), g = h / (H / G);
  const long n = att_end(pre, op, b, t, T, mask, ATT_PREFIX(b), q_pos0, S, bs, tw);
  const long lo = att_first(pre, op, b, t, T, mask, n);
  __global const float* qr = q + oq + QOFF(b, t, h);
  __global float* yr = y + oy + YOFF(b, t, h);
  for (long c = 0; c < hd; ++c) yr[c] = 0.f;
  float mx = -INFINITY, sum = 0.f;
  for (long jj = -P; jj < n; ++jj) {  // the shared prefix's keys first, then the sequence's
    if (jj >= 0 && jj < lo) jj = lo;
    if (jj >= n) break;
    const long row = jj < 0 ? 0 : att_row(pre, op, t, jj, mask, bs, tw, kv_rows);
    __global const float* kr = jj < 0 ? pk + opk + (P + jj) * G * hd + g * hd : k + ok + KOFF(b, row, g);
    __global const float* vr = jj < 0 ? pv + opv + (P + jj) * G * hd + g * hd : v + ov + VOFF(b, row, g);
    float s = 0.f;
    for (long c = 0; c < hd; ++c) s += qr[c] * kr[c];
    s *= scale;
    const float m2 = fmax(mx, s), corr = exp(mx - m2), p = exp(s - m2);
    sum = sum * corr + p;
    for (long c = 0; c < hd; ++c) yr[c] = yr[c] * corr + p * vr[c];
    mx = m2;
  }
  const float inv = 1.f / sum;
  for (long c = 0; c < hd; ++c) yr[c] *= inv;
  if (want_lse) lse[ol + (b * T + t) * H + h] = mx + log(sum);
}

// dQ for one query row: dS_j = P_j (dY.V_j - dY.Y) scale; dQ = sum_j dS_j K_j.
__kernel void attn_bwd_dq(__global const float* dy, ulong ody, __global const float* q, ulong oq,
                          __global const float* k, ulong ok, __global const float* v, ulong ov,
                          __global const float* y, ulong oy, __global const float* lse, ulong ol,
                          __global const float* pk, ulong opk, __global const float* pv, ulong opv,
                          __global const int* pre, ulong op, __global float* dq, ulong odq,
                          ATT_PARAMS) {
  const long i = get_global_id(0), h = i % H, t = i / H % T, b = i / (H * T), g = h / (H / G);
  const long n = att_visible(t, ATT_PREFIX(b), mask, q_pos0, S);
  const long lo = att_first(pre, op, b, t, T, mask, n);
  __global const float* qr = q + oq + QOFF(b, t, h);
  __global const float* dyr = dy + ody + YOFF(b, t, h);
  __global const float* yr = y + oy + YOFF(b, t, h);
  __global float* dqr = dq + odq + QOFF(b, t, h);
  const float m = lse[ol + (b * T + t) * H + h];
  float D = 0.f;
  for (long c = 0; c < hd; ++c) D += dyr[c] * yr[c];
  for (long c = 0; c < hd; ++c) dqr[c] = 0.f;
  for (long jj = -P; jj < n; ++jj) {
    if (jj >= 0 && jj < lo) jj = lo;
    if (jj >= n) break;
    __global const float* kr = jj < 0 ? pk + opk + (P + jj) * G * hd + g * hd : k + ok + KOFF(b, jj, g);
    __global const float* vr = jj < 0 ? pv + opv + (P + jj) * G * hd + g * hd : v + ov + VOFF(b, jj, g);
    float s = 0.f, dp = 0.f;
    for (long c = 0; c < hd; ++c) {
      s += qr[c] * kr[c];
      dp += dyr[c] * vr[c];
    }
    const float ds = exp(s * scale - m) * (dp - D) * scale;
    for (long c = 0; c < hd; ++c) dqr[c] += ds * kr[c];
  }
}

// One query's share of one key's dK and dV: p = exp(s - lse), dS = p (dY.V - dY.Y) scale;
// dK += dS q, dV += p dY. Shared by the sequence's keys and the prefix's.
void att_dkv_add(__global const float* qr, __global const float* dyr, __global const float* yr,
                 float lse, __global const float* kr, __global const float* vr, __global float* dkr,
                 __global float* dvr, long hd, float scale) {
  float s = 0.f, dp = 0.f, D = 0.f;
  for (long c = 0; c < hd; ++c) {
    s += qr[c] * kr[c];
    dp += dyr[c] * vr[c];
    D += dyr[c] * yr[c];
  }
  const float p = exp(s * scale - lse), ds = p * (dp - D) * scale;
  for (long c = 0; c < hd; ++c) {
    dkr[c] += ds * qr[c];
    dvr[c] += p * dyr[c];
  }
}

// dK and dV for one key row (b, j, g): sums over the group's query heads and the queries that
// see key j, in a fixed order.
__kernel void attn_bwd_dkv(__global const float* dy, ulong ody, __global const float* q, ulong oq,
                           __global const float* k, ulong ok, __global const float* v, ulong ov,
                           __global const float* y, ulong oy, __global const float* lse, ulong ol,
                           __global const int* pre, ulong op, __global float* dk, ulong odk,
                           __global float* dv, ulong odv, ATT_PARAMS) {
  // (P-Tuning's prefix keys are attn_bwd_dprefix's.)
  const long i = get_global_id(0), g = i % G, j = i / G % kv_rows, b = i / (G * kv_rows);
  __global const float* kr = k + ok + KOFF(b, j, g);
  __global const float* vr = v + ov + VOFF(b, j, g);
  __global float* dkr = dk + odk + KOFF(b, j, g);
  __global float* dvr = dv + odv + VOFF(b, j, g);
  for (long c = 0; c < hd; ++c) {
    dkr[c] = 0.f;
    dvr[c] = 0.f;
  }
  if (j >= S) return;
  const long prefix = ATT_PREFIX(b);
  for (long h = g * (H / G); h < (g + 1) * (H / G); ++h)
    for (long t = 0; t < T; ++t) {
      const long n = att_visible(t, prefix, mask, q_pos0, S);
      if (n <= j || j < att_first(pre, op, b, t, T, mask, n)) continue;
      att_dkv_add(q + oq + QOFF(b, t, h), dy + ody + YOFF(b, t, h), y + oy + YOFF(b, t, h),
                  lse[ol + (b * T + t) * H + h], kr, vr, dkr, dvr, hd, scale);
    }
}

// dPK and dPV for one shared prefix row (p, g): sums over every sequence, the group's query
// heads and every query (each sees the whole prefix), in a fixed order.
__kernel void attn_bwd_dprefix(__global const float* dy, ulong ody, __global const float* q,
                               ulong oq, __global const float* y, ulong oy,
                               __global const float* lse, ulong ol, __global const float* pk,
                               ulong opk, __global const float* pv, ulong opv,
                               __global float* dpk, ulong odpk, __global float* dpv, ulong odpv,
                               ATT_PARAMS) {
  const long i = get_global_id(0), g = i % G, p = i / G;
  __global const float* kr = pk + opk + p * G * hd + g * hd;
  __global const float* vr = pv + opv + p * G * hd + g * hd;
  __global float* dkr = dpk + odpk + p * G * hd + g * hd;
  __global float* dvr = dpv + odpv + p * G * hd + g * hd;
  for (long c = 0; c < hd; ++c) {
    dkr[c] = 0.f;
    dvr[c] = 0.f;
  }
  for (long b = 0; b < B; ++b)
    for (long h = g * (H / G); h < (g + 1) * (H / G); ++h)
      for (long t = 0; t < T; ++t) {
        att_dkv_add(q + oq + QOFF(b, t, h), dy + ody + YOFF(b, t, h), y + oy + YOFF(b, t, h),
                    lse[ol + (b * T + t) * H + h], kr, vr, dkr, dvr, hd, scale);
      }
}

ulong dropout_mix(ulong x) {
  x += 0x9e3779b97f4a7c15UL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9UL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebUL;
  return x ^ (x >> 31);
}
__kernel void dropout(__global const float* x, ulong ox, __global float* y, ulong oy, ulong seed,
                      ulong first, float p, float scale) {
  const size_t i = get_global_id(0);
  const float u = (float)(dropout_mix(seed + dropout_mix(first + i)) >> 40) * (1.f / 16777216.f);
  y[oy + i] = u >= p ? x[ox + i] * scale : 0.f;
}

__kernel void rmsnorm(__global const float* x, ulong ox, __global const float* w, ulong ow,
                      __global float* y, ulong oy, __global float* rstd, ulong orr, ulong cols,
                      float eps) {
  const size_t r = get_global_id(0);
  __global const float* xr = x + ox + r * cols;
  float ss = 0.f;
  for (ulong c = 0; c < cols; ++c) ss += xr[c] * xr[c];
  const float rs = 1.f / sqrt(ss / (float)cols + eps);
  for (ulong c = 0; c < cols; ++c) y[oy + r * cols + c] = xr[c] * rs * w[ow + c];
  rstd[orr + r] = rs;
}
__kernel void rmsnorm_dx(__global const float* dy, ulong od, __global const float* x, ulong ox,
                         __global const float* w, ulong ow, __global const float* rstd, ulong orr,
                         __global float* dx, ulong odx, ulong cols) {
  const size_t r = get_global_id(0);
  __global const float* xr = x + ox + r * cols;
  __global const float* d = dy + od + r * cols;
  const float rs = rstd[orr + r];
  float m = 0.f;
  for (ulong c = 0; c < cols; ++c) m += d[c] * w[ow + c] * xr[c];
  m /= (float)cols;
  for (ulong c = 0; c < cols; ++c)
    dx[odx + r * cols + c] = rs * (d[c] * w[ow + c] - xr[c] * rs * rs * m);
}
__kernel void rmsnorm_dw(__global const float* dy, ulong od, __global const float* x, ulong ox,
                         __global const float* rstd, ulong orr, __global float* dw, ulong odw,
                         ulong rows, ulong cols) {
  const size_t c = get_global_id(0);
  float s = 0.f;
  for (ulong r = 0; r < rows; ++r) s += dy[od + r * cols + c] * x[ox + r * cols + c] * rstd[orr + r];
  dw[odw + c] = s;
}
// One row: columns outside the rotated heads are copied (unless y is x), then each pair turns.
__kernel void rope(__global const float* x, ulong ox, __global const int* pos, ulong op,
                   __global float* y, ulong oy, __global const float* inv_freq, ulong ld,
                   ulong col0, ulong heads, ulong hd, ulong rot, int interleaved, float sign) {
  const size_t r = get_global_id(0);
  __global const float* xr = x + ox + r * ld;
  __global float* yr = y + oy + r * ld;
  const int same = xr == yr;
  if (!same)
    for (ulong c = 0; c < ld; ++c) yr[c] = xr[c];
  const float p = (float)pos[op + r];
  const ulong npair = rot / 2;
  for (ulong h = 0; h < heads; ++h)
    for (ulong i = 0; i < npair; ++i) {
      const float ang = p * inv_freq[i], cs = cos(ang), sn = sign * sin(ang);
      const ulong base = col0 + h * hd;
      const ulong i1 = base + (interleaved ? 2 * i : i), i2 = base + (interleaved ? 2 * i + 1 : i + npair);
      const float a = xr[i1], b = xr[i2];
      yr[i1] = a * cs - b * sn;
      yr[i2] = b * cs + a * sn;
    }
}
__kernel void silu(__global const float* x, ulong ox, __global float* y, ulong oy) {
  const size_t i = get_global_id(0);
  const float v = x[ox + i];
  y[oy + i] = v / (1.f + exp(-v));
}
__kernel void silu_bwd(__global const float* dy, ulong od, __global const float* x, ulong ox,
                       __global float* dx, ulong oo) {
  const size_t i = get_global_id(0);
  const float v = x[ox + i], s = 1.f / (1.f + exp(-v));
  dx[oo + i] = dy[od + i] * s * (1.f + v * (1.f - s));
}
__kernel void swiglu(__global const float* g, ulong og, ulong lg, __global const float* u,
                     ulong ou, ulong lu, __global float* y, ulong oy, ulong F) {
  const size_t i = get_global_id(0), r = i / F, c = i % F;
  const float gv = g[og + r * lg + c];
  y[oy + i] = gv / (1.f + exp(-gv)) * u[ou + r * lu + c];
}
__kernel void swiglu_bwd(__global const float* dy, ulong od, __global const float* g, ulong og,
                         ulong lg, __global const float* u, ulong ou, ulong lu,
                         __global float* dg, ulong odg, __global float* du, ulong odu, ulong F) {
  const size_t i = get_global_id(0), r = i / F, c = i % F;
  const float gv = g[og + r * lg + c], uv = u[ou + r * lu + c], d = dy[od + i];
  const float s = 1.f / (1.f + exp(-gv));
  du[odu + r * lu + c] = d * gv * s;
  dg[odg + r * lg + c] = d * uv * s * (1.f + gv * (1.f - s));
}
__kernel void set_rows(__global const float* src, ulong os, __global float* dst, ulong od,
                       __global const int* idx, ulong oi, int has_idx, ulong n, ulong R,
                       ulong at, ulong W, ulong ld) {
  const size_t i = get_global_id(0), c = i % W, row = i / W, b = row / n, t = row % n;
  const ulong to = has_idx ? (ulong)idx[oi + row] : b * R + at + t;
  dst[od + to * W + c] = src[os + row * ld + c];
}
)CLC";

}  // namespace mxn::opencl
