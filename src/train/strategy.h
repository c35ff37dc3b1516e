#pragma once
// How one training step's work is spread over the ranks: a small interface, and today's three
// implementations. The Trainer owns the model, the data, the Program and the optimizer; a strategy
// decides which layers and rows this rank holds, runs a step's passes, reduces the gradients and
// their norm, runs validation through the ranks and gathers the state a checkpoint needs.
//
//   DataParallel  every rank holds the whole model and takes a share of each step's rows, in
//                 proportion to its measured speed (or --split), corrected for drift; gradients
//                 are summed by GradSync, overlapping the backward. One rank is its world of one.
//   Pipeline      --pp stages of contiguous layers, replicas of them taking even shares of rows,
//                 the 1F1B schedule (parallel/schedule.h) over micro-batches; with --ep, a
//                 stage's replicas split its MoE layers' experts.
//   ExpertParallel --ep groups that split each MoE layer's experts by chip speed, tokens
//                 exchanged all-to-all at the graph's cuts; data parallel across the groups.
//
//   TensorParallel --tp groups that split every block by heads and MLP columns (uneven by chip
//                 speed), the partial sums all-reduced at the graph's cuts; data parallel across
//                 the groups.
// They are to compose as DESIGN.md's map says: TP inside a stage, EP across a stage's ranks,
// pipeline stages across nodes, data parallelism / ZeRO-1 across the replicas; each
// implementation names the ranks it reduces over with Communicator::split. TP does not yet
// combine with --pp or --ep.
#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "io/checkpoint.h"
#include "io/train_config.h"
#include "models/decoder.h"
#include "parallel/comm.h"
#include "parallel/grad_sync.h"

namespace mxn {

class Trainer;
class Program;
class ExpertExchange;
class TensorGroup;

// Expert parallelism: a rank's experts of each MoE layer.
struct ExpertShard {
  int64_t first = 0, count = 0;  // experts [first, first + count)
  int64_t rows_in = 0;           // the most sequences a pass of all the group's ranks has together
};

class Strategy {
 public:
  virtual ~Strategy() = default;
  // Before the graph: the layers this rank holds ([first, last), last -1: to the end) and the
  // rows of one forward pass (this rank's memory or the pipeline's micro-batch).
  virtual std::array<int64_t, 2> layers() const { return {0, -1}; }
  virtual int64_t pass_rows() = 0;
  // After the Program, the optimizer and the weights: measure, share the rows, make the pass
  // variants and describe the plan (Trainer::plan()).
  virtual void plan() = 0;
  // At the start of a step, before anything of it runs (a strategy that times its ranks' compute
  // starts the clock here, so a slow chip's every delay is counted).
  virtual void before_step() {}
  // One step's forward and backward passes over this rank's rows; returns the global batch's mean
  // loss, the same on every rank.
  virtual double passes(uint64_t key, double total) = 0;
  // The global sum of squares of the mean gradient, with every gradient reduced over the ranks
  // that share it (collective).
  virtual double grad_sumsq() = 0;
  virtual void after_step() {}
  // The mean loss over the validation windows (collective).
  virtual double eval() = 0;
  // Fills a checkpoint with the whole model's weights and moments; true on the rank that writes
  // it (collective).
  virtual bool gather(Checkpoint& ck) = 0;
  virtual const std::vector<int64_t>& stage_bounds() const { return none_; }
  // Expert parallelism: this rank's experts (nullptr: all of them, no exchanges).
  virtual const ExpertShard* experts() const { return nullptr; }
  // Tensor parallelism: this rank's share of the blocks (nullptr: whole), and a checkpoint's
  // whole tensors (and moments) cut to it.
  virtual const TensorShard* tensor_shard() const { return nullptr; }
  virtual TensorMap cut(const TensorMap& whole) const { return whole; }
  // Nodes [0, end) of a pass (expert parallelism: with the exchanges at the cuts).
  virtual void run(Program& prog, int variant, size_t end);
  virtual double exposed_reduce_seconds() const { return 0; }
  // The copies of weights this rank holds, in the order they are made equal (align_copies): for
  // each communicator, the float ranges of the flat params that all its ranks hold alike, its
  // rank 0's copy the reference. Empty: nothing held twice (one rank).
  struct Copies {
    Communicator* comm;
    std::vector<std::array<int64_t, 2>> ranges;
  };
  virtual std::vector<Copies> copies() { return {}; }
  // Expert parallelism: seconds a step in the exchanges (moving rows, waiting for the others).
  virtual double exchange_seconds() const { return 0; }

