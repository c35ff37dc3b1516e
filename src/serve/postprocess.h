#pragma once
// The serving engine's third part: from a request's row of logits to its next token and event.
// OpenAI's presence and frequency penalties and logit_bias, the request's sampler, the
// log-probabilities it asked for, and its end: the model's end-of-sequence tokens, the chat
// turn's end (stop_ids) or max_tokens. Stop strings are text and end a request above the engine
// (serve/answer.h).
#include <memory>
#include <vector>

#include "infer/generate.h"
#include "serve/engine_types.h"
#include "serve/scheduler.h"

namespace mxn {

class PostProcessor {
 public:
  PostProcessor(int64_t slots, int64_t vocab, std::vector<int32_t> eos);
  void start(size_t slot, const EngineRequest& r);  // a request admitted into `slot`
  // The next token of the request in `slot` from its logits (changed in place by the penalties
  // and bias); s.made and s.next move on. The event is `finished` when the request ends.
  EngineEvent next(size_t slot, Seq& s, float* logits);

 private:
  struct State {
    std::unique_ptr<Sampler> sampler;
    std::vector<std::pair<int32_t, int32_t>> counts;  // generated token -> times (penalties)
  };
  void logprobs(EngineEvent& e, const float* row, int64_t k) const;

  int64_t vocab_;
  std::vector<int32_t> eos_;
  std::vector<State> slots_;
};

}  // namespace mxn
