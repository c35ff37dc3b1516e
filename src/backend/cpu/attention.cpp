// The general attention on the CPU, flash-style in memory: queries go in blocks of kBlock rows;
// a block's scores against the keys it may see live in per-thread scratch (kBlock x S), never a
// T x S matrix per head; the forward keeps only each row's log-sum-exp, and the backward
// recomputes the probabilities from it. Every product is a oneDNN GEMM reading q, k and v in
// place through their leading dimensions, so fused qkv and KV caches need no copies.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "backend/cpu/kernels.h"
#include "backend/cpu/vmath.h"

namespace mxn::cpu {
namespace {

constexpr int64_t kBlock = 64;

// With grouped heads each query head's dK and dV went to a private (kv_rows x hd) slab; each kv
// head's gradient is their sum, in a fixed order: deterministic, no atomics.
void sum_groups(const AttentionShape& a, const float* priv, float* dk, float* dv) {
  const int64_t hd = a.hd, rows_kv = a.kv_rows;
#pragma omp parallel for schedule(static)
  for (int64_t bg = 0; bg < a.B * a.G; ++bg) {
    const int64_t b = bg / a.G, g = bg % a.G;
    for (int64_t j = 0; j < rows_kv; ++j) {
      float* dkr = dk + a.k(b, j, g);
      float* dvr = dv + a.v(b, j, g);
      std::fill_n(dkr, hd, 0.f);
      std::fill_n(dvr, hd, 0.f);
      for (int64_t i = 0; i < a.group(); ++i) {
        const float* src = priv + size_t(b * a.H + g * a.group() + i) * 2 * rows_kv * hd;
        for (int64_t c = 0; c < hd; ++c) {
          dkr[c] += src[j * hd + c];
          dvr[c] += src[rows_kv * hd + j * hd + c];
        }
      }
    }
  }
}

// Softmax of one query's scores in place: P prefix scores (pre) and the sequence's keys
// [lo, n) of its nk columns (row), the rest of them zero. Returns the row's log-sum-exp.
float softmax_row(float* pre, int64_t P, float* row, int64_t lo, int64_t n, int64_t nk) {
  float mx = row[lo];
  for (int64_t j = 0; j < P; ++j) mx = std::max(mx, pre[j]);
  for (int64_t j = lo + 1; j < n; ++j) mx = std::max(mx, row[j]);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < P; ++j) {
    pre[j] = vexp(pre[j] - mx);
    sum += pre[j];
  }
#pragma omp simd reduction(+ : sum)
  for (int64_t j = lo; j < n; ++j) {
    row[j] = vexp(row[j] - mx);
    sum += row[j];
  }
  const float inv = 1.f / sum;
#pragma omp simd
  for (int64_t j = 0; j < P; ++j) pre[j] *= inv;
#pragma omp simd
  for (int64_t j = lo; j < n; ++j) row[j] *= inv;
  std::fill(row, row + lo, 0.f);
  std::fill(row + n, row + nk, 0.f);
  return mx + std::log(sum);
}

// The backward's row over the sequence's keys: scores pr become probabilities exp(s - m) and
// dr (dP) becomes dS = P (dP - D) scale on [lo, n); both are zero on the rest of the nk columns.
void grad_row(float* pr, float* dr, int64_t lo, int64_t n, int64_t nk, float m, float D,
              float scale) {
#pragma omp simd
  for (int64_t j = lo; j < n; ++j) {
    pr[j] = vexp(pr[j] - m);
    dr[j] = pr[j] * (dr[j] - D) * scale;
  }
  std::fill(pr, pr + lo, 0.f);
  std::fill(dr, dr + lo, 0.f);
  std::fill(pr + n, pr + nk, 0.f);
  std::fill(dr + n, dr + nk, 0.f);
}

// The bf16 tiles' key count rounded up to whole blocks (the extra keys get probability 0), so
// the GEMMs take at most S / kBlock shapes whatever the prefix lengths.
int64_t padded(const AttentionShape& a, int64_t nk) {
  return std::min(a.S, (nk + kBlock - 1) / kBlock * kBlock);
}

}  // namespace

