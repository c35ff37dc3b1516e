// The CPU's mixture-of-experts kernels (ABI 9): routing with the stable counting sort into expert
// order, the permutation and the weighted scatter back, and the grouped GEMM (one oneDNN GEMM per
// expert over its rows, inside one op call).
#include <omp.h>

#include <algorithm>
#include <cstring>

#include "backend/cpu/kernels.h"
#include "backend/moe_route.h"

namespace mxn::cpu {

void moe_route(Scratch& s, const MoeRouteShape& r, const MoeRouteParams& p, const float* logits,
               const float* bias, float* w, int32_t* ids, int32_t* pos, int32_t* offsets,
               float* aux) {
  const int64_t N = r.N, E = r.E, K = r.K;
  float* scores = s.get(s.a, size_t(N * E));
  // each thread's E bytes of "taken" flags, in scratch (no allocation once it has grown)
  auto* flags = reinterpret_cast<uint8_t*>(s.get(s.rows, size_t(omp_get_max_threads() * E)));
#pragma omp parallel
  {
    uint8_t* taken = flags + omp_get_thread_num() * E;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < N; ++t)
      moe_route_token(logits + t * E, bias, E, p, scores + t * E, taken, ids + t * K, w + t * K);
  }
  // The stable counting sort of the N*K slots by expert.
  for (int64_t e = 0; e <= E; ++e) offsets[e] = 0;
  for (int64_t i = 0; i < N * K; ++i) ++offsets[ids[i] + 1];
  for (int64_t e = 0; e < E; ++e) offsets[e + 1] += offsets[e];
  int32_t* next = reinterpret_cast<int32_t*>(s.get(s.b, size_t(E)));
  for (int64_t e = 0; e < E; ++e) next[e] = offsets[e];
  for (int64_t i = 0; i < N * K; ++i) pos[i] = next[ids[i]]++;
  if (!aux) return;
  double loss = 0;  // E * sum_e (count_e / N) * mean_t s[t, e]
  for (int64_t e = 0; e < E; ++e) {
    double mean = 0;
    for (int64_t t = 0; t < N; ++t) mean += scores[t * E + e];
    loss += double(offsets[e + 1] - offsets[e]) / double(N) * mean / double(N);
  }
  *aux = float(double(E) * loss);
}

void moe_route_bwd(Scratch& s, const MoeRouteShape& r, const MoeRouteParams& p, const float* dw,
                   const float* logits, const int32_t* ids, const float* daux, float* dlogits) {
  const int64_t N = r.N, E = r.E, K = r.K;
  float* extra = nullptr;
  if (daux) {  // d(aux)/d(s[t, e]) = daux * E * count_e / N^2, the same for every token
    extra = s.get(s.c, size_t(E));
    for (int64_t e = 0; e < E; ++e) extra[e] = 0.f;
    for (int64_t i = 0; i < N * K; ++i) extra[ids[i]] += 1.f;
    for (int64_t e = 0; e < E; ++e) extra[e] *= *daux * float(E) / (float(N) * float(N));
  }
  float* per_thread = s.get(s.wide, size_t(omp_get_max_threads() * 2 * E));
#pragma omp parallel
  {
    float* sc = per_thread + omp_get_thread_num() * 2 * E;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < N; ++t)
      moe_route_token_bwd(dw + t * K, logits + t * E, ids + t * K, E, p, extra, sc, sc + E,
                          dlogits + t * E);
  }
}

void moe_permute(const MoePermuteShape& m, const float* x, const int32_t* pos, const float* w,
                 float* xp) {
  const int64_t C = m.C, K = m.K;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < m.N * K; ++i) {
    const float* src = x + (i / K) * C;
    float* dst = xp + int64_t(pos[i]) * C;
    if (!w) {
      std::memcpy(dst, src, size_t(C) * 4);
      continue;
    }
    const float f = w[i];
    for (int64_t c = 0; c < C; ++c) dst[c] = src[c] * f;
  }
}

