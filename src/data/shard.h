#pragma once
// Token shards: a small header and uint16 tokens, train split then validation split, memory
// mapped when read. A plain text file is accepted too and tokenised in memory.
#include <memory>
#include <string>
#include <vector>

#include "core/fs.h"

namespace mxn {

// Tokenises `text_path` with the byte tokenizer and writes a shard atomically; the last
// `val_fraction` of the tokens is the validation split. Returns a one-line summary.
std::string prepare_shard(const std::string& text_path, const std::string& out_path,
                          double val_fraction);

class TokenData {
 public:
  // A shard written by prepare_shard, or a text file (split as prepare_shard would).
  static TokenData open(const std::string& path, double val_fraction = 0.1);
  int64_t vocab() const { return vocab_; }
  const uint16_t* train() const { return train_; }
  const uint16_t* val() const { return val_; }
  int64_t n_train() const { return n_train_; }
  int64_t n_val() const { return n_val_; }

 private:
  std::shared_ptr<MappedFile> map_;
  std::shared_ptr<std::vector<uint16_t>> owned_;
  const uint16_t* train_ = nullptr;
  const uint16_t* val_ = nullptr;
  int64_t n_train_ = 0, n_val_ = 0, vocab_ = 256;
};

}  // namespace mxn
