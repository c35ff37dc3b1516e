// `mxn train`: the config from defaults, a TOML file and flags (in that order), then the loop with
// a live progress line, metrics, validation and checkpoints.
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <thread>

#include "backend/device.h"
#include "cli/commands.h"
#include "core/error.h"
#include "core/faults.h"
#include "core/fs.h"
#include "core/text.h"
#include "io/checkpoint.h"
#include "parallel/balance.h"
#include "parallel/comm.h"
#include "parallel/launch.h"
#include "plan/local.h"
#include "train/metrics.h"
#include "train/trainer.h"

namespace mxn::cli {
namespace {

std::vector<std::string> g_argv;  // this process's command line, for starting ranks

// The ranks of this run on `devices`, supervised (restarts recorded in the run's metrics.jsonl).
Job job(const std::vector<std::string>& devices, const TrainConfig& cfg) {
  Job j{devices, g_argv, cfg.out, cfg.threads, cfg.max_restarts, cfg.hang_timeout, {}};
  j.on_restart = [out = cfg.out](const nlohmann::json& row) { append_metrics(out, row); };
  return j;
}

// "cpu,opencl" -> {"cpu:0", "opencl:0"}; "" -> {}.
std::vector<std::string> split_devices(const std::string& s) {
  if (s.empty()) return {};
  std::vector<std::string> out = split(s, ',');
  for (auto& d : out)
    if (d.find(':') == std::string::npos) d += ":0";
  return out;
}

void copy_field(TrainConfig& dst, const TrainConfig& src, const std::string& name) {
  TrainConfig s = src;
  auto df = config_fields(dst);
  auto sf = config_fields(s);
  for (size_t i = 0; i < df.size(); ++i)
    if (df[i].name == name)
      std::visit([&](auto* d) { *d = *std::get<std::remove_reference_t<decltype(d)>>(sf[i].ptr); },
                 df[i].ptr);
}

std::string fmt_duration(double s) {
  char b[32];
  if (s >= 3600)
    std::snprintf(b, sizeof(b), "%dh%02dm", int(s / 3600), int(s / 60) % 60);
  else if (s >= 60)
    std::snprintf(b, sizeof(b), "%dm%02ds", int(s / 60), int(s) % 60);
  else
    std::snprintf(b, sizeof(b), "%.0fs", s);
  return b;
}

// The device each rank runs on, as rank 0 names them in the plan.
std::vector<std::string> rank_devices(const TrainConfig& c, int world) {
  std::vector<std::string> out = split_devices(c.devices);
  if (int(out.size()) != world) out.assign(size_t(world), split_devices(c.device).at(0));
  return out;
}

void print_plan(const Trainer& tr, const std::vector<std::string>& devs) {
  const Plan& p = tr.plan();
  const TrainConfig& c = tr.config();
  const int64_t rows = c.batch * c.accum;
  if (!p.pipeline.empty()) {  // --pp: stages and their chips
    const std::vector<int64_t>& b = tr.stage_bounds();
    const size_t pp = b.size() - 1;
    std::printf("  plan: pipeline of %s\n", p.pipeline.c_str());
    for (size_t r = 0; r < p.ranks.size(); ++r)
      std::printf("    rank %zu %-10s replica %zu stage %zu: layers %lld-%lld\n", r,
                  devs[r].c_str(), r / pp + 1, r % pp + 1, (long long)b[r % pp],
                  (long long)b[r % pp + 1] - 1);
    return;
  }
  std::printf("  plan: %zu ranks share %lld sequences per step (split %s)\n", p.ranks.size(),
              (long long)rows, c.split.c_str());
  for (size_t r = 0; r < p.ranks.size(); ++r) {
    const RankPlan& rp = p.ranks[r];
    std::printf(
        "    rank %zu %-10s %4lld sequences (%5.1f%%), %lld per pass (%.1f GiB free), "
        "measured %.1f ms per sequence -> %.3f s\n",
        r, devs[r].c_str(), (long long)rp.rows, 100.0 * double(rp.rows) / double(rows),
        (long long)rp.cap, double(rp.free_bytes) / double(1 << 30), rp.sec_per_row * 1e3,
        double(rp.rows) * rp.sec_per_row);
  }
  std::printf(
      "    gradients in %zu buckets of up to %g MB, %s, each started as the backward "
      "reaches it\n",
      p.buckets, c.bucket_mb,
      p.device_direct ? "summed by the devices' own collectives (NCCL)"
                      : "host-staged through MPI");
  std::printf("    predicted step time %.3f s (slowest rank plus all-reduce and optimizer)\n",
              p.predicted_step_s);
  if (const std::vector<int64_t>& sh = tr.optimizer_shards(); !sh.empty()) {
    std::printf("    optimizer state sharded (ZeRO-1, by free memory):");
    for (size_t r = 0; r + 1 < sh.size(); ++r)
      std::printf(" rank %zu params [%lld, %lld), %llu bytes of moments%s", r, (long long)sh[r],
                  (long long)sh[r + 1], (unsigned long long)p.ranks[r].optimizer_bytes,
                  r + 2 < sh.size() ? ";" : "\n");
  }
}

struct TrainArgs {
  std::string config_file, resume, plan;
  int64_t stop_at = 0;
  bool dry_run = false, overwrite = false;
  TrainConfig flags;
  std::vector<std::pair<std::string, CLI::Option*>> opts;
};

// --plan: the layout `mxn plan --out` chose, as the pipeline and device fields: every replica's
// stages (their chips in rank order), one stage split for all, the micro-batch and the global
// batch. Errors name the file and what it lacks.
void apply_plan(TrainConfig& cfg, const std::string& path, std::vector<std::string>& set) {
  const nlohmann::json j = nlohmann::json::parse(read_file(path, "plan file"), nullptr, false);
  auto bad = [&](const std::string& what) {
    return Error("plan '" + path + "': " + what + " (expected a plan written by mxn plan --out)");
  };
  if (j.is_discarded() || !j.is_object() || !j.contains("kinds") || !j["kinds"].is_array() ||
      j["kinds"].empty())
    throw bad("no \"kinds\" of replicas");
  for (const char* k : {"pp", "stages", "devices", "device", "micro", "batch", "accum"})
    if (std::find(set.begin(), set.end(), k) != set.end())
      throw Error(std::string("--plan sets ") + k + "; leave out --" + k);
  std::vector<int64_t> split;
  std::vector<std::string> chips;
  try {
    for (const auto& kind : j["kinds"]) {
      std::vector<int64_t> counts;
      std::vector<std::string> stage_chips;
      for (const auto& st : kind.at("stages")) {
        const auto range = st.at("layers").get<std::vector<int64_t>>();
        if (range.size() != 2 || range[1] <= range[0])
          throw bad("a stage's layers are not [first, last)");
        counts.push_back(range[1] - range[0]);
        stage_chips.push_back(st.at("chip").get<std::string>());
      }
      if (!split.empty() && counts != split)
        throw bad(
            "its replicas split the layers differently; mxn train runs replicas of one split");
      split = counts;
      for (int64_t r = 0; r < kind.at("replicas").get<int64_t>(); ++r)
        chips.insert(chips.end(), stage_chips.begin(), stage_chips.end());
    }
    cfg.batch = j.at("global_batch").get<int64_t>();
    cfg.seq = j.at("seq").get<int64_t>();
    cfg.dtype = j.at("dtype").get<std::string>();
    if (split.size() > 1) cfg.micro = j.at("micro_batch").get<int64_t>();
  } catch (const nlohmann::json::exception& e) {
    throw bad(std::string("a field is missing or of the wrong type: ") + e.what());
  }
  cfg.accum = 1;
  cfg.pp = int64_t(split.size());
  cfg.stages.clear();
  for (int64_t n : split) cfg.stages += (cfg.stages.empty() ? "" : ",") + std::to_string(n);
  if (chips.size() == 1) {
    cfg.device = chips[0];
    cfg.devices.clear();
  } else {
    cfg.devices.clear();
    for (const std::string& c : chips) cfg.devices += (cfg.devices.empty() ? "" : ",") + c;
  }
  for (const char* k :
       {"pp", "stages", "devices", "device", "micro", "batch", "accum", "seq", "dtype"})
    set.push_back(k);
}

// A fresh run's folder: refused when an earlier run is there, unless --overwrite (which removes
// only what a run writes).
void check_fresh_out(const std::string& out, bool overwrite) {
  const int64_t step = run_found(out);
  if (step < 0) return;
  if (!overwrite)
    throw Error("'" + out + "' already holds a run (at step " + std::to_string(step) +
                "): continue it with --resume auto, or start again with another --out or with "
                "--overwrite");
  clear_run(out);
  std::printf("  --overwrite: removed the run at step %lld in %s\n", (long long)step, out.c_str());
}

int run_train(TrainArgs& a) {
  watch_stop_signals();  // first: before any thread exists
  TrainConfig cfg;
  std::vector<std::string> set;
  if (!a.config_file.empty()) {
    if (!std::filesystem::is_regular_file(a.config_file))
      throw Error("config file '" + a.config_file + "' does not exist");
    set = apply_toml(cfg, a.config_file);
  }
  for (auto& [name, opt] : a.opts)
    if (opt->count() > 0) {
      copy_field(cfg, a.flags, name);
      set.push_back(name);
    }
  if (!a.plan.empty()) apply_plan(cfg, a.plan, set);
  const bool lead_rank = rank_from_env().rank == 0;
  auto warn = [&](const std::string& w) {
    if (lead_rank) std::fprintf(stderr, "mxn: warning: %s\n", w.c_str());
  };
  const bool auto_resume = a.resume == "auto";
  if (auto_resume) {  // the run folder's newest good checkpoint; with none yet, a fresh start
    const bool any = !newest_checkpoint(cfg.out).empty();
    a.resume = any ? find_good_checkpoint(cfg.out, warn) : "";
    if (!any && lead_rank)
      std::printf("  --resume auto: no checkpoint in %s yet, starting fresh\n", cfg.out.c_str());
  } else if (!a.resume.empty()) {
    a.resume = find_good_checkpoint(a.resume, warn);
  }
  if (!a.resume.empty()) {
    // A resumed run keeps its checkpoint's config; only keys given now override it, and the
    // model's shape cannot change.
    TrainConfig saved;  // its trainer.json alone: the Trainer reads the tensors
    from_json(saved, load_trainer_json(a.resume).at("config"));
    for (const auto& k : set) {
      TrainConfig probe = saved;
      copy_field(probe, cfg, k);
      for (auto& f : config_fields(probe))
        if (f.name == k && f.model && to_json(probe)[k] != to_json(saved)[k])
          throw Error("cannot change " + k + " when resuming (the checkpoint has " +
                      to_json(saved)[k].dump() + ")");
      saved = probe;
    }
    if (std::find(set.begin(), set.end(), "out") == set.end())
      saved.out = std::filesystem::path(resolve_checkpoint(a.resume)).parent_path().string();
    cfg = saved;
    // --resume auto on other machines: the saved devices that are here, planned afresh.
    if (auto_resume && !cfg.devices.empty() &&
        std::find(set.begin(), set.end(), "devices") == set.end()) {
      const auto here = available_devices();
      std::string kept, saved_devs;
      for (const std::string& d : split_devices(cfg.devices)) {
        saved_devs += (saved_devs.empty() ? "" : ",") + d;
        if (std::find(here.begin(), here.end(), d) != here.end())
          kept += (kept.empty() ? "" : ",") + d;
      }
      if (kept != saved_devs && lead_rank)
        std::printf("  the saved run used --devices %s; here: %s, planned for these\n",
                    saved_devs.c_str(), kept.empty() ? cfg.device.c_str() : kept.c_str());
      if (kept != saved_devs) {
        cfg.devices = kept.find(',') == std::string::npos ? "" : kept;
        if (!kept.empty() && cfg.devices.empty()) cfg.device = kept;
        cfg.split = "auto";
      }
    }
  }
  // A fresh run into a folder that holds one would mix two loss curves and two runs' checkpoints.
  if (a.resume.empty() && !auto_resume && !a.dry_run && lead_rank && !std::getenv("MXN_SUPERVISED"))
    check_fresh_out(cfg.out, a.overwrite);
  if (a.stop_at < 0) throw Error("--stop-at must be >= 0");
  if (cfg.sft.empty() && cfg.data == TrainConfig().data && !std::filesystem::exists(cfg.data))
    throw Error("the default corpus '" + cfg.data +
                "' is missing: run scripts/setup (it prepares "
                "it), or pass --data FILE");
  cfg.validate();
  if (cfg.devices == "all") {  // every device here that adds speed, one rank each
    cfg.devices.clear();
    const std::vector<std::string> here = available_devices();
    const auto shared = devices_on_shared_cores(here);
    for (const auto& d : here) {
      auto on =
          std::find_if(shared.begin(), shared.end(), [&](const auto& s) { return s.first == d; });
      if (on != shared.end()) {  // mxn plan's rule: two chips on one set of cores both slow down
        if (rank_from_env().rank == 0)
          std::printf(
              "  %s left out of --devices all: it computes on %s's cores, so the two would split "
              "them and the job would be slower than on %s alone at any batch (mxn plan --cluster "
              "here --model ... prices both); name it in --devices to use it anyway\n",
              d.c_str(), on->second.c_str(), on->second.c_str());
        continue;
      }
      cfg.devices += (cfg.devices.empty() ? "" : ",") + d;
    }
    if (cfg.devices.find(',') == std::string::npos) {  // one device: no ranks to start
      cfg.device = cfg.devices;
      cfg.devices.clear();
    }
  }
  const std::vector<std::string> devs = split_devices(cfg.devices);
  if (!devs.empty()) {
    const auto here = available_devices();
    std::string names;
    for (const auto& d : here) names += (names.empty() ? "" : ", ") + d;
    std::vector<std::string> seen;
    for (const std::string& d : devs) {
      if (std::find(here.begin(), here.end(), d) == here.end())
        throw Error("unknown device '" + d + "' in --devices (devices here: " + names + ")");
      // Pipeline replicas may put a stage of each on one chip (memory permitting); CPU ranks
      // are each bound to their own cores.
      if (std::find(seen.begin(), seen.end(), d) != seen.end() && cfg.pp <= 1 &&
          d.rfind("cpu", 0) != 0)
        throw Error("device '" + d +
                    "' appears twice in --devices; each rank needs its own device (only "
                    "pipeline stages, --pp, and CPU ranks, each on its own cores, may share one)");
      seen.push_back(d);
    }
    if (cfg.batch < int64_t(devs.size()))
      throw Error("the global batch (" + std::to_string(cfg.batch) +
                  " sequences) is smaller than the " + std::to_string(devs.size()) +
                  " devices: each rank needs at least one");
    if (devs.size() > 1)  // a bad split is one line here, not one per rank
      parse_split(cfg.split, int(devs.size()));
    const RankInfo ri = rank_from_env();
    if (ri.world == 1 && devs.size() > 1 && !std::getenv("MXN_SUPERVISED"))
      return supervise(job(seen, cfg));
    if (size_t(ri.world) != devs.size())
      throw Error("--devices names " + std::to_string(devs.size()) +
                  " devices but the launcher started " + std::to_string(ri.world) + " ranks");
    cfg.device = seen[size_t(ri.rank)];
  }
  if (devs.size() <= 1 && cfg.max_restarts > 0 && rank_from_env().world == 1 &&
      !std::getenv("MXN_SUPERVISED"))  // one device, watched and restarted by this process
    return supervise(job({cfg.device}, cfg));
  Communicator& comm = Communicator::world();
  fault_set_rank(comm.rank());
  Heartbeat beat(comm.rank(), 1.0);
  fault_point("start", 0);
  const bool lead = comm.rank() == 0;  // rank 0 prints, writes metrics and checkpoints

  Trainer tr(cfg, a.resume, &comm);
  const TrainConfig& c = tr.config();
  if (lead && !a.dry_run) std::filesystem::create_directories(c.out);
  if (!lead) {
    if (std::freopen("/dev/null", "w", stdout) == nullptr) { /* keep stdout */
    }
  }
  const int64_t tokens_per_step = c.batch * c.accum * c.seq_len();
  const DecoderConfig d = c.decoder_config();
  std::printf(
      "mxn train: %s %lld layers, %lld heads (%lld kv), width %lld, context %lld: %.2fM "
      "params%s%s\n",
      arch_name(d.arch), (long long)d.layers, (long long)d.heads, (long long)d.n_kv_heads(),
      (long long)d.hidden, (long long)c.seq_len(), double(d.param_count()) / 1e6,
      c.model.dir.empty() ? "" : ", from ", c.model.dir.c_str());
  std::printf("  device %s (%s), dtype %s, %lld tokens/step, data %s, run folder %s\n",
              tr.device().name().c_str(), tr.device().props().name, c.dtype.c_str(),
              (long long)tokens_per_step, c.data.c_str(), c.out.c_str());
  {
    const TrainConfig& tc = tr.config();
    auto size = [](double bytes) {
      char b[32];
      std::snprintf(b, sizeof b, bytes < (1 << 30) ? "%.0f MiB" : "%.2f GiB",
                    bytes / (bytes < (1 << 30) ? 1 << 20 : 1 << 30));
      return std::string(b);
    };
    std::printf("  memory on %s: weights and gradients %s, AdamW %s, activations %s (%s%s)\n",
                tr.device().name().c_str(), size(double(tr.param_count()) * 8).c_str(),
                size(double(tr.optimizer_bytes())).c_str(), size(double(tr.arena_bytes())).c_str(),
                tc.recompute ? "norms and MLP activations recomputed" : "--recompute 0: all kept",
                tc.gelu_bf16 && tc.attn_bf16 ? ", GELU inputs and q, k, v kept in bf16"
                : tc.gelu_bf16               ? ", GELU inputs kept in bf16"
                : tc.attn_bf16               ? ", q, k, v kept in bf16"
                                             : "");
  }
  if (comm.size() > 1) print_plan(tr, rank_devices(c, comm.size()));
  if (a.dry_run) {  // the model is built and every device measured; nothing is trained or written
    std::printf("dry run: nothing trained, nothing written\n");
    return 0;
  }
  if (tr.current_step() > 0) {
    std::printf("  resumed at step %lld\n", (long long)tr.current_step());
    if (lead) truncate_metrics(c.out, tr.current_step());
  }
  std::fflush(stdout);

  // Under mpirun stdout is a pseudo-terminal even when mpirun's is not: plain lines there.
  const bool tty = isatty(STDOUT_FILENO) && comm.size() == 1;
  const int64_t last = a.stop_at > 0 ? std::min(a.stop_at, c.steps) : c.steps;
  const int64_t first = tr.current_step();
  auto t0 = std::chrono::steady_clock::now();
  float loss = 0;
  // Every rank stops at the same step: the signals any rank took, summed (SIGINT, SIGTERM,
  // SIGUSR1). SIGINT is the user's interrupt (exit 130); the others are a preemption (exit 0).
  double stops[3] = {0, 0, 0};
  auto stop_requested = [&] {
    const int sig = stop_signal();
    double f[3] = {sig == SIGINT ? 1.0 : 0.0, sig == SIGTERM ? 1.0 : 0.0,
                   sig == SIGUSR1 ? 1.0 : 0.0};
    comm.all_reduce_sum(f, 3);
    std::copy(f, f + 3, stops);
    return f[0] + f[1] + f[2] > 0;
  };
  // A checkpoint that could not be written (a full disk) is said once; training goes on, since
  // the previous checkpoint is intact and the next interval tries again.
  CheckpointWriter writer;
  auto report = [&](const CheckpointWriter::Result& r) -> std::string {
    if (r.error.empty() || !lead) return r.error;
    const std::string prev = newest_checkpoint(c.out);
    std::fprintf(stderr,
                 "mxn: warning: the checkpoint of step %lld was not written: %s. The previous "
                 "one (%s) is intact; training goes on and tries again in %lld steps\n",
                 (long long)r.step, r.error.c_str(), prev.empty() ? "none" : prev.c_str(),
                 (long long)c.ckpt_every);
    return "step " + std::to_string(r.step) + ": " + r.error;
  };
  rusage ru{};
  long train_peak_kib = 0;  // the high-water mark after the last step, before its evaluation
  while (tr.current_step() < last && !stop_requested()) {
    auto ts = std::chrono::steady_clock::now();
    loss = tr.step();
    getrusage(RUSAGE_SELF, &ru);
    train_peak_kib = ru.ru_maxrss;
    const int64_t s = tr.current_step();
    if (!std::isfinite(loss))
      throw Error(
          "the loss became " + std::to_string(loss) + " at step " + std::to_string(s) +
          " (try a lower --lr); no checkpoint was written for it, the last good one is in " +
          c.out);
    auto now = std::chrono::steady_clock::now();
    const double step_s = std::chrono::duration<double>(now - ts).count();
    const double elapsed = std::chrono::duration<double>(now - t0).count();
    const double tps = double(tokens_per_step * (s - first)) / elapsed;
    const double eta = elapsed / double(s - first) * double(last - s);
    nlohmann::json row = {{"step", s},           {"loss", loss},
                          {"lr", tr.lr_at(s)},   {"grad_norm", tr.last_grad_norm()},
                          {"tokens_per_s", tps}, {"step_s", step_s}};
    const bool eval_now = (c.eval_every > 0 && s % c.eval_every == 0) || s == last;
    if (eval_now) row["val_loss"] = tr.eval_loss();
    beat.step(s);
    if (c.ckpt_every > 0 && s % c.ckpt_every == 0 && s != last) {  // every rank
      const auto tc = std::chrono::steady_clock::now();
      std::string failed;
      if (c.ckpt_async) {
        failed = report(tr.save_async(writer));
      } else {
        try {
          tr.save();
        } catch (const Error& e) {
          failed = report({s, "", e.what()});
        }
      }
      row["ckpt_s"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - tc).count();
      if (!failed.empty()) row["ckpt_error"] = failed;
    }
    if (lead) append_metrics(c.out, row);
    char line[256];
    std::snprintf(line, sizeof(line),
                  "step %5lld/%lld | loss %.4f | lr %.2e | %7.0f tok/s | ETA %s", (long long)s,
                  (long long)last, loss, tr.lr_at(s), tps, fmt_duration(eta).c_str());
    if (tty)
      std::printf("\r%-100s", line);
    else if (s % c.log_every == 0 || s == last)
      std::printf("%s\n", line);
    if (eval_now)
      std::printf("%sstep %lld: val loss %.4f\n", tty ? "\n" : "", (long long)s,
                  row["val_loss"].get<double>());
    if (const std::string change = tr.take_plan_change(); !change.empty())
      std::printf("%s%s\n", tty ? "\n" : "", change.c_str());
    std::fflush(stdout);
  }
  const bool stopped = tr.current_step() < last;
  if (tty) std::printf("\n");
  if (tr.device().profiling()) std::printf("%s", tr.device().profile_report().c_str());
  if (comm.size() > 1 && tr.mean_step_seconds() > 0 && tr.plan().pipeline.empty()) {
    const double pred = tr.plan().predicted_step_s, got = tr.mean_step_seconds();
    std::printf(
        "plan: predicted %.3f s/step, measured %.3f s/step (%+.1f%%); split corrected %d "
        "times; rank 0 waited %.1f ms/step for gradient reduces after its backward\n",
        pred, got, 100.0 * (got - pred) / pred, tr.plan().rebalances,
        tr.mean_exposed_reduce_seconds() * 1e3);
  }
  report(writer.wait());
  std::string where;
  try {
    where = tr.save();
  } catch (const Error& e) {  // the last checkpoint cannot be skipped: stop, and say what is left
    const std::string prev = newest_checkpoint(c.out);
    throw Error(
        std::string(e.what()) + ". Training stopped at step " + std::to_string(tr.current_step()) +
        "; the newest checkpoint on disk is " + (prev.empty() ? "none was written" : prev) +
        " (free space, then resume from it with: mxn train --resume auto --out " + c.out + ")");
  }
  const int code = stopped && stops[0] > 0 ? 130 : 0;
  if (!lead) return code;
  write_loss_svg(c.out);
  getrusage(RUSAGE_SELF, &ru);
  std::printf(
      "peak resident memory: %.2f GiB in training steps, %.2f GiB with evaluation and "
      "checkpointing\n",
      double(train_peak_kib) / (1 << 20), double(ru.ru_maxrss) / (1 << 20));
  if (stopped && code == 0)
    std::printf(
        "stopped at step %lld; preempted by %s, checkpoint %s. Resume with: mxn train "
        "--resume auto --out %s\n",
        (long long)tr.current_step(), stops[1] > 0 ? "SIGTERM" : "SIGUSR1", where.c_str(),
        c.out.c_str());
  else
    std::printf("%s at step %lld; checkpoint %s; metrics %s/metrics.jsonl; curve %s/loss.svg\n",
                stopped ? "stopped" : "done", (long long)tr.current_step(), where.c_str(),
                c.out.c_str(), c.out.c_str());
  return code;
}

}  // namespace

void remember_argv(int argc, char** argv) { g_argv.assign(argv, argv + argc); }

std::function<int()> add_train(CLI::App& app) {
  auto* sub = app.add_subcommand(
      "train", "train a model: GPT-2, LLaMA, Qwen2, GLM (default: a small GPT-2 on the KJV)");
  auto a = std::make_shared<TrainArgs>();
  sub->add_option("config", a->config_file, "TOML file with any of the keys below");
  sub->add_option("--resume", a->resume,
                  "continue from a checkpoint or run folder; auto: the run folder's (--out) "
                  "newest good checkpoint, or a fresh start if it has none");
  sub->add_option("--stop-at", a->stop_at, "stop (with a checkpoint) after this step");
  sub->add_option("--plan", a->plan,
                  "run the layout a plan file holds (mxn plan --out): its devices, stages, "
                  "micro-batch and global batch");
  sub->add_flag("--overwrite", a->overwrite,
                "start afresh in an --out folder that holds a run: its checkpoints, "
                "metrics.jsonl and loss.svg are removed first");
  sub->add_flag("--dry-run", a->dry_run,
                "build the model on every device, measure them and print the plan; train nothing");
  for (auto& f : config_fields(a->flags)) {
    CLI::Option* o = std::visit(
        [&](auto* p) {
          std::string names = "--" + f.name, dashed = f.name;
          std::replace(dashed.begin(), dashed.end(), '_', '-');
          if (dashed != f.name) names += ",--" + dashed;  // --max_restarts or --max-restarts
          return sub->add_option(names, *p, f.help)
              ->capture_default_str()
              ->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
        },
        f.ptr);
    a->opts.emplace_back(f.name, o);
  }
  return [a] { return run_train(*a); };
}

}  // namespace mxn::cli
