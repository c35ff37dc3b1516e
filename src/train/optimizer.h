#pragma once
// The optimizer: AdamW over a Program's flat parameters with f32 moments on the device, the
// learning-rate schedule (linear warmup, then cosine to min_lr), clipping by the global gradient
// norm, and ZeRO-1's sharding: each rank keeps the moments of its share [lo, hi) of the flat
// parameters (in proportion to its free memory), updates that share and all-gathers the rest.
// Checkpoints hold every parameter's moments whole ("m.NAME", "v.NAME"), whatever the sharding,
// so a run resumes on any number of ranks.
#include <cstdint>
#include <memory>
#include <vector>

#include "backend/device.h"
#include "graph/program.h"
#include "io/safetensors.h"
#include "parallel/comm.h"

namespace mxn {

struct OptimizerOptions {
  double lr = 2e-3, min_lr = 2e-4;
  int64_t warmup = 40, steps = 1500;
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1;
  double clip = 1.0;  // the global gradient norm's bound (0: none)
};

class Optimizer {
 public:
  // `free_bytes`: each rank's free device memory, for ZeRO-1's shares; empty (or one rank, or no
  // communicator): every rank keeps every moment.
  Optimizer(Program& prog, Device& dev, const OptimizerOptions& o, Communicator* comm,
            const std::vector<double>& free_bytes);

  double lr_at(int64_t step) const;
  // Step `s` with the gradients in the Program (already reduced over the ranks) whose squared
  // global norm is `sumsq`: clips, updates this rank's share, gathers the others'. Returns the
  // norm (before clipping).
  float step(int64_t s, float sumsq);
  void zero();  // the moments of a fresh run

  // Moments of the whole model, by name, into `out` on the root (collective under ZeRO-1).
  // Returns false on the ranks that hold nothing to write.
  bool save(TensorMap& out, int root);
  // This rank's share of every parameter's moments from `in` (Error naming a missing or
  // misshapen tensor).
  void load(const TensorMap& in);
  // One parameter's moment (0: m, 1: v) on the device, unsharded only (pipeline stages).
  Tensor moment(int i, const Value& param) const;

  uint64_t bytes() const { return m_->bytes() + v_->bytes(); }
  const std::vector<int64_t>& shards() const { return shards_; }  // empty: unsharded

 private:
  void gather_params();

  Program& prog_;
  Device& dev_;
  OptimizerOptions o_;
  Communicator* comm_;
  std::vector<int64_t> shards_;  // ZeRO-1's bounds, world + 1
  int64_t lo_ = 0, hi_ = 0;      // this rank's share of the flat params
  std::unique_ptr<Buffer> m_, v_;
  mxn_op_call adamw_[2]{};         // the decayed group, then the rest
  std::vector<float> host_;        // ZeRO-1: the params' (or moments') host copy
  std::vector<float> moments_[2];  // ZeRO-1: the gathered moments, for a checkpoint
};

}  // namespace mxn
