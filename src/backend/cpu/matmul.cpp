// Matmul on the CPU: oneDNN does every GEMM (f32, and bf16 operands with f32 accumulation).
#include <dnnl.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <dnnl.hpp>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "backend/cpu/kernels.h"
#include "backend/cpu/vmath.h"
#include "core/dtype.h"
#include "core/error.h"

namespace mxn::cpu {

std::atomic<bool> g_gemm_split{false};
void set_gemm_split(bool on) { g_gemm_split.store(on, std::memory_order_relaxed); }

void sgemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
           int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  dnnl_status_t st =
      dnnl_sgemm(ta ? 'T' : 'N', tb ? 'T' : 'N', M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  MXN_CHECK(st == dnnl_success, "dnnl_sgemm failed");
}

namespace {

// The native bf16 path: oneDNN's matmul primitive with bf16 sources and f32 destination, which
// runs on AMX / AVX512-BF16. Primitives and their memory objects are made once per shape; a call
// only points them at the data and runs through the C API, so a step allocates nothing here.
struct Bf16Gemm {
  struct Entry {
    dnnl::matmul prim;
    dnnl::memory a, b, c, bias;
  };
  dnnl::engine eng{dnnl::engine::kind::cpu, 0};
  dnnl::stream strm{eng};
  using Key = std::tuple<bool, bool, int64_t, int64_t, int64_t, float, bool, bool, int64_t, int64_t,
                         int64_t>;
  std::map<Key, Entry> cache;

  // bias (N), when given, is added to every row of C in the GEMM (oneDNN's bias argument).
  // lda, ldb, ldc: the row strides of A, B and C as stored (0: dense).
  void run(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const uint16_t* A,
           const uint16_t* B, bool accumulate, float* C, const float* bias = nullptr,
           int64_t lda = 0, int64_t ldb = 0, int64_t ldc = 0) {
    if (lda == 0) lda = ta ? M : K;
    if (ldb == 0) ldb = tb ? K : N;
    if (ldc == 0) ldc = N;
    const Key key{ta, tb, M, N, K, alpha, accumulate, bias != nullptr, lda, ldb, ldc};
    auto it = cache.find(key);
    if (it == cache.end()) {
      using dt = dnnl::memory::data_type;
      dnnl::memory::desc a_md({M, K}, dt::bf16,
                              ta ? dnnl::memory::dims{1, lda} : dnnl::memory::dims{lda, 1});
      dnnl::memory::desc b_md({K, N}, dt::bf16,
                              tb ? dnnl::memory::dims{1, ldb} : dnnl::memory::dims{ldb, 1});
      dnnl::memory::desc c_md({M, N}, dt::f32, dnnl::memory::dims{ldc, 1});
      dnnl::primitive_attr attr;
      if (alpha != 1.0f) attr.set_output_scales(0, {alpha});
      if (accumulate) {
        dnnl::post_ops po;
        po.append_sum(1.0f);
        attr.set_post_ops(po);
      }
      dnnl::memory::desc bias_md({1, N}, dt::f32, dnnl::memory::dims{N, 1});
      dnnl::matmul::primitive_desc pd(bias ? dnnl::matmul::desc(a_md, b_md, bias_md, c_md)
                                           : dnnl::matmul::desc(a_md, b_md, c_md),
                                      attr, eng);
      Entry e{dnnl::matmul(pd), dnnl::memory(a_md, eng, nullptr), dnnl::memory(b_md, eng, nullptr),
              dnnl::memory(c_md, eng, nullptr), dnnl::memory(bias_md, eng, nullptr)};
      it = cache.emplace(key, std::move(e)).first;
    }
    Entry& e = it->second;
    dnnl_memory_set_data_handle(e.a.get(), const_cast<uint16_t*>(A));
    dnnl_memory_set_data_handle(e.b.get(), const_cast<uint16_t*>(B));
    dnnl_memory_set_data_handle(e.c.get(), C);
    dnnl_memory_set_data_handle(e.bias.get(), const_cast<float*>(bias));
    const dnnl_exec_arg_t args[4] = {{DNNL_ARG_SRC, e.a.get()},
                                     {DNNL_ARG_WEIGHTS, e.b.get()},
                                     {DNNL_ARG_DST, e.c.get()},
                                     {DNNL_ARG_BIAS, e.bias.get()}};
    MXN_CHECK(dnnl_primitive_execute(e.prim.get(), strm.get(), bias ? 4 : 3, args) == dnnl_success,
              "oneDNN bf16 matmul failed");
    MXN_CHECK(dnnl_stream_wait(strm.get()) == dnnl_success, "oneDNN stream wait failed");
  }
};

template <typename T, typename F>
void convert(const float* src, T* dst, int64_t n, F f) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) dst[i] = f(src[i]);
}

// f32 -> bf16 with the CPU's own instruction (round to nearest even, as f32_to_bf16; denormal
// inputs become zero), 16 at a time. Only called where native_bf16() holds. Scalar loops with
// the NaN test did not vectorise and cost as much as the bf16 GEMMs they fed.
}  // namespace

