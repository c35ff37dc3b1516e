#pragma once
// Every op of the chip contract in double precision on the host, written from its definition in
// backend_abi.h with none of a backend's code paths: what the conformance kit checks the CPU
// backend against (the CPU backend is in turn the reference every other backend is checked
// against). bf16 compute rounds the operands to bf16 first, as the contract says, and then
// computes exactly, so a bf16 row is compared with f32 arithmetic on the rounded inputs.
#include <vector>

#include "backend/op_case.h"

namespace mxn::opcase {

using Values = std::vector<std::vector<double>>;

// The outputs of case `c` for inputs `in`, starting from the outputs' values `out` (what the
// device's outputs were filled with: accumulating ops add into them, windowed ops leave the rest).
Values reference_outputs(const Case& c, const Values& in, Values out);
// The mixture-of-experts ops (reference_moe.cpp); false for any other op.
bool moe_reference(const mxn_op_call& k, const Values& in, Values& out);

}  // namespace mxn::opcase
