#pragma once
// `mxn bench ops`: per-op throughput at the GPT benchmark's shapes (6 layers, width 384,
// 6 heads, context 256, batch 8, vocab 256) on a device, beside the CPU's.
#include <string>
#include <vector>

#include "backend/device.h"

namespace mxn {

struct OpBench {
  std::string label;
  std::string unit;  // "GFLOP/s" or "GB/s"
  double dev = 0;    // throughput on the device
  double cpu = 0;    // throughput on the CPU
};

std::vector<OpBench> bench_ops(Device& dev, Device& cpu, int reps);

// `mxn bench gemm`: oneDNN's GEMM rate on the CPU for C (M x N, f32) = A (M x K) B (K x N), in
// GFLOP/s, median of `reps` runs after a warm-up: bf16 operands already converted (the matmul
// primitive) or f32 (sgemm). The figure a model-FLOP utilisation is measured against.
double cpu_gemm_gflops(bool bf16, int64_t M, int64_t N, int64_t K, int reps, int threads);

}  // namespace mxn
