#pragma once
// One op call with its operands described (shapes, dtypes, how to fill them), bound to a device:
// shared by the conformance kit and `mxn bench ops`.
#include <array>
#include <memory>
#include <vector>

#include "backend/device.h"
#include "core/rng.h"

namespace mxn::opcase {

enum class Gen { normal, positive, index, target, distinct, offsets };

struct Operand {
  Shape shape;
  Gen gen = Gen::normal;
  int64_t range = 0;  // index: [0, range); target: [-1, range)
  DType dtype = DType::f32;
};

struct Case {
  mxn_op op;
  std::vector<Operand> in, out;
  std::array<int64_t, MXN_MAX_IP> ip{};
  std::array<float, 8> fp{};
};

// A case with its op's parameters, by name (op_params.h).
template <typename P>
Case with(Case c, const P& p) {
  set_params(c, p);
  return c;
}

inline Operand f(Shape s) { return {std::move(s)}; }
inline Operand pos(Shape s) { return {std::move(s), Gen::positive}; }
inline Operand idx(Shape s, int64_t r) { return {std::move(s), Gen::index, r, DType::i32}; }
inline Operand tgt(Shape s, int64_t r) { return {std::move(s), Gen::target, r, DType::i32}; }
// Distinct indexes in [0, r) (a scatter's destinations, which must not collide): r >= count.
inline Operand distinct(Shape s, int64_t r) { return {std::move(s), Gen::distinct, r, DType::i32}; }
// Group offsets (E+1): non-decreasing from 0 to r, some groups empty (a grouped GEMM's experts).
inline Operand offsets(int64_t E, int64_t r) { return {{E + 1}, Gen::offsets, r, DType::i32}; }

std::vector<uint8_t> make_data(const Operand& o, Rng& rng);
std::vector<double> to_double(const std::vector<uint8_t>& b, DType t);

// The case's operands allocated on `dev` and filled with `data` (inputs, then outputs: outputs
// are pre-filled so accumulating ops are checked too). run() may be called repeatedly.
class BoundCase {
 public:
  BoundCase(Device& dev, const Case& c, const std::vector<std::vector<uint8_t>>& data);
  BoundCase& run();
  std::vector<std::vector<uint8_t>> outputs() const;
  const mxn_op_call& call() const { return call_; }

 private:
  Device& dev_;
  std::vector<std::unique_ptr<Buffer>> bufs_;
  std::vector<Tensor> out_;
  mxn_op_call call_;
};

}  // namespace mxn::opcase
