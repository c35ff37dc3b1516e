#pragma once
// Expert parallelism priced on paper: a mixture of experts trained on a whole cluster, each MoE
// layer's experts sharded over EP groups of `ep` chips, the rest (attention, dense layers, the
// router, shared experts, embeddings and head) data parallel over every chip.
//
// Every EP group is a cross-section of the cluster (its chip types in the cluster's proportions,
// chips of a type in as few nodes as they fill). A chip's share of the tokens and of its group's
// experts are both in proportion to its speed (bf16 peak x its group's MFU), so that with
// uniform routing every chip's step ends together: a faster chip holds more experts. Per MoE
// layer and step, four all-to-alls move each routed (token, expert) row of C values in bf16:
// dispatch and combine, forward and backward; a row stays on its chip with the probability that
// its expert is local, else crosses to a peer of the same node (intra_gbs) or of another node
// (inter_gbs) in proportion to where the group's other chips are. Then the gradient reduce: the
// data-parallel weights over every chip, each expert's over the EP groups (rings at inter_gbs).
// Nothing overlaps (a conservative price); `mxn train --ep` (and --pp with --ep) runs it.
#include <cstdint>
#include <string>
#include <vector>

#include "models/decoder.h"
#include "plan/cluster.h"
#include "plan/cost.h"

namespace mxn {

struct EpShare {
  int group = 0;             // the cluster group (chip type)
  int64_t chips = 0;         // of this type in each EP group
  int64_t experts_each = 0;  // experts of every MoE layer each such chip holds (its share, floored)
  int64_t experts_extra = 0;        // ... and how many of these chips hold one more
  double tokens_share = 0;          // of the global batch's tokens, per chip
  double compute_s = 0, a2a_s = 0;  // per chip and step
  double mem_gib = 0;  // weights, gradients, optimizer state (ZeRO-1 over DP), per chip
};

struct EpEstimate {
  int64_t ep = 0, groups = 0;         // chips per EP group, and EP groups (in each pipeline stage)
  int64_t pp = 1, micro_batches = 1;  // pipeline stages, and 1F1B micro-batches a replica
  std::vector<EpShare> shares;
  double step_s = 0, compute_s = 0, a2a_s = 0, reduce_s = 0;  // the slowest chip's
  double bubble_s = 0, p2p_s = 0;  // the pipeline's fill and drain; its activations' sends
  double tokens_per_s = 0;
  double a2a_share() const { return step_s > 0 ? a2a_s / step_s : 0; }
};

// With `pp` > 1 (DeepSeek-V3's layout: pipeline stages, EP inside each): every stage holds 1/pp of
// the layers on chips/pp chips of the same mix, EP groups of `ep` of them; a chip's compute and
// all-to-all are as without stages, its weights and state 1/pp, plus the 1F1B bubble over
// `micro`-sequence micro-batches and the activations' sends between stages.
// Error when the cluster's chips do not divide into EP groups of `ep` (in each stage), when the
// model has no experts, or when `ep` exceeds the experts.
EpEstimate price_expert_parallel(const Cluster& cl, const DecoderConfig& c, const JobSpec& job,
                                 int64_t ep, int64_t pp = 1, int64_t micro = 1);

}  // namespace mxn
