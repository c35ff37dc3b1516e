// The rows of a training pass: next-token windows, GLM blank-infilling samples, and SFT
// conversations (one per row, or packed). Each row is a pure function of (seed, step, row), so
// any split over ranks, passes or chips sees the same rows; loss_tokens() counts what
// fill_batch() will weigh, for the global mean.
#include <algorithm>

#include "core/rng.h"
#include "train/trainer.h"

namespace mxn {

int64_t Trainer::fill_batch(TokenSpan tokens, int64_t rows, uint64_t seed, bool eval) {
  const int64_t T = cfg_.seq_len();
  const Pass& p = passes_[size_t(rows)];
  // LoRA dropout: each DROPOUT call's mask from (step key, node tag, global token index), so a
  // row gets the same mask on any rank, pass or chip; none while validating.
  for (size_t n : dropout_nodes_) {
    const Node& node = prog_->graph().nodes[n];
    mxn_op_call& c = prog_->call(n, p.variant);
    const int64_t tag = node.params<DropoutParams>().tag;
    set_params(c, DropoutParams{mix64(seed + uint64_t(tag)),
                                uint64_t(row_ids_[0]) * uint64_t(T) *
                                    uint64_t(prog_->graph().v(node.in[0]).shape.back()),
                                tag, eval ? 0.f : float(cfg_.lora_dropout)});
  }
  if (sft_set_) {  // conversations from their start, padded; loss where the mask says
    int64_t counted = 0;
    std::fill(tok_host_.begin(), tok_host_.begin() + rows * T, 0);
    std::fill(tgt_host_.begin(), tgt_host_.begin() + rows * T, -1);
    for (size_t b = 0; b < size_t(rows); ++b) {
      int32_t* tok = tok_host_.data() + b * size_t(T);
      int32_t* tgt = tgt_host_.data() + b * size_t(T);
      int32_t* pos = pos_host_.data() + b * size_t(T);
      int32_t* seg = pre_host_.data() + b * size_t(T);
      int64_t at = 0;  // packed: the next free token of the row
      for (int64_t i = 0;; ++i) {
        const int64_t ci = packed() ? sft_pick(seed, int64_t(row_ids_[b]), i, eval) : offsets_[b];
        const ChatTokens& c = (*sft_set_)[size_t(ci)];
        const int64_t len = int64_t(c.ids.size());
        if (at > 0 && at + len > T) break;  // the first one is cut to the row; others must fit
        const int64_t n = std::min<int64_t>(T - at, len);
        for (int64_t t = 0; t < n; ++t) {
          tok[at + t] = c.ids[size_t(t)];
          pos[at + t] = int32_t(t);
          seg[at + t] = int32_t(at);
          if (t + 1 < len && c.loss[size_t(t + 1)]) {
            tgt[at + t] = c.ids[size_t(t + 1)];
            ++counted;
          }
        }
        at += n;
        if (!packed() || at >= T || i + 1 >= kMaxPacked) break;
      }
      for (int64_t t = at; t < T && packed(); ++t) {  // padding: a segment of its own
        pos[t] = int32_t(t - at);
        seg[t] = int32_t(at);
      }
    }
    dev_->upload(p.tokens, tok_host_.data());
    dev_->upload(p.targets, tgt_host_.data());
    if (packed()) {
      dev_->upload(p.positions, pos_host_.data());
      dev_->upload(p.prefix, pre_host_.data());
    }
    return counted;
  }
  if (!glm_) {
    for (size_t b = 0; b < size_t(rows); ++b)
      for (int64_t t = 0; t < T; ++t) {
        tok_host_[b * size_t(T) + size_t(t)] = int32_t(tokens[offsets_[b] + t]);
        tgt_host_[b * size_t(T) + size_t(t)] = int32_t(tokens[offsets_[b] + t + 1]);
      }
    dev_->upload(p.tokens, tok_host_.data());
    if (m_.targets >= 0) dev_->upload(p.targets, tgt_host_.data());  // a pipeline's last stage
    return rows * T;
  }
  GlmOptions o;
  o.gmask_share = cfg_.gmask;
  std::vector<int32_t> text(static_cast<size_t>(T));
  int64_t counted = 0;
  for (size_t b = 0; b < size_t(rows); ++b) {
    for (int64_t t = 0; t < T; ++t) text[size_t(t)] = int32_t(tokens[offsets_[b] + t]);
    const GlmSample g = glm_sample(text.data(), T, glm_tokens_, o, seed, row_ids_[b]);
    std::copy(g.tokens.begin(), g.tokens.end(), tok_host_.begin() + int64_t(b) * T);
    std::copy(g.targets.begin(), g.targets.end(), tgt_host_.begin() + int64_t(b) * T);
    std::copy(g.pos.begin(), g.pos.end(), pos_host_.begin() + int64_t(b) * T);
    std::copy(g.block_pos.begin(), g.block_pos.end(), blk_host_.begin() + int64_t(b) * T);
    pre_host_[b] = g.sep;
    counted += T - g.sep;
  }
  dev_->upload(p.tokens, tok_host_.data());
  dev_->upload(p.targets, tgt_host_.data());
  dev_->upload(p.positions, pos_host_.data());
  dev_->upload(p.block_positions, blk_host_.data());
  dev_->upload(p.prefix, pre_host_.data());
  return counted;
}

int64_t Trainer::sft_row(uint64_t seed, int64_t row, bool eval) const {
  const auto& set = eval ? sft_val_ : sft_train_;
  return eval ? row % int64_t(set.size()) : int64_t(mix64(seed + uint64_t(row)) % set.size());
}

int64_t Trainer::sft_pick(uint64_t seed, int64_t row, int64_t i, bool eval) const {
  const auto& set = eval ? sft_val_ : sft_train_;
  const uint64_t k = uint64_t(row) * uint64_t(kMaxPacked) + uint64_t(i);
  return int64_t((eval ? k : mix64(seed + k)) % set.size());
}

int64_t Trainer::loss_tokens(uint64_t seed, int64_t first, int64_t n, bool eval) const {
  const int64_t T = cfg_.seq_len();
  if (!cfg_.sft.empty()) {  // the rows as fill_batch lays them out
    int64_t count = 0;
    const auto& set = eval ? sft_val_ : sft_train_;
    for (int64_t r = first; r < first + n; ++r)
      for (int64_t i = 0, at = 0;; ++i) {
        const ChatTokens& c =
            set[size_t(packed() ? sft_pick(seed, r, i, eval) : sft_row(seed, r, eval))];
        const int64_t len = int64_t(c.ids.size());
        if (at > 0 && at + len > T) break;
        const int64_t m = std::min<int64_t>(T - at, len);
        for (int64_t t = 1; t <= m && t < len; ++t) count += c.loss[size_t(t)];
        at += m;
        if (!packed() || at >= T || i + 1 >= kMaxPacked) break;
      }
    return std::max<int64_t>(count, 1);
  }
  if (!glm_) return n * T;
  // The layout of a GLM sample depends on (seed, row) only, not on the text.
  GlmOptions o;
  o.gmask_share = cfg_.gmask;
  const std::vector<int32_t> text(size_t(T), 0);
  int64_t count = 0;
  for (int64_t r = first; r < first + n; ++r)
    count += T - glm_sample(text.data(), T, glm_tokens_, o, seed, uint64_t(r)).sep;
  return count;
}

}  // namespace mxn
