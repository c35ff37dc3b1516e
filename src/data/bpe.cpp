#include "data/bpe.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <climits>
#include <memory>
#include <queue>

#include "core/error.h"

namespace mxn {

// GPT-2's split: contractions, letters, numbers, other symbols, spaces (encoder.py).
const char* const kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
// cl100k's split, which GLM-4's tiktoken tokenizer uses.
const char* const kGpt4Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

namespace {

// GPT-2's bytes_to_unicode: printable bytes stand for themselves, the rest for 256 + n.
std::array<int, 256> byte_to_code() {
  std::array<int, 256> t{};
  int n = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
    t[size_t(b)] = printable ? b : 256 + n++;
  }
  return t;
}

struct Pcre {
  pcre2_code* code = nullptr;
  ~Pcre() {
    if (code) pcre2_code_free(code);
  }
};

class Bpe final : public Tokenizer {
 public:
  Bpe(BpeSpec s, const std::string& source, const char* kind) : spec_(std::move(s)), kind_(kind) {
    for (size_t i = 0; i < spec_.vocab.size(); ++i)
      if (!spec_.vocab[i].empty()) ids_.emplace(spec_.vocab[i], int32_t(i));
    byte_id_.fill(-1);
    for (int b = 0; b < 256; ++b) {
      auto it = ids_.find(std::string(1, char(b)));
      if (it != ids_.end()) byte_id_[size_t(b)] = it->second;
    }
    for (size_t r = 0; r < spec_.merges.size(); ++r) {
      const auto [a, b] = spec_.merges[r];
      auto it = ids_.find(spec_.vocab[size_t(a)] + spec_.vocab[size_t(b)]);
      if (it == ids_.end())
        throw Error(source + ": merge " + std::to_string(r) + " makes a token not in the vocab");
      ranks_.emplace(key(a, b), std::pair{int32_t(r), it->second});
    }
    for (auto& [text, id] : spec_.added) {
      if (text.empty()) continue;
      added_ids_.emplace(text, id);
      first_bytes_[uint8_t(text[0])] = true;
    }
    std::sort(spec_.added.begin(), spec_.added.end(),
              [](auto& a, auto& b) { return a.first.size() > b.first.size(); });
    int err = 0;
    PCRE2_SIZE off = 0;
    re_.code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(spec_.pattern.c_str()),
                             PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP, &err, &off, nullptr);
    if (!re_.code) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof(msg));
      throw Error(source + ": the pre-tokenizer regex does not compile at offset " +
                  std::to_string(off) + ": " + reinterpret_cast<const char*>(msg));
    }
    pcre2_jit_compile(re_.code, PCRE2_JIT_COMPLETE);  // falls back to the interpreter
    // Byte-level: every byte of the text lands in some token, so no token covers more than the
    // longest one's bytes. (A vocabulary without some byte drops it: no bound.)
    if (std::find(byte_id_.begin(), byte_id_.end(), -1) == byte_id_.end())
      for (const std::string& v : spec_.vocab)
        max_token_bytes_ = std::max(max_token_bytes_, v.size());
  }

  std::vector<int32_t> encode(std::string_view text,
                              Specials specials = Specials::parse) const override {
    std::vector<int32_t> out;
    size_t seg = 0;
    for (size_t i = 0; specials == Specials::parse && i < text.size(); ++i) {
      if (!first_bytes_[uint8_t(text[i])]) continue;
      for (const auto& [t, id] : spec_.added)  // longest first
        if (text.compare(i, t.size(), t) == 0) {
          split_and_merge(text.substr(seg, i - seg), out);
          out.push_back(id);
          i += t.size() - 1;
          seg = i + 1;
          break;
        }
    }
    split_and_merge(text.substr(seg), out);
    return out;
  }
  std::string piece(int32_t id) const override {
    return id >= 0 && size_t(id) < spec_.vocab.size() ? spec_.vocab[size_t(id)] : std::string();
  }
  int64_t vocab_size() const override { return int64_t(spec_.vocab.size()); }
  int32_t token_id(std::string_view text) const override {
    auto it = added_ids_.find(std::string(text));
    return it == added_ids_.end() ? -1 : it->second;
  }
  const char* kind() const override { return kind_; }
  size_t max_token_bytes() const override { return max_token_bytes_; }

 private:
  static uint64_t key(int32_t a, int32_t b) { return uint64_t(uint32_t(a)) << 32 | uint32_t(b); }

  void split_and_merge(std::string_view s, std::vector<int32_t>& out) const {
    // Match data per call: a tokenizer encodes for many threads at once (mxn serve).
    const std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> md(
        pcre2_match_data_create_from_pattern(re_.code, nullptr), &pcre2_match_data_free);
    if (!md) throw Error("out of memory for the pre-tokenizer's match data");
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
    size_t pos = 0;
    uint32_t opts = 0;  // PCRE2 checks the whole subject's UTF-8 per call: once is enough
    while (pos < s.size()) {
      const int rc = pcre2_match(re_.code, subject, s.size(), pos, opts, md.get(), nullptr);
      opts = PCRE2_NO_UTF_CHECK;
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        if (rc <= PCRE2_ERROR_UTF8_ERR1 && rc >= PCRE2_ERROR_UTF8_ERR21)
          throw Error("text is not valid UTF-8 near byte " +
                      std::to_string(pcre2_get_startchar(md.get())));
        throw Error("the pre-tokenizer regex failed (PCRE2 error " + std::to_string(rc) + ")");
      }
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md.get());
      if (ov[0] > pos) merge(s.substr(pos, ov[0] - pos), out);  // a gap: its own piece
      if (ov[1] == ov[0]) {  // an empty match: step over one character
        size_t next = ov[0] + 1;
        while (next < s.size() && (uint8_t(s[next]) & 0xC0) == 0x80) ++next;
        merge(s.substr(ov[0], next - ov[0]), out);
        pos = next;
        continue;
      }
      merge(s.substr(ov[0], ov[1] - ov[0]), out);
      pos = ov[1];
    }
    if (pos < s.size()) merge(s.substr(pos), out);
  }

  // The rank of merging a then b and the token it makes; (INT32_MAX, -1) when there is none.
  std::pair<int32_t, int32_t> rank_of(int32_t a, int32_t b) const {
    if (!spec_.merges.empty()) {
      auto it = ranks_.find(key(a, b));
      return it == ranks_.end() ? std::pair{INT32_MAX, -1} : it->second;
    }
    // tiktoken: a merge's rank is the merged token's rank (its id)
    auto it = ids_.find(spec_.vocab[size_t(a)] + spec_.vocab[size_t(b)]);
    return it == ids_.end() ? std::pair{INT32_MAX, -1} : std::pair{it->second, it->second};
  }

  // Lowest rank first; of equal ranks the leftmost, one merge at a time (as GPT-2's and
  // tiktoken's loops do). The candidate pairs sit in a heap over a linked list of symbols, as
  // the tokenizers library does: O(n log n) a word, where rescanning every pair after each merge
  // made one long word quadratic (a 32 KB word took seconds).
  void merge(std::string_view piece, std::vector<int32_t>& out) const {
    if (piece.empty()) return;
    if (spec_.merges.empty() || spec_.ignore_merges) {
      auto it = ids_.find(std::string(piece));
      if (it != ids_.end()) {
        out.push_back(it->second);
        return;
      }
    }
    std::vector<int32_t> sym;
    sym.reserve(piece.size());
    for (char c : piece) {
      const int32_t id = byte_id_[uint8_t(c)];
      if (id >= 0) sym.push_back(id);  // a byte the vocabulary lacks is dropped, as tokenizers does
    }
    const int32_t n = int32_t(sym.size());
    if (n > 1) {
      std::vector<int32_t> next(static_cast<size_t>(n)), prev(static_cast<size_t>(n));
      for (int32_t i = 0; i < n; ++i) {
        next[size_t(i)] = i + 1 < n ? i + 1 : -1;
        prev[size_t(i)] = i - 1;
      }
      struct Cand {  // merging the symbols at `at` and `right`, as they were when pushed
        int32_t rank, at, right, left_id, right_id, merged;
        bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : at > o.at; }
      };
      std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
      auto offer = [&](int32_t at) {
        if (at < 0 || next[size_t(at)] < 0) return;
        const int32_t right = next[size_t(at)];
        const auto [rank, merged] = rank_of(sym[size_t(at)], sym[size_t(right)]);
        if (merged >= 0) heap.push({rank, at, right, sym[size_t(at)], sym[size_t(right)], merged});
      };
      for (int32_t i = 0; i + 1 < n; ++i) offer(i);
      while (!heap.empty()) {
        const Cand c = heap.top();
        heap.pop();
        // Stale when either symbol has merged since (a merge makes a longer token: a new id).
        if (sym[size_t(c.at)] != c.left_id || next[size_t(c.at)] != c.right ||
            sym[size_t(c.right)] != c.right_id)
          continue;
        sym[size_t(c.at)] = c.merged;
        sym[size_t(c.right)] = -1;
        next[size_t(c.at)] = next[size_t(c.right)];
        if (next[size_t(c.at)] >= 0) prev[size_t(next[size_t(c.at)])] = c.at;
        offer(prev[size_t(c.at)]);
        offer(c.at);
      }
    }
    for (int32_t i = 0; i < n; ++i)
      if (sym[size_t(i)] >= 0) out.push_back(sym[size_t(i)]);
  }

 private:
  BpeSpec spec_;
  const char* kind_;
  std::unordered_map<std::string, int32_t> ids_, added_ids_;
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> ranks_;
  std::array<int32_t, 256> byte_id_{};
  std::array<bool, 256> first_bytes_{};
  size_t max_token_bytes_ = 0;
  Pcre re_;
};

}  // namespace

