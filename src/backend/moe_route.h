#pragma once
// MOE_ROUTE's arithmetic for one token, the same on the CPU and on CUDA (the OpenCL kernel is its
// transcription in OpenCL C): the scores, the group-limited top-k over the selection scores, the
// weights, and the backward of the weights to the logits. Plain C++17 over raw arrays, no
// allocation: the caller gives `s` (E floats) and `taken` (E bytes).
#include <cmath>
#include <cstdint>

#include "backend/op_params.h"

namespace mxn {

// s = softmax(logits) over the E experts, or each one's sigmoid.
MXN_HD inline void moe_scores(const float* logits, int64_t E, bool sigmoid, float* s) {
  if (sigmoid) {
    for (int64_t e = 0; e < E; ++e) s[e] = 1.f / (1.f + expf(-logits[e]));
    return;
  }
  float mx = logits[0];
  for (int64_t e = 1; e < E; ++e) mx = logits[e] > mx ? logits[e] : mx;
  float sum = 0.f;
  for (int64_t e = 0; e < E; ++e) {
    s[e] = expf(logits[e] - mx);
    sum += s[e];
  }
  for (int64_t e = 0; e < E; ++e) s[e] /= sum;
}

// The selection score of expert e: its score plus the bias, if any.
MXN_HD inline float moe_sel(const float* s, const float* bias, int64_t e) {
  return bias ? s[e] + bias[e] : s[e];
}

// One token: ids (K) in descending selection score, w (K) their weights. `taken` marks experts
// out of the running (other groups', already chosen ones).
MXN_HD inline void moe_route_token(const float* logits, const float* bias, int64_t E,
                                   const MoeRouteParams& p, float* s, uint8_t* taken, int32_t* ids,
                                   float* w) {
  moe_scores(logits, E, p.sigmoid, s);
  for (int64_t e = 0; e < E; ++e) taken[e] = 0;
  const int64_t G = p.n_group > 1 ? p.n_group : 1, gs = E / G;
  if (G > 1) {  // keep the topk_group groups of the largest group scores
    for (int64_t pick = 0; pick < G - p.topk_group; ++pick) {  // drop the G - topk_group worst
      int64_t worst = -1;
      float worst_score = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        if (taken[g * gs]) continue;
        float a = -INFINITY, b = -INFINITY;  // the group's two largest
        for (int64_t e = g * gs; e < (g + 1) * gs; ++e) {
          const float v = moe_sel(s, bias, e);
          if (v > a) {
            b = a;
            a = v;
          } else if (v > b) {
            b = v;
          }
        }
        const float score = bias && gs > 1 ? a + b : a;
        if (worst < 0 || score <= worst_score) {  // the later of equal groups goes first
          worst = g;
          worst_score = score;
        }
      }
      for (int64_t e = worst * gs; e < (worst + 1) * gs; ++e) taken[e] = 1;
    }
  }
  float sum = 0.f;
  for (int64_t k = 0; k < p.k; ++k) {
    int64_t best = -1;
    float best_v = 0.f;
    for (int64_t e = 0; e < E; ++e) {
      if (taken[e]) continue;
      const float v = moe_sel(s, bias, e);
      if (best < 0 || v > best_v) {
        best = e;
        best_v = v;
      }
    }
    taken[best] = 1;
    ids[k] = int32_t(best);
    w[k] = s[best];
    sum += s[best];
  }
  const float f = p.norm ? p.scale / sum : p.scale;
  for (int64_t k = 0; k < p.k; ++k) w[k] *= f;
}

// d(logits) of one token from d(w) (K) and the token's experts; `extra` (E, or null) is added to
// d(scores) first (the aux loss's gradient). `s` and `ds` are E floats of scratch.
MXN_HD inline void moe_route_token_bwd(const float* dw, const float* logits, const int32_t* ids,
                                       int64_t E, const MoeRouteParams& p, const float* extra,
                                       float* s, float* ds, float* dlogits) {
  moe_scores(logits, E, p.sigmoid, s);
  for (int64_t e = 0; e < E; ++e) ds[e] = extra ? extra[e] : 0.f;
  auto id = [&](int64_t k) -> int64_t {  // clamped: a device kernel never reads outside s
    return ids[k] < 0 ? 0 : ids[k] >= E ? E - 1 : ids[k];
  };
  float sum = 0.f, dot = 0.f;  // sum of the chosen scores; sum_k dw_k * s_k
  for (int64_t k = 0; k < p.k; ++k) {
    sum += s[id(k)];
    dot += dw[k] * s[id(k)];
  }
  for (int64_t k = 0; k < p.k; ++k)
    ds[id(k)] += p.norm ? p.scale * (dw[k] / sum - dot / (sum * sum)) : p.scale * dw[k];
  if (p.sigmoid) {
    for (int64_t e = 0; e < E; ++e) dlogits[e] = ds[e] * s[e] * (1.f - s[e]);
    return;
  }
  float d = 0.f;
  for (int64_t e = 0; e < E; ++e) d += ds[e] * s[e];
  for (int64_t e = 0; e < E; ++e) dlogits[e] = s[e] * (ds[e] - d);
}

}  // namespace mxn
