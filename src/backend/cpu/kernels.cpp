// The CPU reference kernels other than GEMM: plain loops the compiler vectorises, split over
// OpenMP threads in fixed chunks so that results do not depend on timing.
#include "backend/cpu/kernels.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "backend/cpu/vmath.h"
#include "core/dtype.h"

namespace mxn::cpu {

namespace {
constexpr float kGeluS = 0.7978845608028654f;  // sqrt(2/pi)
constexpr float kGeluC = 0.044715f;

// [begin, end) of chunk `t` of `n` items split over `nt` threads.
inline void chunk(int64_t n, int t, int nt, int64_t& b, int64_t& e) {
  const int64_t per = n / nt, rem = n % nt;
  b = t * per + std::min<int64_t>(t, rem);
  e = b + per + (t < rem ? 1 : 0);
}
}  // namespace

void add(const float* a, const float* b, float* out, int64_t n) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

void add_bias(const float* a, const float* bias, float* out, int64_t rows, int64_t cols) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* ar = a + r * cols;
    float* o = out + r * cols;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) o[c] = ar[c] + bias[c];
  }
}

void sum_rows(Scratch& s, const float* a, float* out, int64_t rows, int64_t cols, bool accumulate) {
  const int nt = omp_get_max_threads();
  float* part = s.get(s.a, size_t(nt) * cols);
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num();
    int64_t b, e;
    chunk(rows, t, nt, b, e);
    float* p = part + size_t(t) * cols;
    std::fill(p, p + cols, 0.f);
    for (int64_t r = b; r < e; ++r) {
      const float* ar = a + r * cols;
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) p[c] += ar[c];
    }
  }
  for (int64_t c = 0; c < cols; ++c) {
    float acc = accumulate ? out[c] : 0.f;
    for (int t = 0; t < nt; ++t) acc += part[size_t(t) * cols + c];
    out[c] = acc;
  }
}

void scale(const float* a, float* out, int64_t n, float k) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] * k;
}

void fill(float* out, int64_t n, float v) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) out[i] = v;
}

double sum_squares(const float* a, int64_t n) {
  const int nt = omp_get_max_threads();
  double part[256] = {0};
#pragma omp parallel num_threads(std::min(nt, 256))
  {
    const int t = omp_get_thread_num();
    int64_t b, e;
    chunk(n, t, omp_get_num_threads(), b, e);
    double acc = 0;
    for (int64_t i = b; i < e; ++i) acc += double(a[i]) * a[i];
    part[t] = acc;
  }
  double total = 0;
  for (int t = 0; t < std::min(nt, 256); ++t) total += part[t];
  return total;
}

namespace {
template <typename X>
void gelu_fwd_t(const X* x, float* y, int64_t n) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float v = widen(x[i]);
    y[i] = 0.5f * v * (1.f + vtanh(kGeluS * (v + kGeluC * v * v * v)));
  }
}

template <typename X>
void gelu_bwd_t(const float* dy, const X* x, float* dx, int64_t n) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float v = widen(x[i]);
    const float t = vtanh(kGeluS * (v + kGeluC * v * v * v));
    const float d =
        0.5f * (1.f + t) + 0.5f * v * (1.f - t * t) * kGeluS * (1.f + 3.f * kGeluC * v * v);
    dx[i] = dy[i] * d;
  }
}
}  // namespace

void gelu_fwd(const float* x, float* y, int64_t n) { gelu_fwd_t(x, y, n); }
void gelu_fwd(const uint16_t* x, float* y, int64_t n) { gelu_fwd_t(x, y, n); }
void gelu_bwd(const float* dy, const float* x, float* dx, int64_t n) { gelu_bwd_t(dy, x, dx, n); }
void gelu_bwd(const float* dy, const uint16_t* x, float* dx, int64_t n) {
  gelu_bwd_t(dy, x, dx, n);
}

void softmax_fwd(const float* x, float* y, int64_t rows, int64_t cols) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * cols;
    float* yr = y + r * cols;
    const float inv = 1.f / exp_shifted_row(xr, yr, cols);
    for (int64_t c = 0; c < cols; ++c) yr[c] *= inv;
  }
}

void softmax_bwd(const float* dy, const float* y, float* dx, int64_t rows, int64_t cols) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* d = dy + r * cols;
    const float* yr = y + r * cols;
    float dot = 0.f;
    for (int64_t c = 0; c < cols; ++c) dot += d[c] * yr[c];
    for (int64_t c = 0; c < cols; ++c) dx[r * cols + c] = yr[c] * (d[c] - dot);
  }
}