namespace {

// Mask 4 (serving): every query has its own key range, e.g. one slot of a batch of KV caches
// seen as one sequence; one row at a time, reading only its range (and the prefix rows).
void attention_fwd_ranges(Scratch& s, const AttentionShape& a, const float* q, const float* k,
                          const float* v, const float* pk, const float* pv, const int32_t* ranges,
                          float* y, float* lse) {
  const int nt = omp_get_max_threads();
  const int64_t P = a.P, ldp = a.G * a.hd, tasks = a.B * a.T * a.H;
  float* scratch = s.get(s.c, size_t(nt) * size_t(a.S + P));
#pragma omp parallel for schedule(dynamic)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t h = task % a.H, t = task / a.H % a.T, b = task / (a.H * a.T), g = h / a.group();
    const int64_t hi = a.range_end(ranges, b, t), lo = a.first(ranges, b, t), n = hi - lo;
    float* row = scratch + size_t(omp_get_thread_num()) * size_t(a.S + P);
    if (P > 0)
      sgemm(false, true, 1, P, a.hd, a.scale, q + a.q(b, t, h), a.ldq, pk + g * a.hd, ldp, 0.f, row,
            P);
    sgemm(false, true, 1, n, a.hd, a.scale, q + a.q(b, t, h), a.ldq, k + a.k(b, lo, g), a.ldk, 0.f,
          row + P, n);
    float mx = row[0];
    for (int64_t j = 1; j < P + n; ++j) mx = std::max(mx, row[j]);
    float sum = 0.f;
    for (int64_t j = 0; j < P + n; ++j) sum += row[j] = vexp(row[j] - mx);
    for (int64_t j = 0; j < P + n; ++j) row[j] /= sum;
    if (lse) lse[a.lse(b, t, h)] = mx + std::log(sum);
    float* yr = y + a.y(b, t, h);
    if (P > 0) sgemm(false, false, 1, a.hd, P, 1.f, row, P, pv + g * a.hd, ldp, 0.f, yr, a.hd);
    sgemm(false, false, 1, a.hd, n, 1.f, row + P, n, v + a.v(b, lo, g), a.ldv, P > 0 ? 1.f : 0.f,
          yr, a.hd);
  }
}

// Mask 5 (serving's paged KV cache): query row t sees keys 0..n-1 of its own request, key j at
// row block[j / bs] * bs + j % bs. Consecutive rows with the same block table (one request's
// prefill chunk, up to kBlock rows) form a group: per kv head its keys and values are gathered
// once into contiguous scratch, and each of the group's heads is two GEMMs over them, every row
// masked to its own n. A decoding request is a group of one row.
void attention_fwd_paged(Scratch& s, const AttentionShape& a, const float* q, const float* k,
                         const float* v, const float* pk, const float* pv, const int32_t* table,
                         float* y, float* lse) {
  const int nt = omp_get_max_threads();
  const int64_t P = a.P, ldp = a.G * a.hd, hd = a.hd, tw = a.tw, most = P + (tw - 1) * a.bs;
  // Group starts, in scratch (no allocation per call): a new group where the table changes.
  int64_t* starts = reinterpret_cast<int64_t*>(s.get(s.b, size_t(2 * (a.T + 1))));
  int64_t groups = 0;
  for (int64_t t = 0; t < a.T; ++t)
    if (t == 0 || t - starts[groups - 1] == kBlock ||
        !std::equal(table + t * tw + 1, table + (t + 1) * tw, table + (t - 1) * tw + 1))
      starts[groups++] = t;
  starts[groups] = a.T;
  const size_t per = size_t(2 * most * hd + kBlock * most);
  float* scratch = s.get(s.c, size_t(nt) * per);
#pragma omp parallel for schedule(dynamic)
  for (int64_t task = 0; task < groups * a.G; ++task) {
    const int64_t gi = task / a.G, g = task % a.G, t0 = starts[gi], m = starts[gi + 1] - t0;
    int64_t n = 0;
    for (int64_t t = t0; t < t0 + m; ++t) n = std::max(n, a.paged_n(table, 0, t));
    const int64_t nk = P + n;
    float* kc = scratch + size_t(omp_get_thread_num()) * per;
    float* vc = kc + most * hd;
    float* sc = vc + most * hd;
    for (int64_t j = 0; j < P; ++j) {
      std::memcpy(kc + j * hd, pk + j * ldp + g * hd, size_t(hd) * 4);
      std::memcpy(vc + j * hd, pv + j * ldp + g * hd, size_t(hd) * 4);
    }
    for (int64_t j = 0; j < n; ++j) {
      const int64_t row = a.paged_row(table, 0, t0, j);
      std::memcpy(kc + (P + j) * hd, k + a.k(0, row, g), size_t(hd) * 4);
      std::memcpy(vc + (P + j) * hd, v + a.v(0, row, g), size_t(hd) * 4);
    }
    for (int64_t h = g * a.group(); h < (g + 1) * a.group(); ++h) {
      sgemm(false, true, m, nk, hd, a.scale, q + a.q(0, t0, h), a.ldq, kc, hd, 0.f, sc, nk);
      for (int64_t r = 0; r < m; ++r) {
        float* row = sc + r * nk;
        const int64_t valid = P + a.paged_n(table, 0, t0 + r);
        float mx = row[0];
        for (int64_t j = 1; j < valid; ++j) mx = std::max(mx, row[j]);
        float sum = 0.f;
        for (int64_t j = 0; j < valid; ++j) sum += row[j] = vexp(row[j] - mx);
        const float inv = 1.f / sum;
#pragma omp simd
        for (int64_t j = 0; j < valid; ++j) row[j] *= inv;
        std::fill(row + valid, row + nk, 0.f);
        if (lse) lse[a.lse(0, t0 + r, h)] = mx + std::log(sum);
      }
      sgemm(false, false, m, hd, nk, 1.f, sc, nk, vc, hd, 0.f, y + a.y(0, t0, h), a.H * hd);
    }
  }
}

}  // namespace

