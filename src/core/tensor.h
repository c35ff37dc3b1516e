#pragma once
// Tensor: a shape, strides and a dtype over a span of some device's buffer. It does not own the
// memory: buffers belong to the backend layer (backend/device.h) or to the graph's arena.
#include <cstdint>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace mxn {

using Shape = std::vector<int64_t>;

int64_t numel(const Shape& s);
std::string shape_str(const Shape& s);  // "[2, 3]"
std::vector<int64_t> contiguous_strides(const Shape& s);

struct Tensor {
  Shape shape;
  std::vector<int64_t> strides;  // in elements
  DType dtype = DType::f32;
  void* buffer = nullptr;  // a backend buffer handle
  uint64_t offset = 0;     // bytes into the buffer

  Tensor() = default;
  Tensor(Shape s, DType t, void* buf = nullptr, uint64_t off = 0);
  int64_t numel() const { return mxn::numel(shape); }
  uint64_t nbytes() const { return uint64_t(numel()) * dtype_size(dtype); }
  bool is_contiguous() const { return strides == contiguous_strides(shape); }
  mxn_tensor to_abi() const;
};

// A tensor that lives in host memory, for files and tests.
struct HostTensor {
  Shape shape;
  DType dtype = DType::f32;
  std::vector<uint8_t> bytes;

  HostTensor() = default;
  HostTensor(Shape s, DType t)
      : shape(std::move(s)), dtype(t), bytes(size_t(mxn::numel(shape)) * dtype_size(t)) {}
  int64_t numel() const { return mxn::numel(shape); }
  float* f32() { return reinterpret_cast<float*>(bytes.data()); }
  const float* f32() const { return reinterpret_cast<const float*>(bytes.data()); }
  int32_t* i32() { return reinterpret_cast<int32_t*>(bytes.data()); }
};

}  // namespace mxn
