#pragma once
// Chips the planner knows without measuring them: published peak figures (dense, no sparsity)
// with their source. Chips here are measured instead (`mxn devices`, the profiler); a cluster
// file may also describe a chip of its own.
#include <string>
#include <vector>

namespace mxn {

struct ChipSpec {
  std::string name;
  double bf16_tflops = 0;  // dense bf16 (or fp16 where the vendor gives no bf16) matrix peak
  double memory_gib = 0;   // device memory
  double hbm_gbs = 0;      // device memory bandwidth, GB/s
  std::string source;      // where the figures come from
  // Dense f32 peak without TF32 (what an f32 GEMM reaches: cuBLAS's SGEMM, oneDNN's f32 GEMM);
  // 0 where not published. plan --dtype f32 prices the GEMMs at it (Cluster::at_dtype).
  double f32_tflops = 0;
};

const std::vector<ChipSpec>& chip_table();
// The table's entry for `name` (case-insensitive), or nullptr.
const ChipSpec* find_chip(const std::string& name);

}  // namespace mxn