void attention_fwd(Scratch& s, const AttentionShape& a, const float* q, const float* k,
                   const float* v, const float* pk, const float* pv, const int32_t* prefix,
                   float* y, float* lse) {
  if (a.mask == MXN_MASK_CACHED) return attention_fwd_ranges(s, a, q, k, v, pk, pv, prefix, y, lse);
  if (a.mask == MXN_MASK_PAGED) return attention_fwd_paged(s, a, q, k, v, pk, pv, prefix, y, lse);
  const int nt = omp_get_max_threads();
  const int64_t nblk = (a.T + kBlock - 1) / kBlock, tasks = a.B * a.H * nblk, P = a.P;
  const int64_t ldp = a.G * a.hd;  // prefix keys and values: (P, G*hd)
  float* scratch = s.get(s.c, size_t(nt) * kBlock * (a.S + P));
#pragma omp parallel for schedule(dynamic)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t b = task / (a.H * nblk), h = task / nblk % a.H, t0 = task % nblk * kBlock;
    const int64_t t1 = std::min(a.T, t0 + kBlock), rows = t1 - t0, g = h / a.group();
    const int64_t pre = a.prefix_of(prefix, b),
                  nk = a.visible(t1 - 1, pre);  // visibility grows with t
    // Scores of a row: the P prefix keys, then the sequence's nk keys (ld = P + nk).
    const int64_t ld = P + nk;
    float* sc = scratch + size_t(omp_get_thread_num()) * kBlock * (a.S + P);
    if (P > 0)
      sgemm(false, true, rows, P, a.hd, a.scale, q + a.q(b, t0, h), a.ldq, pk + g * a.hd, ldp, 0.f,
            sc, ld);
    sgemm(false, true, rows, nk, a.hd, a.scale, q + a.q(b, t0, h), a.ldq, k + a.k(b, 0, g), a.ldk,
          0.f, sc + P, ld);
    for (int64_t r = 0; r < rows; ++r) {
      float* pre_row = sc + r * ld;
      float* row = pre_row + P;
      const int64_t n = a.visible(t0 + r, pre), lo = a.first(prefix, b, t0 + r);
      const float l = softmax_row(pre_row, P, row, lo, n, nk);
      if (lse) lse[a.lse(b, t0 + r, h)] = l;
    }
    if (P > 0)
      sgemm(false, false, rows, a.hd, P, 1.f, sc, ld, pv + g * a.hd, ldp, 0.f, y + a.y(b, t0, h),
            a.H * a.hd);
    sgemm(false, false, rows, a.hd, nk, 1.f, sc + P, ld, v + a.v(b, 0, g), a.ldv, P > 0 ? 1.f : 0.f,
          y + a.y(b, t0, h), a.H * a.hd);
  }
}

