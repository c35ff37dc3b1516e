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

}  // namespace mxn
