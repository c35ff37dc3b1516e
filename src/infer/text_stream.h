#pragma once
// Text out of a stream of sampled tokens: whole UTF-8 characters only, and stop strings cut
// where they begin (shared by mxn generate and mxn serve).
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

namespace mxn {

// A byte-level model can sample bytes that are not UTF-8; text goes out only in whole valid
// characters, and an invalid byte becomes U+FFFD, so a terminal never sees broken sequences.
class Utf8Stream {
 public:
  std::string push(uint8_t b) {
    std::string out;
    if (need_ == 0) {
      if (b < 0x80) return std::string(1, char(b));
      need_ = b >= 0xf0 && b < 0xf5 ? 3 : b >= 0xe0 ? 2 : b >= 0xc2 && b < 0xe0 ? 1 : -1;
      if (need_ < 0) {
        need_ = 0;
        return "\xEF\xBF\xBD";
      }
      pending_.assign(1, char(b));
      return out;
    }
    if ((b & 0xc0) != 0x80) {  // broken sequence: replace it and start over with this byte
      need_ = 0;
      pending_.clear();
      return "\xEF\xBF\xBD" + push(b);
    }
    pending_.push_back(char(b));
    if (--need_ == 0) out.swap(pending_);
    return out;
  }

 private:
  int need_ = 0;
  std::string pending_;
};

// Text held back while it could still become a stop string, so no part of one is ever emitted.
class StopFilter {
 public:
  explicit StopFilter(const std::vector<std::string>& stops) : stops_(stops) {}
  // Adds a piece; returns the text now safe to emit. `done` becomes true at a stop string.
  std::string push(const std::string& piece, bool& done) {
    out_ += piece;
    size_t cut = std::string::npos;
    for (const std::string& s : stops_) {
      const size_t from = sent_ >= s.size() ? sent_ - s.size() : 0;
      const size_t at = s.empty() ? std::string::npos : out_.find(s, from);
      if (at != std::string::npos) cut = std::min(cut, at);
    }
    size_t safe = out_.size();
    if (cut != std::string::npos) {
      done = true;
      safe = std::max(cut, sent_);
    } else {
      for (const std::string& s : stops_)  // the longest tail that begins a stop string
        for (size_t n = std::min(s.size() - (s.empty() ? 0 : 1), out_.size() - sent_); n > 0; --n)
          if (out_.compare(out_.size() - n, n, s, 0, n) == 0) {
            safe = std::min(safe, out_.size() - n);
            break;
          }
    }
    std::string r = out_.substr(sent_, safe - sent_);
    sent_ = safe;
    return r;
  }
  std::string flush() {
    std::string r = out_.substr(sent_);
    sent_ = out_.size();
    return r;
  }

 private:
  std::vector<std::string> stops_;
  std::string out_;
  size_t sent_ = 0;
};

}  // namespace mxn
