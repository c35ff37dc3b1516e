#pragma once
// GLM's autoregressive blank infilling (../shared/GLM.md, from THUDM/GLM's blocklm_utils.py):
// one text window becomes Part A (the text with each span replaced by one mask token, behind
// [CLS]) followed by Part B (the spans in shuffled order, each as [sop] + span with targets
// span + [eop]). Two position ids per token; attention from one number per sample (sep = the
// length of Part A: bidirectional there, causal in Part B, which sees all of Part A); the loss on
// Part B only. Deterministic in (seed, row), like the trainer's other sampling, so a mixed-chip
// run sees the same samples whatever the split.
#include <cstdint>
#include <vector>

namespace mxn {

struct GlmTokens {
  int32_t cls = -1, mask = -1, gmask = -1, sop = -1, eop = -1;
  // mxn's own runs: the five follow the data's vocabulary (256 byte ids for text).
  static GlmTokens after(int32_t vocab) {
    return {vocab, vocab + 1, vocab + 2, vocab + 3, vocab + 4};
  }
};

struct GlmOptions {
  double mask_ratio = 0.15;  // share of the text covered by [MASK] spans
  double lambda = 3.0;       // Poisson mean of span lengths, over 1..max_span
  int max_span = 39;
  double gmask_share = 0.0;  // share of rows in generation mode: one [gMASK] span at the end
};

struct GlmSample {
  std::vector<int32_t> tokens, targets;  // targets -1 where there is no loss (Part A)
  std::vector<int32_t> pos, block_pos;   // position rows 0 and 1
  int32_t sep = 0;                       // tokens in Part A
  int64_t text_len = 0, masked = 0;      // text tokens used, and how many were blanked
  bool generation = false;               // a [gMASK] row
};

// The number of text tokens a sample of `ctx` tokens takes from a window is not known in advance
// (each span adds a mask and a [sop]): the sampler reads what it needs from `text`, which must
// hold at least ctx - 1 tokens. The sample is exactly `ctx` tokens long.
GlmSample glm_sample(const int32_t* text, int64_t ctx, const GlmTokens& t, const GlmOptions& o,
                     uint64_t seed, uint64_t row);

}  // namespace mxn
