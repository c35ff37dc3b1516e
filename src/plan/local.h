#pragma once
// This machine as a cluster (mxn plan --cluster here): one group per device `mxn devices` lists,
// its rate measured by training the model to be planned for a few steps on that device alone
// (the profiler's figure, not a datasheet's), its memory as the device reports it. An OpenCL
// device that runs on the host CPU (PoCL) shares the CPU's cores.
#include <string>
#include <utility>
#include <vector>

#include "io/train_config.h"
#include "parallel/comm.h"
#include "plan/cluster.h"

namespace mxn {

// `cfg`: the model, batch and dtype to time (its data must exist); dtype auto times each device
// in bf16 (its rate) and in f32 (its f32_tflops). Link bandwidths are assumed (host
// memory through MPI's shared memory), memory bandwidth unknown (50 GB/s).
Cluster local_cluster(const TrainConfig& cfg);

// The link between ranks 0 and 1 of `w` (at least two ranks; the others wait), measured: a
// ping-pong of 8 bytes (latency: half a round trip, the median of 5 rounds of 100) and of 16 MiB
// (bandwidth, less the latency), and the time of a 1 MiB all-reduce over every rank.
struct LinkFigures {
  double latency_us = 0, gbs = 0, all_reduce_1mib_us = 0;
};
LinkFigures measure_links(Communicator& w);

// Each device of `names` that computes on another listed device's cores (an OpenCL device PoCL
// makes of the host CPU), with that device: {"opencl:0", "cpu:0"}. From the devices' properties
// alone; nothing is opened.
std::vector<std::pair<std::string, std::string>> devices_on_shared_cores(
    const std::vector<std::string>& names);

}  // namespace mxn
