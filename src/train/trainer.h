#pragma once
// The training loop: AdamW with f32 master weights, warmup + cosine schedule, clipping by global
// norm, gradient accumulation, periodic validation and atomic checkpoints, on one rank or as one
// of several (uneven data parallelism over different chips). Every buffer is made when the
// Trainer is built; step() allocates nothing, except that a drift correction of the split may
// build the op calls of a new pass size once (no device memory).
#include <memory>
#include <string>
#include <vector>

#include "backend/device.h"
#include "data/chat.h"
#include "data/glm.h"
#include "data/shard.h"
#include "graph/program.h"
#include "infer/adapter.h"
#include "io/checkpoint.h"
#include "io/train_config.h"
#include "models/decoder.h"
#include "parallel/comm.h"
#include "train/optimizer.h"
#include "train/strategy.h"

namespace mxn {

// How a step's sequences are shared over the ranks (one entry per rank; one rank: the lot).
struct RankPlan {
  int64_t rows = 0;         // sequences of each step's global batch (batch x accum)
  int64_t cap = 0;          // most sequences per forward pass (memory bound); more go in passes
  uint64_t free_bytes = 0;  // the device's free memory at start
  double sec_per_row = 0;   // measured forward+backward seconds per sequence
  double overhead_s = 0;    // measured all-reduce + optimizer seconds per step
  uint64_t optimizer_bytes = 0;  // AdamW's moments on the device (with ZeRO-1: its share)
};
struct Plan {
  std::vector<RankPlan> ranks;
  double predicted_step_s = 0;  // at start, from the measurements
  int rebalances = 0;           // times the split was corrected for drift
  size_t buckets = 0;           // gradient all-reduce buckets
  bool device_direct = false;   // reduced by the devices' own collectives (NCCL), not via host
  std::string last_change;      // the latest correction, for the log ("" if none pending)
  std::string pipeline;         // with --pp: the stages, their layers and micro-batches
  std::string experts;          // with --ep: the experts' placement and the exchanges
  std::string tensor;           // with --tp: the groups' shares
  std::vector<int64_t> expert_bounds;    // with --ep: group rank i's experts [b[i], b[i + 1])
  std::string zero_why;                  // ZeRO-1 chosen by --zero -1: why
  std::string dtype_why;                 // --dtype auto: what this rank measured
  std::vector<std::string> rank_dtypes;  // --dtype auto over ranks: each one's choice
};

// The training graph for `rows` sequences: the whole model, or a pipeline stage's layers
// [first, last) (last -1: to the end); a stage before the last gets the input "grad_out" that
// seeds its backward (*seed) and keeps its input's gradient (*grad_in).
// With `experts` (expert parallelism) the MoE layers hold that share of the experts and are
// cut where tokens cross ranks (DecoderGraph::expert_cuts, their gradients' seeds and results).
Graph train_graph(const TrainConfig& c, int64_t rows, DecoderGraph* m, size_t* n_forward,
                  int64_t first = 0, int64_t last = -1, int* seed = nullptr, int* grad_in = nullptr,
                  const ExpertShard* experts = nullptr, const TensorShard* tp = nullptr);

// Sequences per forward pass that fit in `free_bytes` (at most cfg.batch, at least 1): params,
// grads and AdamW's moments are fixed, the activation arena grows with the rows; 10% is kept in
// reserve.
int64_t rows_per_pass(const TrainConfig& cfg, uint64_t free_bytes, const TensorShard* tp = nullptr);

class Trainer {
 public:
  // Starts fresh, or from `resume` (a checkpoint or run folder) when non-empty. With a
  // communicator of several ranks, each rank measures its device, takes its share of every
  // step's global batch (batch x accum sequences, split by speed or cfg.split) and gradients are
  // summed weighted by tokens.
  explicit Trainer(const TrainConfig& cfg, const std::string& resume = "",
                   Communicator* comm = nullptr);
  // From a checkpoint already read (load_good_checkpoint: each file read once); nullptr: fresh.
  Trainer(const TrainConfig& cfg, const Checkpoint* resume, Communicator* comm);

  float step();       // one optimizer step; returns the mean training loss of its micro-batches
  float eval_loss();  // mean loss over the validation split's fixed windows
  // Checkpoint into cfg.out; returns its folder. Collective: every rank calls it (with ZeRO-1
  // the lead gathers the optimizer shards); ranks other than 0 write nothing and return "".
  std::string save();
  // The same on `w`'s thread while training goes on: the state is copied to host memory (into
  // buffers kept from one checkpoint to the next) and handed over. First waits for the write in
  // flight, whose outcome it returns (step -1: none).
  CheckpointWriter::Result save_async(CheckpointWriter& w);
  double lr_at(int64_t step) const;

