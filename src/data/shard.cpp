#include "data/shard.h"

#include <cstring>

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
                          double val_fraction) {
  MappedFile text(text_path, "text file");
  if (text.size() < 2) throw Error("text file '" + text_path + "' is empty; expected some text");
  std::vector<uint16_t> tokens = tokenize(text.data(), text.size());
  const int64_t n = int64_t(tokens.size()), cut = split_point(n, val_fraction);
  Header h{};
  std::memcpy(h.magic, kMagic, 8);
  h.version = 1;
  h.vocab = uint32_t(ByteTokenizer::kVocab);
  h.n_train = uint64_t(cut);
  h.n_val = uint64_t(n - cut);
  std::string out(reinterpret_cast<const char*>(&h), sizeof(h));
  out.append(reinterpret_cast<const char*>(tokens.data()), tokens.size() * 2);
  write_file_atomic(out_path, out);
  return "wrote " + out_path + ": " + std::to_string(cut) + " train and " +
         std::to_string(n - cut) + " validation tokens (byte-level, vocab 256)";
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
    if (h.version != 1)
      throw Error("token shard '" + path + "' has unknown version " + std::to_string(h.version));
    const uint64_t want = sizeof(h) + 2 * (h.n_train + h.n_val);
    if (h.n_train > (1ull << 40) || h.n_val > (1ull << 40) || m.size() != want)
      throw Error("token shard '" + path + "' is truncated or corrupt: " +
                  std::to_string(m.size()) + " bytes, header says " + std::to_string(want));
    d.vocab_ = h.vocab;
    d.train_ = reinterpret_cast<const uint16_t*>(m.data() + sizeof(h));
    d.val_ = d.train_ + h.n_train;
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
  d.val_ = d.train_ + cut;
  d.n_train_ = cut;
  d.n_val_ = n - cut;
  d.map_.reset();
  return d;
}

}  // namespace mxn