void layernorm_fwd(const float* x, const float* w, const float* b, float* y, float* stats,
                   int64_t rows, int64_t cols, float eps) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * cols;
    float mean = 0.f;
#pragma omp simd reduction(+ : mean)
    for (int64_t c = 0; c < cols; ++c) mean += xr[c];
    mean /= float(cols);
    float var = 0.f;
#pragma omp simd reduction(+ : var)
    for (int64_t c = 0; c < cols; ++c) var += (xr[c] - mean) * (xr[c] - mean);
    var /= float(cols);
    const float rstd = 1.f / std::sqrt(var + eps);
    float* yr = y + r * cols;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) yr[c] = (xr[c] - mean) * rstd * w[c] + b[c];
    stats[2 * r] = mean;
    stats[2 * r + 1] = rstd;
  }
}

void layernorm_bwd(Scratch& s, const float* dy, const float* x, const float* w, const float* stats,
                   float* dx, float* dw, float* db, int64_t rows, int64_t cols) {
  const int nt = omp_get_max_threads();
  float* part = s.get(s.a, size_t(nt) * cols * 2);
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num();
    int64_t b, e;
    chunk(rows, t, nt, b, e);
    float* pw = part + size_t(t) * cols * 2;
    float* pb = pw + cols;
    std::fill(pw, pw + 2 * cols, 0.f);
    for (int64_t r = b; r < e; ++r) {
      const float* xr = x + r * cols;
      const float* d = dy + r * cols;
      const float mean = stats[2 * r], rstd = stats[2 * r + 1];
      float m1 = 0.f, m2 = 0.f;  // mean(dxhat), mean(dxhat * xhat)
#pragma omp simd reduction(+ : m1, m2)
      for (int64_t c = 0; c < cols; ++c) {
        const float xh = (xr[c] - mean) * rstd;
        const float dxh = d[c] * w[c];
        m1 += dxh;
        m2 += dxh * xh;
        pw[c] += d[c] * xh;
        pb[c] += d[c];
      }
      m1 /= float(cols);
      m2 /= float(cols);
      float* o = dx + r * cols;
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) {
        const float xh = (xr[c] - mean) * rstd;
        o[c] = rstd * (d[c] * w[c] - m1 - xh * m2);
      }
    }
  }
  for (int64_t c = 0; c < cols; ++c) {
    float aw = 0.f, ab = 0.f;
    for (int t = 0; t < nt; ++t) {
      aw += part[size_t(t) * cols * 2 + c];
      ab += part[size_t(t) * cols * 2 + cols + c];
    }
    dw[c] = aw;
    db[c] = ab;
  }
}

namespace {

// Row i's table row, or -1: an id outside [first, first + V) (a zero row when `partial`, else
// an error the caller reports).
inline int64_t table_row(int32_t id, int64_t V, const EmbeddingParams& p) {
  const int64_t r = int64_t(id) - p.first;
  return r >= 0 && r < V ? r : -1;
}

template <typename T, typename Widen>
int64_t embedding_rows(const int32_t* idx, const T* table, float* out, int64_t n, int64_t V,
                       int64_t C, const EmbeddingParams& p, Widen widen) {
  if (!p.partial)
    for (int64_t i = 0; i < n; ++i)
      if (table_row(idx[i], V, p) < 0) return i;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = table_row(idx[i], V, p);
    float* o = out + i * C;
    if (r < 0) {
      std::fill(o, o + C, 0.f);
      continue;
    }
    const T* row = table + r * C;
    for (int64_t c = 0; c < C; ++c) o[c] = widen(row[c]);
  }
  return -1;
}

}  // namespace

int64_t embedding_fwd(const int32_t* idx, const float* table, float* out, int64_t n, int64_t V,
                      int64_t C, const EmbeddingParams& p) {
  return embedding_rows(idx, table, out, n, V, C, p, [](float x) { return x; });
}

int64_t embedding_fwd_bf16(const int32_t* idx, const uint16_t* table, float* out, int64_t n,
                           int64_t V, int64_t C, const EmbeddingParams& p) {
  return embedding_rows(idx, table, out, n, V, C, p, bf16_to_f32);
}

void embedding_bwd(const float* dy, const int32_t* idx, float* dtable, int64_t n, int64_t V,
                   int64_t C, const EmbeddingParams& p) {
  std::fill(dtable, dtable + V * C, 0.f);
  // Each thread owns a block of columns and walks the rows in order: deterministic, no atomics.
#pragma omp parallel
  {
    int64_t b, e;
    chunk(C, omp_get_thread_num(), omp_get_num_threads(), b, e);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = table_row(idx[i], V, p);
      if (r < 0) continue;  // (whole tables: checked by the forward)
      float* row = dtable + r * C;
      const float* d = dy + i * C;
      for (int64_t c = b; c < e; ++c) row[c] += d[c];
    }
  }
}

