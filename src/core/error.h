#pragma once
// Errors a user can cause carry one clear message; the CLI prints it and exits non-zero.
#include <stdexcept>
#include <string>

namespace mxn {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

// Programmer errors: a broken invariant, not bad input.
#define MXN_CHECK(cond, msg)                                                           \
  do {                                                                                 \
    if (!(cond))                                                                       \
      throw ::mxn::Error(std::string("internal error: ") + (msg) + " (" __FILE__ ":" + \
                         std::to_string(__LINE__) + ")");                              \
  } while (0)

}  // namespace mxn
