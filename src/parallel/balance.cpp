#include "parallel/balance.h"

#include <algorithm>
#include <cstdlib>

#include "core/error.h"
#include "core/text.h"

namespace mxn {

std::vector<int64_t> split_rows(int64_t rows, const std::vector<double>& sec_per_row) {
  const size_t n = sec_per_row.size();
  MXN_CHECK(n > 0 && rows >= int64_t(n), "split_rows needs at least one row per rank");
  std::vector<int64_t> out(n, 1);
  // Greedy: each further row goes where it finishes soonest. Optimal for the linear model.
  for (int64_t left = rows - int64_t(n); left > 0; --left) {
    size_t best = 0;
    for (size_t r = 1; r < n; ++r)
      if (double(out[r] + 1) * sec_per_row[r] < double(out[best] + 1) * sec_per_row[best]) best = r;
    ++out[best];
  }
  return out;
}

double slowest_seconds(const std::vector<int64_t>& split, const std::vector<double>& sec_per_row) {
  double t = 0;
  for (size_t r = 0; r < split.size(); ++r) t = std::max(t, double(split[r]) * sec_per_row[r]);
  return t;
}

std::vector<double> parse_split(const std::string& split, int ranks) {
  if (split == "auto") return {};
  if (split == "even") return std::vector<double>(size_t(ranks), 1.0);
  std::vector<double> w;
  for (const std::string& item : mxn::split(split, ',')) {
    char* end = nullptr;
    const double x = std::strtod(item.c_str(), &end);
    if (item.empty() || *end != '\0' || !(x > 0) || x > 1e9)
      throw Error("split '" + split + "': '" + item +
                  "' is not a positive number (expected auto, even, or one weight per rank "
                  "such as 3,1)");
    w.push_back(1.0 / x);
  }
  if (int(w.size()) != ranks)
    throw Error("split '" + split + "' gives " + std::to_string(w.size()) +
                " weights but the job has " + std::to_string(ranks) + " ranks");
  return w;
}

std::vector<int64_t> rebalance(const std::vector<int64_t>& current,
                               const std::vector<double>& sec_per_row, double gain) {
  int64_t rows = 0;
  for (int64_t x : current) rows += x;
  std::vector<int64_t> next = split_rows(rows, sec_per_row);
  const double now = slowest_seconds(current, sec_per_row);
  const double then = slowest_seconds(next, sec_per_row);
  return then < now * (1.0 - gain) ? next : current;
}

std::vector<int64_t> shard_bounds(int64_t n, const std::vector<double>& weights, int64_t align) {
  MXN_CHECK(!weights.empty() && align > 0, "shard_bounds needs ranks and an alignment");
  double sum = 0;
  for (double w : weights) sum += std::max(w, 0.0);
  std::vector<int64_t> b(weights.size() + 1, 0);
  double acc = 0;
  for (size_t r = 0; r + 1 < weights.size(); ++r) {
    acc += std::max(weights[r], 0.0);
    const double share = sum > 0 ? acc / sum : double(r + 1) / double(weights.size());
    const int64_t at = int64_t(double(n) * share) / align * align;
    b[r + 1] = std::clamp(at, b[r], n);
  }
  b.back() = n;
  return b;
}

}  // namespace mxn
