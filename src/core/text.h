#pragma once
// Small text helpers shared by the layers above core.
#include <string>
#include <vector>

namespace mxn {

// "a,b,,c" -> {"a", "b", "", "c"} and "" -> {""}: every separator splits, nothing is dropped, so
// a caller can name an empty item in its error.
inline std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  size_t b = 0;
  for (size_t e = s.find(sep); e != std::string::npos; e = s.find(sep, b)) {
    out.push_back(s.substr(b, e - b));
    b = e + 1;
  }
  out.push_back(s.substr(b));
  return out;
}

}  // namespace mxn