 private:
  std::vector<int64_t> none_;
};

class DataParallel final : public Strategy {
 public:
  // Shares by --split's weights, or by the measured speeds when it is "auto".
  explicit DataParallel(Trainer& t);
  int64_t pass_rows() override;
  void plan() override;
  void before_step() override { step_start_ = std::chrono::steady_clock::now(); }
  double passes(uint64_t key, double total) override;
  double grad_sumsq() override;
  void after_step() override { follow_drift(); }
  double eval() override;
  bool gather(Checkpoint& ck) override;
  double exposed_reduce_seconds() const override;
  std::vector<Copies> copies() override;  // the whole model, over every rank

 private:
  void profile();
  void follow_drift();
  void apply_split(const std::vector<int64_t>& split);

  Trainer& t_;
  std::unique_ptr<GradSync> sync_;
  std::vector<int64_t> split_;
  std::vector<double> sec_per_row_, stats_;  // per rank; stats_: the per-step all-reduce
  bool auto_split_ = false;
  static constexpr int64_t kDriftWindow = 5;
  std::vector<double> drift_;  // per rank, the last kDriftWindow seconds per sequence
  int64_t steps_since_change_ = 0;
  std::chrono::steady_clock::time_point step_start_;
};

// This rank is stage stage_ of replica replica_ (rank = replica x pp + stage), holding layers
// [bounds_[stage_], bounds_[stage_ + 1]). A step runs 1F1B over micro-batches of the pass rows; a
// stage keeps only each micro-batch's input and recomputes its activations in the backward, so
// one arena serves every micro-batch in flight.
class Pipeline final : public Strategy {
 public:
  explicit Pipeline(Trainer& t);  // ranks, layer bounds and communicators, before the graph
  ~Pipeline() override;
  std::array<int64_t, 2> layers() const override;
  int64_t pass_rows() override;  // this replica's rows and the micro-batch
  void plan() override;          // the pass variants, host buffers and the plan's description
  double passes(uint64_t key, double total) override;  // a step's 1F1B schedule
  double grad_sumsq() override;  // sums over replicas (and tied copies); global sum of squares
  double eval() override;
  bool gather(Checkpoint& ck) override;  // replica 0's state on rank 0, by name
  const std::vector<int64_t>& stage_bounds() const override { return bounds_; }
  // --ep N beside --pp: each N consecutive replicas of a stage split its MoE layers' experts
  // (--expert_split even or weights) and exchange rows at the cuts, all in the same 1F1B step.
  const ExpertShard* experts() const override { return ep_ > 1 ? &shard_ : nullptr; }
  // --tp N beside --pp: each N consecutive replicas of a stage split its blocks, run the same
  // micro-batches and add their partial sums at the cuts.
  const TensorShard* tensor_shard() const override;
  TensorMap cut(const TensorMap& whole) const override;
  std::vector<Copies> copies() override;
  void run(Program& prog, int variant, size_t end) override;
  double exchange_seconds() const override;

 private:
  void rows_of(int64_t micro, int64_t n, uint64_t key);  // offsets for a micro-batch
  void gather_stages(Checkpoint& ck);
  void place_experts_here();  // --ep: the groups, the placement and the communicators
  void split_blocks_here();   // --tp: the groups, the shares and the communicators
  double reduce_experts();  // --ep: gradients reduced by range; this group's expert sum of squares
  void own_state(std::vector<float>* blob, Checkpoint& ck);  // this stage's params, whole stacks

