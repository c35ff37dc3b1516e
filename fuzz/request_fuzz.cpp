// The request path from a raw HTTP body to the typed request the engine takes: JSON parsing with
// its depth bound, field validation, prompt tokenization (a small byte-level BPE with ChatML's
// markers) and the context arithmetic. The first byte picks the endpoint (odd: chat). Whatever is
// accepted must fit: the prompt and max_tokens within the context, every id in the vocabulary.
#include <cstdint>
#include <limits>
#include <string>

#include "core/error.h"
#include "data/bpe.h"
#include "serve/request.h"

namespace {

const mxn::Tokenizer& tokenizer() {
  static const auto tok = [] {
    mxn::BpeSpec s;
    for (int b = 0; b < 256; ++b) s.vocab.push_back(std::string(1, char(b)));
    auto add = [&](const std::string& a, const std::string& b) {
      const auto id = [&](const std::string& t) {
        for (size_t i = 0; i < s.vocab.size(); ++i)
          if (s.vocab[i] == t) return int32_t(i);
        return int32_t(-1);
      };
      s.merges.push_back({id(a), id(b)});
      s.vocab.push_back(a + b);
    };
    add("t", "h"), add("th", "e"), add(" ", "the"), add("a", "a"), add("aa", "aa"), add("i", "n");
    for (const char* t : {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}) {
      s.added.push_back({t, int32_t(s.vocab.size())});
      s.vocab.push_back(t);
    }
    s.pattern = mxn::kGpt2Pattern;
    return mxn::make_bpe(std::move(s), "fuzz", "bpe");
  }();
  return *tok;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const bool chat = data[0] & 1;
  const mxn::Tokenizer& tok = tokenizer();
  const mxn::ModelLimits m{&tok, true, mxn::ChatFormat::chatml, 64, tok.vocab_size()};
  try {
    const auto j =
        mxn::parse_body(std::string_view(reinterpret_cast<const char*>(data) + 1, size - 1));
    const mxn::ApiRequest r = chat ? mxn::read_chat(j, m, 7) : mxn::read_completion(j, m, 7);
    const auto& e = r.engine;
    if (e.prompt.empty() || e.max_tokens < 1 || int64_t(e.prompt.size()) >= m.context ||
        e.max_tokens > m.context - int64_t(e.prompt.size()))
      __builtin_trap();
    for (int32_t id : e.prompt)
      if (id < 0 || id >= m.vocab) __builtin_trap();
    for (const auto& [id, b] : e.logit_bias)
      if (id < 0 || id >= m.vocab || !(b >= -100 && b <= 100)) __builtin_trap();
    if (e.logprobs > 20 || e.sampling.top_k < 0 || !(e.sampling.top_p > 0 && e.sampling.top_p <= 1))
      __builtin_trap();
  } catch (const mxn::HttpError& e) {
    if (e.status < 400 || e.status > 499) __builtin_trap();
  }
  return 0;
}
