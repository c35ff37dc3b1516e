#pragma once
// The layout search: which chips train, in how many pipeline replicas of how many stages, how
// many chips of a node each stage splits its layers over (tensor parallelism), which layers
// each stage holds, which stages recompute, how many micro-batches each replica takes.
//
// A layout is a set of replica kinds: a kind is a pipeline template (a chip type per stage, its
// tensor-parallel degree and its layer range) and a count of identical replicas. Tensor-parallel
// groups stay inside a node (powers of two dividing the heads and kv heads) unless --tp asks
// otherwise. Two families are searched:
//   - per chip type: every type forms its own pipelines (depth and TP degree chosen per type,
//     layers split unevenly so the stage with the embeddings and the one with the LM head take as
//     long as the others), data parallel across types with each replica's micro-batches in
//     proportion to its speed; a type may be left out;
//   - mixed: R identical pipelines, each with count/R chips of every type, stages ordered by
//     memory (the first stage keeps the most micro-batches in flight), layers in proportion to
//     each chip's speed.
// Each template's stage boundaries are the best under the chips' memory (weights, gradients,
// optimizer shards, the activations of the micro-batches in flight, the logits on the last
// stage, send and bucket buffers; 10% of every chip kept in reserve); a stage recomputes its
// activations only when they would not fit otherwise. Every candidate is priced by the event
// simulator (plan/simulate.h); the step time is its slowest replica's.
#include <string>
#include <vector>

#include "plan/cluster.h"
#include "plan/cost.h"
#include "plan/simulate.h"

namespace mxn {

struct ReplicaKind {
  std::vector<StageCost> stages;  // the template
  int64_t replicas = 0;
  std::vector<int64_t> micro;  // micro-batches of each replica (identical ones differ by one)
};

struct LayoutPlan {
  std::string family;              // "per type" or "mixed"
  int64_t micro_batch = 1;         // sequences per micro-batch
  std::vector<ReplicaKind> kinds;  // kinds with no micro-batches are not kept
  double step_s = 0, tokens_per_s = 0;
  double efficiency = 0;     // tokens/s over the sum of every type's standalone best (0: unknown)
  double cost_per_mtok = 0;  // price of a million tokens (0: some used chip has no price)
  std::vector<int64_t> chips_used;               // per cluster group
  std::vector<double> peak_bytes;                // per cluster group: its most loaded chip
  std::string describe(const Cluster& c) const;  // "32 x [H100-SXM x 4] + ..."
};

struct PlanOptions {
  int64_t micro_batch = 0;  // 0: searched over powers of two
  int top = 5;
  int64_t tp = 0;            // tensor-parallel chips a stage (0: searched, inside a node)
  int64_t pp = 0;            // pipeline stages (0: searched)
  bool even_stages = false;  // every stage the same number of layers (Megatron-LM's split)
};

struct LeftOut {
  int group = 0;
  double step_with_s = 0;        // the best layout that uses this type as well
  int64_t helps_from_batch = 0;  // global batch from which it would speed the job (0: none found)
  std::string why;               // one line for the user
};

struct PlanReport {
  std::vector<LayoutPlan> best;        // fastest first
  std::vector<double> standalone_tps;  // per group: tokens/s of its chips alone (0: cannot)
  std::vector<LeftOut> left_out;       // types the best plan leaves out, and why
  int64_t layouts_priced = 0;
};

// Error, naming the constraint that failed, when no layout fits.
PlanReport plan_layouts(const Cluster& c, const ModelCost& m, const JobSpec& job,
                        const PlanOptions& opt = {});

// A layout as the user gives it (mxn plan --layout), priced the same way: replicas of stages,
// each stage a cluster group and its layer count (every count 0: balanced by the planner).
// Ranks beyond a group's chips share their cores. Error naming what does not fit.
struct LayoutStage {
  int group = 0;
  int64_t layers = 0;
  int64_t tp = 1;  // chips of the stage's tensor-parallel group (the same for a replica's stages)
};
LayoutPlan price_layout(const Cluster& c, const ModelCost& m, const JobSpec& job,
                        const std::vector<std::vector<LayoutStage>>& replicas, int64_t micro);

// The chosen plan's step drawn as lanes, one per chip type (its busiest stage): forward,
// backward, sends, reduce, optimizer; what is left of the step is bubble.
std::string timeline_svg(const Cluster& c, const LayoutPlan& p, const ModelCost& m,
                         const JobSpec& job);

}  // namespace mxn