int64_t cross_entropy_fwd(Scratch& s, const float* logits, const int32_t* targets, float* loss,
                          int64_t rows, int64_t V) {
  for (int64_t r = 0; r < rows; ++r)
    if (targets[r] >= V) return r;
  float* per_row = s.get(s.a, size_t(rows));
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    if (targets[r] < 0) {
      per_row[r] = 0.f;
      continue;
    }
    const float* l = logits + r * V;
    float mx, sum;
    max_sum_exp(l, V, &mx, &sum);
    per_row[r] = std::log(sum) + mx - l[targets[r]];
  }
  double total = 0;
  int64_t count = 0;
  for (int64_t r = 0; r < rows; ++r) {
    total += per_row[r];
    count += targets[r] >= 0;
  }
  *loss = count ? float(total / double(count)) : 0.f;
  return -1;
}

void cross_entropy_bwd(const float* dloss, const float* logits, const int32_t* targets,
                       float* dlogits, int64_t rows, int64_t V, const XentParams& p,
                       const float* stats) {
  int64_t count = 0;
  for (int64_t r = 0; r < rows; ++r) count += targets[r] >= 0;
  const float k = count ? *dloss / float(count) : 0.f;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* l = logits + r * V;
    float* d = dlogits + r * V;
    if (targets[r] < 0) {
      std::fill(d, d + V, 0.f);
      continue;
    }
    if (stats) {  // a slice: the whole softmax's max and sum from the group's stats
      float M, S, target;
      xent_combine(stats + r * p.slots * 3, p.slots, &M, &S, &target);
      const float inv = k / S;
#pragma omp simd
      for (int64_t v = 0; v < V; ++v) d[v] = vexp(l[v] - M) * inv;
    } else {
      const float inv = k / exp_shifted_row(l, d, V);
      for (int64_t v = 0; v < V; ++v) d[v] *= inv;
    }
    const int64_t t = int64_t(targets[r]) - p.vocab0;
    if (t >= 0 && t < V) d[t] -= k;
  }
}

void xent_stats(const float* logits, const int32_t* targets, float* stats, int64_t rows, int64_t V,
                const XentParams& p) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* l = logits + r * V;
    float mx, sum;
    max_sum_exp(l, V, &mx, &sum);
    const int64_t t = int64_t(targets[r]) - p.vocab0;
    float* st = stats + r * p.slots * 3;
    std::fill(st, st + p.slots * 3, 0.f);
    st[3 * p.slot] = mx;
    st[3 * p.slot + 1] = sum;
    st[3 * p.slot + 2] = t >= 0 && t < V ? l[t] : 0.f;
  }
}

void xent_loss(const float* stats, const int32_t* targets, float* loss, int64_t rows,
               int64_t slots) {
  double total = 0;
  int64_t count = 0;
  for (int64_t r = 0; r < rows; ++r) {
    if (targets[r] < 0) continue;
    float M, S, target;
    xent_combine(stats + r * slots * 3, slots, &M, &S, &target);
    total += double(std::log(S) + M - target);
    ++count;
  }
  *loss = count ? float(total / double(count)) : 0.f;
}

void rmsnorm_fwd(const float* x, const float* w, float* y, float* rstd, int64_t rows, int64_t cols,
                 float eps) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * cols;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t c = 0; c < cols; ++c) ss += xr[c] * xr[c];
    const float rs = 1.f / std::sqrt(ss / float(cols) + eps);
    float* yr = y + r * cols;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) yr[c] = xr[c] * rs * w[c];
    rstd[r] = rs;
  }
}

void rmsnorm_bwd(Scratch& s, const float* dy, const float* x, const float* w, const float* rstd,
                 float* dx, float* dw, int64_t rows, int64_t cols) {
  const int nt = omp_get_max_threads();
  float* part = s.get(s.a, size_t(nt) * cols);
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num();
    int64_t b, e;
    chunk(rows, t, nt, b, e);
    float* pw = part + size_t(t) * cols;
    std::fill(pw, pw + cols, 0.f);
    for (int64_t r = b; r < e; ++r) {
      const float* xr = x + r * cols;
      const float* d = dy + r * cols;
      const float rs = rstd[r];
      float m = 0.f;  // mean(dy * w * x)
#pragma omp simd reduction(+ : m)
      for (int64_t c = 0; c < cols; ++c) {
        m += d[c] * w[c] * xr[c];
        pw[c] += d[c] * xr[c] * rs;
      }
      m /= float(cols);
      float* o = dx + r * cols;
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) o[c] = rs * (d[c] * w[c] - xr[c] * rs * rs * m);
    }
  }
  for (int64_t c = 0; c < cols; ++c) {
    float acc = 0.f;
    for (int t = 0; t < nt; ++t) acc += part[size_t(t) * cols + c];
    dw[c] = acc;
  }
}

