#pragma once
// An OpenAI request body turned into the typed request the engine takes, every field checked
// before it meets a size: JSON nested at most kMaxJsonDepth deep (checked on the bytes, before
// any recursive walk), numbers range-checked before any conversion, counts compared without
// overflow (a prompt and max_tokens against the context), token ids against the vocabulary.
// Everything a client can get wrong is an HttpError with OpenAI's error shape and a 4xx status.
// No HTTP here: the server and the fuzz target (fuzz/request_fuzz.cpp) share it.
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "data/chat.h"
#include "serve/engine.h"

namespace mxn {

struct HttpError {
  HttpError(int s, std::string m, std::string t = "invalid_request_error", std::string c = "")
      : status(s), message(std::move(m)), type(std::move(t)), code(std::move(c)) {}
  int status;
  std::string message, type, code;
};

constexpr int kMaxJsonDepth = 64;

// The body as a JSON object; 400 when it is not one or is nested deeper than kMaxJsonDepth.
nlohmann::json parse_body(std::string_view body);

// What a model offers a request.
struct ModelLimits {
  const Tokenizer* tok = nullptr;  // nullptr: takes token ids only
  bool has_chat = false;
  ChatFormat chat{};
  int64_t context = 0;  // prompt and output tokens
  int64_t vocab = 0;
};

struct ApiRequest {
  EngineRequest engine;
  bool stream = false;
  std::vector<std::string> stops;
};

// The typed request of a parsed body, one function per endpoint: /v1/completions (a prompt as text
// or token ids) and /v1/chat/completions (messages in the model's chat format). `seed`: the
// sampler's seed when the body gives none. HttpError 400 naming the field that is wrong.
ApiRequest read_completion(const nlohmann::json& j, const ModelLimits& m, uint64_t seed);
ApiRequest read_chat(const nlohmann::json& j, const ModelLimits& m, uint64_t seed);

}  // namespace mxn
