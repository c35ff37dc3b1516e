#include "plan/local.h"

#include <algorithm>
#include <cstdio>

#include "backend/device.h"
#include "plan/cost.h"
#include "train/trainer.h"

namespace mxn {

std::vector<std::pair<std::string, std::string>> devices_on_shared_cores(
    const std::vector<std::string>& names) {
  std::vector<std::pair<std::string, std::string>> out;
  std::string cpu;
  mxn_device_props cp{};
  for (const std::string& n : names)
    if (n.rfind("cpu:", 0) == 0 && cpu.empty() && device_props(n, cp)) cpu = n;
  if (cpu.empty()) return out;
  for (const std::string& n : names) {
    mxn_device_props p{};
    if (n.rfind("opencl:", 0) != 0 || !device_props(n, p)) continue;
    const std::string dev = p.name;
    if (dev.find("pthread") != std::string::npos ||
        (cp.name[0] && dev.find(cp.name) != std::string::npos))
      out.push_back({n, cpu});
  }
  return out;
}

Cluster local_cluster(const TrainConfig& cfg) {
  Cluster c;
  const std::vector<std::string> names = available_devices();
  const auto shared = devices_on_shared_cores(names);
  for (const std::string& name : names) {
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
    g.measured = true;
    g.count = g.per_node = 1;
    g.intra_gbs = g.inter_gbs = 10;
    c.groups.push_back(g);
  }
  for (const auto& [dev, host] : shared) {  // PoCL: an OpenCL device made of the host's cores
    const auto at = [&](const std::string& n) {
      return int(std::find(names.begin(), names.end(), n) - names.begin());
    };
    c.groups[size_t(at(dev))].shares_cores_with = at(host);
  }
  return c;
}

}  // namespace mxn
