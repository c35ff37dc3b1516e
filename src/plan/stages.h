#pragma once
// One pipeline template's stages, priced (the planner's inner part): a stage is a tensor-parallel
// group of `tp` chips of one type holding a range of layers; its forward and backward time per
// micro-batch (GEMM FLOPs at the chips' rate, non-GEMM bytes at their memory bandwidth, the
// group's all-reduces over the node's link), its peak memory, and the stage boundaries that make
// a pipeline's stages take about as long as each other under every chip's memory.
#include <string>
#include <vector>

#include "plan/cluster.h"
#include "plan/cost.h"
#include "plan/simulate.h"

namespace mxn {

constexpr double kUsable = 0.9;   // of a chip's memory; the rest is context and fragmentation
constexpr double kPassS = 20e-6;  // a layer's kernel launches and sync per pass, each way
constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

std::string gib(double bytes);

// The job at one micro-batch size on a cluster.
struct Ctx {
  const Cluster& c;
  const ModelCost& m;
  const JobSpec& job;
  int64_t b = 1;

  double tokens() const { return double(b) * double(job.seq); }
  int pool(int g) const;
  // Groups computing on the same cores split them evenly when all of them are used: each
  // group's rate is divided by the number of used groups on its cores.
  std::vector<double> divisors(const std::vector<bool>& used) const;
  double rate(int g, const std::vector<double>& divisor) const;  // FLOP/s of one chip
  double usable(int g) const;
  // One all-reduce of `bytes` a chip among `t` chips of group g: a ring's 2 (t - 1) / t of the
  // bytes over the node's link (the inter-node link where the group spans nodes).
  double tp_allreduce_s(int g, int64_t t, double bytes) const;
};

struct StageShape {
  int64_t first, last, p, s;
  bool recompute;
  int64_t t = 1;  // tensor-parallel chips
  int g = 0;      // their cluster group
};

double stage_params(const ModelCost& m, const StageShape& x);  // per chip of the stage
double stage_bytes(const Ctx& x, const StageShape& st, int64_t inflight, double shards);
double stage_fwd_s(const Ctx& x, const StageShape& st, double rate);
double stage_bwd_s(const Ctx& x, const StageShape& st, double rate);  // recomputation included
double stage_tp_s(const Ctx& x, const StageShape& st);  // of both: the group's all-reduces

// A pipeline over `chips` (a group per stage, each stage `t` chips) with the best stage
// boundaries: the smallest bottleneck time whose greedy packing (each stage takes as many layers
// as fit its time and memory, recomputing only when that fits more) places every layer;
// `fixed`: the layers of each stage given. `shards`: the replicas sharing each stage's
// optimizer state. Returns false with `why` when no packing fits.
bool build_pipeline(const Ctx& x, const std::vector<int>& chips, int64_t t,
                    const std::vector<double>& divisor, double shards, std::vector<StageCost>& out,
                    std::string& why, const std::vector<int64_t>* fixed = nullptr);

}  // namespace mxn
