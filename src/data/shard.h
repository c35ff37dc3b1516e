#pragma once
// Token shards: a small header and uint16 tokens (version 1) or uint32 tokens (version 2, for
// vocabularies past 65536), train split then validation split, memory mapped when read. A plain
// text file is accepted too and tokenised in memory, one token per byte.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/fs.h"

namespace mxn {

// Tokenises `text_path` with the byte tokenizer, or with a model folder's (or file's) tokenizer
// when `tokenizer` is given, and writes a shard atomically; the last `val_fraction` of the tokens
// is the validation split. Returns a one-line summary.
std::string prepare_shard(const std::string& text_path, const std::string& out_path,
                          double val_fraction, const std::string& tokenizer = "");

// Tokens as stored: 2 or 4 bytes each.
struct TokenSpan {
  const void* p = nullptr;
  int width = 2;
  uint32_t operator[](int64_t i) const {
    return width == 2 ? static_cast<const uint16_t*>(p)[i] : static_cast<const uint32_t*>(p)[i];
  }
};

class TokenData {
 public:
  // A shard written by prepare_shard, or a text file (split as prepare_shard would).
  static TokenData open(const std::string& path, double val_fraction = 0.1);
  int64_t vocab() const { return vocab_; }
  TokenSpan train() const { return {train_, width_}; }
  TokenSpan val() const { return {val_, width_}; }
  int64_t n_train() const { return n_train_; }
  int64_t n_val() const { return n_val_; }

 private:
  std::shared_ptr<MappedFile> map_;
  std::shared_ptr<std::vector<uint16_t>> owned_;
  const void* train_ = nullptr;
  const void* val_ = nullptr;
  int width_ = 2;
  int64_t n_train_ = 0, n_val_ = 0, vocab_ = 256;
};

}  // namespace mxn
