#pragma once
// exp and tanh in plain arithmetic, so that `#pragma omp simd` loops vectorise (glibc's vector
// expf is only declared under -ffast-math). exp is accurate to about 2 ulp over the float range.
#include <cstdint>
#include <cstring>

namespace mxn::cpu {

inline float vexp(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  // x = n ln2 + r, |r| <= ln2/2; ln2 split in two for an exact product.
  // Round to nearest by adding and removing 1.5 * 2^23 (no libm call, so it vectorises).
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // Scale by 2^n in two halves so n = 128 (x near 88.7) does not overflow the exponent field.
  const int32_t ni = int32_t(n);
  const int32_t h = ni >> 1;
  uint32_t a = uint32_t(h + 127) << 23, b = uint32_t(ni - h + 127) << 23;
  float fa, fb;
  std::memcpy(&fa, &a, 4);
  std::memcpy(&fb, &b, 4);
  return p * fa * fb;
}

inline float vtanh(float x) {
  // tanh(x) = 1 - 2 / (exp(2x) + 1); for |x| > 9, tanh rounds to +-1 in float.
  // Near 0 the subtraction would cancel, so the series is used there; both are computed and
  // one is selected, which keeps the loop free of branches.
  const float c = x > 9.f ? 9.f : (x < -9.f ? -9.f : x);
  const float c2 = c * c;
  const float series = c * (1.f + c2 * (-0.333333333f + c2 * (0.133333333f - c2 * 0.053968254f)));
  const float via_exp = 1.f - 2.f / (vexp(2.f * c) + 1.f);
  return c2 < 0.00390625f ? series : via_exp;
}

// y = exp(x - max(x)) over a row of n; returns the sum of y (the softmax's normaliser).
// x and y may be the same row.
inline float exp_shifted_row(const float* x, float* y, int64_t n) {
  float mx = x[0];
#pragma omp simd reduction(max : mx)
  for (int64_t i = 1; i < n; ++i) mx = mx > x[i] ? mx : x[i];
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    y[i] = vexp(x[i] - mx);
    sum += y[i];
  }
  return sum;
}

// A row's max and sum of exp(x - max) (the log-sum-exp's parts), without writing the exps.
inline void max_sum_exp(const float* x, int64_t n, float* max, float* sum) {
  float mx = -INFINITY, s = 0.f;
#pragma omp simd reduction(max : mx)
  for (int64_t i = 0; i < n; ++i) mx = mx > x[i] ? mx : x[i];
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += vexp(x[i] - mx);
  *max = mx, *sum = s;
}

}  // namespace mxn::cpu
