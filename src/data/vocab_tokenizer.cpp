// Tokenizers from a GGUF file's vocabulary (data/tokenizer.h, VocabSpec): byte-level BPE through
// make_bpe with the split regex llama.cpp names by `pre`, SentencePiece through a ModelProto
// written here from the pieces (protobuf's wire format: the few fields a BPE model with byte
// fallback reads), so that libsentencepiece encodes exactly as it does from the original file.
#include <cstring>
#include <unordered_map>

#include "core/error.h"
#include "data/bpe.h"
#include "data/tokenizer.h"

namespace mxn {
namespace {

// Qwen2's split: cl100k's with single digits.
const char* const kQwen2Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

std::unique_ptr<Tokenizer> gpt2_from_vocab(const VocabSpec& v, const std::string& source) {
  BpeSpec s;
  const std::string& pre = v.pre;
  if (pre.empty() || pre == "default" || pre == "gpt-2" || pre == "gpt2") {
    s.pattern = kGpt2Pattern;
  } else if (pre == "llama-bpe" || pre == "llama3" || pre == "llama-v3") {
    s.pattern = kGpt4Pattern;
    s.ignore_merges = true;
  } else if (pre == "qwen2") {
    s.pattern = kQwen2Pattern;
  } else if (pre == "chatglm-bpe" || pre == "glm4") {
    s.pattern = kGpt4Pattern;
  } else {
    throw Error(source + ": pre-tokenizer '" + pre +
                "' is not one mxn reads (gpt-2, llama-bpe, qwen2, chatglm-bpe)");
  }
  std::unordered_map<std::string, int32_t> id_of;
  s.vocab.resize(v.tokens.size());
  for (size_t i = 0; i < v.tokens.size(); ++i) {
    const int32_t type = i < v.types.size() ? v.types[i] : 1;
    const std::string& t = v.tokens[i];
    if (type == 3 || type == 4) {  // control and user-defined tokens: their own text, matched first
      s.vocab[i] = t;
      s.added.push_back({t, int32_t(i)});
    } else if (type != 5) {
      bool ok = true;
      s.vocab[i] = bytes_from_gpt2_unicode(t, &ok);
      if (!ok)
        throw Error(source + ": token " + std::to_string(i) + " is not in GPT-2's byte form");
    }
    id_of.emplace(t, int32_t(i));
  }
  // The end and start of text are matched as themselves even where a file lists them as normal
  // tokens (mxn convert from vocab.json + merges.txt did).
  for (int32_t sp : {v.bos, v.eos})
    if (sp >= 0 && size_t(sp) < v.tokens.size() &&
        !(v.types.size() > size_t(sp) && (v.types[size_t(sp)] == 3 || v.types[size_t(sp)] == 4)))
      s.added.push_back({v.tokens[size_t(sp)], sp});
  s.merges.reserve(v.merges.size());
  for (const std::string& m : v.merges) {
    const size_t sp = m.find(' ', 1);
    const auto a = id_of.find(m.substr(0, sp));
    const auto b = sp == std::string::npos ? id_of.end() : id_of.find(m.substr(sp + 1));
    if (a == id_of.end() || b == id_of.end())
      throw Error(source + ": merge '" + m + "' is not two tokens of the vocabulary");
    s.merges.push_back({a->second, b->second});
  }
  return make_bpe(std::move(s), source, "bpe");
}

// Protobuf's wire format, as much of it as a ModelProto needs.
void varint(std::string& out, uint64_t x) {
  while (x >= 0x80) {
    out.push_back(char(uint8_t(x) | 0x80));
    x >>= 7;
  }
  out.push_back(char(x));
}
void tag(std::string& out, int field, int wire) {
  varint(out, uint64_t(field) << 3 | uint64_t(wire));
}
void bytes_field(std::string& out, int field, const std::string& s) {
  tag(out, field, 2);
  varint(out, s.size());
  out += s;
}
void int_field(std::string& out, int field, int64_t x) {
  tag(out, field, 0);
  varint(out, uint64_t(x));  // negative ids as ten-byte varints, as protobuf writes int32
}
void float_field(std::string& out, int field, float f) {
  tag(out, field, 5);
  char b[4];
  std::memcpy(b, &f, 4);  // little-endian, as this machine and protobuf's fixed32
  out.append(b, 4);
}

// sentencepiece_model.proto: ModelProto {pieces = 1 {piece 1, score 2, type 3}, trainer_spec =
// 2 {model_type 3 (BPE = 2), vocab_size 4, byte_fallback 35, unk_id 40, bos_id 41, eos_id 42,
// pad_id 43}, normalizer_spec = 3 {name 1, add_dummy_prefix 3, remove_extra_whitespaces 4,
// escape_whitespaces 5}}.
std::string model_proto(const VocabSpec& v) {
  std::string out;
  bool bytes = false;
  int32_t unk = v.unk;
  for (size_t i = 0; i < v.tokens.size(); ++i) {
    const int32_t type = i < v.types.size() && v.types[i] > 0 ? v.types[i] : 1;
    bytes |= type == 6;
    if (type == 2 && unk < 0) unk = int32_t(i);
    std::string p;
    bytes_field(p, 1, v.tokens[i]);
    float_field(p, 2, i < v.scores.size() ? v.scores[i] : 0.f);
    int_field(p, 3, type);
    bytes_field(out, 1, p);
  }
  std::string t;
  int_field(t, 3, 2);
  int_field(t, 4, int64_t(v.tokens.size()));
  int_field(t, 35, bytes);
  int_field(t, 40, unk);
  int_field(t, 41, v.bos);
  int_field(t, 42, v.eos);
  int_field(t, 43, -1);
  bytes_field(out, 2, t);
  std::string n;
  bytes_field(n, 1, "identity");
  int_field(n, 3, v.add_space_prefix);
  int_field(n, 4, v.remove_extra_whitespaces);
  int_field(n, 5, 1);
  bytes_field(out, 3, n);
  return out;
}

}  // namespace

std::unique_ptr<Tokenizer> tokenizer_from_vocab(const VocabSpec& v, const std::string& source) {
  if (v.tokens.empty()) throw Error(source + ": no tokenizer.ggml.tokens");
  if (v.model == "gpt2") return gpt2_from_vocab(v, source);
  if (v.model == "llama") {
    for (size_t i = 0; i < v.tokens.size(); ++i)
      if (v.tokens[i].empty())
        throw Error(source + ": SentencePiece token " + std::to_string(i) + " is empty");
    return sentencepiece_from_proto(model_proto(v), source);
  }
  throw Error(source + ": tokenizer model '" + v.model +
              "' is not one mxn reads (gpt2: byte-level BPE, llama: SentencePiece)");
}

}  // namespace mxn
