#include "core/tensor.h"

#include "core/error.h"

namespace mxn {

int64_t numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

std::string shape_str(const Shape& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

std::vector<int64_t> contiguous_strides(const Shape& s) {
  std::vector<int64_t> st(s.size());
  int64_t acc = 1;
  for (size_t i = s.size(); i-- > 0;) {
    st[i] = acc;
    acc *= s[i];
  }
  return st;
}

Tensor::Tensor(Shape s, DType t, void* buf, uint64_t off)
    : shape(std::move(s)), strides(contiguous_strides(shape)), dtype(t), buffer(buf), offset(off) {}

mxn_tensor Tensor::to_abi() const {
  MXN_CHECK(shape.size() <= MXN_MAX_DIMS, "tensor has too many dims for the chip contract");
  MXN_CHECK(is_contiguous(), "the chip contract takes contiguous tensors");
  mxn_tensor t{};
  t.buffer = buffer;
  t.offset = offset;
  t.dtype = int32_t(dtype);
  t.ndim = int32_t(shape.size());
  for (size_t i = 0; i < shape.size(); ++i) t.shape[i] = shape[i];
  return t;
}

}  // namespace mxn
