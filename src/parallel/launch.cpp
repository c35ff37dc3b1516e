#include "parallel/launch.h"

#include <pthread.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "core/error.h"
#include "io/checkpoint.h"

namespace fs = std::filesystem;

namespace mxn {
namespace {

std::atomic<int> g_signal{0};

double now_s() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// A small file replaced whole (readers see the old text or the new), without an fsync: a
// heartbeat is worth nothing after a crash of the machine.
void put(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  if (FILE* f = std::fopen(tmp.c_str(), "w")) {
    std::fputs(text.c_str(), f);
    std::fclose(f);
    std::rename(tmp.c_str(), path.c_str());
  }
}

}  // namespace

void watch_stop_signals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGUSR1);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  std::thread([set] {
    int sig = 0;
    while (sigwait(&set, &sig) == 0) {
      int none = 0;
      g_signal.compare_exchange_strong(none, sig);
    }
  }).detach();
}

int stop_signal() { return g_signal.load(); }

// --- heartbeats -----------------------------------------------------------------------------

struct Heartbeat::State {
  std::string path;
  double period = 1;
  std::atomic<int64_t> step{0};
  std::mutex mu;
  std::condition_variable cv;
  bool quit = false;
  std::thread thread;
  std::string text(const char* what) const {
    return std::string(what) + " " + std::to_string(::getpid()) + " " +
           std::to_string(step.load()) + "\n";
  }
};

Heartbeat::Heartbeat(int64_t rank, double period) {
  const char* dir = std::getenv("MXN_HEARTBEAT_DIR");
  if (!dir || !*dir) return;
  s_ = new State;
  s_->path = (fs::path(dir) / ("rank-" + std::to_string(rank))).string();
  if (const char* p = std::getenv("MXN_HEARTBEAT_PERIOD")) period = std::atof(p);
  s_->period = std::clamp(period, 0.02, 10.0);
  put(s_->path, s_->text("run"));
  s_->thread = std::thread([s = s_] {  // every period, and soon after each new step
    std::unique_lock<std::mutex> l(s->mu);
    int64_t written = 0;
    for (;;) {
      s->cv.wait_for(l, std::chrono::duration<double>(s->period),
                     [&] { return s->quit || s->step.load() != written; });
      if (s->quit) return;
      written = s->step.load();
      put(s->path, s->text("run"));
      s->cv.wait_for(l, std::chrono::milliseconds(20), [&] { return s->quit; });  // 50 a second
    }
  });
}

Heartbeat::~Heartbeat() {
  if (!s_) return;
  {
    std::lock_guard<std::mutex> l(s_->mu);
    s_->quit = true;
  }
  s_->cv.notify_all();
  s_->thread.join();
  put(s_->path, s_->text("exit"));
  delete s_;
}

void Heartbeat::step(int64_t s) {
  if (!s_) return;
  s_->step = s;
  s_->cv.notify_one();
}

// --- the supervisor -------------------------------------------------------------------------
namespace {

struct Beat {
  int64_t rank = 0;
  pid_t pid = 0;
  int64_t step = 0;
  bool exited = false;
  double age = 0;  // seconds since it was written
};

std::vector<Beat> read_beats(const std::string& dir) {
  std::vector<Beat> out;
  std::error_code ec;
  const double now = now_s();
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (name.rfind("rank-", 0) != 0 || e.path().extension() == ".tmp") continue;
    std::ifstream f(e.path());
    std::string what;
    Beat b;
    if (!(f >> what >> b.pid >> b.step)) continue;
    struct stat st {};
    if (::stat(e.path().c_str(), &st) != 0) continue;
    b.rank = std::atoll(name.c_str() + 5);
    b.exited = what == "exit";
    b.age = now - (double(st.st_mtim.tv_sec) + 1e-9 * double(st.st_mtim.tv_nsec));
    out.push_back(b);
  }
  return out;
}

