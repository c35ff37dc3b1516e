#include "backend/op_case.h"

#include <algorithm>

namespace mxn::opcase {

std::vector<uint8_t> make_data(const Operand& o, Rng& rng) {
  const int64_t n = numel(o.shape);
  std::vector<uint8_t> out(size_t(n) * dtype_size(o.dtype));
  if (o.gen == Gen::distinct) {  // a shuffled prefix of 0..range-1
    std::vector<int32_t> all(size_t(o.range));
    for (int64_t i = 0; i < o.range; ++i) all[size_t(i)] = int32_t(i);
    for (int64_t i = o.range - 1; i > 0; --i)
      std::swap(all[size_t(i)], all[size_t(rng.next() % uint64_t(i + 1))]);
    std::copy_n(all.begin(), n, reinterpret_cast<int32_t*>(out.data()));
    return out;
  }
  if (o.gen == Gen::offsets) {  // sorted draws in [0, range], first 0 and last range
    auto* v = reinterpret_cast<int32_t*>(out.data());
    for (int64_t i = 0; i < n; ++i) v[i] = int32_t(rng.next() % uint64_t(o.range + 1));
    std::sort(v, v + n);
    v[0] = 0;
    v[n - 1] = int32_t(o.range);
    return out;
  }
  for (int64_t i = 0; i < n; ++i) {
    if (o.dtype == DType::i32) {
      const int64_t lo = o.gen == Gen::target ? -1 : 0;
      reinterpret_cast<int32_t*>(out.data())[i] =
          int32_t(lo + int64_t(rng.next() % uint64_t(o.range - lo)));
      continue;
    }
    float v = float(rng.normal());
    if (o.gen == Gen::positive) v = 0.5f + float(rng.uniform());
    if (o.dtype == DType::bf16)
      reinterpret_cast<uint16_t*>(out.data())[i] = f32_to_bf16(v);
    else
      reinterpret_cast<float*>(out.data())[i] = v;
  }
  return out;
}

std::vector<double> to_double(const std::vector<uint8_t>& b, DType t) {
  std::vector<double> out(b.size() / dtype_size(t));
  for (size_t i = 0; i < out.size(); ++i) {
    switch (t) {
      case DType::f32:
        out[i] = reinterpret_cast<const float*>(b.data())[i];
        break;
      case DType::bf16:
        out[i] = bf16_to_f32(reinterpret_cast<const uint16_t*>(b.data())[i]);
        break;
      case DType::f16:
        out[i] = f16_to_f32(reinterpret_cast<const uint16_t*>(b.data())[i]);
        break;
      case DType::i32:
        out[i] = reinterpret_cast<const int32_t*>(b.data())[i];
        break;
    }
  }
  return out;
}

BoundCase::BoundCase(Device& dev, const Case& c, const std::vector<std::vector<uint8_t>>& data)
    : dev_(dev) {
  std::vector<Tensor> in;
  size_t k = 0;
  for (const auto* ops : {&c.in, &c.out})
    for (const Operand& o : *ops) {
      bufs_.push_back(dev.alloc(std::max<uint64_t>(64, data[k].size())));
      Tensor t(o.shape, o.dtype, bufs_.back()->handle());
      dev.upload(t, data[k].data());
      (ops == &c.in ? in : out_).push_back(t);
      ++k;
    }
  call_ = make_op_call(c.op, in, out_, c.ip, c.fp);
}

BoundCase& BoundCase::run() {
  dev_.run(call_);
  dev_.synchronize();
  return *this;
}

std::vector<std::vector<uint8_t>> BoundCase::outputs() const {
  std::vector<std::vector<uint8_t>> result;
  for (const Tensor& t : out_) {
    result.emplace_back(t.nbytes());
    dev_.download(result.back().data(), t);
  }
  return result;
}

}  // namespace mxn::opcase
