#pragma once
// Many prompts at once through the serving engine, for `mxn generate --prompts-file`.
#include <cstdint>
#include <vector>

#include "infer/model.h"

namespace mxn {

// Many prompts (token ids) at once through the serving engine (continuous batching over `slots`
// KV-cache slots): each prompt's new tokens, in order. Sampling, max_tokens, ignore_eos, model,
// adapter, device and threads as in `o`; each prompt's seed is o.sampling.seed + its index.
std::vector<std::vector<int32_t>> generate_batch(const GenerateOptions& o,
                                                 const std::vector<std::vector<int32_t>>& prompts,
                                                 int64_t slots);

}  // namespace mxn