std::string bytes_from_gpt2_unicode(const std::string& s, bool* ok) {
  static const std::array<int, 512> inverse = [] {
    std::array<int, 512> inv;
    inv.fill(-1);
    const auto fwd = byte_to_code();
    for (int b = 0; b < 256; ++b) inv[size_t(fwd[size_t(b)])] = b;
    return inv;
  }();
  std::string out;
  *ok = true;
  for (size_t i = 0; i < s.size();) {
    const uint8_t c = uint8_t(s[i]);
    int cp = -1, n = 1;
    if (c < 0x80)
      cp = c;
    else if ((c & 0xE0) == 0xC0 && i + 1 < s.size())
      cp = (c & 0x1F) << 6 | (uint8_t(s[i + 1]) & 0x3F), n = 2;
    if (cp < 0 || cp >= 512 || inverse[size_t(cp)] < 0) {
      *ok = false;
      return out;
    }
    out.push_back(char(inverse[size_t(cp)]));
    i += size_t(n);
  }
  return out;
}

std::unique_ptr<Tokenizer> make_bpe(BpeSpec spec, const std::string& source, const char* kind) {
  return std::make_unique<Bpe>(std::move(spec), source, kind);
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string s;
  for (int32_t id : ids) s += piece(id);
  return s;
}

}  // namespace mxn