void rope(const float* x, const int32_t* pos, float* y, int64_t rows, int64_t ld, int64_t col0,
          int64_t heads, int64_t hd, int64_t rot, bool interleaved, bool inverse,
          const float* inv_freq) {
  const int64_t half = rot / 2;
  const float sign = inverse ? -1.f : 1.f;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ld;
    float* yr = y + r * ld;
    if (xr != yr) std::copy(xr, xr + ld, yr);  // the unrotated columns (a row is small)
    const float p = float(pos[r]);
    for (int64_t h = 0; h < heads; ++h) {
      const float* xh = xr + col0 + h * hd;
      float* yh = yr + col0 + h * hd;
      for (int64_t i = 0; i < half; ++i) {
        const float ang = p * inv_freq[i];
        const float c = std::cos(ang), s = sign * std::sin(ang);
        const int64_t i1 = interleaved ? 2 * i : i, i2 = interleaved ? 2 * i + 1 : i + half;
        const float a = xh[i1], b = xh[i2];
        yh[i1] = a * c - b * s;
        yh[i2] = b * c + a * s;
      }
    }
  }
}

void silu_fwd(const float* x, float* y, int64_t n) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] / (1.f + vexp(-x[i]));
}

void silu_bwd(const float* dy, const float* x, float* dx, int64_t n) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float sg = 1.f / (1.f + vexp(-x[i]));
    dx[i] = dy[i] * sg * (1.f + x[i] * (1.f - sg));
  }
}

void swiglu_fwd(const float* gate, int64_t lg, int64_t gcol, const float* up, int64_t lu,
                int64_t ucol, float* out, int64_t rows, int64_t F) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = gate + r * lg + gcol;
    const float* u = up + r * lu + ucol;
    float* o = out + r * F;
#pragma omp simd
    for (int64_t c = 0; c < F; ++c) o[c] = g[c] / (1.f + vexp(-g[c])) * u[c];
  }
}

void swiglu_bwd(const float* dy, const float* gate, int64_t lg, int64_t gcol, const float* up,
                int64_t lu, int64_t ucol, float* dgate, float* dup, int64_t rows, int64_t F) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = gate + r * lg + gcol;
    const float* u = up + r * lu + ucol;
    const float* d = dy + r * F;
    float* dg = dgate + r * lg + gcol;
    float* du = dup + r * lu + ucol;
#pragma omp simd
    for (int64_t c = 0; c < F; ++c) {
      const float sg = 1.f / (1.f + vexp(-g[c]));
      const float gv = g[c], uv = u[c];
      du[c] = d[c] * gv * sg;
      dg[c] = d[c] * uv * sg * (1.f + gv * (1.f - sg));
    }
  }
}

// AdamW exactly as torch.optim.AdamW computes it (decoupled decay, bias-corrected moments).
void adamw(float* p, const float* g, float* m, float* v, int64_t n, float lr, float b1, float b2,
           float eps, float wd, float gscale, float step_size, float bc2_sqrt) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i] * gscale;
    m[i] = b1 * m[i] + (1.f - b1) * gi;
    v[i] = b2 * v[i] + (1.f - b2) * gi * gi;
    float pi = p[i] * (1.f - lr * wd);
    pi -= step_size * m[i] / (std::sqrt(v[i]) / bc2_sqrt + eps);
    p[i] = pi;
  }
}

void strided_copy(const StridedCopyParams& p, const float* in, float* out) {
  const int64_t n = p.count();
  if (p.in_stride[2] == 1 && p.out_stride[2] == 1) {  // rows of n2 contiguous elements
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t r = 0; r < n / p.n[2]; ++r)
      std::memcpy(out + p.out_at(r * p.n[2]), in + p.in_at(r * p.n[2]), size_t(p.n[2]) * 4);
    return;
  }
#pragma omp parallel for schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; ++i) out[p.out_at(i)] = in[p.in_at(i)];
}

}  // namespace mxn::cpu
