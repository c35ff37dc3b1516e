// A tokenizer.json from arbitrary bytes; what loads must encode and decode a fixed text.
#include <cstdint>
#include <string>

#include "core/error.h"
#include "data/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    auto tok =
        mxn::tokenizer_from_json(std::string(reinterpret_cast<const char*>(data), size), "fuzz");
    const auto ids = tok->encode("Hello world, 你好 123!");
    for (int32_t id : ids)
      if (id < 0) __builtin_trap();
    (void)tok->decode(ids);
  } catch (const mxn::Error&) {
  }
  return 0;
}