  Trainer& t_;
  int64_t pp_ = 1, stage_ = 0, replica_ = 0, replicas_ = 1, hidden_ = 0;  // hidden_: width
  std::vector<int64_t> bounds_;
  std::unique_ptr<Communicator> pipe_, dp_, tied_;  // a replica's stages; a stage's replicas;
                                                    // the first and last stage (tied embeddings)
  std::vector<float> stash_, send_f_, send_b_, recv_g_, grad_host_, tied_host_;
  int64_t ep_ = 1, index_ = 0;          // --ep: the group's size, this replica's place in it
  std::vector<int64_t> expert_bounds_;  // experts of group rank i: [b[i], b[i + 1])
  ExpertShard shard_;
  std::unique_ptr<Communicator> group_, holders_;  // my EP group; the replicas with my experts
  std::unique_ptr<ExpertExchange> x_;
  std::vector<std::array<int64_t, 2>> shared_, expert_;  // param float ranges in the flat grads
  std::vector<float> pack_;
  int64_t tp_ = 1;                   // --tp: the group's size
  std::unique_ptr<TensorGroup> tg_;  // --tp: my group
};

// --ep N: each group of N consecutive ranks splits every MoE layer's experts into contiguous
// ranges (by --expert_split: the chips' measured GEMM speed, even, or weights) and the ranks share
// each step's rows (by --split: the same measured speed, even, or weights); everything else is
// replicated. Every rank runs the same number of passes (of its own size), in step. In a pass each
// MoE layer's permuted rows travel to their experts' ranks and back by four all-to-alls (the rows
// out and the results back; their gradients in the backward), host-staged or, among CUDA ranks,
// NCCL's device to device. Gradients: the replicated
// params' summed over all ranks, an expert's over the groups (the ranks that hold it); the norm
// counts each once. Checkpoints hold every expert (gathered), so a run resumes on any --ep or on
// one device.
class ExpertParallel final : public Strategy {
 public:
  explicit ExpertParallel(Trainer& t);  // groups, the experts' placement, before the graph
  ~ExpertParallel() override;
  int64_t pass_rows() override;  // the rows' split and the passes, from every rank's memory
  void plan() override;          // rows, the cuts, host buffers, the plan's description
  double passes(uint64_t key, double total) override;
  double grad_sumsq() override;  // reduces (replicated: all ranks; experts: over the groups)
  double eval() override;
  bool gather(Checkpoint& ck) override;  // every expert's weights and moments on rank 0
  const ExpertShard* experts() const override { return &shard_; }
  void run(Program& prog, int variant, size_t end) override;
  double exchange_seconds() const override;
  std::vector<Copies> copies() override;

  // This rank's seconds for an expert's GEMM over an even routing's rows, and for one sequence
  // through a block of the model's shape (the placement's and the rows' probes; Pipeline's too).
  static std::array<double, 2> measure_seconds(Trainer& t);
  // A checkpoint's state for the params of `whole` (in its order; expert stacks whole): each
  // param's weight (i 0) and moments (1, 2) to put() on the `lead` rank; a stack's slices (this
  // rank's Program holds experts `first`..) gathered over `group` (null: no stacks split), whose
  // rank i holds [bounds[i], bounds[i + 1]). Every rank of the group calls it.
  static void gather_state(Trainer& t, const Graph& whole, Communicator* group,
                           const std::vector<int64_t>& bounds, int64_t first, bool lead,
                           const std::function<void(const Value&, int, HostTensor&&)>& put);

 private:
  Trainer& t_;
  int64_t ep_ = 1, index_ = 0, group_ = 0, groups_ = 1;
  std::vector<double> row_sec_;            // per rank: --split's stand-ins, or measured
  std::vector<int64_t> rows_, eval_rows_;  // per rank: a step's sequences, the windows
  int64_t passes_ = 1, eval_passes_ = 1;   // every rank runs this many, in step
  std::string speeds_;                     // the measured GEMM times, for the plan
  std::vector<int64_t> bounds_;            // experts of group rank i: [bounds_[i], bounds_[i + 1])
  ExpertShard shard_;
  std::unique_ptr<Communicator> group_comm_, replicas_;  // my group; my experts' holders
  std::unique_ptr<ExpertExchange> x_;
  std::vector<std::array<int64_t, 2>> shared_, expert_;  // param float ranges in the flat grads
  std::vector<float> grads_host_, pack_;
};

// --tp N: groups of N consecutive ranks (rank = replica x tp + index) split every block (strategy
// overview above; tensor_parallel.cpp).
class TensorParallel final : public Strategy {
 public:
  explicit TensorParallel(Trainer& t);  // groups, the shares (measured or --tp_split)
  ~TensorParallel() override;
  int64_t pass_rows() override;  // the group's smallest memory
  void plan() override;          // rows per replica, the cuts, the plan's description
  double passes(uint64_t key, double total) override;
  double grad_sumsq() override;
  double eval() override;
  bool gather(Checkpoint& ck) override;  // the whole layout, on rank 0
  const TensorShard* tensor_shard() const override;
  TensorMap cut(const TensorMap& whole) const override;
  void run(Program& prog, int variant, size_t end) override;
  double exchange_seconds() const override;  // in the all-reduces
  std::vector<Copies> copies() override;     // whole weights in the group, then over the replicas

