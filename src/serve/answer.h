#pragma once
// One request's answer in OpenAI's shapes, made from its channel of engine events: a whole JSON
// body, or server-sent events (a chunk a token or so, the last with usage, then "data: [DONE]").
// Text is cut at whole UTF-8 characters and at stop strings; log-probabilities in the chat or the
// legacy completions shape. A client that hangs up is cancelled, whole answer or stream.
#include <httplib.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "serve/served_model.h"

namespace mxn {

struct AnswerSpec {
  bool chat = false;
  std::string id, model;  // "chatcmpl-7"; the model's name as the request gave it
  int64_t created = 0;    // unix seconds
  int64_t n_prompt = 0;
  bool logprobs = false;
  std::vector<std::string> stops;
};

// Answers `res` for the submitted request `t` of `model`, whose events arrive on `ch`. Throws
// HttpError (503) when its replica fails before a whole answer is made.
void answer(httplib::Response& res, bool stream, const AnswerSpec& spec,
            std::shared_ptr<ServedModel> model, const Ticket& t, std::shared_ptr<Channel> ch);

}  // namespace mxn
