#include "serve/request.h"

#include <charconv>
#include <cmath>
#include <limits>

#include "core/error.h"

namespace mxn {

namespace {

using json = nlohmann::json;

[[noreturn]] void bad(const std::string& message, const std::string& code = "") {
  throw HttpError{400, message, "invalid_request_error", code};
}

const json* field(const json& j, const char* key) {
  auto it = j.find(key);
  return it == j.end() || it->is_null() ? nullptr : &*it;
}

std::string quoted(const char* key) { return std::string("'") + key + "'"; }

double real(const json& j, const char* key, double dflt, double lo, double hi) {
  const json* v = field(j, key);
  if (!v) return dflt;
  if (!v->is_number()) bad(quoted(key) + " must be a number");
  const double x = v->get<double>();
  if (!(x >= lo && x <= hi))  // NaN too
    bad(quoted(key) + " must be a number in [" + std::to_string(lo) + ", " + std::to_string(hi) +
        "]");
  return x;
}

// An integer field, range-checked before any conversion: a float must be integral and in
// range (casting an out-of-range double is undefined), an unsigned above 2^63 saturates.
int64_t integer(const json& j, const char* key, int64_t dflt, int64_t lo, int64_t hi) {
  const json* v = field(j, key);
  if (!v) return dflt;
  int64_t x = 0;
  if (v->is_number_unsigned()) {
    const uint64_t u = v->get<uint64_t>();
    x = u > uint64_t(std::numeric_limits<int64_t>::max()) ? std::numeric_limits<int64_t>::max()
                                                          : int64_t(u);
  } else if (v->is_number_integer()) {
    x = v->get<int64_t>();
  } else if (v->is_number_float()) {
    const double d = v->get<double>();
    if (!(d >= -9.2e18 && d <= 9.2e18) || d != std::floor(d))
      bad(quoted(key) + " must be an integer");
    x = int64_t(d);
  } else {
    bad(quoted(key) + " must be an integer");
  }
  if (x < lo || x > hi)
    bad(quoted(key) + " must be an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) +
        "]");
  return x;
}

bool boolean(const json& j, const char* key, bool dflt) {
  const json* v = field(j, key);
  if (!v) return dflt;
  if (!v->is_boolean()) bad(quoted(key) + " must be true or false");
  return v->get<bool>();
}

// Fields mxn does not implement yet: a 400 that names them, never silently ignored.
void refuse_unsupported(const json& j, bool chat) {
  if (integer(j, "n", 1, 1, std::numeric_limits<int64_t>::max()) != 1)
    bad("'n' must be 1: mxn serve returns one choice a request (send n requests)");
  if (!chat && integer(j, "best_of", 1, 1, std::numeric_limits<int64_t>::max()) != 1)
    bad("'best_of' must be 1: mxn serve does not rank several completions yet");
  if (!chat && boolean(j, "echo", false)) bad("'echo' is not supported");
  if (const json* s = field(j, "suffix"); s && !(s->is_string() && s->get<std::string>().empty()))
    bad("'suffix' is not supported");
  for (const char* k : {"tools", "functions", "tool_choice", "function_call"})
    if (field(j, k)) bad(quoted(k) + " is not supported yet (no tool calling)");
  if (const json* rf = field(j, "response_format");
      rf && !(rf->is_object() && rf->value("type", json()) == "text"))
    bad("'response_format' other than {\"type\": \"text\"} is not supported yet");
}

// logit_bias: {"token id": bias in [-100, 100]}, at most 300 entries, as OpenAI's.
std::vector<std::pair<int32_t, float>> logit_bias(const json& j, int64_t vocab) {
  const json* v = field(j, "logit_bias");
  if (!v) return {};
  if (!v->is_object()) bad("'logit_bias' must be an object of token ids to biases");
  if (v->size() > 300) bad("'logit_bias' has more than 300 entries");
  std::vector<std::pair<int32_t, float>> out;
  for (auto it = v->begin(); it != v->end(); ++it) {
    const std::string& k = it.key();
    int64_t id = -1;
    const auto [end, ec] = std::from_chars(k.data(), k.data() + k.size(), id);
    if (ec != std::errc() || end != k.data() + k.size() || id < 0 || id >= vocab)
      bad("'logit_bias' key '" + k.substr(0, 32) + "' is not a token id in [0, " +
          std::to_string(vocab) + ")");
    if (!it->is_number() || !(it->get<double>() >= -100 && it->get<double>() <= 100))
      bad("'logit_bias' values must be numbers in [-100, 100]");
    out.emplace_back(int32_t(id), float(it->get<double>()));
  }
  return out;
}

std::vector<std::string> stops(const json& j) {
  const json* v = field(j, "stop");
  if (!v) return {};
  std::vector<std::string> out;
  if (v->is_string()) {
    out.push_back(v->get<std::string>());
  } else if (v->is_array() && v->size() <= 16) {
    for (const json& s : *v) {
      if (!s.is_string()) bad("'stop' must be a string or a list of at most 16 strings");
      out.push_back(s.get<std::string>());
    }
  } else {
    bad("'stop' must be a string or a list of at most 16 strings");
  }
  for (const std::string& s : out)
    if (s.empty() || s.size() > 1024) bad("each 'stop' string must have 1 to 1024 bytes");
  return out;
}

// Text of B bytes is at least B / max_token_bytes tokens: refused before it is tokenized when
// that is already over the context.
void check_text_fits(size_t bytes, const ModelLimits& m) {
  const size_t most = m.tok->max_token_bytes();
  if (most > 0 && bytes / most > size_t(m.context))
    bad("the prompt (" + std::to_string(bytes) + " bytes, at least " +
            std::to_string(bytes / most) + " tokens) exceeds the context of " +
            std::to_string(m.context) + " tokens",
        "context_length_exceeded");
}

std::vector<ChatMessage> messages(const json& j) {
  const json* v = field(j, "messages");
  if (!v || !v->is_array() || v->empty()) bad("'messages' is missing (a list of {role, content})");
  try {
    return chat_messages(*v, "'messages'");
  } catch (const Error& e) {
    bad(e.what());
  }
}

std::vector<int32_t> prompt_ids(const json& j, const ModelLimits& m) {
  const json* p = field(j, "prompt");
  if (!p) bad("'prompt' is missing");
  const json* text = p->is_string() ? p : nullptr;
  if (p->is_array() && p->size() == 1 && (*p)[0].is_string()) text = &(*p)[0];
  if (text) {
    if (!m.tok) bad("the model has no tokenizer files; send 'prompt' as a list of token ids");
    const std::string& s = text->get_ref<const std::string&>();
    check_text_fits(s.size(), m);
    return m.tok->encode(s);
  }
  if (!p->is_array() || p->empty() || !(*p)[0].is_number())
    bad("'prompt' must be a string or a list of token ids (one prompt a request)");
  if (int64_t(p->size()) > m.context)
    bad("the prompt (" + std::to_string(p->size()) + " tokens) exceeds the context of " +
            std::to_string(m.context) + " tokens",
        "context_length_exceeded");
  std::vector<int32_t> ids;
  ids.reserve(p->size());
  for (const json& x : *p) {
    // As int64 before int32: an id of 2^32 + 5 must not wrap to 5.
    const bool in = (x.is_number_unsigned() && x.get<uint64_t>() < uint64_t(m.vocab)) ||
                    (x.is_number_integer() && x.get<int64_t>() >= 0 && x.get<int64_t>() < m.vocab);
    if (!in)
      bad("'prompt' token ids must be integers in [0, " + std::to_string(m.vocab) +
          "), the model's vocabulary");
    ids.push_back(int32_t(x.get<int64_t>()));
  }
  return ids;
}

}  // namespace

json parse_body(std::string_view body) {
  // Depth on the bytes first: copying, dumping or destroying a deep document recurses.
  int depth = 0;
  bool in_string = false, escaped = false;
  for (const char c : body) {
    if (in_string) {
      if (escaped)
        escaped = false;
      else if (c == '\\')
        escaped = true;
      else if (c == '"')
        in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > kMaxJsonDepth)
        bad("the body is nested more than " + std::to_string(kMaxJsonDepth) + " levels deep");
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  json j = json::parse(body, nullptr, false);
  if (j.is_discarded() || !j.is_object()) bad("the body is not a JSON object");
  return j;
}

namespace {
// The fields both endpoints share, sampling and output first: a wrong one is named before any
// tokenizing is done.
ApiRequest read_common(const json& j, bool chat, const ModelLimits& m, uint64_t seed) {
  ApiRequest out;
  EngineRequest& r = out.engine;
  refuse_unsupported(j, chat);
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  r.sampling.temperature = real(j, "temperature", 1.0, 0, 1e6);
  r.sampling.top_p = real(j, "top_p", 1.0, 0, 1);
  if (r.sampling.top_p <= 0) bad("'top_p' must be in (0, 1]");
  r.sampling.top_k = std::max<int64_t>(0, integer(j, "top_k", 0, -1, kMax));  // vLLM's: -1, 0 all
  if (const json* s = field(j, "seed"); s && s->is_number_unsigned())
    r.sampling.seed = s->get<uint64_t>();
  else
    r.sampling.seed =
        uint64_t(integer(j, "seed", int64_t(seed), std::numeric_limits<int64_t>::min(), kMax));
  // vLLM's and llama.cpp's extension: generate max_tokens whatever the model says (benchmarks)
  r.ignore_eos = boolean(j, "ignore_eos", false);
  r.presence_penalty = float(real(j, "presence_penalty", 0, -2, 2));
  r.frequency_penalty = float(real(j, "frequency_penalty", 0, -2, 2));
  r.logit_bias = logit_bias(j, m.vocab);
  out.stream = boolean(j, "stream", false);
  out.stops = stops(j);
  return out;
}

// The prompt's length against the context, and max_tokens (`key` in the body; 0: not given, then
// as many as fit up to `dflt`).
void fit_length(EngineRequest& r, int64_t max_tokens, const char* key, int64_t dflt,
                const ModelLimits& m) {
  const int64_t n = int64_t(r.prompt.size());
  if (n == 0) bad("the prompt is empty");
  // n < context leaves room for one token; max_tokens is compared with what is left, so no sum
  // of a prompt and a count near 2^63 can overflow.
  if (n >= m.context || max_tokens > m.context - n)
    bad("the prompt (" + std::to_string(n) + " tokens) and " + key + " (" +
            std::to_string(max_tokens > 0 ? max_tokens : 1) + ") exceed the context of " +
            std::to_string(m.context) + " tokens",
        "context_length_exceeded");
  r.max_tokens = max_tokens > 0 ? max_tokens : std::min<int64_t>(dflt, m.context - n);
}
}  // namespace

ApiRequest read_completion(const json& j, const ModelLimits& m, uint64_t seed) {
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  ApiRequest out = read_common(j, false, m, seed);
  out.engine.logprobs = integer(j, "logprobs", -1, 0, 20);  // the legacy shape: N alternatives
  const int64_t max_tokens = integer(j, "max_tokens", 0, 1, kMax);
  out.engine.prompt = prompt_ids(j, m);
  fit_length(out.engine, max_tokens, "max_tokens", 16, m);  // OpenAI's default: 16
  return out;
}

ApiRequest read_chat(const json& j, const ModelLimits& m, uint64_t seed) {
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  ApiRequest out = read_common(j, true, m, seed);
  EngineRequest& r = out.engine;
  const bool want = boolean(j, "logprobs", false);  // "logprobs": true, "top_logprobs": N
  const int64_t top = integer(j, "top_logprobs", 0, 0, 20);
  if (field(j, "top_logprobs") && !want) bad("'top_logprobs' needs \"logprobs\": true");
  r.logprobs = want ? top : -1;
  const char* key = field(j, "max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
  const int64_t max_tokens = integer(j, key, 0, 1, kMax);
  if (!m.tok) bad("the model has no tokenizer files; it cannot take chat messages");
  if (!m.has_chat) bad("the model has no chat format (a base model): use /v1/completions");
  const std::vector<ChatMessage> msgs = messages(j);
  size_t bytes = 0;
  for (const ChatMessage& c : msgs) bytes += c.content.size();
  check_text_fits(bytes, m);
  r.prompt = chat_prompt(m.chat, msgs, *m.tok);
  r.stop_ids = chat_stop_ids(m.chat, *m.tok);
  fit_length(r, max_tokens, key, 256, m);
  return out;
}

}  // namespace mxn
