#pragma once
// The CUDA backend's kernels other than GEMM: grid-stride loops for elementwise ops, one thread
// per row or column for reductions (deterministic: fixed order, no atomics). Written in the
// subset that HIP compiles unchanged.
#include <cstdint>

#include "backend/cuda/vendor.h"
#include "backend/op_params.h"

namespace mxn::cuda {

#define MXN_LOOP(i, n) \
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); i += int64_t(blockDim.x) * gridDim.x)

constexpr float kGeluS = 0.7978845608028654f, kGeluC = 0.044715f;

__global__ void k_add(const float* a, const float* b, float* y, int64_t n) { MXN_LOOP(i, n) y[i] = a[i] + b[i]; }
__global__ void k_add_bias(const float* a, const float* b, float* y, int64_t n, int64_t cols) {
  MXN_LOOP(i, n) y[i] = a[i] + b[i % cols];
}
__global__ void k_sum_rows(const float* a, float* y, int64_t rows, int64_t cols, int acc) {
  MXN_LOOP(c, cols) {
    float s = acc ? y[c] : 0.f;
    for (int64_t r = 0; r < rows; ++r) s += a[r * cols + c];
    y[c] = s;
  }
}
__global__ void k_scale(const float* a, float* y, int64_t n, float k) { MXN_LOOP(i, n) y[i] = a[i] * k; }
__global__ void k_fill(float* y, int64_t n, float v) { MXN_LOOP(i, n) y[i] = v; }
__global__ void k_copy(const float* a, float* y, int64_t n) { MXN_LOOP(i, n) y[i] = a[i]; }
__global__ void k_gelu(const float* x, float* y, int64_t n) {
  MXN_LOOP(i, n) {
    const float v = x[i];
    y[i] = 0.5f * v * (1.f + tanhf(kGeluS * (v + kGeluC * v * v * v)));
  }
}
__global__ void k_tanh(const float* x, float* y, int64_t n) { MXN_LOOP(i, n) y[i] = tanhf(x[i]); }
__global__ void k_mul(const float* a, const float* b, float* y, int64_t n) { MXN_LOOP(i, n) y[i] = a[i] * b[i]; }
__global__ void k_tanh_bwd(const float* dy, const float* y, float* dx, int64_t n) {
  MXN_LOOP(i, n) dx[i] = dy[i] * (1.f - y[i] * y[i]);
}
__global__ void k_gelu_bwd(const float* dy, const float* x, float* dx, int64_t n) {
  MXN_LOOP(i, n) {
    const float v = x[i], t = tanhf(kGeluS * (v + kGeluC * v * v * v));
    dx[i] = dy[i] * (0.5f * (1.f + t) + 0.5f * v * (1.f - t * t) * kGeluS * (1.f + 3.f * kGeluC * v * v));
  }
}
// Row softmax; causal: row r keeps entries 0..r % cols.
__global__ void k_softmax(const float* x, float* y, int64_t rows, int64_t cols, int causal) {
  MXN_LOOP(r, rows) {
    const float* xr = x + r * cols;
    float* yr = y + r * cols;
    const int64_t n = causal ? r % cols + 1 : cols;
    float mx = xr[0];
    for (int64_t c = 1; c < n; ++c) mx = fmaxf(mx, xr[c]);
    float s = 0.f;
    for (int64_t c = 0; c < n; ++c) { const float e = expf(xr[c] - mx); yr[c] = e; s += e; }
    const float inv = 1.f / s;
    for (int64_t c = 0; c < n; ++c) yr[c] *= inv;
    for (int64_t c = n; c < cols; ++c) yr[c] = 0.f;
  }
}
__global__ void k_softmax_bwd(const float* dy, const float* y, float* dx, int64_t rows, int64_t cols,
                              int causal, float k) {
  MXN_LOOP(r, rows) {
    const int64_t n = causal ? r % cols + 1 : cols;
    const float *d = dy + r * cols, *yr = y + r * cols;
    float* o = dx + r * cols;
    float dot = 0.f;
    for (int64_t c = 0; c < n; ++c) dot += d[c] * yr[c];
    for (int64_t c = 0; c < n; ++c) o[c] = yr[c] * (d[c] - dot) * k;
    for (int64_t c = n; c < cols; ++c) o[c] = 0.f;
  }
}
__global__ void k_layernorm(const float* x, const float* w, const float* b, float* y, float* st,
                            int64_t rows, int64_t cols, float eps) {
  MXN_LOOP(r, rows) {
    const float* xr = x + r * cols;
    float mean = 0.f, var = 0.f;
    for (int64_t c = 0; c < cols; ++c) mean += xr[c];
    mean /= float(cols);
    for (int64_t c = 0; c < cols; ++c) var += (xr[c] - mean) * (xr[c] - mean);
    var /= float(cols);
    const float rstd = rsqrtf(var + eps);
    for (int64_t c = 0; c < cols; ++c) y[r * cols + c] = (xr[c] - mean) * rstd * w[c] + b[c];
    st[2 * r] = mean;
    st[2 * r + 1] = rstd;
  }
}
__global__ void k_layernorm_dx(const float* dy, const float* x, const float* w, const float* st,
                               float* dx, int64_t rows, int64_t cols) {
  MXN_LOOP(r, rows) {
    const float mean = st[2 * r], rstd = st[2 * r + 1];
    const float *xr = x + r * cols, *d = dy + r * cols;
    float m1 = 0.f, m2 = 0.f;
    for (int64_t c = 0; c < cols; ++c) {
      const float xh = (xr[c] - mean) * rstd, dxh = d[c] * w[c];
      m1 += dxh;
      m2 += dxh * xh;
    }
    m1 /= float(cols);
    m2 /= float(cols);
    for (int64_t c = 0; c < cols; ++c)
      dx[r * cols + c] = rstd * (d[c] * w[c] - m1 - (xr[c] - mean) * rstd * m2);
  }
}
__global__ void k_layernorm_dwdb(const float* dy, const float* x, const float* st, float* dw, float* db,
                                 int64_t rows, int64_t cols) {
  MXN_LOOP(c, cols) {
    float sw = 0.f, sb = 0.f;
    for (int64_t r = 0; r < rows; ++r) {
      const float g = dy[r * cols + c];
      sw += g * (x[r * cols + c] - st[2 * r]) * st[2 * r + 1];
      sb += g;
    }
    dw[c] = sw;
    db[c] = sb;
  }
}
// Rows [first, first + V) of a table (the whole one: first 0); other ids give zero rows.
__global__ void k_embedding(const int32_t* idx, const float* t, float* y, int64_t n, int64_t cols,
                            int64_t first, int64_t V) {
  MXN_LOOP(i, n) {
    const int64_t r = int64_t(idx[i / cols]) - first;
    y[i] = r >= 0 && r < V ? t[r * cols + i % cols] : 0.f;
  }
}
__global__ void k_embedding_bwd(const float* dy, const int32_t* idx, float* dt, int64_t n, int64_t V,
                                int64_t cols, int64_t first) {
  MXN_LOOP(c, cols) {
    for (int64_t v = 0; v < V; ++v) dt[v * cols + c] = 0.f;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = int64_t(idx[i]) - first;
      if (r >= 0 && r < V) dt[r * cols + c] += dy[i * cols + c];
    }
  }
}
// The vocabulary split over a group (XentParams): a slice's stats in its slot; the per-row loss
// from the summed stats; the slice's dlogits.
__global__ void k_xent_stats(const float* l, const int32_t* t, float* st, int64_t rows, int64_t V,
                             int64_t vocab0, int64_t slot, int64_t slots) {
  MXN_LOOP(r, rows) {
    const float* x = l + r * V;
    float mx = x[0], s = 0.f;
    for (int64_t v = 1; v < V; ++v) mx = fmaxf(mx, x[v]);
    for (int64_t v = 0; v < V; ++v) s += expf(x[v] - mx);
    const int64_t tr = int64_t(t[r]) - vocab0;
    float* o = st + r * slots * 3;
    for (int64_t j = 0; j < slots * 3; ++j) o[j] = 0.f;
    o[3 * slot] = mx;
    o[3 * slot + 1] = s;
    o[3 * slot + 2] = tr >= 0 && tr < V ? x[tr] : 0.f;
  }
}
__global__ void k_xent_slice_rows(const float* st, const int32_t* t, float* per_row, int64_t rows,
                                  int64_t slots) {
  MXN_LOOP(r, rows) {
    if (t[r] < 0) { per_row[r] = 0.f; continue; }
    float M, S, T;
    mxn::xent_combine(st + r * slots * 3, slots, &M, &S, &T);
    per_row[r] = logf(S) + M - T;
  }
}
__global__ void k_xent_rows(const float* l, const int32_t* t, float* per_row, int64_t rows, int64_t V) {
  MXN_LOOP(r, rows) {
    if (t[r] < 0) { per_row[r] = 0.f; continue; }
    const float* x = l + r * V;
    float mx = x[0], s = 0.f;
    for (int64_t v = 1; v < V; ++v) mx = fmaxf(mx, x[v]);
    for (int64_t v = 0; v < V; ++v) s += expf(x[v] - mx);
    per_row[r] = logf(s) + mx - x[t[r]];
  }
}
__global__ void k_xent_mean(const float* per_row, const int32_t* t, int64_t rows, float* loss) {
  float s = 0.f;
  int64_t n = 0;
  for (int64_t r = 0; r < rows; ++r)
    if (t[r] >= 0) { s += per_row[r]; ++n; }
  *loss = n ? s / float(n) : 0.f;
}
// dlogits; with `st` (part 2 of XentParams) a vocabulary slice's, from the group's stats.
__global__ void k_xent_bwd(const float* dloss, const float* l, const int32_t* t, float* d, int64_t rows,
                           int64_t V, const float* st = nullptr, int64_t vocab0 = 0, int64_t slots = 0) {
  MXN_LOOP(r, rows) {
    int64_t n = 0;
    for (int64_t i = 0; i < rows; ++i) n += t[i] >= 0;
    const float k = n ? *dloss / float(n) : 0.f;
    const float* x = l + r * V;
    float* o = d + r * V;
    if (t[r] < 0) { for (int64_t v = 0; v < V; ++v) o[v] = 0.f; continue; }
    float mx = x[0], s = 0.f, T;
    if (st) {
      mxn::xent_combine(st + r * slots * 3, slots, &mx, &s, &T);
    } else {
      for (int64_t v = 1; v < V; ++v) mx = fmaxf(mx, x[v]);
      for (int64_t v = 0; v < V; ++v) s += expf(x[v] - mx);
    }
    const float inv = k / s;
    for (int64_t v = 0; v < V; ++v) o[v] = expf(x[v] - mx) * inv;
    const int64_t tr = int64_t(t[r]) - vocab0;
    if (tr >= 0 && tr < V) o[tr] -= k;
  }
}
__global__ void k_adamw(float* p, const float* g, float* m, float* v, int64_t n, float lr, float b1,
                        float b2, float eps, float wd, float gs, float step_size, float bc2_sqrt) {
  MXN_LOOP(i, n) {
    const float gi = g[i] * gs;
    const float mi = b1 * m[i] + (1.f - b1) * gi, vi = b2 * v[i] + (1.f - b2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * (1.f - lr * wd) - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
  }
}
__global__ void k_sumsq_part(const float* a, int64_t n, int64_t chunk, float* part, int64_t parts) {
  MXN_LOOP(p, parts) {
    float s = 0.f;
    const int64_t e = (p + 1) * chunk < n ? (p + 1) * chunk : n;
    for (int64_t i = p * chunk; i < e; ++i) s += a[i] * a[i];
    part[p] = s;
  }
}
__global__ void k_sumsq_total(const float* part, int64_t parts, float* y, int acc) {
  float s = 0.f;
  for (int64_t p = 0; p < parts; ++p) s += part[p];
  *y = acc ? *y + s : s;
}

}  // namespace mxn::cuda
