// The fused classifier and cross-entropy (CLASSIFIER_CE), as llm.c fuses them: a block of rows'
// logits is computed, turned into its loss and its gradient in place, and the gradient goes
// straight into the two backward GEMMs, so the (N, V) logits never exist. For GPT-2 at batch 4,
// context 1024, that is 823 MB of logits (and 411 MB of their bf16 copy) the unfused graph kept.
// On the native bf16 path x and w are converted once a call and each block's gradient once for
// both GEMMs that read it.
#include <omp.h>

#include <algorithm>
#include <cmath>

#include "backend/cpu/kernels.h"
#include "backend/cpu/vmath.h"

namespace mxn::cpu {
namespace {

constexpr int64_t kBlockFloats = int64_t(1) << 25;  // 128 MB of f32 logits a block

// Row r's loss, and with `grad` its logits replaced by k (softmax - onehot).
inline float row_loss(float* l, int64_t V, int32_t t, bool grad, float k) {
  float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
  for (int64_t v = 0; v < V; ++v) mx = std::max(mx, l[v]);
  const float target = l[t];
  float sum = 0.f;
  if (!grad) {
#pragma omp simd reduction(+ : sum)
    for (int64_t v = 0; v < V; ++v) sum += vexp(l[v] - mx);
    return std::log(sum) + mx - target;
  }
#pragma omp simd reduction(+ : sum)
  for (int64_t v = 0; v < V; ++v) {
    l[v] = vexp(l[v] - mx);
    sum += l[v];
  }
  const float inv = k / sum;
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) l[v] *= inv;
  l[t] -= k;
  return std::log(sum) + mx - target;
}

// A vocabulary slice's row (XentParams): part 1 its stats into `st` (its slot of the row's),
// part 2 the whole softmax's loss from the group's summed stats and, with `grad`, the slice's
// logits replaced by k (softmax - onehot). `t`: the target's column in the slice (maybe outside).
inline float slice_row(float* l, int64_t V, int64_t t, const XentParams& p, float* st, bool grad,
                       float k) {
  if (p.part == 1) {
    float mx, sum;
    max_sum_exp(l, V, &mx, &sum);
    std::fill(st, st + 3 * p.slots, 0.f);
    st[3 * p.slot] = mx, st[3 * p.slot + 1] = sum, st[3 * p.slot + 2] = t >= 0 && t < V ? l[t] : 0;
    return 0.f;
  }
  float M, S, target;
  xent_combine(st, p.slots, &M, &S, &target);
  if (grad) {
    const float inv = k / S;
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) l[v] = vexp(l[v] - M) * inv;
    if (t >= 0 && t < V) l[t] -= k;
  }
  return std::log(S) + M - target;
}

}  // namespace

int64_t classifier_ce(Scratch& s, Compute compute, int grads, int64_t block, const float* x,
                      const float* w, const int32_t* targets, float* loss, float* dx, float* dw,
                      int64_t N, int64_t C, int64_t V, float dloss, bool add_dw,
                      const XentParams& vp, float* stats) {
  int64_t count = 0;
  for (int64_t r = 0; r < N; ++r) {
    if (vp.part == 0 && targets[r] >= V) return r;
    count += targets[r] >= 0;
  }
  if (vp.part == 1) grads = 0;
  const float k = count ? dloss / float(count) : 0.f;
  const int64_t R =
      std::min(N, block > 0 ? block : std::max<int64_t>(64, kBlockFloats / V / 64 * 64));
  float* L = s.get(s.logits, size_t(R * V));
  float* per_row = s.get(s.rows, size_t(N));
  const bool native = compute == Compute::bf16 && native_bf16();
  uint16_t *x16 = nullptr, *w16 = nullptr, *l16 = nullptr;
  if (native) {
    x16 = s.get(s.x16, size_t(N * C));
    w16 = s.get(s.w16, size_t(V * C));
    l16 = s.get(s.l16, size_t(R * V));
    to_bf16(x, x16, N * C);
    to_bf16(w, w16, V * C);
  }
  for (int64_t r0 = 0; r0 < N; r0 += R) {
    const int64_t n = std::min(R, N - r0);
    if (native)
      gemm_bf16(false, true, n, V, C, 1.f, x16 + r0 * C, w16, false, L);
    else
      matmul(s, compute, false, true, 1, n, V, C, 1.f, x + r0 * C, 0, w, 0, false, L, 0);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const int32_t t = targets[r0 + i];
      float* l = L + i * V;
      if (vp.part > 0 && (t >= 0 || vp.part == 1)) {
        per_row[r0 + i] = slice_row(l, V, int64_t(t) - vp.vocab0, vp,
                                    stats + (r0 + i) * 3 * vp.slots, grads > 0, k);
        continue;
      }
      if (t < 0) {
        per_row[r0 + i] = 0.f;
        if (grads) std::fill(l, l + V, 0.f);
        continue;
      }
      per_row[r0 + i] = row_loss(l, V, t, grads > 0, k);
    }
    if (!grads) continue;
    // dx = dlogits w (n x V times V x C); dw += dlogits^T x (V x n times n x C)
    if (native) {
      to_bf16(L, l16, n * V);
      gemm_bf16(false, false, n, C, V, 1.f, l16, w16, false, dx + r0 * C);
      if (grads > 1) gemm_bf16(true, false, V, C, n, 1.f, l16, x16 + r0 * C, r0 > 0 || add_dw, dw);
    } else {
      matmul(s, compute, false, false, 1, n, C, V, 1.f, L, 0, w, 0, false, dx + r0 * C, 0);
      if (grads > 1)
        matmul(s, compute, true, false, 1, V, C, n, 1.f, L, 0, x + r0 * C, 0, r0 > 0 || add_dw, dw,
               0);
    }
  }
  if (vp.part == 1) return -1;  // the stats only
  double total = 0;
  for (int64_t r = 0; r < N; ++r) total += per_row[r];
  *loss = count ? float(total / double(count)) : 0.f;
  return -1;
}

}  // namespace mxn::cpu
