#pragma once
// The training loop: AdamW with f32 master weights, warmup + cosine schedule, clipping by global
// norm, gradient accumulation, periodic validation and atomic checkpoints. Every buffer is made
// when the Trainer is built; step() allocates nothing.
#include <memory>
#include <string>
#include <vector>

#include "backend/device.h"
#include "data/shard.h"
#include "graph/program.h"
#include "io/checkpoint.h"
#include "models/gpt2/gpt2.h"
#include "parallel/comm.h"
#include "train/config.h"

namespace mxn {

class Trainer {
 public:
  // Starts fresh, or from `resume` (a checkpoint or run folder) when non-empty. With a
  // communicator of several ranks, each rank takes its share of every step's global batch
  // (cfg.batch sequences per micro-step) and gradients are summed weighted by tokens.
  explicit Trainer(const TrainConfig& cfg, const std::string& resume = "",
                   Communicator* comm = nullptr);

  float step();        // one optimizer step; returns the mean training loss of its micro-batches
  float eval_loss();   // mean loss over the validation split's fixed windows
  std::string save();  // checkpoint into cfg.out; returns its folder
  double lr_at(int64_t step) const;

  int64_t current_step() const { return step_; }
  const TrainConfig& config() const { return cfg_; }
  TensorMap weights() const;
  float last_grad_norm() const { return grad_norm_; }
  Device& device() { return *dev_; }
  int64_t local_batch() const { return local_batch_; }

 private:
  void fill_batch(const uint16_t* tokens, const std::vector<int64_t>& offsets);
  void load(const Checkpoint& ck);

  TrainConfig cfg_;
  std::unique_ptr<Device> dev_;
  TokenData data_;
  GPT2Graph m_;
  std::unique_ptr<Program> prog_;
  size_t n_forward_ = 0;
  std::unique_ptr<Buffer> opt_m_, opt_v_, scalar_;
  std::vector<int32_t> tok_host_, tgt_host_;
  std::vector<int64_t> offsets_;
  // The optimizer's op calls, built once: zero the grads, their sum of squares, AdamW per group.
  mxn_op_call zero_grads_{}, grad_sumsq_{}, adamw_[2]{};
  Tensor loss_, sumsq_, tokens_, targets_;
  int64_t step_ = 0;
  Communicator* comm_ = nullptr;
  int64_t local_batch_ = 0, row_begin_ = 0;  // this rank's rows of the global batch
  std::vector<float> host_grads_;            // host staging for the all-reduce
  float grad_norm_ = 0;
};

}  // namespace mxn
