#include "data/glm.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "core/rng.h"

namespace mxn {
namespace {

// Span lengths 1..max by inverse CDF of the renormalised Poisson(lambda) pmf.
int32_t span_length(Rng& rng, const GlmOptions& o) {
  std::vector<double> cdf(size_t(o.max_span));
  double p = std::exp(-o.lambda), total = 0;
  for (int k = 1; k <= o.max_span; ++k) {
    p = p * o.lambda / k;
    total += p;
    cdf[size_t(k - 1)] = total;
  }
  const double u = rng.uniform() * total;
  for (int k = 1; k <= o.max_span; ++k)
    if (u < cdf[size_t(k - 1)]) return k;
  return o.max_span;
}

}  // namespace

GlmSample glm_sample(const int32_t* text, int64_t ctx, const GlmTokens& t, const GlmOptions& o,
                     uint64_t seed, uint64_t row) {
  if (ctx < 8) throw Error("the GLM objective needs a context of at least 8 tokens");
  Rng rng(mix64(seed ^ mix64(row + 0x61a7)));
  GlmSample s;
  s.generation = o.gmask_share > 0 && rng.uniform() < o.gmask_share;
  // Spans as (start, length) in the text; k spans take 1 + m + 2k = ctx tokens in all.
  std::vector<std::pair<int64_t, int64_t>> spans;
  int64_t m = 0;
  if (s.generation) {  // one span from a point in the second half to the end (GLM-130B's [gMASK])
    m = ctx - 3;
    const int64_t lo = (m + 1) / 2, hi = m - 1;
    const int64_t len = lo + int64_t(rng.next() % uint64_t(hi - lo + 1));
    spans.push_back({m - len, len});
  } else {
    std::vector<int64_t> lens;
    int64_t sum = 0;
    for (;;) {  // draw until the spans cover mask_ratio of the text they leave room for
      const int64_t k = int64_t(lens.size());
      m = ctx - 1 - 2 * k;
      if (k > 0 && sum >= std::max<int64_t>(1, int64_t(o.mask_ratio * double(m)))) break;
      lens.push_back(span_length(rng, o));
      sum += lens.back();
    }
    // Room for every span and one kept token between spans; drop the last span if not.
    while (!lens.empty() && sum + int64_t(lens.size()) - 1 > m) {
      sum -= lens.back();
      lens.pop_back();
      m = ctx - 1 - 2 * int64_t(lens.size());
    }
    // Placement as blocklm's sample_spans: sorted offsets into the unmasked tokens.
    const int64_t slack = m - sum - (int64_t(lens.size()) - 1);
    std::vector<int64_t> places;
    for (size_t i = 0; i < lens.size(); ++i)
      places.push_back(int64_t(rng.next() % uint64_t(slack + 1)));
    std::sort(places.begin(), places.end());
    int64_t offset = 0;
    for (size_t i = 0; i < lens.size(); ++i) {
      spans.push_back({offset + places[i], lens[i]});
      offset += lens[i] + 1;
    }
  }
  s.text_len = m;
  // Part A: [CLS], the text with each span collapsed to its mask token.
  const int32_t mask = s.generation ? t.gmask : t.mask;
  std::vector<int32_t> mask_pos;  // each span's mask, as a row-0 position
  s.tokens.push_back(t.cls);
  int64_t i = 0;
  for (const auto& [start, len] : spans) {
    for (; i < start; ++i) s.tokens.push_back(text[i]);
    mask_pos.push_back(int32_t(s.tokens.size()));
    s.tokens.push_back(mask);
    i += len;
    s.masked += len;
  }
  for (; i < m; ++i) s.tokens.push_back(text[i]);
  s.sep = int32_t(s.tokens.size());
  for (int32_t p = 0; p < s.sep; ++p) s.pos.push_back(p);
  s.block_pos.assign(size_t(s.sep), 0);
  s.targets.assign(size_t(s.sep), -1);
  // Part B: the spans in shuffled order (Fisher-Yates), [sop] + span -> span + [eop].
  std::vector<size_t> order(spans.size());
  for (size_t j = 0; j < order.size(); ++j) order[j] = j;
  for (size_t j = order.size(); j > 1; --j) std::swap(order[j - 1], order[rng.next() % j]);
  for (size_t j : order) {
    const auto [start, len] = spans[j];
    for (int64_t q = 0; q <= len; ++q) {
      s.tokens.push_back(q == 0 ? t.sop : text[start + q - 1]);
      s.targets.push_back(q == len ? t.eop : text[start + q]);
      s.pos.push_back(mask_pos[j]);
      s.block_pos.push_back(int32_t(q + 1));
    }
  }
  MXN_CHECK(int64_t(s.tokens.size()) == ctx, "GLM sample length");
  return s;
}

}  // namespace mxn