__attribute__((target("avx512f,avx512bf16"))) void to_bf16_here(const float* src, uint16_t* dst,
                                                                int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), reinterpret_cast<const __m256i&>(h));
  }
  for (; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
}

void to_bf16(const float* src, uint16_t* dst, int64_t n) {
  constexpr int64_t kChunk = 4096;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < n; c += kChunk) to_bf16_here(src + c, dst + c, std::min(kChunk, n - c));
}

void from_bf16(const uint16_t* src, float* dst, int64_t n) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
}

namespace {
Bf16Gemm& bf16_gemm() {  // one primitive cache per thread that calls it
  static thread_local Bf16Gemm gemm;
  return gemm;
}
}  // namespace

void gemm_bf16(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const uint16_t* A,
               const uint16_t* B, bool accumulate, float* C) {
  bf16_gemm().run(ta, tb, M, N, K, alpha, A, B, accumulate, C);
}

void gemm_bf16(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const uint16_t* A,
               int64_t lda, const uint16_t* B, int64_t ldb, bool accumulate, float* C,
               int64_t ldc) {
  bf16_gemm().run(ta, tb, M, N, K, alpha, A, B, accumulate, C, nullptr, lda, ldb, ldc);
}

bool native_bf16() {
  static const bool yes = dnnl_get_effective_cpu_isa() >= dnnl_cpu_isa_avx512_core_bf16 &&
                          dnnl_get_effective_cpu_isa() != dnnl_cpu_isa_all;
  return yes;
}

template <typename W>
void gemv_rows(int64_t R, int64_t N, int64_t K, float alpha, const float* const* x,
               const W* const* B, bool accumulate, float* const* y) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < R * N; ++i) {
    const int64_t r = i / N, n = i % N;
    const W* b = B[r] + n * K;
    const float* v = x[r];
    float acc[32] = {};  // two chains of 16 lanes, kept in registers
    int64_t k = 0;
    for (; k + 32 <= K; k += 32)
      for (int64_t j = 0; j < 32; ++j) acc[j] += widen(b[k + j]) * v[k + j];
    float s0 = 0.f, s1 = 0.f;
    for (; k < K; ++k) s0 += widen(b[k]) * v[k];
    for (float a : acc) s1 += a;
    y[r][n] = alpha * (s0 + s1) + (accumulate ? y[r][n] : 0.f);
  }
}
template void gemv_rows(int64_t, int64_t, int64_t, float, const float* const*, const float* const*,
                        bool, float* const*);
template void gemv_rows(int64_t, int64_t, int64_t, float, const float* const*,
                        const uint16_t* const*, bool, float* const*);

namespace {

// One row times a matrix: batch-1 decoding, which reads every weight once per token and is bound
// by memory bandwidth. oneDNN's sgemm packs B for M = 1 as for any M; this streams it instead,
// each thread over its own share of the outputs (with B as N x K: gemv_rows).
template <typename W>
void gemv(bool tb, int64_t N, int64_t K, float alpha, const float* x, const W* B, bool accumulate,
          float* y) {
  if (tb) return gemv_rows(1, N, K, alpha, &x, &B, accumulate, &y);
  // B is K x N: each thread takes a run of B's rows (one linear stream, as above) and sums them,
  // scaled by x, into its own N partial sums; then the threads add the partials over columns.
  // (Each thread down a block of columns, four rows at a time, streamed 6-16 GB/s here; this
  // 12-27 GB/s, GPT-2's shapes in bf16.)
  const int64_t T = std::min<int64_t>(omp_get_max_threads(), std::max<int64_t>(K / 16, 1));
  thread_local std::vector<float> partial;  // T x N; grows once
  if (partial.size() < size_t(T * N)) partial.resize(size_t(T * N));
  float* part = partial.data();
#pragma omp parallel num_threads(int(T))
  {
    const int64_t t = omp_get_thread_num(), k0 = K * t / T, k1 = K * (t + 1) / T;
    float* p = part + t * N;
    for (int64_t j = 0; j < N; ++j) p[j] = 0.f;
    int64_t k = k0;
    if (N >= 3072)  // partials past L1: two rows a pass halve their traffic
      for (; k + 2 <= k1; k += 2) {
        const float x0 = x[k], x1 = x[k + 1];
        const W *b0 = B + k * N, *b1 = b0 + N;
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) p[j] += x0 * widen(b0[j]) + x1 * widen(b1[j]);
      }
    for (; k < k1; ++k) {
      const float xk = x[k];
      const W* b = B + k * N;
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) p[j] += xk * widen(b[j]);
    }
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t j = 0; j < N; ++j) {
      float sum = 0.f;
      for (int64_t u = 0; u < T; ++u) sum += part[u * N + j];
      y[j] = alpha * sum + (accumulate ? y[j] : 0.f);
    }
  }
}

}  // namespace

namespace {
void add_bias_rows(float* C, const float* bias, int64_t rows, int64_t N) {
  if (bias) add_bias(C, bias, C, rows, N);
}
}  // namespace

