#pragma once
// Tokenizers, read from the files a model folder ships: GPT-2's vocab.json + merges.txt, a
// Hugging Face tokenizer.json (byte-level BPE with its pre-tokenizer regex and added tokens: GPT-2,
// Llama 3, Qwen2), a SentencePiece tokenizer.model (Llama 2, ChatGLM2/3, through libsentencepiece)
// and GLM-4's tiktoken-format tokenizer.model. mxn's own runs use one token per byte.
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace mxn {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // Special and added tokens written in the text (e.g. "<|im_start|>") become their ids; with
  // Specials::as_text they are ordinary text (a chat message's content: a user must not be able
  // to write a turn marker).
  enum class Specials { parse, as_text };
  virtual std::vector<int32_t> encode(std::string_view text,
                                      Specials specials = Specials::parse) const = 0;
  // The bytes of one token (a special token's text); decode() is their concatenation.
  virtual std::string piece(int32_t id) const = 0;
  virtual int64_t vocab_size() const = 0;
  // The id of a special or added token by its text, or -1.
  virtual int32_t token_id(std::string_view text) const = 0;
  virtual const char* kind() const = 0;
  virtual std::string decode(const std::vector<int32_t>& ids) const;
  // A bound on the bytes of text one token covers (0: none known): text of B bytes is at least
  // B / max_token_bytes() tokens, so a prompt can be refused before it is tokenized.
  virtual size_t max_token_bytes() const { return 0; }
};

struct ByteTokenizer {
  static constexpr int64_t kVocab = 256;
  std::vector<int32_t> encode(std::string_view text) const {
    return std::vector<int32_t>(reinterpret_cast<const uint8_t*>(text.data()),
                                reinterpret_cast<const uint8_t*>(text.data()) + text.size());
  }
  std::string decode(const std::vector<int32_t>& ids) const {
    std::string s;
    for (int32_t id : ids) s.push_back(char(uint8_t(id)));
    return s;
  }
};

// The tokenizer of a model folder: tokenizer.json, else vocab.json + merges.txt, else
// tokenizer.model (SentencePiece or tiktoken format). An Error names the folder and the file
// that is missing or does not parse.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& dir);
// A tokenizer.json's text (`path` names it in errors).
std::unique_ptr<Tokenizer> tokenizer_from_json(const std::string& text, const std::string& path);
// One file: tokenizer.json, tokenizer.model, or vocab.json (merges.txt beside it).
std::unique_ptr<Tokenizer> load_tokenizer_file(const std::string& path);

// A vocabulary as a GGUF file carries it (tokenizer.ggml.*, as llama.cpp's converter and mxn
// convert write it): `model` "gpt2" is byte-level BPE (tokens in GPT-2's printable form, merges
// "a b", the split regex named by `pre`), "llama" SentencePiece (pieces with scores and types).
struct VocabSpec {
  std::string model, pre;
  std::vector<std::string> tokens, merges;
  std::vector<float> scores;
  std::vector<int32_t> types;  // 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
  int32_t bos = -1, eos = -1, unk = -1;
  bool add_space_prefix = true, remove_extra_whitespaces = false;  // SentencePiece's normalizer
};
// An Error names `source` and what is missing or unknown (a model or pre-tokenizer mxn does
// not read, a merge of tokens that are not in the vocabulary).
std::unique_ptr<Tokenizer> tokenizer_from_vocab(const VocabSpec& v, const std::string& source);
// A serialized SentencePiece ModelProto (`source` names it in errors).
std::unique_ptr<Tokenizer> sentencepiece_from_proto(const std::string& bytes,
                                                    const std::string& source);

}  // namespace mxn
