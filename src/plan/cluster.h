#pragma once
// A cluster to plan for, as node groups of one chip type each (cluster.toml):
//
//   [[group]]
//   chip = "H100-SXM"     # from plan/chips.h, or any name with bf16_tflops, memory_gib, hbm_gbs
//   count = 256           # chips
//   per_node = 8          # chips a node (default: 8, at most count)
//   intra_gbs = 450       # GB/s a chip sends to another of its node (NVLink, HCCS, PCIe)
//   inter_gbs = 50        # GB/s a chip sends across nodes (its share of the NICs)
//   latency_us = 20       # optional: what a message costs before its bytes (default 20 us)
//   source = "..."        # optional, for a chip of your own: where its figures come from
//   price_per_hour = 2.5  # optional: a chip-hour's price, for cost per million tokens
//   f32_tflops = 67       # optional: its f32 peak (no TF32), for plans in f32 (default: the
//                         # table's figure for a known chip; unknown otherwise)
//   mfu = 0.5             # optional: the share of the bf16 peak a training step's GEMMs reach
//   measured = false      # optional: true when mfu was measured on whole training steps (its
//                         # rate then covers the memory-bound ops as well)
//   shares_cores_with = "cpu:0"  # optional: this chip computes on another group's cores (PoCL
//                         # on the host CPU): when both are used they split those cores evenly
//
// Errors name the file, the group and what was expected, one line each.
#include <cstdint>
#include <string>
#include <vector>

#include "plan/chips.h"

namespace mxn {

struct NodeGroup {
  ChipSpec chip;
  int64_t count = 0, per_node = 0;
  double intra_gbs = 0, inter_gbs = 0, price_per_hour = 0;
  double latency_us = 20;  // what a message costs before its bytes (MPI, NCCL)
  double mfu = 0.5;
  int shares_cores_with = -1;  // index of the group whose cores it uses, or -1
  // The rate is measured on whole training steps (mxn plan --cluster here), memory-bound ops
  // included: no separate time for them. Otherwise it is a datasheet peak times a GEMM share.
  bool measured = false;
  int64_t nodes() const { return (count + per_node - 1) / per_node; }
  double latency_s() const { return latency_us * 1e-6; }
};

struct Cluster {
  std::vector<NodeGroup> groups;
  int64_t chips() const;
  double bf16_pflops() const;  // the sum of the chips' peaks
  double memory_tib() const;
};

Cluster load_cluster(const std::string& path);

// The cluster as a plan in `dtype` (f32 or bf16) sees it: for f32, each chip's matrix rate
// (chip.bf16_tflops, the field every price reads) replaced by its f32 peak, the share of it
// reached kept. Chips with no f32 figure keep their bf16 rate and are named in `*unknown`.
Cluster at_dtype(const Cluster& c, const std::string& dtype, std::string* unknown = nullptr);

// Seconds of a ring all-reduce of `bytes` a chip among `t` chips over a link of `gbs`: 2 (t - 1)
// / t of the bytes, and one message's latency.
double ring_allreduce_s(int64_t t, double bytes, double gbs, double latency_s);

// The cluster as a cluster file load_cluster reads back the same (every figure written out,
// the chips' own included, with their sources as comments).
std::string cluster_toml(const Cluster& c);

}  // namespace mxn
