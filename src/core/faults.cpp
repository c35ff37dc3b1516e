#include "core/faults.h"

#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "core/text.h"

namespace mxn {
namespace {

struct Fault {
  int sig = 0;
  std::string where;
  int64_t step = 0, rank = 0;
};

std::atomic<int64_t> g_rank{0}, g_step{0};

// This run's faults (those of MXN_ATTEMPT), parsed once; a malformed entry is reported once and
// ignored, so a typo never turns into a crash of its own.
const std::vector<Fault>& plan() {
  static const std::vector<Fault> faults = [] {
    std::vector<Fault> out;
    const char* spec = std::getenv("MXN_FAULTS");
    if (!spec || !*spec) return out;
    const char* at = std::getenv("MXN_ATTEMPT");
    const int64_t attempt = at ? std::atoll(at) : 0;
    for (const std::string& item : split(spec, ';')) {
      if (item.empty()) continue;
      const std::vector<std::string> f = split(item, ':');
      if (f.size() != 5 || (f[1] != "kill" && f[1] != "hang")) {
        std::fprintf(stderr,
                     "mxn: warning: MXN_FAULTS entry '%s' ignored (expected "
                     "attempt:kill|hang:where:step:rank)\n",
                     item.c_str());
        continue;
      }
      if (std::atoll(f[0].c_str()) != attempt) continue;
      out.push_back({f[1] == "kill" ? SIGKILL : SIGSTOP, f[2], std::atoll(f[3].c_str()),
                     std::atoll(f[4].c_str())});
    }
    return out;
  }();
  return faults;
}

}  // namespace

void fault_set_rank(int64_t rank) { g_rank.store(rank, std::memory_order_relaxed); }
void fault_set_step(int64_t step) { g_step.store(step, std::memory_order_relaxed); }

void fault_point(const char* where, int64_t step) {
  const std::vector<Fault>& faults = plan();
  if (faults.empty()) return;
  if (step < 0) step = g_step.load(std::memory_order_relaxed);
  for (const Fault& f : faults)
    if (f.rank == g_rank.load(std::memory_order_relaxed) && f.step == step && f.where == where) {
      std::fprintf(stderr, "mxn: fault injected: %s at %s of step %lld on rank %lld\n",
                   f.sig == SIGKILL ? "SIGKILL" : "SIGSTOP", where, (long long)step,
                   (long long)f.rank);
      std::fflush(stderr);
      ::kill(::getpid(), f.sig);
    }
}

}  // namespace mxn
