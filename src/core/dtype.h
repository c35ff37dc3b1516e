#pragma once
#include <cstdint>
#include <cstring>
#include <string>

#include "mxn/backend_abi.h"

namespace mxn {

enum class DType : int32_t {
  f32 = MXN_DTYPE_F32,
  bf16 = MXN_DTYPE_BF16,
  f16 = MXN_DTYPE_F16,
  i32 = MXN_DTYPE_I32,
};

size_t dtype_size(DType t);
const char* dtype_name(DType t);
DType dtype_from_name(const std::string& name);  // throws Error naming the accepted names

// bf16 is the top half of an f32; rounding is to nearest, ties to even (as PyTorch does).
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

uint16_t f32_to_f16(float f);
float f16_to_f32(uint16_t h);

}  // namespace mxn
