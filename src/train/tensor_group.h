#pragma once
// One rank's part in a tensor-parallel group (strategy.h has the overview), for any strategy that
// splits blocks: TensorParallel over the whole model, Pipeline inside each stage. It knows the
// group's shares, the cut points where partial sums are added over the group (host-staged through
// MPI), which params are split, whole or whole with a partial gradient, and how a checkpoint's
// whole tensors are cut to this rank's share and gathered back.
#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "graph/program.h"
#include "io/checkpoint.h"
#include "models/decoder.h"
#include "parallel/comm.h"

namespace mxn {

// Each rank's share of a block, in proportion to `speed`: whole kv heads (with their query heads)
// and MLP columns in blocks of 32 where the width allows, every rank at least one of each; and its
// vocabulary rows, by speed too unless `even_vocab` (a pipeline's tied embeddings: the first and
// last stages' groups must cut the table alike).
std::vector<TensorShard> tensor_shards(const DecoderConfig& d, const std::vector<double>& speed,
                                       bool even_vocab = false);
// Copies between a whole tensor and a share of it made of ShardPieces: to the share, or back.
void move_pieces(const ShardPieces& s, const Shape& whole, float* w, float* shard, bool to_shard);

class TensorGroup {
 public:
  // `group`: the ranks that split the blocks, this one its `index`th; their shares in proportion
  // to `speed` (one a group rank; the vocabulary's evenly with `even_vocab`); with `seq`, the
  // rows between the blocks split too (sequence parallelism).
  TensorGroup(std::unique_ptr<Communicator> group, int64_t index, const DecoderConfig& d,
              const std::vector<double>& speed, bool even_vocab = false, bool seq = false);
  ~TensorGroup();
  const TensorShard& shard() const { return shards_[size_t(index_)]; }
  Communicator& comm() { return *group_; }
  int64_t index() const { return index_; }
  // After the Program: the cut points of its graph (DecoderGraph::tp_sums, tp_grad_sums), the
  // params' kinds and how the sums travel. Collective over the group.
  void plan(Program& prog, const DecoderGraph& m);
  // Nodes [0, end) of a pass, the partial sums added over the group at the cuts: device to
  // device where every rank of the group has the same backend with grouped messages (NCCL among
  // CUDA GPUs: each rank's partial to every other, then summed in rank order, so every rank has
  // the same bits), else through the host (MPI).
  void run(Program& prog, Device& dev, int variant, size_t end);
  // How the sums travel, for the plan.
  const char* path() const { return direct_ ? "device-to-device (NCCL)" : "host-staged"; }
  // The flat gradients (host): partial ones summed over the group. Returns what this rank's sum
  // of squares lacks of the group's: the other ranks' split params' squares. Collective.
  double reduce(std::vector<float>& grads);
  bool has_partial() const { return !partial_.empty(); }
  // The whole params' float ranges in the flat layout.
  const std::vector<std::array<int64_t, 2>>& whole_ranges() const { return whole_; }
  // A checkpoint's whole tensors (and moments "m."/"v.") cut to this rank's share.
  TensorMap cut(const TensorMap& whole) const;
  // Each param of `whole` as weight (i 0) and moments (1, 2), gathered whole on the group's first
  // rank and handed to `put` there; `mine(name, i)` is this rank's tensor of it. Collective.
  void gather(const Graph& whole, const std::function<Tensor(const std::string&, int)>& mine,
              Device& dev, const std::function<void(const Value&, int, HostTensor&&)>& put);
  // "kv heads 3 1, MLP columns 192 64": the shares, for the plan.
  std::string describe() const;
  void set_timing(bool on) { timing_ = on; }
  double seconds() const { return seconds_; }

 private:
  struct Cut {
    size_t at;  // before this node
    int value;  // summed over the group, in place; or (sequence parallelism) moved into `to`
    enum Kind { sum, gather, scatter } kind = sum;
    int to = -1;
  };
  std::vector<int64_t> bounds_;  // a gather's floats a rank
  void move_rows(Device& dev, const Cut& c, const Tensor& from, const Tensor& to);
  std::unique_ptr<Communicator> group_;
  int64_t index_ = 0;
  DecoderConfig d_;
  std::vector<TensorShard> shards_;  // every rank of the group's
  std::vector<Cut> cuts_;
  std::vector<float> host_, pack_;
  static constexpr int kGroup = 2;  // the device's communicator for the group (ABI 10)
  bool direct_ = false;
  std::unique_ptr<Buffer> slots_;  // direct: the other ranks' partials, and a running sum
  std::vector<mxn_message> wire_;  // direct: a sum's messages (capacity kept)
  void sum_on_device(Device& dev, const Tensor& x);
  // Param float ranges in the flat layout: whole on every rank, split, partial_gradient's.
  std::vector<std::array<int64_t, 2>> whole_, split_, partial_;
  bool timing_ = false;
  double seconds_ = 0;
};

}  // namespace mxn
