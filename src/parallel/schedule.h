#pragma once
// The 1F1B pipeline schedule (PipeDream-Flush, as Megatron runs it): stage s of p warms up with
// p - s - 1 forwards, then alternates one forward and one backward, then drains the backwards.
// At most p - s micro-batches are in flight on stage s. The trainer runs it; the planner's
// simulator prices it.
#include <algorithm>
#include <cstdint>

namespace mxn {

// The k-th of stage s's 2m operations: >= 0 the forward of that micro-batch, < 0 the backward of
// micro-batch -(value) - 1.
inline int64_t one_f_one_b(int64_t p, int64_t s, int64_t m, int64_t k) {
  const int64_t w = std::min(p - s - 1, m);
  if (k < w) return k;
  const int64_t j = k - w;  // steady state: forward w + j/2, backward j/2
  if (j < 2 * (m - w)) return j % 2 == 0 ? w + j / 2 : -(j / 2) - 1;
  return -(m - w + (j - 2 * (m - w))) - 1;  // drain
}

}  // namespace mxn
