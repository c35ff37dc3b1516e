// The tokenizer a GGUF file carries, read from the keys llama.cpp's converter and mxn convert
// write (tokenizer.ggml.model, .pre, .tokens, .token_type, .merges, .scores, the special ids,
// .add_space_prefix, tokenizer.chat_template), so that a GGUF alone reads and writes text.
#include "core/error.h"
#include "core/json_num.h"
#include "io/gguf_model.h"

namespace mxn {

std::unique_ptr<Tokenizer> tokenizer_from_gguf(const GgufFile& f, const std::string& path,
                                               std::string* chat_template) {
  if (chat_template) {
    const GgufKV* t = f.find("tokenizer.chat_template");
    *chat_template = t && t->value.is_string() ? t->value.get<std::string>() : "";
  }
  const GgufKV* model = f.find("tokenizer.ggml.model");
  if (!model || !f.find("tokenizer.ggml.tokens")) return nullptr;
  auto where = [&](const char* key) { return path + ": GGUF '" + std::string(key) + "'"; };
  auto strings = [&](const char* key, std::vector<std::string>& out) {
    const GgufKV* kv = f.find(key);
    if (!kv) return;
    if (!kv->value.is_array()) throw Error(where(key) + " is not an array");
    out.reserve(kv->value.size());
    for (const auto& e : kv->value) {
      if (!e.is_string()) throw Error(where(key) + " holds a value that is not a string");
      out.push_back(e.get<std::string>());
    }
  };
  auto numbers = [&](const char* key, auto& out) {
    const GgufKV* kv = f.find(key);
    if (!kv) return;
    if (!kv->value.is_array()) throw Error(where(key) + " is not an array");
    using T = typename std::decay_t<decltype(out)>::value_type;
    out.reserve(kv->value.size());
    for (const auto& e : kv->value) out.push_back(json_number<T>(e, where(key)));
  };
  auto id = [&](const char* key) {
    const GgufKV* kv = f.find(key);
    return kv ? json_number<int32_t>(kv->value, where(key)) : -1;
  };
  auto flag = [&](const char* key, bool dflt) {
    const GgufKV* kv = f.find(key);
    return kv && kv->value.is_boolean() ? kv->value.get<bool>() : dflt;
  };
  VocabSpec v;
  if (!model->value.is_string()) throw Error(where("tokenizer.ggml.model") + " is not a string");
  v.model = model->value.get<std::string>();
  if (const GgufKV* pre = f.find("tokenizer.ggml.pre"); pre && pre->value.is_string())
    v.pre = pre->value.get<std::string>();
  strings("tokenizer.ggml.tokens", v.tokens);
  strings("tokenizer.ggml.merges", v.merges);
  numbers("tokenizer.ggml.scores", v.scores);
  numbers("tokenizer.ggml.token_type", v.types);
  v.bos = id("tokenizer.ggml.bos_token_id");
  v.eos = id("tokenizer.ggml.eos_token_id");
  v.unk = id("tokenizer.ggml.unknown_token_id");
  v.add_space_prefix = flag("tokenizer.ggml.add_space_prefix", true);
  v.remove_extra_whitespaces = flag("tokenizer.ggml.remove_extra_whitespaces", false);
  for (int32_t s : {v.bos, v.eos, v.unk})
    if (s >= int64_t(v.tokens.size()))
      throw Error(path + ": special token id " + std::to_string(s) + " is outside its " +
                  std::to_string(v.tokens.size()) + " tokens");
  return tokenizer_from_vocab(v, path);
}

}  // namespace mxn