void matmul(Scratch& s, Compute compute, bool ta, bool tb, int64_t batch, int64_t M, int64_t N,
            int64_t K, float alpha, const float* A, int64_t sa, const float* B, int64_t sb,
            bool accumulate, float* C, int64_t sc, const float* bias) {
  const int64_t lda = ta ? M : K, ldb = tb ? K : N;
  if (M == 1 && compute == Compute::f32) {
    for (int64_t i = 0; i < batch; ++i)
      gemv(tb, N, K, alpha, A + i * sa, B + i * sb, accumulate, C + i * sc);
    add_bias_rows(C, bias, M, N);
    return;
  }
  if (compute == Compute::bf16 && native_bf16()) {
    Bf16Gemm& gemm = bf16_gemm();
    auto* a16 = reinterpret_cast<uint16_t*>(s.get(s.a, size_t(M * K + 1) / 2));
    auto* b16 = reinterpret_cast<uint16_t*>(s.get(s.b, size_t(K * N + 1) / 2));
    for (int64_t i = 0; i < batch; ++i) {
      to_bf16(A + i * sa, a16, M * K);
      to_bf16(B + i * sb, b16, K * N);
      gemm.run(ta, tb, M, N, K, alpha, a16, b16, accumulate, C + i * sc, bias);
    }
    return;
  }
  if (compute == Compute::bf16) {
    // No bf16 units: round the operands to bf16 and multiply in f32. The numbers are those of a
    // bf16 GEMM with f32 accumulation, as on AMX, at f32 speed.
    float* ar = s.get(s.a, size_t(M * K));
    float* br = s.get(s.b, size_t(K * N));
    for (int64_t i = 0; i < batch; ++i) {
      convert(A + i * sa, ar, M * K, round_bf16);
      convert(B + i * sb, br, K * N, round_bf16);
      sgemm(ta, tb, M, N, K, alpha, ar, lda, br, ldb, accumulate ? 1.f : 0.f, C + i * sc, N);
    }
    add_bias_rows(C, bias, M, N);
    return;
  }
  // The option "gemm_split" (mxn serve sets it): the columns go out in chunks of 256 that a
  // running thread takes when another is descheduled, instead of oneDNN's static split across
  // threads. When other work shares the cores (HTTP threads, a client) a preempted thread no
  // longer stalls the GEMM: +25% serving throughput here (docs/benchmarks.md); alone it is 12%
  // slower, so training keeps oneDNN's split.
  if (g_gemm_split.load(std::memory_order_relaxed) && batch == 1 && N >= 512) {
    constexpr int64_t kCols = 256;
    const int64_t chunks = (N + kCols - 1) / kCols;
#pragma omp parallel for schedule(dynamic)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t n0 = c * kCols, w = std::min(kCols, N - n0);
      sgemm(ta, tb, M, w, K, alpha, A, lda, tb ? B + n0 * ldb : B + n0, ldb, accumulate ? 1.f : 0.f,
            C + n0, N);
    }
    add_bias_rows(C, bias, M, N);
    return;
  }
  for (int64_t i = 0; i < batch; ++i)
    sgemm(ta, tb, M, N, K, alpha, A + i * sa, lda, B + i * sb, ldb, accumulate ? 1.f : 0.f,
          C + i * sc, N);
  add_bias_rows(C, bias, M, N);
}

void matmul_bf16_weights(Scratch& s, Compute compute, bool ta, bool tb, int64_t batch, int64_t M,
                         int64_t N, int64_t K, float alpha, const float* A, int64_t sa,
                         const uint16_t* B, int64_t sb, bool accumulate, float* C, int64_t sc,
                         const float* bias) {
  if (M == 1) {
    for (int64_t i = 0; i < batch; ++i)
      gemv(tb, N, K, alpha, A + i * sa, B + i * sb, accumulate, C + i * sc);
    add_bias_rows(C, bias, M, N);
    return;
  }
  if (compute == Compute::bf16 && native_bf16()) {  // B as it is; A rounded to bf16 (serving)
    Bf16Gemm& gemm = bf16_gemm();
    auto* a16 = reinterpret_cast<uint16_t*>(s.get(s.a, size_t(M * K + 1) / 2));
    for (int64_t i = 0; i < batch; ++i) {
      to_bf16(A + i * sa, a16, M * K);
      gemm.run(ta, tb, M, N, K, alpha, a16, B + i * sb, accumulate, C + i * sc, bias);
    }
    return;
  }
  // Widened into scratch.c (matmul's bf16 path uses scratch.a and scratch.b for its operands).
  float* wide = s.get(s.c, size_t(K * N));
  for (int64_t i = 0; i < batch; ++i) {
    from_bf16(B + i * sb, wide, K * N);
    matmul(s, compute, ta, tb, 1, M, N, K, alpha, A + i * sa, 0, wide, 0, accumulate, C + i * sc, 0,
           bias);
  }
}

}  // namespace mxn::cpu
