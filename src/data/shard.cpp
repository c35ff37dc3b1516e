#include "data/shard.h"

#include <cstring>
#include <filesystem>

#include "core/error.h"
#include "data/tokenizer.h"

namespace mxn {
namespace {

constexpr char kMagic[8] = {'M', 'X', 'N', 'T', 'O', 'K', '0', '1'};
struct Header {
  char magic[8];
  uint32_t version, vocab;
  uint64_t n_train, n_val;
};
static_assert(sizeof(Header) == 32);

std::vector<uint16_t> tokenize(const char* data, size_t n) {
  std::vector<uint16_t> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = uint8_t(data[i]);
  return out;
}

int64_t split_point(int64_t n, double val_fraction) {
  if (!(val_fraction > 0 && val_fraction < 1))
    throw Error("validation fraction " + std::to_string(val_fraction) + " must be in (0, 1)");
  return n - std::max<int64_t>(1, int64_t(double(n) * val_fraction));
}

}  // namespace

std::string prepare_shard(const std::string& text_path, const std::string& out_path,
                          double val_fraction, const std::string& tokenizer) {
  MappedFile text(text_path, "text file");
  if (text.size() < 2) throw Error("text file '" + text_path + "' is empty; expected some text");
  std::vector<uint32_t> tokens;
  int64_t vocab = ByteTokenizer::kVocab;
  std::string kind = "byte-level";
  if (tokenizer.empty()) {
    tokens.assign(reinterpret_cast<const uint8_t*>(text.data()),
                  reinterpret_cast<const uint8_t*>(text.data()) + text.size());
  } else {
    auto tok = std::filesystem::is_directory(tokenizer) ? load_tokenizer(tokenizer)
                                                        : load_tokenizer_file(tokenizer);
    const std::vector<int32_t> ids = tok->encode(std::string_view(text.data(), text.size()));
    tokens.assign(ids.begin(), ids.end());
    vocab = tok->vocab_size();
    kind = tok->kind();
  }
  const int64_t n = int64_t(tokens.size());
  if (n < 2) throw Error("text file '" + text_path + "' gives fewer than 2 tokens");
  const int64_t cut = split_point(n, val_fraction);
  const int width = vocab > 65536 ? 4 : 2;
  Header h{};
  std::memcpy(h.magic, kMagic, 8);
  h.version = width == 2 ? 1 : 2;
  h.vocab = uint32_t(vocab);
  h.n_train = uint64_t(cut);
  h.n_val = uint64_t(n - cut);
  std::string out(reinterpret_cast<const char*>(&h), sizeof(h));
  out.reserve(sizeof(h) + size_t(n) * size_t(width));
  for (uint32_t t : tokens) out.append(reinterpret_cast<const char*>(&t), size_t(width));
  // The shard's folder is made, as `mxn train --out` makes its run folder.
  const auto dir = std::filesystem::path(out_path).parent_path();
  std::error_code ec;
  if (!dir.empty() && !std::filesystem::is_directory(dir) &&
      !std::filesystem::create_directories(dir, ec))
    throw Error("cannot make the folder '" + dir.string() + "' for '" + out_path +
                "': " + (ec ? ec.message() : "a file of that name is in the way"));
  write_file_atomic(out_path, out);
  return "wrote " + out_path + ": " + std::to_string(cut) + " train and " +
         std::to_string(n - cut) + " validation tokens (" + kind + ", vocab " +
         std::to_string(vocab) + ", " + std::to_string(width * 8) + "-bit)";
}

TokenData TokenData::open(const std::string& path, double val_fraction) {
  TokenData d;
  d.map_ = std::make_shared<MappedFile>(path, "data file");
  const MappedFile& m = *d.map_;
  if (m.size() == 0)
    throw Error("data file '" + path + "' is empty; expected text or a token shard");
  if (m.size() >= 8 && std::memcmp(m.data(), kMagic, 8) == 0) {
    Header h;
    if (m.size() < sizeof(h)) throw Error("token shard '" + path + "' is truncated (no header)");
    std::memcpy(&h, m.data(), sizeof(h));
    if (h.version != 1 && h.version != 2)
      throw Error("token shard '" + path + "' has unknown version " + std::to_string(h.version) +
                  " (expected 1: 16-bit tokens, or 2: 32-bit)");
    d.width_ = h.version == 1 ? 2 : 4;
    const uint64_t want = sizeof(h) + uint64_t(d.width_) * (h.n_train + h.n_val);
    if (h.n_train > (1ull << 40) || h.n_val > (1ull << 40) || m.size() != want)
      throw Error("token shard '" + path + "' is truncated or corrupt: " +
                  std::to_string(m.size()) + " bytes, header says " + std::to_string(want));
    d.vocab_ = h.vocab;
    d.train_ = m.data() + sizeof(h);
    d.val_ = m.data() + sizeof(h) + h.n_train * uint64_t(d.width_);
    d.n_train_ = int64_t(h.n_train);
    d.n_val_ = int64_t(h.n_val);
    return d;
  }
  if (m.size() < 2)
    throw Error("data file '" + path + "' has too little text (" + std::to_string(m.size()) +
                " bytes)");
  d.owned_ = std::make_shared<std::vector<uint16_t>>(tokenize(m.data(), m.size()));
  const int64_t n = int64_t(d.owned_->size()), cut = split_point(n, val_fraction);
  d.train_ = d.owned_->data();
  d.val_ = d.owned_->data() + cut;
  d.n_train_ = cut;
  d.n_val_ = n - cut;
  d.map_.reset();
  return d;
}

}  // namespace mxn
