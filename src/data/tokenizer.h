#pragma once
// The default tokenizer: one token per byte (vocab 256). Any text round-trips exactly.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace mxn {

struct ByteTokenizer {
  static constexpr int64_t kVocab = 256;
  std::vector<int32_t> encode(std::string_view text) const {
    return std::vector<int32_t>(reinterpret_cast<const uint8_t*>(text.data()),
                                reinterpret_cast<const uint8_t*>(text.data()) + text.size());
  }
  std::string decode(const std::vector<int32_t>& ids) const {
    std::string s;
    for (int32_t id : ids) s.push_back(char(uint8_t(id)));
    return s;
  }
};

}  // namespace mxn