void attention_bwd(Scratch& s, const AttentionShape& a, const float* dy, const float* q,
                   const float* k, const float* v, const float* y, const float* lse,
                   const float* pk, const float* pv, const int32_t* prefix, float* dq, float* dk,
                   float* dv, float* dpk, float* dpv) {
  const int nt = omp_get_max_threads();
  const int64_t BH = a.B * a.H, hd = a.hd, rows_kv = a.kv_rows, P = a.P, ldp = a.G * a.hd;
  // With grouped heads every query head's dK and dV go to private (kv_rows x hd) slabs first and
  // are summed over the group in a fixed order afterwards: deterministic, no atomics. The prefix
  // keys' and values' gradients (shared by all sequences) likewise, per (sequence, head).
  const bool grouped = a.G != a.H;
  float* sc = s.get(s.c, size_t(nt) * 2 * kBlock * (a.S + P));
  float* priv = grouped ? s.get(s.b, size_t(BH) * 2 * rows_kv * hd) : nullptr;
  float* ppriv = P > 0 ? s.get(s.a, size_t(BH) * 2 * P * hd) : nullptr;
#pragma omp parallel for schedule(dynamic)
  for (int64_t bh = 0; bh < BH; ++bh) {
    const int64_t b = bh / a.H, h = bh % a.H, g = h / a.group();
    const int64_t pre = a.prefix_of(prefix, b);
    float* Pr = sc + size_t(omp_get_thread_num()) * 2 * kBlock * (a.S + P);
    float* dP = Pr + kBlock * (a.S + P);
    float* dpkh = ppriv ? ppriv + size_t(bh) * 2 * P * hd : nullptr;
    float* dpvh = dpkh ? dpkh + P * hd : nullptr;
    if (dpkh) std::fill_n(dpkh, 2 * P * hd, 0.f);
    float *dkh, *dvh;
    int64_t ldk, ldv;
    if (grouped) {
      dkh = priv + size_t(bh) * 2 * rows_kv * hd;
      dvh = dkh + rows_kv * hd;
      ldk = ldv = hd;
    } else {
      dkh = dk + a.k(b, 0, g);
      dvh = dv + a.v(b, 0, g);
      ldk = a.ldk;
      ldv = a.ldv;
    }
    for (int64_t j = 0; j < rows_kv; ++j) {
      std::fill_n(dkh + j * ldk, hd, 0.f);
      std::fill_n(dvh + j * ldv, hd, 0.f);
    }
    for (int64_t t0 = 0; t0 < a.T; t0 += kBlock) {
      const int64_t t1 = std::min(a.T, t0 + kBlock), rows = t1 - t0;
      const int64_t nk = a.visible(t1 - 1, pre);  // visibility grows with t
      const int64_t ld = P + nk;                  // the prefix's columns first
      const float* qb = q + a.q(b, t0, h);
      const float* dyb = dy + a.y(b, t0, h);
      if (P > 0) {
        sgemm(false, true, rows, P, hd, a.scale, qb, a.ldq, pk + g * hd, ldp, 0.f, Pr, ld);
        sgemm(false, true, rows, P, hd, 1.f, dyb, a.H * hd, pv + g * hd, ldp, 0.f, dP, ld);
      }
      sgemm(false, true, rows, nk, hd, a.scale, qb, a.ldq, k + a.k(b, 0, g), a.ldk, 0.f, Pr + P,
            ld);
      sgemm(false, true, rows, nk, hd, 1.f, dyb, a.H * hd, v + a.v(b, 0, g), a.ldv, 0.f, dP + P,
            ld);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t n = a.visible(t0 + r, pre), lo = a.first(prefix, b, t0 + r);
        const float m = lse[a.lse(b, t0 + r, h)];
        const float* yr = y + a.y(b, t0 + r, h);
        const float* dyr = dyb + r * a.H * hd;
        float D = 0.f;  // sum_j P dP = <dY, Y> for this row
#pragma omp simd reduction(+ : D)
        for (int64_t c = 0; c < hd; ++c) D += dyr[c] * yr[c];
        float* ppr = Pr + r * ld;
        float* pdr = dP + r * ld;
#pragma omp simd
        for (int64_t j = 0; j < P; ++j) {
          ppr[j] = vexp(ppr[j] - m);
          pdr[j] = ppr[j] * (pdr[j] - D) * a.scale;
        }
        grad_row(ppr + P, pdr + P, lo, n, nk, m, D, a.scale);
      }
      sgemm(true, false, nk, hd, rows, 1.f, Pr + P, ld, dyb, a.H * hd, 1.f, dvh,
            ldv);  // dV += P^T dY
      sgemm(false, false, rows, hd, nk, 1.f, dP + P, ld, k + a.k(b, 0, g), a.ldk, 0.f,  // dQ = dS K
            dq + a.q(b, t0, h), a.ldq);
      sgemm(true, false, nk, hd, rows, 1.f, dP + P, ld, qb, a.ldq, 1.f, dkh, ldk);  // dK += dS^T Q
      if (P > 0) {
        sgemm(false, false, rows, hd, P, 1.f, dP, ld, pk + g * hd, ldp, 1.f, dq + a.q(b, t0, h),
              a.ldq);  // dQ += dS_p PK
        sgemm(true, false, P, hd, rows, 1.f, Pr, ld, dyb, a.H * hd, 1.f, dpvh, hd);  // dPV
        sgemm(true, false, P, hd, rows, 1.f, dP, ld, qb, a.ldq, 1.f, dpkh, hd);      // dPK
      }
    }
  }
  if (P > 0) {  // the prefix's gradients: each (row, kv head) summed over sequences and heads
#pragma omp parallel for schedule(static)
    for (int64_t pg = 0; pg < P * a.G; ++pg) {
      const int64_t p = pg / a.G, g = pg % a.G;
      float* dkr = dpk + p * ldp + g * hd;
      float* dvr = dpv + p * ldp + g * hd;
      std::fill_n(dkr, hd, 0.f);
      std::fill_n(dvr, hd, 0.f);
      for (int64_t b = 0; b < a.B; ++b)
        for (int64_t i = 0; i < a.group(); ++i) {
          const float* src = ppriv + size_t(b * a.H + g * a.group() + i) * 2 * P * hd + p * hd;
          for (int64_t c = 0; c < hd; ++c) {
            dkr[c] += src[c];
            dvr[c] += src[P * hd + c];
          }
        }
    }
  }
  if (grouped) sum_groups(a, priv, dk, dv);
}

