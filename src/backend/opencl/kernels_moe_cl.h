#pragma once
// The OpenCL C kernels of ABI 9's mixture-of-experts ops: routing (one work-item a token, the
// transcription of backend/moe_route.h), the stable sort of the slots into expert order (one
// work-item an expert), the permutations, and the grouped GEMM (one work-item an output element;
// a row finds its expert by binary search over the offsets, on the device: no host round trip).
// Same conventions as kernels_cl.h: every buffer comes with its offset in elements.
namespace mxn::opencl {

inline const char* kKernelsMoe = R"CLC(
float moe_sel(__global const float* s, __global const float* bias, ulong ob, int has_bias, long e) {
  return has_bias ? s[e] + bias[ob + e] : s[e];
}
void moe_scores(__global const float* lg, long E, int sigm, __global float* s) {
  if (sigm) {
    for (long e = 0; e < E; ++e) s[e] = 1.f / (1.f + exp(-lg[e]));
    return;
  }
  float mx = lg[0];
  for (long e = 1; e < E; ++e) mx = fmax(mx, lg[e]);
  float sum = 0.f;
  for (long e = 0; e < E; ++e) {
    s[e] = exp(lg[e] - mx);
    sum += s[e];
  }
  for (long e = 0; e < E; ++e) s[e] /= sum;
}
// One token: scores into sc (N*E scratch), flags in tk (N*E scratch), its K experts and weights.
__kernel void moe_route(__global const float* logits, ulong ol, __global const float* bias, ulong ob,
                        int has_bias, __global float* sc, ulong osc, __global uchar* tk, ulong otk, __global float* w,
                        ulong ow, __global int* ids, ulong oi, long E, long K, int sigm, int norm,
                        long G, long topk_group, float scale) {
  const long t = get_global_id(0);
  __global float* s = sc + osc + t * E;
  __global uchar* taken = tk + otk + t * E;
  moe_scores(logits + ol + t * E, E, sigm, s);
  for (long e = 0; e < E; ++e) taken[e] = 0;
  const long gs = E / G;
  for (long pick = 0; G > 1 && pick < G - topk_group; ++pick) {
    long worst = -1;
    float worst_score = 0.f;
    for (long g = 0; g < G; ++g) {
      if (taken[g * gs]) continue;
      float a = -INFINITY, b = -INFINITY;
      for (long e = g * gs; e < (g + 1) * gs; ++e) {
        const float v = moe_sel(s, bias, ob, has_bias, e);
        if (v > a) { b = a; a = v; } else if (v > b) { b = v; }
      }
      const float score = has_bias && gs > 1 ? a + b : a;
      if (worst < 0 || score <= worst_score) { worst = g; worst_score = score; }
    }
    for (long e = worst * gs; e < (worst + 1) * gs; ++e) taken[e] = 1;
  }
  float sum = 0.f;
  for (long k = 0; k < K; ++k) {
    long best = -1;
    float best_v = 0.f;
    for (long e = 0; e < E; ++e) {
      if (taken[e]) continue;
      const float v = moe_sel(s, bias, ob, has_bias, e);
      if (best < 0 || v > best_v) { best = e; best_v = v; }
    }
    taken[best] = 1;
    ids[oi + t * K + k] = (int)best;
    w[ow + t * K + k] = s[best];
    sum += s[best];
  }
  const float f = norm ? scale / sum : scale;
  for (long k = 0; k < K; ++k) w[ow + t * K + k] *= f;
}
// One expert: how many of the n slots chose it (ids clamped into [0, E)).
__kernel void moe_count(__global const int* ids, ulong oi, long n, __global int* cnt, ulong oc) {
  const long e = get_global_id(0);
  int c = 0;
  for (long i = 0; i < n; ++i) c += ids[oi + i] == e;
  cnt[oc + e] = c;
}
__kernel void moe_offsets(__global const int* cnt, ulong oc, long E, __global int* off, ulong oo) {
  int acc = 0;
  off[oo] = 0;
  for (long e = 0; e < E; ++e) {
    acc += cnt[oc + e];
    off[oo + e + 1] = acc;
  }
}
// One expert: its slots' rows, in slot order (the stable sort).
__kernel void moe_positions(__global const int* ids, ulong oi, long n, __global const int* off,
                            ulong oo, __global int* pos, ulong op) {
  const long e = get_global_id(0);
  int next = off[oo + e];
  for (long i = 0; i < n; ++i)
    if (ids[oi + i] == e) pos[op + i] = next++;
}
// The load-balancing loss E * sum_e (count_e / N) * mean_t s[t, e], in one work-item.
__kernel void moe_aux(__global const float* sc, ulong osc, __global const int* cnt, ulong oc, long N, long E,
                      __global float* aux, ulong oa) {
  float loss = 0.f;
  for (long e = 0; e < E; ++e) {
    float mean = 0.f;
    for (long t = 0; t < N; ++t) mean += sc[osc + t * E + e];
    loss += (float)cnt[oc + e] / (float)N * mean / (float)N;
  }
  aux[oa] = (float)E * loss;
}
// One token: d(logits) from d(w); with has_daux the aux loss's share daux * E * count_e / N^2.
__kernel void moe_route_bwd(__global const float* dw, ulong odw, __global const float* logits,
                            ulong ol, __global const int* ids, ulong oi, __global const int* cnt, ulong oc,
                            __global const float* daux, ulong oda, int has_daux,
                            __global float* sc, ulong osc, __global float* dl, ulong odl, long N, long E,
                            long K, int sigm, int norm, float scale) {
  const long t = get_global_id(0);
  __global float* s = sc + osc + t * 2 * E;
  __global float* ds = s + E;
  moe_scores(logits + ol + t * E, E, sigm, s);
  for (long e = 0; e < E; ++e)
    ds[e] = has_daux ? daux[oda] * (float)E * (float)cnt[oc + e] / ((float)N * (float)N) : 0.f;
  float sum = 0.f, dot = 0.f;
  for (long k = 0; k < K; ++k) {
    const int id = clamp(ids[oi + t * K + k], 0, (int)E - 1);
    sum += s[id];
    dot += dw[odw + t * K + k] * s[id];
  }
  for (long k = 0; k < K; ++k) {
    const float d = dw[odw + t * K + k];
    ds[clamp(ids[oi + t * K + k], 0, (int)E - 1)] += norm ? scale * (d / sum - dot / (sum * sum)) : scale * d;
  }
  if (sigm) {
    for (long e = 0; e < E; ++e) dl[odl + t * E + e] = ds[e] * s[e] * (1.f - s[e]);
    return;
  }
  float d = 0.f;
  for (long e = 0; e < E; ++e) d += ds[e] * s[e];
  for (long e = 0; e < E; ++e) dl[odl + t * E + e] = s[e] * (ds[e] - d);
}
// One element (slot i, column c): xp[pos[i]] = x[i / K] (* w[i]).
__kernel void moe_permute(__global const float* x, ulong ox, __global const int* pos, ulong op,
                          __global const float* w, ulong ow, int weighted, __global float* xp,
                          ulong oxp, long C, long K, long NK) {
  const long i = get_global_id(0) / C, c = get_global_id(0) % C;
  const long row = clamp((long)pos[op + i], 0L, NK - 1);
  xp[oxp + row * C + c] = x[ox + (i / K) * C + c] * (weighted ? w[ow + i] : 1.f);
}
// One element (token t, column c): y = sum_k yp[pos[t*K+k]] (* w), in k order.
__kernel void moe_unpermute(__global const float* yp, ulong oyp, __global const int* pos, ulong op,
                            __global const float* w, ulong ow, int weighted, __global float* y,
                            ulong oy, long C, long K, long NK) {
  const long t = get_global_id(0) / C, c = get_global_id(0) % C;
  float acc = 0.f;
  for (long k = 0; k < K; ++k) {
    const long row = clamp((long)pos[op + t * K + k], 0L, NK - 1);
    acc += yp[oyp + row * C + c] * (weighted ? w[ow + t * K + k] : 1.f);
  }
  y[oy + t * C + c] = acc;
}
__kernel void moe_unpermute_bwd(__global const float* dy, ulong ody, __global const float* yp,
                                ulong oyp, __global const int* pos, ulong op, __global float* dw,
                                ulong odw, long C, long K, long NK) {
  const long i = get_global_id(0);
  const long row = clamp((long)pos[op + i], 0L, NK - 1);
  float d = 0.f;
  for (long c = 0; c < C; ++c) d += dy[ody + (i / K) * C + c] * yp[oyp + row * C + c];
  dw[odw + i] = d;
}
long moe_clamp_off(__global const int* off, ulong oo, long e, long M) {
  return clamp((long)off[oo + e], 0L, M);
}
// One output element (row r, column j) of out (M, N) = a (M, K) op(b[e]) for r's expert e.
__kernel void grouped_mm(__global const float* a, ulong oa, __global const float* b, ulong ob,
                         __global const int* off, ulong oo, __global float* out, ulong oc, long M,
                         long N, long K, long E, int tb) {
  const long r = get_global_id(0) / N, j = get_global_id(0) % N;
  long lo = 0, hi = E;  // the first expert whose rows end after r
  while (lo < hi) {
    const long mid = (lo + hi) / 2;
    if (moe_clamp_off(off, oo, mid + 1, M) <= r) lo = mid + 1; else hi = mid;
  }
  float acc = 0.f;
  if (lo < E && moe_clamp_off(off, oo, lo, M) <= r) {
    __global const float* be = b + ob + lo * N * K;
    for (long l = 0; l < K; ++l) acc += a[oa + r * K + l] * (tb ? be[j * K + l] : be[l * N + j]);
  }
  out[oc + r * N + j] = acc;
}
// One output element (e, i, j) of out (E, P, Q) = a_e^T b_e over expert e's rows (+ out).
__kernel void grouped_mm_wgrad(__global const float* a, ulong oa, __global const float* b, ulong ob,
                               __global const int* off, ulong oo, __global float* out, ulong oc,
                               long M, long P, long Q, int accumulate) {
  const long g = get_global_id(0), e = g / (P * Q), i = (g / Q) % P, j = g % Q;
  const long lo = moe_clamp_off(off, oo, e, M), hi = max(lo, moe_clamp_off(off, oo, e + 1, M));
  float acc = accumulate ? out[oc + g] : 0.f;
  for (long r = lo; r < hi; ++r) acc += a[oa + r * P + i] * b[ob + r * Q + j];
  out[oc + g] = acc;
}
// STRIDED_COPY: one work-item an element of the (n0, n1, n2) index space.
__kernel void strided_copy(__global const float* x, ulong ox, __global float* y, ulong oy, long n1,
                           long n2, long is0, long is1, long is2, long ioff, long os0, long os1,
                           long os2, long ooff) {
  const long g = get_global_id(0), i = g / (n1 * n2), j = g / n2 % n1, k = g % n2;
  y[oy + ooff + i * os0 + j * os1 + k * os2] = x[ox + ioff + i * is0 + j * is1 + k * is2];
}
)CLC";

}  // namespace mxn::opencl
