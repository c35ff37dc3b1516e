#pragma once
// What goes into the serving engine and what comes out: a request and the events of its tokens.
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "infer/generate.h"

namespace mxn {

struct EngineRequest {
  std::vector<int32_t> prompt;
  int64_t max_tokens = 16;
  SamplingOptions sampling;
  bool ignore_eos = false;
  std::vector<int32_t> stop_ids;  // ends the request too, like the model's eos (a chat turn's end)
  // OpenAI's penalties on the logits of tokens already generated: presence once a token has
  // appeared, frequency times its count.
  float presence_penalty = 0, frequency_penalty = 0;
  std::vector<std::pair<int32_t, float>> logit_bias;  // OpenAI's: added to those tokens' logits
  int64_t logprobs = -1;  // >= 0: each token's log-probability and this many alternatives
  int adapter = 0;        // 0: the base model; k: the engine's k-th adapter
};

struct EngineEvent {
  int64_t id = 0;
  int32_t token = -1;     // -1: none (the request ended without one, e.g. cancelled)
  bool finished = false;  // the request's last event
  std::string reason;     // with finished: "length", "stop" (an end-of-sequence token), "cancel"
                          // (or "error", from a server whose replica failed; `error` says why)
  std::string error;
  float logprob = 0;  // with EngineRequest::logprobs >= 0: log p(token) under the model
  std::vector<std::pair<int32_t, float>> top;  // the likeliest tokens and their log-probabilities
};

}  // namespace mxn
