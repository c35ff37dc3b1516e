#include "plan/local.h"

#include <algorithm>
#include <cstdio>

#include "backend/device.h"
#include "plan/cost.h"
#include "train/trainer.h"

namespace mxn {

Cluster local_cluster(const TrainConfig& cfg) {
  Cluster c;
  std::string cpu_model;
  int cpu_group = -1;
  for (const std::string& name : available_devices()) {
    TrainConfig t = cfg;
    t.device = name;
    t.devices.clear();
    Trainer tr(t);
    for (int i = 0; i < 4; ++i) tr.step();  // the first is left out of the mean (warm-up)
    const double step_s = tr.mean_step_seconds();
    JobSpec job;
    job.global_batch = t.batch * t.accum;
    job.seq = t.seq_len();
    const ModelCost m = model_cost(tr.config().decoder_config(), job);
    const double flops = 3.0 * double(job.global_batch * job.seq) *
                         (double(m.layers) * m.layer_flops + m.head_flops);
    const mxn_device_props& p = tr.device().props();
    NodeGroup g;
    g.chip.name = name;
    g.chip.bf16_tflops = p.peak_gflops > 0 ? p.peak_gflops / 1000 : flops / step_s / 0.5e12;
    g.mfu = std::min(1.0, flops / step_s / (g.chip.bf16_tflops * 1e12));
    g.chip.memory_gib = double(p.memory_bytes) / double(1ull << 30);
    g.chip.hbm_gbs = 50;
    char src[160];
    std::snprintf(src, sizeof src, "measured here: %.4g s a step of %lld x %lld tokens", step_s,
                  (long long)job.global_batch, (long long)job.seq);
    g.chip.source = src;
    g.count = g.per_node = 1;
    g.intra_gbs = g.inter_gbs = 10;
    if (name.rfind("cpu", 0) == 0 && cpu_group < 0) {
      cpu_group = int(c.groups.size());
      cpu_model = p.name;
    } else if (cpu_group >= 0 && name.rfind("opencl", 0) == 0 &&
               (std::string(p.name).find("pthread") != std::string::npos ||
                (!cpu_model.empty() && std::string(p.name).find(cpu_model) != std::string::npos))) {
      g.shares_cores_with = cpu_group;  // PoCL: an OpenCL device made of the host's cores
    }
    c.groups.push_back(g);
  }
  return c;
}

}  // namespace mxn
