// safetensors_parse on arbitrary bytes: an Error, or tensors whose bytes lie inside the input.
#include <cstdint>
#include <string>

#include "core/error.h"
#include "io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    mxn::TensorMap m =
        mxn::safetensors_parse(std::string(reinterpret_cast<const char*>(data), size), "fuzz");
    for (const auto& [name, t] : m)
      if (t.bytes.size() != size_t(t.numel()) * mxn::dtype_size(t.dtype)) __builtin_trap();
  } catch (const mxn::Error&) {
  }
  return 0;
}
