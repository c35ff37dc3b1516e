#pragma once
// Byte-level BPE as GPT-2, tokenizer.json and tiktoken use it: text is split into pieces by a
// regex (PCRE2, Unicode classes), each piece's bytes are merged pair by pair, lowest rank first.
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "data/tokenizer.h"

namespace mxn {

struct BpeSpec {
  std::vector<std::string> vocab;  // id -> raw bytes ("" for unused ids)
  // Merge ranks: by pair of ids (GPT-2 and tokenizer.json merges lists), or, when empty, by the
  // rank of the merged bytes' id (tiktoken: a token's rank is its id).
  std::vector<std::pair<int32_t, int32_t>> merges;
  std::string pattern;                                 // the split regex
  std::vector<std::pair<std::string, int32_t>> added;  // special/added tokens, matched first
  bool ignore_merges = false;  // a piece that is itself a token is emitted whole (Llama 3)
};

std::unique_ptr<Tokenizer> make_bpe(BpeSpec spec, const std::string& source, const char* kind);

// GPT-2's byte <-> printable-character table, which vocab.json and tokenizer.json keys use.
std::string bytes_from_gpt2_unicode(const std::string& s, bool* ok);

extern const char* const kGpt2Pattern;
extern const char* const kGpt4Pattern;

}  // namespace mxn
