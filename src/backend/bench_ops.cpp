#include "backend/bench_ops.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "backend/cpu/kernels.h"
#include "backend/op_case.h"
#include "core/rng.h"

namespace mxn {
namespace {

using namespace opcase;

struct Item {
  std::string label;
  Case c;
  double work;  // flops, or bytes moved
  bool flops;
};

std::vector<Item> items() {
  const int64_t B = 8, T = 256, C = 384, H = 6, V = 256, N = B * T, P = 10'700'000;
  const double f4 = 4;
  auto mm = [&](const char* l, int64_t M, int64_t K, int64_t Nn, bool tb) {
    return Item{
        l,
        with({MXN_OP_MATMUL, {f({M, K}), f(tb ? Shape{Nn, K} : Shape{K, Nn})}, {f({M, Nn})}},
             MatmulParams{false, tb}),
        2.0 * M * K * Nn, true};
  };
  const double att = 4.0 * B * H * T * T * (C / H);  // QK^T and PV, full square
  AttentionParams ap;                                // causal, scale 1/sqrt(hd)
  ap.heads = ap.kv_heads = H, ap.head_dim = C / H, ap.T = T;
  return {
      mm("matmul c_attn 2048x384x1152", N, C, 3 * C, false),
      mm("matmul c_fc 2048x384x1536", N, C, 4 * C, false),
      mm("matmul c_proj 2048x1536x384", N, 4 * C, C, false),
      mm("matmul lm_head 2048x384x256^T", N, C, V, true),
      {"attention fwd B8 H6 T256",
       with({MXN_OP_ATTENTION, {f({N, C}), f({N, C}), f({N, C})}, {f({N, C}), f({N, H})}}, ap), att,
       true},
      {"attention bwd",
       with({MXN_OP_ATTENTION_BWD,
             {f({N, C}), f({N, C}), f({N, C}), f({N, C}), f({N, C}), pos({N, H})},
             {f({N, C}), f({N, C}), f({N, C})}},
            ap),
       2 * att, true},
      {"layernorm 2048x384",
       with({MXN_OP_LAYERNORM, {f({N, C}), f({C}), f({C})}, {f({N, C}), f({N, 2})}}, NormParams{}),
       f4 * 2 * N * C, false},
      {"layernorm bwd",
       {MXN_OP_LAYERNORM_BWD,
        {f({N, C}), f({N, C}), f({C}), pos({N, 2})},
        {f({N, C}), f({C}), f({C})}},
       f4 * 3 * N * C,
       false},
      {"gelu 2048x1536",
       {MXN_OP_GELU, {f({N, 4 * C})}, {f({N, 4 * C})}},
       f4 * 2 * N * 4 * C,
       false},
      {"gelu bwd",
       {MXN_OP_GELU_BWD, {f({N, 4 * C}), f({N, 4 * C})}, {f({N, 4 * C})}},
       f4 * 3 * N * 4 * C,
       false},
      {"add 2048x384", {MXN_OP_ADD, {f({N, C}), f({N, C})}, {f({N, C})}}, f4 * 3 * N * C, false},
      {"add_bias 2048x1536",
       {MXN_OP_ADD_BIAS, {f({N, 4 * C}), f({4 * C})}, {f({N, 4 * C})}},
       f4 * 2 * N * 4 * C,
       false},
      {"softmax 2048x256", {MXN_OP_SOFTMAX, {f({N, V})}, {f({N, V})}}, f4 * 2 * N * V, false},
      {"cross_entropy 2048x256",
       {MXN_OP_CROSS_ENTROPY, {f({N, V}), tgt({N}, V)}, {f({1})}},
       f4 * N * V,
       false},
      {"cross_entropy bwd",
       {MXN_OP_CROSS_ENTROPY_BWD, {f({1}), f({N, V}), tgt({N}, V)}, {f({N, V})}},
       f4 * 2 * N * V,
       false},
      {"embedding 2048x384",
       {MXN_OP_EMBEDDING, {idx({N}, V), f({V, C})}, {f({N, C})}},
       f4 * 2 * N * C,
       false},
      {"embedding bwd",
       {MXN_OP_EMBEDDING_BWD, {f({N, C}), idx({N}, V)}, {f({V, C})}},
       f4 * N * C,
       false},
      {"adamw 10.7M params",
       with({MXN_OP_ADAMW, {f({P})}, {f({P}), f({P}), pos({P})}},
            AdamwParams{1, 1e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, 1.f}),
       f4 * 7 * P, false},
      {"sum_squares 10.7M", {MXN_OP_SUM_SQUARES, {f({P})}, {f({1})}}, f4 * P, false},
  };
}

// Median seconds of `reps` runs after one warm-up run.
double time_case(Device& dev, const Case& c, const std::vector<std::vector<uint8_t>>& data,
                 int reps) {
  BoundCase b(dev, c, data);
  b.run();
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    b.run();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace

std::vector<OpBench> bench_ops(Device& dev, Device& cpu, int reps) {
  std::vector<OpBench> out;
  Rng rng(5);
  for (const Item& it : items()) {
    std::vector<std::vector<uint8_t>> data;
    for (const auto* ops : {&it.c.in, &it.c.out})
      for (const Operand& o : *ops) data.push_back(make_data(o, rng));
    const double scale = it.flops ? 1e9 : 1e9;
    OpBench r{it.label, it.flops ? "GFLOP/s" : "GB/s", 0, 0};
    r.dev = it.work / time_case(dev, it.c, data, reps) / scale;
    r.cpu = &dev == &cpu ? r.dev : it.work / time_case(cpu, it.c, data, reps) / scale;
    out.push_back(r);
  }
  return out;
}

double cpu_gemm_gflops(bool bf16, int64_t M, int64_t N, int64_t K, int reps, int threads) {
  auto dev = open_device("cpu", threads);  // sets the OpenMP threads as training does
  Rng rng(9);
  std::vector<float> a(size_t(M * K)), b(size_t(K * N)), c(size_t(M * N));
  for (auto& e : a) e = float(rng.normal());
  for (auto& e : b) e = float(rng.normal());
  std::vector<uint16_t> a16(a.size()), b16(b.size());
  const bool native = bf16 && cpu::native_bf16();
  if (native) {
    cpu::to_bf16(a.data(), a16.data(), M * K);
    cpu::to_bf16(b.data(), b16.data(), K * N);
  }
  cpu::Scratch s;
  auto once = [&] {
    if (native)
      cpu::gemm_bf16(false, false, M, N, K, 1.f, a16.data(), b16.data(), false, c.data());
    else
      cpu::matmul(s, bf16 ? cpu::Compute::bf16 : cpu::Compute::f32, false, false, 1, M, N, K, 1.f,
                  a.data(), 0, b.data(), 0, false, c.data(), 0);
  };
  once();
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    once();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return 2.0 * double(M) * double(N) * double(K) / t[t.size() / 2] / 1e9;
}

}  // namespace mxn
