#include "plan/local.h"

#include <algorithm>
#include <chrono>
#include <cstdio>

#include "backend/device.h"
#include "core/error.h"
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

namespace {

// One device trained on `t` alone: the median of 6 steps after a warm-up one (one slow step on a
// busy machine moves it less than it would a mean), with the FLOPs of a step and the device.
struct Timed {
  double step_s = 0, flops = 0;
  mxn_device_props props{};
};

Timed time_steps(const TrainConfig& t) {
  Trainer tr(t);
  std::vector<double> steps;
  for (int i = 0; i < 7; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    tr.step();
    if (i > 0)
      steps.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(steps.begin(), steps.end());
  Timed out;
  out.step_s = 0.5 * (steps[2] + steps[3]);
  JobSpec job;
  job.global_batch = t.batch * t.accum;
  job.seq = t.seq_len();
  const ModelCost m = model_cost(tr.config().decoder_config(), job);
  out.flops =
      3.0 * double(job.global_batch * job.seq) * (double(m.layers) * m.layer_flops + m.head_flops);
  out.props = tr.device().props();
  return out;
}

}  // namespace

Cluster local_cluster(const TrainConfig& cfg) {
  Cluster c;
  const std::vector<std::string> names = available_devices();
  const auto shared = devices_on_shared_cores(names);
  for (const std::string& name : names) {
    TrainConfig t = cfg;
    t.device = name;
    t.devices.clear();
    // auto: timed in both, so that a plan can price either (its rate is the bf16 one, f32's
    // kept beside it); otherwise the dtype given, as the matrix rate.
    t.dtype = cfg.dtype == "auto" ? "bf16" : cfg.dtype;
    const Timed main = time_steps(t);
    const mxn_device_props& p = main.props;
    NodeGroup g;
    g.chip.name = name;
    const double rate = main.flops / main.step_s;
    g.chip.bf16_tflops = p.peak_gflops > 0 ? p.peak_gflops / 1000 : rate / 0.5e12;
    g.mfu = std::min(1.0, rate / (g.chip.bf16_tflops * 1e12));
    if (t.dtype == "f32") g.chip.f32_tflops = g.chip.bf16_tflops;
    char src[200];
    const int n =
        std::snprintf(src, sizeof src, "measured here: %.4g s a step of %lld x %lld tokens%s",
                      main.step_s, (long long)(t.batch * t.accum), (long long)t.seq_len(),
                      cfg.dtype == "auto" ? " in bf16" : "");
    if (cfg.dtype == "auto") {
      t.dtype = "f32";
      const Timed f32 = time_steps(t);
      g.chip.f32_tflops = f32.flops / f32.step_s / g.mfu / 1e12;
      std::snprintf(src + n, sizeof src - size_t(n), ", %.4g s in f32", f32.step_s);
    }
    g.chip.source = src;
    g.chip.memory_gib = double(p.memory_bytes) / double(1ull << 30);
    g.chip.hbm_gbs = 50;
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

LinkFigures measure_links(Communicator& w) {
  MXN_CHECK(w.size() >= 2, "measure_links needs two ranks");
  std::vector<float> buf(size_t(4) << 20);  // 16 MiB
  using clock = std::chrono::steady_clock;
  // Seconds one way for `n` floats, over `reps` round trips between ranks 0 and 1.
  auto one_way = [&](int64_t n, int reps) {
    w.barrier();
    const auto t0 = clock::now();
    for (int i = 0; i < reps; ++i)
      if (w.rank() == 0) {
        w.send(buf.data(), n, 1, 71);
        w.wait_sends();
        w.recv(buf.data(), n, 1, 71);
      } else if (w.rank() == 1) {
        w.recv(buf.data(), n, 0, 71);
        w.send(buf.data(), n, 0, 71);
        w.wait_sends();
      }
    const double s = std::chrono::duration<double>(clock::now() - t0).count() / reps / 2;
    double out = s;
    w.broadcast(&out, sizeof out, 0);  // rank 0's figure on every rank
    return out;
  };
  one_way(2, 20);  // warm-up: connections made, pages touched
  std::vector<double> lat;
  for (int r = 0; r < 5; ++r) lat.push_back(one_way(2, 100));
  std::sort(lat.begin(), lat.end());
  LinkFigures f;
  f.latency_us = lat[2] * 1e6;
  const double big = one_way(int64_t(buf.size()), 10);
  f.gbs = double(buf.size() * sizeof(float)) / std::max(big - lat[2], 1e-9) / 1e9;
  w.barrier();
  const auto t0 = clock::now();
  for (int i = 0; i < 20; ++i) w.all_reduce_sum(buf.data(), int64_t(1) << 18);
  double ar = std::chrono::duration<double>(clock::now() - t0).count() / 20;
  w.broadcast(&ar, sizeof ar, 0);
  f.all_reduce_1mib_us = ar * 1e6;
  return f;
}

}  // namespace mxn
