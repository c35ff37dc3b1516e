#pragma once
// Numbers out of JSON that a user (or a fuzzer) wrote. nlohmann's get<int>() of a float, or
// get<float>() of 1e300, is undefined behaviour; these check the kind and the range first and
// throw an Error naming `what`.
#include <cmath>
#include <cstdint>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <type_traits>

#include "core/error.h"

namespace mxn {

template <typename T>
T json_number(const nlohmann::json& v, const std::string& what) {
  if constexpr (std::is_same_v<T, bool>) {
    if (!v.is_boolean()) throw Error(what + " is " + v.dump() + ", expected true or false");
    return v.get<bool>();
  } else if constexpr (std::is_integral_v<T>) {
    bool ok = false;
    T out = 0;
    if (v.is_number_unsigned()) {
      const uint64_t u = v.get<uint64_t>();
      ok = u <= uint64_t(std::numeric_limits<T>::max());
      out = T(u);
    } else if (v.is_number_integer()) {
      const int64_t i = v.get<int64_t>();
      ok = i >= int64_t(std::numeric_limits<T>::min()) &&
           (i < 0 || uint64_t(i) <= uint64_t(std::numeric_limits<T>::max()));
      out = T(i);
    }
    if (!ok) throw Error(what + " is " + v.dump() + ", expected an integer in range");
    return out;
  } else {
    static_assert(std::is_floating_point_v<T>);
    const double d = v.is_number() ? v.get<double>() : NAN;
    if (!std::isfinite(d) || std::fabs(d) > double(std::numeric_limits<T>::max()))
      throw Error(what + " is " + v.dump() + ", expected a finite number");
    return T(d);
  }
}

// j[key] when present and not null, else `dflt`.
template <typename T>
T json_value(const nlohmann::json& j, const char* key, T dflt, const std::string& where) {
  if (!j.is_object() || !j.contains(key) || j[key].is_null()) return dflt;
  return json_number<T>(j[key], where + ": '" + key + "'");
}

}  // namespace mxn