  int64_t current_step() const { return step_; }
  const TrainConfig& config() const { return cfg_; }
  TensorMap weights() const;         // the trained ones (with LoRA: the adapters)
  TensorMap frozen_weights() const;  // the frozen base under adapters, as stored (f32 or bf16)
  uint64_t optimizer_bytes() const { return opt_->bytes(); }
  uint64_t arena_bytes() const { return prog_->arena_bytes(); }  // the activations of a pass
  int64_t param_count() const { return prog_->param_count(); }
  // ZeRO-1: rank r's optimizer state covers params [shards[r], shards[r + 1]) of the flat
  // layout; empty when every rank holds all of it.
  const std::vector<int64_t>& optimizer_shards() const { return opt_->shards(); }
  // With --pp: stage s holds layers [bounds[s], bounds[s + 1]); empty otherwise.
  const std::vector<int64_t>& stage_bounds() const { return par_->stage_bounds(); }
  float last_grad_norm() const { return grad_norm_; }
  // A mixture of experts: the last step's tokens per expert, one list per MoE layer (summed over
  // the ranks); empty for a dense model.
  nlohmann::json expert_load() const;
  Device& device() { return *dev_; }
  const Plan& plan() const { return plan_; }
  // Mean wall seconds of the steps this process ran, the first one left out (warm-up).
  double mean_step_seconds() const;
  // Mean seconds per step this rank waited for gradient reduces after its own backward.
  double mean_exposed_reduce_seconds() const;
  // Mean seconds per step this rank spent in expert parallelism's exchanges.
  double mean_exchange_seconds() const;
  // Hands over the latest split correction's description, once.
  std::string take_plan_change();
  // Whether every copy of each weight is bit-identical to its reference (data parallelism: every
  // rank's weights to rank 0's; --pp, --ep, --tp: each copy to the first rank's of those that
  // hold it, `shares`), and the largest difference on any rank (collective; not compared on one
  // rank).
  struct Drift {
    bool compared = false;
    bool identical = true;
    double worst = 0;
    bool shares = false;
  };
  Drift replica_drift();

 private:
  // Setup (trainer_setup.cpp), in the constructor's order.
  Adapter start_adapter();
  void open_data();
  void setup_glm();
  // Several ranks, each holding the whole model (data parallelism: no --pp, no --ep).
  bool whole_replicas() const { return comm_ && cfg_.pp == 1 && cfg_.ep == 1 && cfg_.tp == 1; }
  void choose_dtype();
  void choose_kernels();
  void setup_ranks(const DecoderConfig& model);
  void build_program();
  void setup_optimizer();
  void alloc_rows();
  void load_weights(const Checkpoint* ck, const Adapter& start, const DecoderConfig& model);

  int variant_for(int64_t rows);  // builds the Program variant on first use
  // Uploads rows offsets_[0, rows) of `tokens`; with the GLM objective each row is blank-infilled
  // by glm_sample(seed, row_ids_[b]). Returns the tokens that carry a loss.
  // `eval`: the validation windows (no dropout).
  int64_t fill_batch(TokenSpan tokens, int64_t rows, uint64_t seed, bool eval);
  // Tokens with a loss in rows [0, n) of a step's global batch (the GLM objective's vary by row).
  int64_t loss_tokens(uint64_t seed, int64_t first, int64_t n, bool eval) const;
  // SFT: the row -> conversation index of a step (or of the validation set).
  int64_t sft_row(uint64_t seed, int64_t row, bool eval) const;
  // Packed SFT: the i-th conversation offered to a row (taken while it fits the row).
  int64_t sft_pick(uint64_t seed, int64_t row, int64_t i, bool eval) const;
  bool packed() const { return cfg_.pack != 0 && !cfg_.sft.empty(); }
  static constexpr int64_t kMaxPacked = 64;  // conversations per packed row, at most
  void load(const Checkpoint& ck);
  bool snapshot(Checkpoint& ck);  // collective; true on the rank that writes it
  Checkpoint snap_;               // save_async's host copy
  void init_adapter(int param);
  // An adapter's fresh values (LoRA's A, the prefix rows and MLP; zeros else); an expert stack's
  // slices are experts first.. of the model's.
  std::vector<float> adapter_values(const Value& v, int64_t first) const;
  // Every param of the whole model, fresh (its adapters, fine-tuning): what a tensor-parallel
  // rank cuts its share from.
  TensorMap whole_fresh(const DecoderConfig& model) const;