void attention_fwd_bf16(Scratch& s, const AttentionShape& a, const uint16_t* q, const uint16_t* k,
                        const uint16_t* v, const int32_t* prefix, float* y, float* lse) {
  const int nt = omp_get_max_threads();
  const int64_t nblk = (a.T + kBlock - 1) / kBlock, tasks = a.B * a.H * nblk;
  const size_t per = size_t(kBlock) * size_t(a.S);
  float* scores = s.get(s.c, size_t(nt) * per);
  uint16_t* probs = s.get(s.t16, size_t(nt) * per);
#pragma omp parallel for schedule(dynamic)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t b = task / (a.H * nblk), h = task / nblk % a.H, t0 = task % nblk * kBlock;
    const int64_t t1 = std::min(a.T, t0 + kBlock), rows = t1 - t0, g = h / a.group();
    const int64_t pre = a.prefix_of(prefix, b), nk = padded(a, a.visible(t1 - 1, pre));
    float* sc = scores + size_t(omp_get_thread_num()) * per;
    uint16_t* p16 = probs + size_t(omp_get_thread_num()) * per;
    gemm_bf16(false, true, rows, nk, a.hd, a.scale, q + a.q(b, t0, h), a.ldq, k + a.k(b, 0, g),
              a.ldk, false, sc, nk);
    for (int64_t r = 0; r < rows; ++r) {
      float* row = sc + r * nk;
      const int64_t n = a.visible(t0 + r, pre), lo = a.first(prefix, b, t0 + r);
      const float l = softmax_row(nullptr, 0, row, lo, n, nk);
      to_bf16_here(row, p16 + r * nk, nk);
      if (lse) lse[a.lse(b, t0 + r, h)] = l;
    }
    gemm_bf16(false, false, rows, a.hd, nk, 1.f, p16, nk, v + a.v(b, 0, g), a.ldv, false,
              y + a.y(b, t0, h), a.H * a.hd);
  }
}

