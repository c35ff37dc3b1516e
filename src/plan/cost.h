#pragma once
// What one decoder layer costs, from the model's shape alone: parameters, FLOPs and the bytes
// its training step keeps. The planner and the simulator price every layout from these figures.
//
// Time is the GEMM FLOPs at the chip's rate plus, where that rate is a datasheet peak times a
// GEMM efficiency (not a rate measured on the whole step), the non-GEMM ops' bytes at the
// chip's memory bandwidth (forward ew_bytes, backward twice that).
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
  // Every stage recomputes, one-stage replicas too (Megatron-LM's full recomputation).
  bool recompute_full = false;
  // Model chunks a pipeline stage holds (Megatron-LM's interleaved schedule, plan/simulate.h);
  // 1: plain 1F1B, what mxn train --pp runs.
  int64_t interleave = 1;
  // Megatron-LM's sequence parallelism inside a tensor-parallel group: the norms, dropout and
  // residual activations (and the stage boundary) split along the sequence over the group, the
  // group's all-reduces become reduce-scatter + all-gather (the same bytes). mxn train has it
  // (--sequence_parallel 1) but not with --pp: off by default so that plans predict its runs.
  bool sequence_parallel = false;
  // Attention computed flash-style (mxn's kernels, FlashAttention): no (heads, T, T) scores
  // written to memory. false: the scores are materialized, scaled, masked, soft-maxed and
  // dropped out in memory (Megatron-LM as of 2021), which the memory-bound time counts.
  bool flash_attention = true;
};

struct ModelCost {
  int64_t layers = 0, hidden = 0, vocab = 0;
  bool tied = true;
  double layer_params = 0;  // one decoder layer
  double embed_params = 0;  // token (and learned position) embeddings: the first stage
  double head_params = 0;   // final norm and, untied, the LM head: the last stage
  double layer_flops = 0;   // forward FLOPs per token of one layer
  double head_flops = 0;    // forward FLOPs per token of the LM head (the last stage)
  int64_t heads = 0, kv_heads = 0;
  double act_bytes = 0;         // per token and layer, what the backward needs, no recomputation
  double act_shared_bytes = 0;  // the part of act_bytes tensor parallelism does not split (the
                                // norms' and residuals' full-width tensors; SP splits them too)
  double ew_bytes = 0;          // per token and layer, memory traffic of one forward's non-GEMM ops
                        // (norms, activation, residuals, rotation; unfused attention's scores)
  double ew_shared_bytes = 0;  // the part of ew_bytes on full-width tensors (as act_shared_bytes)
  double input_bytes = 0;      // per token and layer, what full recomputation keeps (its input)
  double logits_bytes = 0;     // per token on the last stage: f32 logits and their gradient
  double boundary_bytes = 0;   // per token, one activation crossing a stage boundary
  double weight_bytes = 0, grad_bytes = 0, optim_bytes = 0;  // per parameter
  double total_params() const;
};

// Error naming the field for a bad job (batch or sequence below 1, an unknown dtype).
ModelCost model_cost(const DecoderConfig& c, const JobSpec& job);

}  // namespace mxn
