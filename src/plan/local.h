#pragma once
// This machine as a cluster (mxn plan --cluster here): one group per device `mxn devices` lists,
// its rate measured by training the model to be planned for a few steps on that device alone
// (the profiler's figure, not a datasheet's), its memory as the device reports it. An OpenCL
// device that runs on the host CPU (PoCL) shares the CPU's cores.
#include <string>

#include "plan/cluster.h"
#include "train/config.h"

namespace mxn {

// `cfg`: the model and batch to time (its data must exist). Link bandwidths are assumed (host
// memory through MPI's shared memory), memory bandwidth unknown (50 GB/s).
Cluster local_cluster(const TrainConfig& cfg);

}  // namespace mxn