void attention_bwd_bf16(Scratch& s, const AttentionShape& a, const float* dy, const uint16_t* q,
                        const uint16_t* k, const uint16_t* v, const float* y, const float* lse,
                        const int32_t* prefix, float* dq, float* dk, float* dv) {
  const int nt = omp_get_max_threads();
  const int64_t BH = a.B * a.H, hd = a.hd, rows_kv = a.kv_rows;
  const bool grouped = a.G != a.H;  // private dK, dV slabs summed afterwards, as attention_bwd
  const size_t per = size_t(kBlock) * size_t(a.S);
  float* sc = s.get(s.c, size_t(nt) * 2 * per);
  uint16_t* sc16 = s.get(s.t16, size_t(nt) * (2 * per + size_t(kBlock * hd)));
  float* priv = grouped ? s.get(s.b, size_t(BH) * 2 * rows_kv * hd) : nullptr;
#pragma omp parallel for schedule(dynamic)
  for (int64_t bh = 0; bh < BH; ++bh) {
    const int64_t b = bh / a.H, h = bh % a.H, g = h / a.group();
    const int64_t pre = a.prefix_of(prefix, b);
    float* Pr = sc + size_t(omp_get_thread_num()) * 2 * per;
    float* dP = Pr + per;
    uint16_t* p16 = sc16 + size_t(omp_get_thread_num()) * (2 * per + size_t(kBlock * hd));
    uint16_t* ds16 = p16 + per;
    uint16_t* dy16 = ds16 + per;
    float* dkh = grouped ? priv + size_t(bh) * 2 * rows_kv * hd : dk + a.k(b, 0, g);
    float* dvh = grouped ? dkh + rows_kv * hd : dv + a.v(b, 0, g);
    const int64_t ldk = grouped ? hd : a.ldk, ldv = grouped ? hd : a.ldv;
    for (int64_t j = 0; j < rows_kv; ++j) {
      std::fill_n(dkh + j * ldk, hd, 0.f);
      std::fill_n(dvh + j * ldv, hd, 0.f);
    }
    for (int64_t t0 = 0; t0 < a.T; t0 += kBlock) {
      const int64_t t1 = std::min(a.T, t0 + kBlock), rows = t1 - t0;
      const int64_t nk = padded(a, a.visible(t1 - 1, pre));
      const uint16_t* qb = q + a.q(b, t0, h);
      const float* dyb = dy + a.y(b, t0, h);
      for (int64_t r = 0; r < rows; ++r) to_bf16_here(dyb + r * a.H * hd, dy16 + r * hd, hd);
      gemm_bf16(false, true, rows, nk, hd, a.scale, qb, a.ldq, k + a.k(b, 0, g), a.ldk, false, Pr,
                nk);
      gemm_bf16(false, true, rows, nk, hd, 1.f, dy16, hd, v + a.v(b, 0, g), a.ldv, false, dP, nk);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t n = a.visible(t0 + r, pre), lo = a.first(prefix, b, t0 + r);
        const float m = lse[a.lse(b, t0 + r, h)];
        const float* yr = y + a.y(b, t0 + r, h);
        const uint16_t* dyr = dy16 + r * hd;  // the dY that dP was made from
        float D = 0.f;                        // sum_j P dP = <dY, Y> for this row
#pragma omp simd reduction(+ : D)
        for (int64_t c = 0; c < hd; ++c) D += widen(dyr[c]) * yr[c];
        grad_row(Pr + r * nk, dP + r * nk, lo, n, nk, m, D, a.scale);
        to_bf16_here(Pr + r * nk, p16 + r * nk, nk);
        to_bf16_here(dP + r * nk, ds16 + r * nk, nk);
      }
      // dV += P^T dY, dQ = dS K, dK += dS^T Q
      gemm_bf16(true, false, nk, hd, rows, 1.f, p16, nk, dy16, hd, true, dvh, ldv);
      gemm_bf16(false, false, rows, hd, nk, 1.f, ds16, nk, k + a.k(b, 0, g), a.ldk, false,
                dq + a.q(b, t0, h), a.ldq);
      gemm_bf16(true, false, nk, hd, rows, 1.f, ds16, nk, qb, a.ldq, true, dkh, ldk);
    }
  }
  if (grouped) sum_groups(a, priv, dk, dv);
}

}  // namespace mxn::cpu