// Whether the process exists and is not a zombie (a stopped one is alive).
bool alive(pid_t pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
  std::string all((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  const auto close = all.rfind(')');
  return close != std::string::npos && close + 2 < all.size() && all[close + 2] != 'Z';
}

struct Ended {
  int code = 0;
  int rank = -1;  // the rank that died or hung
  int sig = 0;    // the signal it died of
  bool hung = false;
  double silent_s = 0;  // a hung rank's time without a heartbeat
  pid_t pid = 0;
  int64_t step = 0;  // the step the failed rank was on, as its heartbeat said
};

std::string exe_path(const std::string& argv0) {
  char exe[4096];
  const ssize_t len = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  return len > 0 ? std::string(exe, size_t(len)) : argv0;
}

// mpirun's stderr, passed on, with its boxed notices about a rank that failed or died replaced
// by our own line; any other box (a launch problem) is passed through. Notes the first rank it
// says died of a signal.
void filter_mpirun(FILE* err, int& dead_rank, int& dead_signal) {
  char line[4096];
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
}

// The command line of one run: mpirun with a rank per device, each bound to its share of the
// cores, or this program alone for one device.
std::vector<std::string> launch_args(const Job& job, const std::vector<std::string>& devs,
                                     const std::vector<std::string>& mxn_args) {
  const size_t n = devs.size();
  std::vector<std::string> args;
  const long cores = std::max<long>(1, sysconf(_SC_NPROCESSORS_ONLN));
  const long per_rank = std::max<long>(1, cores / long(std::max<size_t>(n, 1)));
  if (n > 1) {
    args = {"mpirun", "-np", std::to_string(n), "--oversubscribe"};
    if (long(n) <= cores)
      args.insert(args.end(),
                  {"--map-by", "slot:PE=" + std::to_string(per_rank), "--bind-to", "core"});
    else
      args.insert(args.end(), {"--bind-to", "none"});
    if (geteuid() == 0) args.push_back("--allow-run-as-root");
    for (const char* v :
         {"MXN_SUPERVISED", "MXN_ATTEMPT", "MXN_HEARTBEAT_DIR", "MXN_HEARTBEAT_PERIOD"})
      args.insert(args.end(), {"-x", v});
  }
  args.push_back(exe_path(job.argv.at(0)));
  args.insert(args.end(), mxn_args.begin(), mxn_args.end());
  if (n > 1 && job.threads == 0) {  // the cores each rank is bound to
    args.push_back("--threads");
    args.push_back(std::to_string(per_rank));
  }
  return args;
}

// Starts `args` with the supervisor's environment; with several ranks, its stderr into `fds`.
pid_t start_job(std::vector<std::string>& args, bool ranks, int attempt, const std::string& beats,
                double period, int fds[2]) {
  std::vector<char*> cargs;
  for (auto& a : args) cargs.push_back(a.data());
  cargs.push_back(nullptr);
  std::fflush(stdout);
  if (ranks && pipe(fds) != 0)
    throw Error("cannot start mpirun: pipe: " + std::string(std::strerror(errno)));
  const pid_t pid = fork();
  if (pid < 0) throw Error("cannot start the job: fork: " + std::string(std::strerror(errno)));
  if (pid != 0) return pid;
  sigset_t none;  // the job starts with signals as usual
  sigemptyset(&none);
  pthread_sigmask(SIG_SETMASK, &none, nullptr);
  setenv("MXN_SUPERVISED", "1", 1);
  setenv("MXN_ATTEMPT", std::to_string(attempt).c_str(), 1);
  setenv("MXN_HEARTBEAT_DIR", beats.c_str(), 1);
  setenv("MXN_HEARTBEAT_PERIOD", std::to_string(period).c_str(), 1);
  if (ranks) {
    dup2(fds[1], STDERR_FILENO);
    close(fds[0]);
    close(fds[1]);
  }
  execvp(cargs[0], cargs.data());
  std::fprintf(stderr,
               "mxn: error: cannot start %s for --devices (%s); install openmpi-bin, or start "
               "the ranks with your own launcher\n",
               cargs[0], std::strerror(errno));
  _exit(127);
}

// One run of the job. Forwards a stop signal, and stops the whole job when a rank's heartbeat
// goes silent for longer than the timeout.
Ended run_job(const Job& job, const std::vector<std::string>& devs,
              const std::vector<std::string>& mxn_args, int attempt, const std::string& beats) {
  const size_t n = devs.size();
  std::vector<std::string> args = launch_args(job, devs, mxn_args);
  const double period = std::clamp(job.hang_timeout / 5, 0.05, 1.0);
  int fds[2] = {-1, -1};
  const pid_t pid = start_job(args, n > 1, attempt, beats, period, fds);
  Ended e;
  int dead_rank = -1, dead_signal = 0;
  std::thread reader;
  if (n > 1) {
    close(fds[1]);
    reader = std::thread([&, fd = fds[0]] {
      FILE* err = fdopen(fd, "r");
      filter_mpirun(err, dead_rank, dead_signal);
      if (err) std::fclose(err);
    });
  }
  bool forwarded = false, stuck = false;
  double killed_at = 0, gone_since = 0;
  int orphan = -1;  // with a stuck mpirun: the first rank that ended without its exit mark
  int status = 0;
  for (;;) {
    const pid_t r = waitpid(pid, &status, WNOHANG);
    if (r == pid || (r < 0 && errno != EINTR)) break;
    // SIGTERM or SIGUSR1 sent to this process alone: passed on (mpirun hands SIGUSR1 to every
    // rank). Ctrl-C's SIGINT reaches the terminal's whole process group, the ranks included.
    if (stop_signal() && stop_signal() != SIGINT && !forwarded) {
      kill(pid, SIGUSR1);
      forwarded = true;
    }
    const std::vector<Beat> now = read_beats(beats);  // once a poll
    if (job.hang_timeout > 0 && !e.hung) {
      for (const Beat& b : now)
        if (!b.exited && b.age > job.hang_timeout && alive(b.pid)) {  // a dead one: mpirun says
          e = {0, int(b.rank), 0, true, b.age, b.pid, b.step};
          for (const Beat& o : now)
            if (o.pid > 0) kill(o.pid, SIGKILL);  // a stopped process dies of SIGKILL too
          killed_at = now_s();  // mpirun then ends by itself, its ranks' output passed on
          break;
        }
    }
    if (killed_at > 0 && now_s() - killed_at > 10) kill(pid, SIGKILL);
    // Every rank gone while mpirun lives on: seen after a SIGKILL, mpirun 4.1 waiting on a
    // child it never reaps. It is ended after a grace period.
    if (n > 1 && !e.hung) {
      const bool none_left =
          std::any_of(now.begin(), now.end(), [](const Beat& b) { return !b.exited; }) &&
          std::none_of(now.begin(), now.end(), [](const Beat& b) { return alive(b.pid); });
      if (!none_left) {
        gone_since = 0;
      } else if (gone_since == 0) {
        gone_since = now_s();
      } else if (now_s() - gone_since > 5 && !stuck) {
        stuck = true;
        for (const Beat& b : now)
          if (!b.exited && orphan < 0) orphan = int(b.rank);
        kill(pid, SIGKILL);
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  if (reader.joinable()) reader.join();
  e.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  if (e.hung) return e;
  if (n <= 1 && WIFSIGNALED(status)) {
    e.rank = 0;
    e.sig = WTERMSIG(status);
  } else if (dead_rank >= 0 && dead_rank < int(n)) {
    e.rank = dead_rank;
    e.sig = dead_signal;
  } else if (stuck && orphan >= 0) {  // mpirun said nothing before it was ended
    e.rank = orphan;
    e.sig = SIGKILL;
  }
  if (e.rank >= 0)
    for (const Beat& b : read_beats(beats))
      if (b.rank == e.rank) e.step = b.step;
  return e;
}

// The step of the run folder's newest checkpoint (0: none yet).
int64_t checkpoint_step(const std::string& out) {
  const std::string dir = fs::path(newest_checkpoint(out)).filename().string();
  return dir.size() > 5 ? std::atoll(dir.c_str() + 5) : 0;  // ckpt-NNNNNNNN
}

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ",") + x;
  return s;
}

// The command line of a restart: the first one's, resuming from the run folder, on `devs`.
std::vector<std::string> restart_args(const Job& job, const std::vector<std::string>& devs) {
  const bool moved = devs != job.devices;
  std::vector<std::string> drop = {"--resume"};
  if (moved) drop.insert(drop.end(), {"--devices", "--device", "--split", "--plan"});
  std::vector<std::string> out;
  for (size_t i = 1; i < job.argv.size(); ++i) {
    const std::string& a = job.argv[i];
    const auto eq = a.find('=');
    const std::string key = a.substr(0, eq);
    if (std::find(drop.begin(), drop.end(), key) != drop.end()) {
      if (eq == std::string::npos) ++i;  // its value too
      continue;
    }
    out.push_back(a);
  }
  out.insert(out.end(), {"--resume", "auto", "--out", job.out});
  if (moved) out.insert(out.end(), {"--devices", join(devs), "--split", "auto"});
  return out;
}

}  // namespace

int supervise(const Job& job) {
  std::vector<std::string> devs = job.devices;
  const std::string beats = (fs::path(job.out) / ".heartbeat").string();
  std::map<std::string, int64_t> failed_at;  // rank and device -> checkpoint step at its failure
  for (int attempt = 0;; ++attempt) {
    std::error_code ec;
    fs::remove_all(beats, ec);
    fs::create_directories(beats, ec);
    if (ec) throw Error("cannot create " + beats + ": " + ec.message());
    std::vector<std::string> args(job.argv.begin() + 1, job.argv.end());
    if (attempt > 0) args = restart_args(job, devs);
    const Ended e = run_job(job, devs, args, attempt, beats);
    fs::remove_all(beats, ec);  // an attempt's heartbeats end with it
    if (const int sig = stop_signal()) return sig == SIGINT ? 130 : e.code;
    if (!e.hung && e.rank < 0) return e.code;  // finished, or an error a restart would repeat
    const std::string dev = devs.at(size_t(e.rank));
    char cause[512];
    if (e.hung)
      std::snprintf(cause, sizeof(cause),
                    "rank %d (%s) hung: no heartbeat for %.1f s at step %lld (process %d is "
                    "stopped or stuck; hang_timeout %g s)",
                    e.rank, dev.c_str(), e.silent_s, (long long)e.step, int(e.pid),
                    job.hang_timeout);
    else
      std::snprintf(cause, sizeof(cause), "rank %d (%s) died (signal %d: %s)", e.rank, dev.c_str(),
                    e.sig, strsignal(e.sig));
    const int64_t at = checkpoint_step(job.out);
    std::vector<std::string> rest;
    for (size_t i = 0; i < devs.size(); ++i)
      if (int(i) != e.rank) rest.push_back(devs[i]);
    if (attempt >= job.max_restarts) {
      std::string last = newest_checkpoint(job.out);
      if (last.empty()) last = "none was written yet";
      if (rest.empty()) rest = devs;  // one device: try it again
      std::fprintf(
          stderr,
          "mxn: error: %s; the job stopped%s. Last checkpoint: %s. Continue on the "
          "remaining devices with: mxn train --resume %s --devices %s (under Slurm: "
          "MXN_DEVICES=%s sbatch --ntasks %zu examples/slurm/train.sbatch --resume %s)\n",
          cause,
          job.max_restarts > 0 ? (" after " + std::to_string(attempt) + " restarts").c_str() : "",
          last.c_str(), job.out.c_str(), join(rest).c_str(), join(rest).c_str(), rest.size(),
          job.out.c_str());
      return e.code == 0 ? 1 : e.code;
    }
    // A device that fails again before the job made a new checkpoint is left out (if another
    // remains); one that fails after progress had a passing fault and stays.
    const std::string key = std::to_string(e.rank) + " " + dev;  // CPU ranks share a name
    const auto prev = failed_at.find(key);
    const bool drop = prev != failed_at.end() && prev->second == at && devs.size() > 1;
    failed_at[key] = at;
    if (drop) failed_at.clear();  // the ranks after it are numbered anew
    if (drop) devs = rest;
    if (job.on_restart)
      job.on_restart({{"step", at},
                      {"event", "restart"},
                      {"restart", attempt + 1},
                      {"cause", cause},
                      {"rank", e.rank},
                      {"device", dev},
                      {"devices", join(devs)},
                      {"dropped", drop ? dev : ""}});
    std::fprintf(stderr, "mxn: %s; restart %d of %lld from step %lld on %s%s\n", cause, attempt + 1,
                 (long long)job.max_restarts, (long long)at, join(devs).c_str(),
                 drop ? (" (" + dev + " left out: it failed twice without progress)").c_str() : "");
  }
}

}  // namespace mxn
