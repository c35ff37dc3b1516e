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

namespace {

// One row times a matrix: batch-1 decoding, which reads every weight once per token and is bound
// by memory bandwidth. oneDNN's sgemm packs B for M = 1 as for any M; this streams it instead,
// each thread over its own share of the outputs.
template <typename W>
void gemv(bool tb, int64_t N, int64_t K, float alpha, const float* x, const W* B, bool accumulate,
          float* y) {
  if (tb) {  // B is N x K: dot products, four rows at once (four accumulator chains, one x load)
    const int64_t quads = (N + 3) / 4;
#pragma omp parallel for schedule(static)
    for (int64_t q = 0; q < quads; ++q) {
      const int64_t n = q * 4;
      const W* b0 = B + n * K;
      const W* b1 = n + 1 < N ? b0 + K : b0;
      const W* b2 = n + 2 < N ? b1 + K : b0;
      const W* b3 = n + 3 < N ? b2 + K : b0;
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t k = 0; k < K; ++k) {
        const float xk = x[k];
        s0 += widen(b0[k]) * xk, s1 += widen(b1[k]) * xk;
        s2 += widen(b2[k]) * xk, s3 += widen(b3[k]) * xk;
      }
      const float sums[4] = {s0, s1, s2, s3};
      for (int64_t j = 0; j < 4 && n + j < N; ++j)
        y[n + j] = alpha * sums[j] + (accumulate ? y[n + j] : 0.f);
    }
    return;
  }
  // B is K x N: each thread takes blocks of columns and walks down the rows, four at a time.
  constexpr int64_t kMaxBlock = 1024;
  const int64_t threads = omp_get_max_threads();
  const int64_t blocks = threads * ((N + threads * kMaxBlock - 1) / (threads * kMaxBlock));
  const int64_t width = ((N + blocks - 1) / blocks + 15) / 16 * 16;
#pragma omp parallel for schedule(static)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t n0 = blk * width, w = std::min(N - n0, width);
    if (w <= 0) continue;
    alignas(64) float acc[kMaxBlock + 16];
    for (int64_t j = 0; j < w; ++j) acc[j] = 0.f;
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) {
      const float x0 = x[k], x1 = x[k + 1], x2 = x[k + 2], x3 = x[k + 3];
      const W *b0 = B + k * N + n0, *b1 = b0 + N, *b2 = b1 + N, *b3 = b2 + N;
#pragma omp simd
      for (int64_t j = 0; j < w; ++j)
        acc[j] += x0 * widen(b0[j]) + x1 * widen(b1[j]) + x2 * widen(b2[j]) + x3 * widen(b3[j]);
    }
    for (; k < K; ++k) {
      const float xk = x[k];
      const W* b = B + k * N + n0;
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) acc[j] += xk * widen(b[j]);
    }
    for (int64_t j = 0; j < w; ++j) y[n0 + j] = alpha * acc[j] + (accumulate ? y[n0 + j] : 0.f);
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
