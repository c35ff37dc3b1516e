#pragma once
// The conformance kit: every op of the chip contract, forward and backward kernels, on random
// inputs of several shapes (odd sizes included), run on a device and on a reference, and
// compared with a tolerance per dtype. The reference is the CPU backend for other backends, and
// for the CPU backend itself every op computed in double precision (reference.h), so that the
// reference is checked too. `mxn conformance` prints the table.
#include <string>
#include <vector>

#include "backend/device.h"

namespace mxn {

struct ConformanceRow {
  std::string op;
  std::string dtype;
  std::string status;  // "pass", "FAIL" or "unsupported"
  double max_err = 0;  // max over cases of max|out - ref| / max(1, max|ref|)
  int cases = 0;
};

// `ref` null: the double-precision reference. `only_op` empty: every op. Throws an Error naming
// the ops when `only_op` is not one.
std::vector<ConformanceRow> run_conformance(Device& dev, Device* ref, DType dtype,
                                            const std::string& only_op = "");
double conformance_tolerance(DType dtype);

}  // namespace mxn
