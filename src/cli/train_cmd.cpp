// `mxn train`: the config from defaults, a TOML file and flags (in that order), then the loop with
// a live progress line, metrics, validation and checkpoints.
#include <pthread.h>
#include <sys/resource.h>
#include <sys/wait.h>
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
#include "core/fs.h"
#include "core/text.h"
#include "io/checkpoint.h"
#include "parallel/balance.h"
#include "parallel/comm.h"
#include "plan/local.h"
#include "train/metrics.h"
#include "train/trainer.h"

namespace mxn::cli {
namespace {

std::atomic<bool> g_stop{false};
std::vector<std::string> g_argv;  // this process's command line, for starting ranks

// SIGINT / SIGTERM stop training after the current step (with a checkpoint). They are blocked
// in every thread (threads made later inherit the mask) and taken by one thread that waits for
// them, so a signal never interrupts a kernel. It used to run a handler on whichever thread it
// hit: on this AVX-512 machine about one run in eight then died of heap corruption inside
// oneDNN 2.6's sgemm (not with DNNL_MAX_CPU_ISA=AVX2), so kernels must not be interrupted.
void watch_stop_signals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  std::thread([set] {
    int sig = 0;
    while (sigwait(&set, &sig) == 0) g_stop = true;
  }).detach();
}

// "cpu,opencl" -> {"cpu:0", "opencl:0"}; "" -> {}.
std::vector<std::string> split_devices(const std::string& s) {
  if (s.empty()) return {};
  std::vector<std::string> out = split(s, ',');
  for (auto& d : out)
    if (d.find(':') == std::string::npos) d += ":0";
  return out;
}

// `--devices a,b` on one machine: start one rank per device through mpirun (the same command
// line; each rank picks its device by rank), each bound to its own cores, and watch the job. If a
// rank dies, mpirun ends the others at once; we then say which rank, on which device, and where
// the last checkpoint is. Returns the job's exit code.
int launch_ranks(const std::vector<std::string>& devs, int64_t threads, const std::string& out) {
  const size_t n = devs.size();
  const long cores = std::max<long>(1, sysconf(_SC_NPROCESSORS_ONLN));
  const long per_rank = std::max<long>(1, cores / long(n));
  std::vector<std::string> args = {"mpirun", "-np", std::to_string(n), "--oversubscribe"};
  if (long(n) <= cores) {
    args.insert(args.end(),
                {"--map-by", "slot:PE=" + std::to_string(per_rank), "--bind-to", "core"});
  } else {
    args.insert(args.end(), {"--bind-to", "none"});
  }
  if (geteuid() == 0) args.push_back("--allow-run-as-root");
  char exe[4096];
  const ssize_t len = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  args.push_back(len > 0 ? std::string(exe, size_t(len)) : g_argv[0]);
  args.insert(args.end(), g_argv.begin() + 1, g_argv.end());
  if (threads == 0) {  // the cores each rank is bound to
    args.push_back("--threads");
    args.push_back(std::to_string(per_rank));
  }
  std::vector<char*> cargs;
  for (auto& arg : args) cargs.push_back(arg.data());
  cargs.push_back(nullptr);
  std::fflush(stdout);
  int fds[2];
  if (pipe(fds) != 0)
    throw Error("cannot start mpirun: pipe: " + std::string(std::strerror(errno)));
  const pid_t pid = fork();
  if (pid < 0) throw Error("cannot start mpirun: fork: " + std::string(std::strerror(errno)));
  if (pid == 0) {
    sigset_t none;  // mpirun and the ranks start with signals as usual
    sigemptyset(&none);
    pthread_sigmask(SIG_SETMASK, &none, nullptr);
    dup2(fds[1], STDERR_FILENO);
    close(fds[0]);
    close(fds[1]);
    execvp("mpirun", cargs.data());
    std::fprintf(stderr,
                 "mxn: error: cannot start mpirun for --devices (%s); install openmpi-bin, "
                 "or start the ranks with your own launcher\n",
                 std::strerror(errno));
    _exit(127);
  }
  close(fds[1]);
  // Ctrl-C reaches every process of the terminal's group; the ranks stop together, and this
  // process (its signals taken by watch_stop_signals) waits to report how the job ended.
  FILE* err = fdopen(fds[0], "r");
  int dead_rank = -1, dead_signal = 0;
  char line[4096];
  // mpirun's boxed notices about a rank that failed or died are replaced by the ranks' own
  // error lines and by ours below; any other box (e.g. a launch problem) is passed through.
  std::string box;
  bool in_box = false;
  while (err && std::fgets(line, sizeof(line), err)) {
    int r = -1, sig = 0;
    const char* at = std::strstr(line, "process rank ");
    if (at && std::strstr(at, "exited on signal") && std::sscanf(at, "process rank %d", &r) == 1 &&
        std::sscanf(std::strstr(at, "exited on signal"), "exited on signal %d", &sig) == 1 &&
        dead_rank < 0) {
      dead_rank = r;
      dead_signal = sig;
    }
    if (std::strncmp(line, "-----", 5) == 0) {
      box += line;
      if (in_box) {
        const bool known = box.find("mpirun noticed that process rank") != std::string::npos ||
                           box.find("Primary job  terminated normally") != std::string::npos ||
                           box.find("exited with non-zero status") != std::string::npos;
        if (!known) std::fputs(box.c_str(), stderr);
        box.clear();
      }
      in_box = !in_box;
    } else if (in_box) {
      box += line;
    } else {
      std::fputs(line, stderr);
    }
  }
  if (!box.empty()) std::fputs(box.c_str(), stderr);
  if (err) std::fclose(err);
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  const int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  if (dead_rank < 0 || dead_rank >= int(n)) return g_stop && code != 0 ? 130 : code;
  std::string last = "none was written yet";
  try {
    last = resolve_checkpoint(out);
  } catch (const Error&) {
  }
  std::vector<std::string> rest;
  for (size_t i = 0; i < n; ++i)
    if (int(i) != dead_rank) rest.push_back(devs[i]);
  std::string again;
  for (const auto& d : rest) again += (again.empty() ? "" : ",") + d;
  std::fprintf(stderr,
               "mxn: error: rank %d (%s) died (signal %d: %s); the job stopped. Last checkpoint: "
               "%s. Continue on the remaining devices with: mxn train --resume %s --devices %s "
               "(under Slurm: MXN_DEVICES=%s sbatch --ntasks %zu examples/slurm/train.sbatch "
               "--resume %s)\n",
               dead_rank, devs[size_t(dead_rank)].c_str(), dead_signal, strsignal(dead_signal),
               last.c_str(), out.c_str(), again.c_str(), again.c_str(), rest.size(), out.c_str());
  return code == 0 ? 1 : code;
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
  bool dry_run = false;
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
  if (!a.resume.empty()) {
    // A resumed run keeps its checkpoint's config; only keys given now override it, and the
    // model's shape cannot change.
    Checkpoint ck = load_checkpoint(a.resume, false);
    TrainConfig saved;
    from_json(saved, ck.trainer.at("config"));
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
  }
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
      // Pipeline replicas may put a stage of each on one chip (memory permitting).
      if (std::find(seen.begin(), seen.end(), d) != seen.end() && cfg.pp <= 1)
        throw Error("device '" + d +
                    "' appears twice in --devices; each rank needs its own device (only "
                    "pipeline stages, --pp, may share one)");
      seen.push_back(d);
    }
    if (cfg.batch < int64_t(devs.size()))
      throw Error("the global batch (" + std::to_string(cfg.batch) +
                  " sequences) is smaller than the " + std::to_string(devs.size()) +
                  " devices: each rank needs at least one");
    if (devs.size() > 1)  // a bad split is one line here, not one per rank
      parse_split(cfg.split, int(devs.size()));
    const RankInfo ri = rank_from_env();
    if (ri.world == 1 && devs.size() > 1) return launch_ranks(seen, cfg.threads, cfg.out);
    if (size_t(ri.world) != devs.size())
      throw Error("--devices names " + std::to_string(devs.size()) +
                  " devices but the launcher started " + std::to_string(ri.world) + " ranks");
    cfg.device = seen[size_t(ri.rank)];
  }
  Communicator& comm = Communicator::world();
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
  auto stop_requested = [&] {  // every rank must stop at the same step
    double f = g_stop ? 1 : 0;
    comm.all_reduce_sum(&f, 1);
    return f > 0;
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
    if (c.ckpt_every > 0 && s % c.ckpt_every == 0 && s != last) tr.save();  // every rank
  }
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
  const std::string where = tr.save();
  if (!lead) return g_stop ? 130 : 0;
  write_loss_svg(c.out);
  getrusage(RUSAGE_SELF, &ru);
  std::printf(
      "peak resident memory: %.2f GiB in training steps, %.2f GiB with evaluation and "
      "checkpointing\n",
      double(train_peak_kib) / (1 << 20), double(ru.ru_maxrss) / (1 << 20));
  std::printf("%s at step %lld; checkpoint %s; metrics %s/metrics.jsonl; curve %s/loss.svg\n",
              g_stop ? "stopped" : "done", (long long)tr.current_step(), where.c_str(),
              c.out.c_str(), c.out.c_str());
  return g_stop ? 130 : 0;
}

}  // namespace

void remember_argv(int argc, char** argv) { g_argv.assign(argv, argv + argc); }

std::function<int()> add_train(CLI::App& app) {
  auto* sub = app.add_subcommand(
      "train", "train a model: GPT-2, LLaMA, Qwen2, GLM (default: a small GPT-2 on the KJV)");
  auto a = std::make_shared<TrainArgs>();
  sub->add_option("config", a->config_file, "TOML file with any of the keys below");
  sub->add_option("--resume", a->resume, "continue from a checkpoint or run folder");
  sub->add_option("--stop-at", a->stop_at, "stop (with a checkpoint) after this step");
  sub->add_option("--plan", a->plan,
                  "run the layout a plan file holds (mxn plan --out): its devices, stages, "
                  "micro-batch and global batch");
  sub->add_flag("--dry-run", a->dry_run,
                "build the model on every device, measure them and print the plan; train nothing");
  for (auto& f : config_fields(a->flags)) {
    CLI::Option* o = std::visit(
        [&](auto* p) {
          return sub->add_option("--" + f.name, *p, f.help)
              ->capture_default_str()
              ->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
        },
        f.ptr);
    a->opts.emplace_back(f.name, o);
  }
  return [a] { return run_train(*a); };
}

}  // namespace mxn::cli
