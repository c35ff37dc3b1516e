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
#include <optional>
#include <thread>
#include <tuple>

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

void print_plan(const Trainer& tr, std::vector<std::string> devs) {
  const Plan& p = tr.plan();
  if (p.rank_dtypes.size() == devs.size())  // --dtype auto: each rank's choice
    for (size_t r = 0; r < devs.size(); ++r) devs[r] += " " + p.rank_dtypes[r];
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
  if (!p.experts.empty()) {  // --ep: the experts' placement
    std::printf("  plan: expert parallel, %s\n", p.experts.c_str());
    const std::vector<int64_t>& b = p.expert_bounds;
    const size_t ep = b.size() - 1;
    for (size_t r = 0; r < p.ranks.size(); ++r)
      std::printf(
          "    rank %zu %-10s experts %s, %lld sequences\n", r, devs[r].c_str(),
          b[r % ep] == b[r % ep + 1]
              ? "none"
              : (std::to_string(b[r % ep]) + "-" + std::to_string(b[r % ep + 1] - 1)).c_str(),
          (long long)p.ranks[r].rows);
    return;
  }
  if (!p.tensor.empty()) {  // --tp: each rank's heads and columns
    std::printf("  plan: tensor parallel, %s\n", p.tensor.c_str());
    for (size_t r = 0; r < p.ranks.size(); ++r)
      std::printf("    rank %zu %-10s %lld sequences a step, %lld a pass\n", r, devs[r].c_str(),
                  (long long)p.ranks[r].rows, (long long)p.ranks[r].cap);
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
    std::printf("    optimizer state sharded (ZeRO-1, by free memory%s%s):",
                p.zero_why.empty() ? "" : "; ", p.zero_why.c_str());
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

// The run's config: the TOML file's keys, then the flags given, then a plan file's layout.
// Returns the names of the keys set (a resumed run takes only those from now).
std::vector<std::string> gather_config(const TrainArgs& a, TrainConfig& cfg) {
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
  return set;
}

// --resume: the checkpoint to continue from (auto: the run folder's newest good one, or none),
// and its config with the keys given now; the model's shape cannot change.
std::optional<Checkpoint> resume_config(TrainArgs& a, TrainConfig& cfg,
                                        const std::vector<std::string>& set) {
  const bool lead_rank = rank_from_env().rank == 0;
  auto warn = [&](const std::string& w) {
    if (lead_rank) std::fprintf(stderr, "mxn: warning: %s\n", w.c_str());
  };
  const bool auto_resume = a.resume == "auto";
  std::optional<Checkpoint> ck;  // read once: checked and parsed in one pass
  if (auto_resume) {  // the run folder's newest good checkpoint; with none yet, a fresh start
    const bool any = !newest_checkpoint(cfg.out).empty();
    a.resume.clear();
    if (any) std::tie(a.resume, ck) = load_good_checkpoint(cfg.out, warn);
    if (!any && lead_rank)
      std::printf("  --resume auto: no checkpoint in %s yet, starting fresh\n", cfg.out.c_str());
  } else if (!a.resume.empty()) {
    std::tie(a.resume, ck) = load_good_checkpoint(a.resume, warn);
  }
  if (ck) {
    // A resumed run keeps its checkpoint's config; only keys given now override it, and the
    // model's shape cannot change.
    TrainConfig saved;
    from_json(saved, ck->trainer.at("config"));
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
  return ck;
}

// What no rank can start without: a fresh run folder, a step to stop at, the default corpus, and
// values each field allows.
void check_start(const TrainArgs& a, bool resuming, TrainConfig& cfg) {
  // A fresh run into a folder that holds one would mix two loss curves and two runs' checkpoints.
  if (!resuming && !a.dry_run && rank_from_env().rank == 0 && !std::getenv("MXN_SUPERVISED"))
    check_fresh_out(cfg.out, a.overwrite);
  if (a.stop_at < 0) throw Error("--stop-at must be >= 0");
  if (cfg.sft.empty() && cfg.data == TrainConfig().data && !std::filesystem::exists(cfg.data))
    throw Error("the default corpus '" + cfg.data +
                "' is missing: run scripts/setup (it prepares "
                "it), or pass --data FILE");
  cfg.validate();
}

// --devices all: every device here that adds speed, one rank each.
void expand_all_devices(TrainConfig& cfg) {
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

// This process's place in the job: with several devices and no launcher, the supervisor that
// starts a rank for each (its exit code returned); under a launcher, the rank's device. One
// device with --max-restarts: this process supervises the one rank.
std::optional<int> place_rank(TrainConfig& cfg, std::optional<Checkpoint>& ck) {
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
    if (devs.size() > 1 && cfg.ep > 1) check_expert_parallel(cfg, int64_t(devs.size()));
    if (devs.size() > 1 && cfg.tp > 1) {
      TrainConfig c = cfg;
      c.resolve_model();
      check_tensor_parallel(c, int64_t(devs.size()), c.decoder_config());
    }
    const RankInfo ri = rank_from_env();
    if (ri.world == 1 && devs.size() > 1 && !std::getenv("MXN_SUPERVISED"))
      return ck.reset(), supervise(job(seen, cfg));  // the ranks read the checkpoint
    if (size_t(ri.world) != devs.size())
      throw Error("--devices names " + std::to_string(devs.size()) +
                  " devices but the launcher started " + std::to_string(ri.world) + " ranks");
    cfg.device = seen[size_t(ri.rank)];
  }
  if (devs.size() <= 1 && cfg.max_restarts > 0 && rank_from_env().world == 1 &&
      !std::getenv("MXN_SUPERVISED"))  // one device, watched and restarted by this process
    return ck.reset(), supervise(job({cfg.device}, cfg));
  return std::nullopt;
}

// The run's first lines: the model, the device, the memory it takes, the ranks' plan.
void print_start(Trainer& tr, const Communicator& comm) {
  const TrainConfig& c = tr.config();
  const DecoderConfig d = c.decoder_config();
  std::printf(
      "mxn train: %s %lld layers, %lld heads (%lld kv), width %lld, context %lld: %.2fM "
      "params%s%s\n",
      arch_name(d.arch), (long long)d.layers, (long long)d.heads, (long long)d.n_kv_heads(),
      (long long)d.hidden, (long long)c.seq_len(), double(d.param_count()) / 1e6,
      c.model.dir.empty() ? "" : ", from ", c.model.dir.c_str());
  const std::string why = tr.plan().dtype_why.empty() ? "" : " (" + tr.plan().dtype_why + ")";
  std::printf("  device %s (%s), dtype %s%s, %lld tokens/step, data %s, run folder %s\n",
              tr.device().name().c_str(), tr.device().props().name, c.dtype.c_str(), why.c_str(),
              (long long)(c.batch * c.accum * c.seq_len()), c.data.c_str(), c.out.c_str());
  auto size = [](double bytes) {
    char b[32];
    std::snprintf(b, sizeof b, bytes < (1 << 30) ? "%.0f MiB" : "%.2f GiB",
                  bytes / (bytes < (1 << 30) ? 1 << 20 : 1 << 30));
    return std::string(b);
  };
  std::printf("  memory on %s: weights and gradients %s, AdamW %s, activations %s (%s%s)\n",
              tr.device().name().c_str(), size(double(tr.param_count()) * 8).c_str(),
              size(double(tr.optimizer_bytes())).c_str(), size(double(tr.arena_bytes())).c_str(),
              c.recompute ? "norms and MLP activations recomputed" : "--recompute 0: all kept",
              c.gelu_bf16 && c.attn_bf16 ? ", GELU inputs and q, k, v kept in bf16"
              : c.gelu_bf16              ? ", GELU inputs kept in bf16"
              : c.attn_bf16              ? ", q, k, v kept in bf16"
                                         : "");
  if (comm.size() > 1) print_plan(tr, rank_devices(c, comm.size()));
}

// The steps to `last`, or to a stop signal any rank took: a metrics row and a progress line each,
// evaluation and checkpoints at their intervals; then the last checkpoint and the run's summary.
class StepLoop {
 public:
  StepLoop(Trainer& tr, Communicator& comm, Heartbeat& beat, int64_t stop_at)
      : tr_(tr),
        c_(tr.config()),
        comm_(comm),
        beat_(beat),
        lead_(comm.rank() == 0),
        // Under mpirun stdout is a pseudo-terminal even when mpirun's is not: plain lines there.
        tty_(isatty(STDOUT_FILENO) && comm.size() == 1),
        last_(stop_at > 0 ? std::min(stop_at, c_.steps) : c_.steps),
        first_(tr.current_step()) {}

  void run() {
    const auto t0 = std::chrono::steady_clock::now();
    const int64_t tokens_per_step = c_.batch * c_.accum * c_.seq_len();
    rusage ru{};
    while (tr_.current_step() < last_ && !stop_requested()) {
      const auto ts = std::chrono::steady_clock::now();
      const float loss = tr_.step();
      getrusage(RUSAGE_SELF, &ru);
      train_peak_kib_ = ru.ru_maxrss;  // the high-water mark after the step, before evaluation
      const int64_t s = tr_.current_step();
      if (!std::isfinite(loss))
        throw Error("the loss became " + std::to_string(loss) + " at step " + std::to_string(s) +
                    " (try a lower --lr); no checkpoint was written for it, the last good one "
                    "is in " +
                    c_.out);
      const auto now = std::chrono::steady_clock::now();
      const double elapsed = std::chrono::duration<double>(now - t0).count();
      nlohmann::json row = {{"step", s},
                            {"loss", loss},
                            {"lr", tr_.lr_at(s)},
                            {"grad_norm", tr_.last_grad_norm()},
                            {"tokens_per_s", double(tokens_per_step * (s - first_)) / elapsed},
                            {"step_s", std::chrono::duration<double>(now - ts).count()}};
      if (nlohmann::json load = tr_.expert_load(); !load.empty()) row["expert_load"] = load;
      const bool eval_now = (c_.eval_every > 0 && s % c_.eval_every == 0) || s == last_;
      if (eval_now) row["val_loss"] = tr_.eval_loss();
      beat_.step(s);
      if (c_.ckpt_every > 0 && s % c_.ckpt_every == 0 && s != last_) checkpoint(row);
      if (lead_) append_metrics(c_.out, row);
      progress(row, elapsed / double(s - first_) * double(last_ - s), eval_now);
    }
  }

  int finish() {
    const bool stopped = tr_.current_step() < last_;
    if (tty_) std::printf("\n");
    if (tr_.device().profiling()) std::printf("%s", tr_.device().profile_report().c_str());
    if (comm_.size() > 1 && tr_.mean_step_seconds() > 0 && tr_.plan().predicted_step_s > 0) {
      const double pred = tr_.plan().predicted_step_s, got = tr_.mean_step_seconds();
      std::printf(
          "plan: predicted %.3f s/step, measured %.3f s/step (%+.1f%%); split corrected %d "
          "times; rank 0 waited %.1f ms/step for gradient reduces after its backward\n",
          pred, got, 100.0 * (got - pred) / pred, tr_.plan().rebalances,
          tr_.mean_exposed_reduce_seconds() * 1e3);
    }
    // Expert and tensor parallelism's exchanges inside the step (one of them at most).
    const char* exchanges = !tr_.plan().experts.empty()
                                ? "expert parallel: %s in the exchanges: rows through the host, "
                                  "and waiting for the other ranks' pieces\n"
                            : !tr_.plan().tensor.empty()
                                ? "tensor parallel: %s in the blocks' all-reduces\n"
                                : nullptr;
    if (lead_ && exchanges && tr_.mean_step_seconds() > 0) {
      char spent[96];
      std::snprintf(spent, sizeof spent, "rank 0 spent %.1f ms a step (%.0f%% of it)",
                    tr_.mean_exchange_seconds() * 1e3,
                    100.0 * tr_.mean_exchange_seconds() / tr_.mean_step_seconds());
      std::printf(exchanges, spent);
    }
    report(writer_.wait());
    const std::string where = last_checkpoint();
    const int code = stopped && stops_[0] > 0 ? 130 : 0;
    const Trainer::Drift drift = tr_.replica_drift();  // collective
    if (!lead_) return code;
    if (drift.compared) {
      if (drift.identical && drift.shares)
        std::printf(
            "replicas: every copy of each weight bit-identical to the first rank's of those that "
            "hold it\n");
      else if (drift.identical)
        std::printf("replicas: every rank's weights bit-identical to rank 0's\n");
      else
        std::printf(
            "replicas: weights differ from rank 0's by up to %.3g (each rank's optimizer on its "
            "own chip; --zero 1 keeps them identical)\n",
            drift.worst);
    }
    write_loss_svg(c_.out);
    rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    std::printf(
        "peak resident memory: %.2f GiB in training steps, %.2f GiB with evaluation and "
        "checkpointing\n",
        double(train_peak_kib_) / (1 << 20), double(ru.ru_maxrss) / (1 << 20));
    if (stopped && code == 0)
      std::printf(
          "stopped at step %lld; preempted by %s, checkpoint %s. Resume with: mxn train "
          "--resume auto --out %s\n",
          (long long)tr_.current_step(), stops_[1] > 0 ? "SIGTERM" : "SIGUSR1", where.c_str(),
          c_.out.c_str());
    else
      std::printf("%s at step %lld; checkpoint %s; metrics %s/metrics.jsonl; curve %s/loss.svg\n",
                  stopped ? "stopped" : "done", (long long)tr_.current_step(), where.c_str(),
                  c_.out.c_str(), c_.out.c_str());
    return code;
  }

 private:
  // Every rank stops at the same step: the signals any rank took, summed (SIGINT, SIGTERM,
  // SIGUSR1). SIGINT is the user's interrupt (exit 130); the others are a preemption (exit 0).
  bool stop_requested() {
    const int sig = stop_signal();
    double f[3] = {sig == SIGINT ? 1.0 : 0.0, sig == SIGTERM ? 1.0 : 0.0,
                   sig == SIGUSR1 ? 1.0 : 0.0};
    comm_.all_reduce_sum(f, 3);
    std::copy(f, f + 3, stops_);
    return f[0] + f[1] + f[2] > 0;
  }

  // A checkpoint that could not be written (a full disk) is said once; training goes on, since
  // the previous checkpoint is intact and the next interval tries again.
  std::string report(const CheckpointWriter::Result& r) {
    if (r.error.empty() || !lead_) return r.error;
    const std::string prev = newest_checkpoint(c_.out);
    std::fprintf(stderr,
                 "mxn: warning: the checkpoint of step %lld was not written: %s. The previous "
                 "one (%s) is intact; training goes on and tries again in %lld steps\n",
                 (long long)r.step, r.error.c_str(), prev.empty() ? "none" : prev.c_str(),
                 (long long)c_.ckpt_every);
    return "step " + std::to_string(r.step) + ": " + r.error;
  }

  void checkpoint(nlohmann::json& row) {  // every rank
    const auto tc = std::chrono::steady_clock::now();
    std::string failed;
    if (c_.ckpt_async) {
      failed = report(tr_.save_async(writer_));
    } else {
      try {
        tr_.save();
      } catch (const Error& e) {
        failed = report({tr_.current_step(), "", e.what()});
      }
    }
    row["ckpt_s"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - tc).count();
    if (!failed.empty()) row["ckpt_error"] = failed;
  }

  void progress(const nlohmann::json& row, double eta, bool eval_now) {
    const int64_t s = row["step"].get<int64_t>();
    char line[256];
    std::snprintf(line, sizeof(line),
                  "step %5lld/%lld | loss %.4f | lr %.2e | %7.0f tok/s | ETA %s", (long long)s,
                  (long long)last_, row["loss"].get<double>(), tr_.lr_at(s),
                  row["tokens_per_s"].get<double>(), fmt_duration(eta).c_str());
    if (tty_)
      std::printf("\r%-100s", line);
    else if (s % c_.log_every == 0 || s == last_)
      std::printf("%s\n", line);
    if (eval_now)
      std::printf("%sstep %lld: val loss %.4f\n", tty_ ? "\n" : "", (long long)s,
                  row["val_loss"].get<double>());
    if (const std::string change = tr_.take_plan_change(); !change.empty())
      std::printf("%s%s\n", tty_ ? "\n" : "", change.c_str());
    std::fflush(stdout);
  }

  // The last checkpoint cannot be skipped: when it fails, stop and say what is left.
  std::string last_checkpoint() {
    try {
      return tr_.save();
    } catch (const Error& e) {
      const std::string prev = newest_checkpoint(c_.out);
      throw Error(std::string(e.what()) + ". Training stopped at step " +
                  std::to_string(tr_.current_step()) + "; the newest checkpoint on disk is " +
                  (prev.empty() ? "none was written" : prev) +
                  " (free space, then resume from it with: mxn train --resume auto --out " +
                  c_.out + ")");
    }
  }

  Trainer& tr_;
  const TrainConfig& c_;
  Communicator& comm_;
  Heartbeat& beat_;
  const bool lead_, tty_;
  const int64_t last_, first_;
  double stops_[3] = {0, 0, 0};
  long train_peak_kib_ = 0;
  CheckpointWriter writer_;
};

int run_train(TrainArgs& a) {
  watch_stop_signals();  // first: before any thread exists
  TrainConfig cfg;
  const std::vector<std::string> set = gather_config(a, cfg);
  const bool resuming = !a.resume.empty();  // auto included: a fresh start there is a restart's
  std::optional<Checkpoint> ck = resume_config(a, cfg, set);
  check_start(a, resuming, cfg);
  if (cfg.devices == "all") expand_all_devices(cfg);
  if (const std::optional<int> code = place_rank(cfg, ck)) return *code;
  Communicator& comm = Communicator::world();
  fault_set_rank(comm.rank());
  Heartbeat beat(comm.rank(), 1.0);
  fault_point("start", 0);
  const bool lead = comm.rank() == 0;  // rank 0 prints, writes metrics and checkpoints
  Trainer tr(cfg, ck ? &*ck : nullptr, &comm);
  ck.reset();  // on the device now
  if (lead && !a.dry_run) std::filesystem::create_directories(tr.config().out);
  if (!lead && std::freopen("/dev/null", "w", stdout) == nullptr) { /* keep stdout */
  }
  print_start(tr, comm);
  if (a.dry_run) {  // the model is built and every device measured; nothing is trained or written
    std::printf("dry run: nothing trained, nothing written\n");
    return 0;
  }
  if (tr.current_step() > 0) {
    std::printf("  resumed at step %lld\n", (long long)tr.current_step());
    if (lead) truncate_metrics(tr.config().out, tr.current_step());
  }
  std::fflush(stdout);
  StepLoop loop(tr, comm, beat, a.stop_at);
  loop.run();
  return loop.finish();
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
