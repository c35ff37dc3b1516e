// gguf_parse on arbitrary bytes, then reading a decoder config and weights out of what parsed.
#include <cstdint>

#include "core/error.h"
#include "io/gguf.h"
#include "io/gguf_model.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const mxn::GgufFile f = mxn::gguf_parse(reinterpret_cast<const char*>(data), size, "fuzz");
    mxn::TensorMap w;
    const mxn::DecoderConfig c = mxn::decoder_from_gguf(f, w, "fuzz");
    if (c.param_count() > (int64_t(1) << 40)) __builtin_trap();
  } catch (const mxn::Error&) {
  }
  return 0;
}
