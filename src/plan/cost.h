#pragma once
// What one decoder layer costs, from the model's shape alone: parameters, FLOPs and the bytes
// its training step keeps. The planner and the simulator price every layout from these figures.
//
// FLOPs count multiply-adds twice; a backward pass is twice its forward, recomputation adds one
// forward. Attention is causal (half of the T x T scores), flash-style (nothing T x T is kept).
// Bytes per parameter follow the training precision:
//   f32  (mxn's trainer today): weight 4 + gradient 4 + AdamW moments 8
//   bf16 (mixed precision):     bf16 weight 2 + f32 gradient 4 + f32 master and moments 12
// The optimizer part (moments, and the master copy in bf16) is what ZeRO-1 shards.
#include <cstdint>
#include <string>

#include "models/decoder.h"

namespace mxn {

struct JobSpec {
  int64_t global_batch = 16;  // sequences per optimizer step, over every replica
  int64_t seq = 128;          // tokens per sequence
  std::string dtype = "f32";  // f32 | bf16 (see above)
  double bucket_mb = 1.0;     // gradient all-reduce bucket (host-staged copy, sent twice)
  bool zero1 = true;          // shard the optimizer state over the replicas holding a layer
  // Every stage of a pipeline recomputes its activations (what mxn's trainer does today);
  // false: only stages whose activations would not fit do.
  bool recompute_all = false;
};

struct ModelCost {
  int64_t layers = 0, hidden = 0, vocab = 0;
  bool tied = true;
  double layer_params = 0;    // one decoder layer
  double embed_params = 0;    // token (and learned position) embeddings: the first stage
  double head_params = 0;     // final norm and, untied, the LM head: the last stage
  double layer_flops = 0;     // forward FLOPs per token of one layer
  double head_flops = 0;      // forward FLOPs per token of the LM head (the last stage)
  double act_bytes = 0;       // per token and layer, what the backward needs, no recomputation
  double input_bytes = 0;     // per token and layer, what full recomputation keeps (its input)
  double logits_bytes = 0;    // per token on the last stage: f32 logits and their gradient
  double boundary_bytes = 0;  // per token, one activation crossing a stage boundary
  double weight_bytes = 0, grad_bytes = 0, optim_bytes = 0;  // per parameter
  double total_params() const;
};

// Error naming the field for a bad job (batch or sequence below 1, an unknown dtype).
ModelCost model_cost(const DecoderConfig& c, const JobSpec& job);

}  // namespace mxn