void moe_unpermute(const MoePermuteShape& m, const float* yp, const int32_t* pos, const float* w,
                   float* y) {
  const int64_t C = m.C, K = m.K;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < m.N; ++t) {
    float* out = y + t * C;
    for (int64_t k = 0; k < K; ++k) {
      const float* src = yp + int64_t(pos[t * K + k]) * C;
      const float f = w ? w[t * K + k] : 1.f;
      if (k == 0)
        for (int64_t c = 0; c < C; ++c) out[c] = src[c] * f;
      else
        for (int64_t c = 0; c < C; ++c) out[c] += src[c] * f;
    }
  }
}

void moe_unpermute_bwd(const MoePermuteShape& m, const float* dy, const float* yp,
                       const int32_t* pos, float* dw) {
  const int64_t C = m.C, K = m.K;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < m.N * K; ++i) {
    const float *a = dy + (i / K) * C, *b = yp + int64_t(pos[i]) * C;
    float d = 0.f;
    for (int64_t c = 0; c < C; ++c) d += a[c] * b[c];
    dw[i] = d;
  }
}

// The experts (tb) with exactly one row (decoding one token: every expert it picked), in one
// gemv_rows pass, up to 64 at a time; the others are left to the caller's GEMMs.
template <typename W>
void single_rows(const GroupedMatmulShape& g, const float* a, const W* b, const int32_t* offsets,
                 float* out) {
  constexpr int kMax = 64;
  const float* x[kMax];
  const W* B[kMax];
  float* y[kMax];
  int n = 0;
  for (int64_t e = 0; e <= g.E; ++e) {
    int64_t lo = 0, hi = 0;
    if (e < g.E) expert_rows(offsets, e, g.M, &lo, &hi);
    if (hi - lo == 1) x[n] = a + lo * g.K, B[n] = b + e * g.N * g.K, y[n++] = out + lo * g.N;
    if (n == kMax || (e == g.E && n)) gemv_rows(n, g.N, g.K, 1.f, x, B, false, y), n = 0;
  }
}

void grouped_matmul(const GroupedMatmulShape& g, const float* a, const float* b,
                    const int32_t* offsets, float* out) {
  const int64_t M = g.M, N = g.N, K = g.K;
  const bool singles = !g.weight_grad && g.tb;
  if (singles) single_rows(g, a, b, offsets, out);
  for (int64_t e = 0; e < g.E; ++e) {
    int64_t lo, hi;
    expert_rows(offsets, e, M, &lo, &hi);
    if (singles && hi - lo == 1) continue;
    if (g.weight_grad) {  // out[e] (N x K) = a_e^T (N x rows) b_e (rows x K)
      float* o = out + e * N * K;
      if (hi == lo) {
        if (!g.accumulate) std::memset(o, 0, size_t(N * K) * 4);
        continue;
      }
      sgemm(true, false, N, K, hi - lo, 1.f, a + lo * N, N, b + lo * K, K, g.accumulate ? 1.f : 0.f,
            o, K);
      continue;
    }
    if (hi == lo) continue;
    sgemm(false, g.tb, hi - lo, N, K, 1.f, a + lo * K, K, b + e * N * K, g.tb ? K : N, 0.f,
          out + lo * N, N);
  }
  if (!g.weight_grad) {  // rows no expert covers (offsets that end early) are zero
    int64_t lo, hi;
    expert_rows(offsets, g.E - 1, M, &lo, &hi);
    if (hi < M) std::memset(out + hi * N, 0, size_t((M - hi) * N) * 4);
  }
}

void grouped_matmul_bf16(Scratch& s, const GroupedMatmulShape& g, Compute compute, const float* a,
                         const uint16_t* b, const int32_t* offsets, float* out) {
  const int64_t M = g.M, N = g.N, K = g.K;
  int64_t covered = 0;
  if (g.tb) single_rows(g, a, b, offsets, out);
  for (int64_t e = 0; e < g.E; ++e) {
    int64_t lo, hi;
    expert_rows(offsets, e, M, &lo, &hi);
    covered = std::max(covered, hi);
    if (hi - lo >
        (g.tb ? 1
              : 0))  // one row: B streamed as bf16; more: bf16 GEMM (compute bf16) or widened once
      matmul_bf16_weights(s, compute, false, g.tb, 1, hi - lo, N, K, 1.f, a + lo * K, 0,
                          b + e * N * K, 0, false, out + lo * N, 0);
  }
  if (covered < M) std::memset(out + covered * N, 0, size_t((M - covered) * N) * 4);
}

}  // namespace mxn::cpu
