// A Hugging Face config.json from arbitrary bytes: an Error, or a config that validates and
// converts back to config.json.
#include <cstdint>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "models/decoder.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  nlohmann::json j = nlohmann::json::parse(data, data + size, nullptr, false);
  if (j.is_discarded()) return 0;  // not JSON: the reader's caller reports the parse error
  try {
    const mxn::DecoderConfig c = mxn::decoder_config_from_hf(j, "fuzz");
    c.validate();
    (void)mxn::decoder_config_to_hf(c).dump();
  } catch (const mxn::Error&) {
  }
  return 0;
}