  // The shares' weights for `places` group places: --tp_split's, or (auto) each place's speed,
  // 1 / the mean seconds of a GEMM of the model's shape over the ranks at that place (this rank
  // at `place`); `why` gets every rank's time. Collective.
  static std::vector<double> speeds(Trainer& t, int64_t place, int64_t places, std::string* why);
  // This rank's tensor of a param by name: its weight (i 0) or AdamW moment (1, 2).
  static std::function<Tensor(const std::string&, int)> mine(Trainer& t);

 private:
  Trainer& t_;
  int64_t tp_ = 1, replica_ = 0, replicas_ = 1;
  std::string speeds_;
  std::unique_ptr<TensorGroup> tg_;
  std::unique_ptr<Communicator> dp_;  // the ranks holding my share
  std::unique_ptr<GradSync> sync_;    // over dp_, with several replicas
  std::vector<float> grads_host_;
};

// The faster of two timed (rows, in) x (out, in)^T GEMMs on this device, after a warm-up.
double gemm_seconds(Device& dev, int64_t rows, int64_t out, int64_t in);

// Each copy (flat params `mine`) against its reference: the largest difference into *worst, and
// *same false where a bit differs. Collective.
void compare_copies(const std::vector<Strategy::Copies>& c, const std::vector<float>& mine,
                    double* worst, bool* same);
// A checkpoint's state of param `name`: its weight (i 0) or AdamW moment m (1) or v (2).
void put_state(Checkpoint& ck, const std::string& name, int i, HostTensor&& h);
// Every copy made its reference's, in order (mixed chips: each rank's optimizer rounds its own
// way, so the copies would drift apart). Collective.
void align_copies(const std::vector<Strategy::Copies>& c, std::vector<float>& params);

// --tp's settings against the job's ranks and the model: an Error naming what is wrong.
void check_tensor_parallel(const TrainConfig& c, int64_t world, const DecoderConfig& d);

// --ep's settings against the job's ranks (the multiple, --split and --expert_split): an
// Error naming what is wrong. Checked before the ranks start, and by each rank.
void check_expert_parallel(const TrainConfig& c, int64_t world);
// ... and against the model: a mixture of experts with at least --ep experts a layer.
void check_expert_model(const TrainConfig& c, const DecoderConfig& d);

// --expert_split's weights, one a rank of a group (0: no experts there); empty for auto.
std::vector<double> expert_weights(const std::string& split, int64_t ranks);

// Whole experts in proportion to speed (a rank of speed 0 holds none), the slowest rank's time
// the least it can be; every other rank holds at least one, unless `drop_slow`: then the slowest
// ranks hold none where that ends the step sooner (their tokens still go to the others' experts).
std::vector<int64_t> place_experts(int64_t E, const std::vector<double>& speed, bool drop_slow);

// A graph's params as float ranges [at, n) of the flat gradient: expert stacks', the rest's.
void split_ranges(const Graph& g, std::vector<std::array<int64_t, 2>>& shared,
                  std::vector<std::array<int64_t, 2>>& expert);

// Sums the float ranges [at, at + n) of `flat` over `c` (packed into `pack` for one call).
void reduce_ranges(std::vector<float>& flat, const std::vector<std::array<int64_t, 2>>& ranges,
                   Communicator& c, std::vector<float>& pack);

// A checkpoint's whole expert stacks (E, rows, cols), and their AdamW moments, cut to a shard's.
TensorMap expert_slices(const TensorMap& whole, const ExpertShard& shard);

}  // namespace mxn
