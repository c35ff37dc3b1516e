#pragma once
// The CUDA kernels of ABI 9's mixture-of-experts ops: routing one thread a token (moe_route.h's
// arithmetic, shared with the CPU), the stable sort into expert order one thread an expert, the
// permutations and the grouped GEMM one thread an output element (a row finds its expert by
// binary search over the offsets on the device: no host round trip). Grid-stride loops as
// kernels.cuh. The grouped GEMM is the plain form; a tiled one (or CUTLASS's grouped GEMM) is the
// GPU issue's.
#include <cstdint>

#include "backend/cuda/vendor.h"
#include "backend/moe_route.h"

namespace mxn::cuda {

__global__ void k_moe_route(const float* logits, const float* bias, int64_t N, int64_t E,
                            MoeRouteParams p, float* scores, uint8_t* flags, float* w,
                            int32_t* ids) {
  MXN_LOOP(t, N)
  moe_route_token(logits + t * E, bias, E, p, scores + t * E, flags + t * E, ids + t * p.k,
                  w + t * p.k);
}
__global__ void k_moe_count(const int32_t* ids, int64_t n, int64_t E, int32_t* cnt) {
  MXN_LOOP(e, E) {
    int32_t c = 0;
    for (int64_t i = 0; i < n; ++i) c += ids[i] == e;
    cnt[e] = c;
  }
}
__global__ void k_moe_offsets(const int32_t* cnt, int64_t E, int32_t* off) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  int32_t acc = 0;
  off[0] = 0;
  for (int64_t e = 0; e < E; ++e) off[e + 1] = acc += cnt[e];
}
__global__ void k_moe_positions(const int32_t* ids, int64_t n, int64_t E, const int32_t* off,
                                int32_t* pos) {
  MXN_LOOP(e, E) {
    int32_t next = off[e];
    for (int64_t i = 0; i < n; ++i)
      if (ids[i] == e) pos[i] = next++;
  }
}
__global__ void k_moe_aux(const float* scores, const int32_t* cnt, int64_t N, int64_t E,
                          float* aux) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  float loss = 0.f;
  for (int64_t e = 0; e < E; ++e) {
    float mean = 0.f;
    for (int64_t t = 0; t < N; ++t) mean += scores[t * E + e];
    loss += float(cnt[e]) / float(N) * mean / float(N);
  }
  *aux = float(E) * loss;
}
// extra: the aux loss's d(scores) per expert (daux * E * count_e / N^2), or null.
__global__ void k_moe_extra(const int32_t* cnt, const float* daux, int64_t N, int64_t E,
                            float* extra) {
  MXN_LOOP(e, E) extra[e] = *daux * float(E) * float(cnt[e]) / (float(N) * float(N));
}
__global__ void k_moe_route_bwd(const float* dw, const float* logits, const int32_t* ids,
                                const float* extra, int64_t N, int64_t E, MoeRouteParams p,
                                float* scratch, float* dlogits) {
  MXN_LOOP(t, N)
  moe_route_token_bwd(dw + t * p.k, logits + t * E, ids + t * p.k, E, p, extra,
                      scratch + t * 2 * E, scratch + t * 2 * E + E, dlogits + t * E);
}
__device__ inline int64_t moe_row(const int32_t* pos, int64_t i, int64_t NK) {
  const int64_t r = pos[i];
  return r < 0 ? 0 : r >= NK ? NK - 1 : r;
}
__global__ void k_moe_permute(const float* x, const int32_t* pos, const float* w, float* xp,
                              int64_t N, int64_t C, int64_t K) {
  MXN_LOOP(g, N * K * C) {
    const int64_t i = g / C, c = g % C;
    xp[moe_row(pos, i, N * K) * C + c] = x[(i / K) * C + c] * (w ? w[i] : 1.f);
  }
}
__global__ void k_moe_unpermute(const float* yp, const int32_t* pos, const float* w, float* y,
                                int64_t N, int64_t C, int64_t K) {
  MXN_LOOP(g, N * C) {
    const int64_t t = g / C, c = g % C;
    float acc = 0.f;
    for (int64_t k = 0; k < K; ++k)
      acc += yp[moe_row(pos, t * K + k, N * K) * C + c] * (w ? w[t * K + k] : 1.f);
    y[g] = acc;
  }
}
__global__ void k_moe_unpermute_bwd(const float* dy, const float* yp, const int32_t* pos,
                                    float* dw, int64_t N, int64_t C, int64_t K) {
  MXN_LOOP(i, N * K) {
    const float *a = dy + (i / K) * C, *b = yp + moe_row(pos, i, N * K) * C;
    float d = 0.f;
    for (int64_t c = 0; c < C; ++c) d += a[c] * b[c];
    dw[i] = d;
  }
}
__device__ inline int64_t moe_off(const int32_t* off, int64_t e, int64_t M) {
  const int64_t v = off[e];
  return v < 0 ? 0 : v > M ? M : v;
}
__global__ void k_grouped_mm(const float* a, const float* b, const int32_t* off, float* out,
                             int64_t M, int64_t N, int64_t K, int64_t E, int tb) {
  MXN_LOOP(g, M * N) {
    const int64_t r = g / N, j = g % N;
    int64_t lo = 0, hi = E;  // the first expert whose rows end after r
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (moe_off(off, mid + 1, M) <= r)
        lo = mid + 1;
      else
        hi = mid;
    }
    float acc = 0.f;
    if (lo < E && moe_off(off, lo, M) <= r) {
      const float* be = b + lo * N * K;
      for (int64_t l = 0; l < K; ++l) acc += a[r * K + l] * (tb ? be[j * K + l] : be[l * N + j]);
    }
    out[g] = acc;
  }
}
__global__ void k_grouped_mm_wgrad(const float* a, const float* b, const int32_t* off,
                                   float* out, int64_t M, int64_t P, int64_t Q, int64_t E,
                                   int accumulate) {
  MXN_LOOP(g, E * P * Q) {
    const int64_t e = g / (P * Q), i = (g / Q) % P, j = g % Q;
    const int64_t lo = moe_off(off, e, M), hi = max(lo, moe_off(off, e + 1, M));
    float acc = accumulate ? out[g] : 0.f;
    for (int64_t r = lo; r < hi; ++r) acc += a[r * P + i] * b[r * Q + j];
    out[g] = acc;
  }
}

__global__ void k_strided_copy(const float* x, float* y, StridedCopyParams p) {
  MXN_LOOP(i, p.count()) y[p.out_at(i)] = x[p.in_at(i)];
}

}  // namespace mxn::cuda
