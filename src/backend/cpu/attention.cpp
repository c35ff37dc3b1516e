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

}  // namespace

void attention_fwd(Scratch& s, const AttentionShape& a, const float* q, const float* k,
                   const float* v, const int32_t* prefix, float* y, float* lse) {
  const int nt = omp_get_max_threads();
  const int64_t nblk = (a.T + kBlock - 1) / kBlock, tasks = a.B * a.H * nblk;
  float* scratch = s.get(s.c, size_t(nt) * kBlock * a.S);
#pragma omp parallel for schedule(dynamic)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t b = task / (a.H * nblk), h = task / nblk % a.H, t0 = task % nblk * kBlock;
    const int64_t t1 = std::min(a.T, t0 + kBlock), rows = t1 - t0, g = h / a.group();
    const int64_t pre = a.prefix_of(prefix, b),
                  nk = a.visible(t1 - 1, pre);  // visibility grows with t
    float* sc = scratch + size_t(omp_get_thread_num()) * kBlock * a.S;
    sgemm(false, true, rows, nk, a.hd, a.scale, q + a.q(b, t0, h), a.ldq, k + a.k(b, 0, g), a.ldk,
          0.f, sc, nk);
    for (int64_t r = 0; r < rows; ++r) {
      float* row = sc + r * nk;
      const int64_t n = a.visible(t0 + r, pre), lo = a.first(prefix, b, t0 + r);
      float mx = row[lo];
      for (int64_t j = lo + 1; j < n; ++j) mx = std::max(mx, row[j]);
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = lo; j < n; ++j) {
        row[j] = vexp(row[j] - mx);
        sum += row[j];
      }
      const float inv = 1.f / sum;
#pragma omp simd
      for (int64_t j = lo; j < n; ++j) row[j] *= inv;
      std::fill(row, row + lo, 0.f);
      std::fill(row + n, row + nk, 0.f);
      if (lse) lse[a.lse(b, t0 + r, h)] = mx + std::log(sum);
    }
    sgemm(false, false, rows, a.hd, nk, 1.f, sc, nk, v + a.v(b, 0, g), a.ldv, 0.f,
          y + a.y(b, t0, h), a.H * a.hd);
  }
}

void attention_bwd(Scratch& s, const AttentionShape& a, const float* dy, const float* q,
                   const float* k, const float* v, const float* y, const float* lse,
                   const int32_t* prefix, float* dq, float* dk, float* dv) {
  const int nt = omp_get_max_threads();
  const int64_t BH = a.B * a.H, hd = a.hd, rows_kv = a.kv_rows;
  // With grouped heads every query head's dK and dV go to private (kv_rows x hd) slabs first and
  // are summed over the group in a fixed order afterwards: deterministic, no atomics.
  const bool grouped = a.G != a.H;
  float* sc = s.get(s.c, size_t(nt) * 2 * kBlock * a.S);
  float* priv = grouped ? s.get(s.b, size_t(BH) * 2 * rows_kv * hd) : nullptr;
#pragma omp parallel for schedule(dynamic)
  for (int64_t bh = 0; bh < BH; ++bh) {
    const int64_t b = bh / a.H, h = bh % a.H, g = h / a.group();
    const int64_t pre = a.prefix_of(prefix, b);
    float* P = sc + size_t(omp_get_thread_num()) * 2 * kBlock * a.S;
    float* dP = P + kBlock * a.S;
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
      const float* qb = q + a.q(b, t0, h);
      const float* dyb = dy + a.y(b, t0, h);
      sgemm(false, true, rows, nk, hd, a.scale, qb, a.ldq, k + a.k(b, 0, g), a.ldk, 0.f, P, nk);
      sgemm(false, true, rows, nk, hd, 1.f, dyb, a.H * hd, v + a.v(b, 0, g), a.ldv, 0.f, dP, nk);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t n = a.visible(t0 + r, pre), lo = a.first(prefix, b, t0 + r);
        const float m = lse[a.lse(b, t0 + r, h)];
        const float* yr = y + a.y(b, t0 + r, h);
        const float* dyr = dyb + r * a.H * hd;
        float D = 0.f;  // sum_j P dP = <dY, Y> for this row
#pragma omp simd reduction(+ : D)
        for (int64_t c = 0; c < hd; ++c) D += dyr[c] * yr[c];
        float* pr = P + r * nk;
        float* dr = dP + r * nk;
#pragma omp simd
        for (int64_t j = lo; j < n; ++j) {
          pr[j] = vexp(pr[j] - m);
          dr[j] = pr[j] * (dr[j] - D) * a.scale;
        }
        std::fill(pr, pr + lo, 0.f);
        std::fill(dr, dr + lo, 0.f);
        std::fill(pr + n, pr + nk, 0.f);
        std::fill(dr + n, dr + nk, 0.f);
      }
      sgemm(true, false, nk, hd, rows, 1.f, P, nk, dyb, a.H * hd, 1.f, dvh, ldv);   // dV += P^T dY
      sgemm(false, false, rows, hd, nk, 1.f, dP, nk, k + a.k(b, 0, g), a.ldk, 0.f,  // dQ = dS K
            dq + a.q(b, t0, h), a.ldq);
      sgemm(true, false, nk, hd, rows, 1.f, dP, nk, qb, a.ldq, 1.f, dkh, ldk);  // dK += dS^T Q
    }
  }
  if (!grouped) return;
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

}  // namespace mxn::cpu