  TrainConfig cfg_;
  std::unique_ptr<Device> dev_;
  TokenData data_;
  DecoderGraph m_;
  std::unique_ptr<Program> prog_;
  size_t n_forward_ = 0;
  std::vector<size_t> dropout_nodes_;  // DROPOUT nodes (LoRA dropout), forward and backward
  size_t head_node_ = SIZE_MAX;        // a fused head that takes the seed's d(loss) (ABI 6)
  std::unique_ptr<Optimizer> opt_;     // AdamW, its schedule and clipping, ZeRO-1's shards
  std::unique_ptr<Buffer> scalar_;
  std::vector<int32_t> tok_host_, tgt_host_, pos_host_, blk_host_, pre_host_;
  std::vector<int64_t> offsets_;
  std::vector<uint64_t> row_ids_;
  bool glm_ = false;
  bool zero_ = false;   // ZeRO-1 (--zero 1, or -1 with the ranks' chips differing)
  bool align_ = false;  // copies of weights made equal after each step (chips differ, not DP)
  std::vector<float> align_host_;
  GlmTokens glm_tokens_;
  std::vector<ChatTokens> sft_train_, sft_val_;       // conversations, when cfg_.sft is set
  const std::vector<ChatTokens>* sft_set_ = nullptr;  // the set fill_batch reads
  // The optimizer's op calls, built once: zero the grads, their sum of squares, AdamW per group.
  mxn_op_call zero_grads_{}, grad_sumsq_{};
  Tensor sumsq_;
  struct Pass {  // the Program run with this many rows: its inputs and loss
    int variant = -1;
    Tensor tokens, targets, loss, positions, block_positions, prefix;
    Tensor hidden_in, hidden_out, grad_out, grad_in;  // a pipeline stage's boundary tensors
    std::vector<Tensor> router_offsets;               // MoE layers' expert row offsets
  };
  // MoE: adds a pass's tokens per expert into expert_load_; after the step, moves each router's
  // selection bias towards an even load (cfg_.router_bias_update).
  void count_experts(const Pass& p);
  void update_router_bias();
  std::vector<double> expert_load_;      // (the model's MoE layers x experts), this step's
  int64_t moe_first_ = 0;                // this rank's first MoE layer among the model's
  std::vector<int32_t> offsets_host_;    // one layer's offsets, downloaded
  std::vector<float> bias_host_;         // one router's bias
  std::vector<int> router_bias_values_;  // the routers' bias params, by layer
  std::vector<Pass> passes_;             // by row count, 1..cap
  int64_t step_ = 0;
  Communicator* comm_ = nullptr;
  int64_t world_ = 1, rank_ = 0, cap_ = 0;
  uint64_t free_bytes_ = 0;
  // This rank's rows of a step's global batch and of the validation windows.
  int64_t row_begin_ = 0, rows_ = 0, eval_begin_ = 0, eval_rows_ = 0;
  Plan plan_;
  // How the step's work is spread over the ranks (strategy.h): data parallel or the pipeline.
  // They read and set the rows and passes above; the Trainer keeps no parallel state of its own.
  std::unique_ptr<Strategy> par_;
  friend class DataParallel;
  friend class Pipeline;
  friend class ExpertParallel;
  friend class TensorParallel;
  friend class ExpertExchange;
  int seed_value_ = -1, grad_in_value_ = -1;  // graph values: d(hidden_out), d(hidden_in)
  void run_forward_only(int variant);         // evaluation: no gradients from a fused head
  // Rows [row_begin_ + done, + n) of step `key`'s global batch into offsets_ and row_ids_.
  void pick_rows(uint64_t key, int64_t done, int64_t n);
  // This rank's validation windows: their share of the mean validation loss (not reduced), in
  // passes of up to cap_ rows, or in `passes` passes as even as can be.
  double eval_share(int64_t passes = 0);
  // The backward's seed, d(loss) = this pass's share of the batch, and the fused head's copy.
  void seed_backward(int variant, float dloss);
  double step_seconds_sum_ = 0;
  int64_t steps_timed_ = 0, steps_run_ = 0;
  float grad_norm_ = 0;
};

}  // namespace mxn
