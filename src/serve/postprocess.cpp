#include "serve/postprocess.h"

#include <algorithm>
#include <cmath>

namespace mxn {

PostProcessor::PostProcessor(int64_t slots, int64_t vocab, std::vector<int32_t> eos)
    : vocab_(vocab), eos_(std::move(eos)), slots_(size_t(slots)) {}

void PostProcessor::start(size_t slot, const EngineRequest& r) {
  slots_[slot].sampler = std::make_unique<Sampler>(r.sampling);
  slots_[slot].counts.clear();
}

// Log-softmax of the (penalised) logits, in double: the token's and the k likeliest.
void PostProcessor::logprobs(EngineEvent& e, const float* row, int64_t k) const {
  const int64_t V = vocab_;
  const float mx = *std::max_element(row, row + V);
  double sum = 0;
  for (int64_t v = 0; v < V; ++v) sum += std::exp(double(row[v] - mx));
  const double lse = double(mx) + std::log(sum);
  e.logprob = float(double(row[e.token]) - lse);
  k = std::min<int64_t>(k, V);
  std::vector<int32_t> idx(static_cast<size_t>(V));
  for (int64_t v = 0; v < V; ++v) idx[size_t(v)] = int32_t(v);
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int32_t a, int32_t b) {
    return row[a] > row[b] || (row[a] == row[b] && a < b);
  });
  for (int64_t j = 0; j < k; ++j)
    e.top.emplace_back(idx[size_t(j)], float(double(row[idx[size_t(j)]]) - lse));
}

EngineEvent PostProcessor::next(size_t slot, Seq& s, float* row) {
  State& st = slots_[slot];
  for (const auto& [t, n] : st.counts)
    row[t] -= s.req.presence_penalty + s.req.frequency_penalty * float(n);
  for (const auto& [t, b] : s.req.logit_bias) row[t] += b;
  const int32_t tok = st.sampler->next(row, vocab_);
  ++s.made;
  auto c = std::find_if(st.counts.begin(), st.counts.end(),
                        [&](const auto& p) { return p.first == tok; });
  if (c == st.counts.end())
    st.counts.emplace_back(tok, 1);
  else
    ++c->second;
  EngineEvent e;
  e.id = s.id;
  e.token = tok;
  if (s.req.logprobs >= 0) logprobs(e, row, s.req.logprobs);
  const auto& stops = s.req.stop_ids;  // a chat turn's end (Llama 3's <|eot_id|>, ...)
  const bool eos = !s.req.ignore_eos && (std::find(eos_.begin(), eos_.end(), tok) != eos_.end() ||
                                         std::find(stops.begin(), stops.end(), tok) != stops.end());
  if (eos || s.made >= s.req.max_tokens) {
    e.finished = true;
    e.reason = eos ? "stop" : "length";
  } else {
    s.next = tok;
  }
  return e;
}

}  // namespace mxn
