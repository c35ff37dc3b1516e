#pragma once
// The OpenCL C kernels of the OpenCL backend (GEMMs go to CLBlast). Every tensor argument is a
// buffer plus an element offset. One work-item per element or per row: simple, and
// deterministic (no atomics, sums in a fixed order).
namespace mxn::opencl {

inline const char* kKernels = R"CLC(
#define GELU_S 0.7978845608028654f
#define GELU_C 0.044715f

__kernel void add(__global const float* a, ulong oa, __global const float* b, ulong ob,
                  __global float* y, ulong oy) {
  size_t i = get_global_id(0);
  y[oy + i] = a[oa + i] + b[ob + i];
}
__kernel void add_bias(__global const float* a, ulong oa, __global const float* b, ulong ob,
                       __global float* y, ulong oy, ulong cols) {
  size_t i = get_global_id(0);
  y[oy + i] = a[oa + i] + b[ob + i % cols];
}
__kernel void sum_rows(__global const float* a, ulong oa, __global float* y, ulong oy, ulong rows,
                       ulong cols, int acc) {
  size_t c = get_global_id(0);
  float s = acc ? y[oy + c] : 0.f;
  for (ulong r = 0; r < rows; ++r) s += a[oa + r * cols + c];
  y[oy + c] = s;
}
__kernel void scale(__global const float* a, ulong oa, __global float* y, ulong oy, float k) {
  size_t i = get_global_id(0);
  y[oy + i] = a[oa + i] * k;
}
__kernel void fill(__global float* y, ulong oy, float v) { y[oy + get_global_id(0)] = v; }
__kernel void copy(__global const float* a, ulong oa, __global float* y, ulong oy) {
  size_t i = get_global_id(0);
  y[oy + i] = a[oa + i];
}
float gelu_of(float v) { return 0.5f * v * (1.f + tanh(GELU_S * (v + GELU_C * v * v * v))); }
float gelu_grad(float v) {
  float t = tanh(GELU_S * (v + GELU_C * v * v * v));
  return 0.5f * (1.f + t) + 0.5f * v * (1.f - t * t) * GELU_S * (1.f + 3.f * GELU_C * v * v);
}
__kernel void gelu(__global const float* x, ulong ox, __global float* y, ulong oy) {
  size_t i = get_global_id(0);
  y[oy + i] = gelu_of(x[ox + i]);
}
// x in bf16: bf16 training keeps the MLP's pre-activation at half size.
__kernel void gelu_h(__global const ushort* x, ulong ox, __global float* y, ulong oy) {
  size_t i = get_global_id(0);
  y[oy + i] = gelu_of(as_float((uint)x[ox + i] << 16));
}
__kernel void mul(__global const float* a, ulong oa, __global const float* b, ulong ob,
                  __global float* y, ulong oy) {
  size_t i = get_global_id(0);
  y[oy + i] = a[oa + i] * b[ob + i];
}
__kernel void tanh_fwd(__global const float* x, ulong ox, __global float* y, ulong oy) {
  size_t i = get_global_id(0);
  y[oy + i] = tanh(x[ox + i]);
}
__kernel void tanh_bwd(__global const float* dy, ulong od, __global const float* y, ulong oy,
                       __global float* dx, ulong oo) {
  size_t i = get_global_id(0);
  float t = y[oy + i];
  dx[oo + i] = dy[od + i] * (1.f - t * t);
}
__kernel void gelu_bwd(__global const float* dy, ulong od, __global const float* x, ulong ox,
                       __global float* dx, ulong oo) {
  size_t i = get_global_id(0);
  dx[oo + i] = dy[od + i] * gelu_grad(x[ox + i]);
}
__kernel void gelu_bwd_h(__global const float* dy, ulong od, __global const ushort* x, ulong ox,
                         __global float* dx, ulong oo) {
  size_t i = get_global_id(0);
  dx[oo + i] = dy[od + i] * gelu_grad(as_float((uint)x[ox + i] << 16));
}
// Softmax over the first `len(row)` entries of each row; with causal != 0 row r keeps entries
// 0..(r % T) and zeroes the rest (attention).
__kernel void softmax(__global const float* x, ulong ox, __global float* y, ulong oy, ulong cols,
                      int causal) {
  size_t r = get_global_id(0);
  __global const float* xr = x + ox + r * cols;
  __global float* yr = y + oy + r * cols;
  ulong n = causal ? (r % cols) + 1 : cols;
  float mx = xr[0];
  for (ulong c = 1; c < n; ++c) mx = fmax(mx, xr[c]);
  float s = 0.f;
  for (ulong c = 0; c < n; ++c) { float e = exp(xr[c] - mx); yr[c] = e; s += e; }
  float inv = 1.f / s;
  for (ulong c = 0; c < n; ++c) yr[c] *= inv;
  for (ulong c = n; c < cols; ++c) yr[c] = 0.f;
}
// dx = y (dy - <dy, y>) * k over a row's first n entries (causal as above), zero beyond.
__kernel void softmax_bwd(__global const float* dy, ulong od, __global const float* y, ulong oy,
                          __global float* dx, ulong ox, ulong cols, int causal, float k) {
  size_t r = get_global_id(0);
  ulong n = causal ? (r % cols) + 1 : cols;
  __global const float* d = dy + od + r * cols;
  __global const float* yr = y + oy + r * cols;
  __global float* o = dx + ox + r * cols;
  float dot = 0.f;
  for (ulong c = 0; c < n; ++c) dot += d[c] * yr[c];
  for (ulong c = 0; c < n; ++c) o[c] = yr[c] * (d[c] - dot) * k;
  for (ulong c = n; c < cols; ++c) o[c] = 0.f;
}
__kernel void layernorm(__global const float* x, ulong ox, __global const float* w, ulong ow,
                        __global const float* b, ulong ob, __global float* y, ulong oy,
                        __global float* st, ulong os, ulong cols, float eps) {
  size_t r = get_global_id(0);
  __global const float* xr = x + ox + r * cols;
  float mean = 0.f;
  for (ulong c = 0; c < cols; ++c) mean += xr[c];
  mean /= (float)cols;
  float var = 0.f;
  for (ulong c = 0; c < cols; ++c) var += (xr[c] - mean) * (xr[c] - mean);
  var /= (float)cols;
  float rstd = 1.f / sqrt(var + eps);
  for (ulong c = 0; c < cols; ++c) y[oy + r * cols + c] = (xr[c] - mean) * rstd * w[ow + c] + b[ob + c];
  st[os + 2 * r] = mean;
  st[os + 2 * r + 1] = rstd;
}
__kernel void layernorm_dx(__global const float* dy, ulong od, __global const float* x, ulong ox,
                           __global const float* w, ulong ow, __global const float* st, ulong os,
                           __global float* dx, ulong oo, ulong cols) {
  size_t r = get_global_id(0);
  float mean = st[os + 2 * r], rstd = st[os + 2 * r + 1];
  __global const float* xr = x + ox + r * cols;
  __global const float* d = dy + od + r * cols;
  float m1 = 0.f, m2 = 0.f;
  for (ulong c = 0; c < cols; ++c) {
    float xh = (xr[c] - mean) * rstd, dxh = d[c] * w[ow + c];
    m1 += dxh;
    m2 += dxh * xh;
  }
  m1 /= (float)cols;
  m2 /= (float)cols;
  for (ulong c = 0; c < cols; ++c) {
    float xh = (xr[c] - mean) * rstd;
    dx[oo + r * cols + c] = rstd * (d[c] * w[ow + c] - m1 - xh * m2);
  }
}
__kernel void layernorm_dwdb(__global const float* dy, ulong od, __global const float* x, ulong ox,
                             __global const float* st, ulong os, __global float* dw, ulong ow,
                             __global float* db, ulong ob, ulong rows, ulong cols) {
  size_t c = get_global_id(0);
  float sw = 0.f, sb = 0.f;
  for (ulong r = 0; r < rows; ++r) {
    float g = dy[od + r * cols + c];
    sw += g * (x[ox + r * cols + c] - st[os + 2 * r]) * st[os + 2 * r + 1];
    sb += g;
  }
  dw[ow + c] = sw;
  db[ob + c] = sb;
}
// Rows [first, first + V) of a table (the whole one: first 0); other ids give zero rows.
__kernel void embedding(__global const int* idx, ulong oi, __global const float* t, ulong ot,
                        __global float* y, ulong oy, ulong cols, ulong first, ulong V) {
  size_t i = get_global_id(0);
  ulong row = i / cols, c = i % cols;
  long r = (long)idx[oi + row] - (long)first;
  y[oy + i] = r >= 0 && r < (long)V ? t[ot + (ulong)r * cols + c] : 0.f;
}
// One work-item per column: rows are added in order, so the result is deterministic.
__kernel void embedding_bwd(__global const float* dy, ulong od, __global const int* idx, ulong oi,
                            __global float* dt, ulong ot, ulong n, ulong V, ulong cols,
                            ulong first) {
  size_t c = get_global_id(0);
  for (ulong v = 0; v < V; ++v) dt[ot + v * cols + c] = 0.f;
  for (ulong i = 0; i < n; ++i) {
    long r = (long)idx[oi + i] - (long)first;
    if (r >= 0 && r < (long)V) dt[ot + (ulong)r * cols + c] += dy[od + i * cols + c];
  }
}
// The vocabulary split over a group (XentParams): a slice's stats, in slot `slot` of `slots`.
__kernel void xent_stats(__global const float* l, ulong ol, __global const int* t, ulong ot,
                         __global float* st, ulong os, ulong V, ulong vocab0, ulong slot,
                         ulong slots) {
  size_t r = get_global_id(0);
  __global const float* x = l + ol + r * V;
  float mx = x[0];
  for (ulong v = 1; v < V; ++v) mx = fmax(mx, x[v]);
  float s = 0.f;
  for (ulong v = 0; v < V; ++v) s += exp(x[v] - mx);
  long tr = (long)t[ot + r] - (long)vocab0;
  __global float* o = st + os + r * slots * 3;
  for (ulong j = 0; j < slots * 3; ++j) o[j] = 0.f;
  o[3 * slot] = mx;
  o[3 * slot + 1] = s;
  o[3 * slot + 2] = tr >= 0 && tr < (long)V ? x[tr] : 0.f;
}
void xent_combine(__global const float* st, ulong slots, float* M, float* S, float* T) {
  float m = st[0];
  for (ulong j = 1; j < slots; ++j) m = fmax(m, st[3 * j]);
  float s = 0.f, t = 0.f;
  for (ulong j = 0; j < slots; ++j) {
    s += st[3 * j + 1] * exp(st[3 * j] - m);
    t += st[3 * j + 2];
  }
  *M = m;
  *S = s;
  *T = t;
}
__kernel void xent_slice_rows(__global const float* st, ulong os, __global const int* t, ulong ot,
                              __global float* per_row, ulong slots) {
  size_t r = get_global_id(0);
  if (t[ot + r] < 0) { per_row[r] = 0.f; return; }
  float M, S, T;
  xent_combine(st + os + r * slots * 3, slots, &M, &S, &T);
  per_row[r] = log(S) + M - T;
}
__kernel void xent_slice_bwd(__global const float* dloss, ulong odl, __global const float* l,
                             ulong ol, __global const int* t, ulong ot, __global const float* st,
                             ulong os, __global float* d, ulong od, ulong rows, ulong V,
                             ulong vocab0, ulong slots) {
  size_t r = get_global_id(0);
  ulong n = 0;
  for (ulong i = 0; i < rows; ++i) n += t[ot + i] >= 0;
  float k = n ? dloss[odl] / (float)n : 0.f;
  __global const float* x = l + ol + r * V;
  __global float* o = d + od + r * V;
  if (t[ot + r] < 0) { for (ulong v = 0; v < V; ++v) o[v] = 0.f; return; }
  float M, S, T;
  xent_combine(st + os + r * slots * 3, slots, &M, &S, &T);
  float inv = k / S;
  for (ulong v = 0; v < V; ++v) o[v] = exp(x[v] - M) * inv;
  long tr = (long)t[ot + r] - (long)vocab0;
  if (tr >= 0 && tr < (long)V) o[tr] -= k;
}
__kernel void xent_rows(__global const float* l, ulong ol, __global const int* t, ulong ot,
                        __global float* per_row, ulong V) {
  size_t r = get_global_id(0);
  int tr = t[ot + r];
  if (tr < 0) { per_row[r] = 0.f; return; }
  __global const float* x = l + ol + r * V;
  float mx = x[0];
  for (ulong v = 1; v < V; ++v) mx = fmax(mx, x[v]);
  float s = 0.f;
  for (ulong v = 0; v < V; ++v) s += exp(x[v] - mx);
  per_row[r] = log(s) + mx - x[tr];
}
__kernel void xent_mean(__global const float* per_row, __global const int* t, ulong ot, ulong rows,
                        __global float* loss, ulong olo) {
  float s = 0.f;
  ulong n = 0;
  for (ulong r = 0; r < rows; ++r) if (t[ot + r] >= 0) { s += per_row[r]; ++n; }
  loss[olo] = n ? s / (float)n : 0.f;
}
__kernel void xent_bwd(__global const float* dloss, ulong odl, __global const float* l, ulong ol,
                       __global const int* t, ulong ot, __global float* d, ulong od, ulong rows,
                       ulong V) {
  size_t r = get_global_id(0);
  ulong n = 0;
  for (ulong i = 0; i < rows; ++i) n += t[ot + i] >= 0;
  float k = n ? dloss[odl] / (float)n : 0.f;
  int tr = t[ot + r];
  __global const float* x = l + ol + r * V;
  __global float* o = d + od + r * V;
  if (tr < 0) { for (ulong v = 0; v < V; ++v) o[v] = 0.f; return; }
  float mx = x[0];
  for (ulong v = 1; v < V; ++v) mx = fmax(mx, x[v]);
  float s = 0.f;
  for (ulong v = 0; v < V; ++v) { float e = exp(x[v] - mx); o[v] = e; s += e; }
  float inv = k / s;
  for (ulong v = 0; v < V; ++v) o[v] *= inv;
  o[tr] -= k;
}
__kernel void adamw(__global float* p, ulong op, __global const float* g, ulong og,
                    __global float* m, ulong om, __global float* v, ulong ov, float lr, float b1,
                    float b2, float eps, float wd, float gs, float step_size, float bc2_sqrt) {
  size_t i = get_global_id(0);
  float gi = g[og + i] * gs;
  float mi = b1 * m[om + i] + (1.f - b1) * gi;
  float vi = b2 * v[ov + i] + (1.f - b2) * gi * gi;
  m[om + i] = mi;
  v[ov + i] = vi;
  float pi = p[op + i] * (1.f - lr * wd);
  p[op + i] = pi - step_size * mi / (sqrt(vi) / bc2_sqrt + eps);
}
// Sum of squares in a fixed order: partial sums per chunk, then one work-item adds them.
__kernel void sumsq_part(__global const float* a, ulong oa, ulong n, ulong chunk,
                         __global float* part) {
  size_t p = get_global_id(0);
  float s = 0.f;
  for (ulong i = p * chunk; i < min(n, (p + 1) * chunk); ++i) s += a[oa + i] * a[oa + i];
  part[p] = s;
}
__kernel void sumsq_total(__global const float* part, ulong parts, __global float* y, ulong oy,
                          int acc) {
  float s = 0.f;
  for (ulong p = 0; p < parts; ++p) s += part[p];
  y[oy] = acc ? y[oy] + s : s;
}
// bf16: the top half of an f32, rounded to nearest even (NaN stays a quiet NaN), as on the CPU.
uint bf16_bits(float x) {
  uint u = as_uint(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
  return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}
__kernel void round_bf16(__global const float* a, ulong oa, __global float* y, ulong oy) {
  const size_t i = get_global_id(0);
  y[oy + i] = as_float(bf16_bits(a[oa + i]) << 16);
}
__kernel void to_bf16(__global const float* a, ulong oa, __global ushort* y, ulong oy) {
  const size_t i = get_global_id(0);
  y[oy + i] = (ushort)bf16_bits(a[oa + i]);
}
__kernel void from_bf16(__global const ushort* a, ulong oa, __global float* y, ulong oy) {
  const size_t i = get_global_id(0);
  y[oy + i] = as_float((uint)a[oa + i] << 16);
}
)CLC";

}  // namespace mxn::opencl
