#include "core/faults.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "core/text.h"

namespace mxn {
namespace {

struct Fault {
  enum Action { kill, hang, sleep, error } action = kill;
  int64_t ms = 0;  // sleep
  std::string where;
  int64_t step = 0, rank = 0;
  bool any_step = false, from_step = false, any_rank = false;

  bool at(const char* w, int64_t s, int64_t r) const {
    const bool place =
        where.back() == '*' ? std::strncmp(w, where.c_str(), where.size() - 1) == 0 : where == w;
    return place && (any_rank || rank == r) && (any_step || (from_step ? s >= step : s == step));
  }
};

std::atomic<int64_t> g_rank{0}, g_step{0};

// One entry, "attempt:action:where:step:rank" (where may hold ':', as a device name does); false
// when it is malformed.
bool parse(const std::string& item, int64_t attempt, std::vector<Fault>& out) {
  const std::vector<std::string> f = split(item, ':');
  if (f.size() < 5 || f[2].empty()) return false;
  const std::string& act = f[1];
  Fault x;
  if (act == "kill" || act == "hang" || act == "error") {
    x.action = act == "kill" ? Fault::kill : act == "hang" ? Fault::hang : Fault::error;
  } else if (act.rfind("sleep=", 0) == 0 && act.size() > 6) {
    x.action = Fault::sleep;
    x.ms = std::atoll(act.c_str() + 6);
  } else {
    return false;
  }
  for (size_t i = 2; i + 2 < f.size(); ++i) x.where += (i > 2 ? ":" : "") + f[i];
  const std::string& step = f[f.size() - 2];
  const std::string& rank = f[f.size() - 1];
  x.any_step = step == "*";
  x.from_step = !step.empty() && step.back() == '+';
  x.step = std::atoll(step.c_str());
  x.any_rank = rank == "*";
  x.rank = std::atoll(rank.c_str());
  if (f[0] == "*" || std::atoll(f[0].c_str()) == attempt) out.push_back(x);
  return true;
}

// This run's faults (those of MXN_ATTEMPT, or of every attempt: '*'), parsed once; a malformed
// entry is reported once and ignored, so a typo never turns into a crash of its own.
const std::vector<Fault>& plan() {
  static const std::vector<Fault> faults = [] {
    std::vector<Fault> out;
    const char* spec = std::getenv("MXN_FAULTS");
    if (!spec || !*spec) return out;
    const char* at = std::getenv("MXN_ATTEMPT");
    const int64_t attempt = at ? std::atoll(at) : 0;
    for (const std::string& item : split(spec, ';'))
      if (!item.empty() && !parse(item, attempt, out))
        std::fprintf(stderr,
                     "mxn: warning: MXN_FAULTS entry '%s' ignored (expected "
                     "attempt:kill|hang|error|sleep=MS:where:step:rank)\n",
                     item.c_str());
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
  const int64_t rank = g_rank.load(std::memory_order_relaxed);
  for (const Fault& f : faults) {
    if (!f.at(where, step, rank)) continue;
    if (f.action == Fault::sleep) {
      std::this_thread::sleep_for(std::chrono::milliseconds(f.ms));
      continue;
    }
    if (f.action == Fault::error)
      throw Error(std::string("an injected fault at ") + where + " of step " +
                  std::to_string(step));
    std::fprintf(stderr, "mxn: fault injected: %s at %s of step %lld on rank %lld\n",
                 f.action == Fault::kill ? "SIGKILL" : "SIGSTOP", where, (long long)step,
                 (long long)rank);
    std::fflush(stderr);
    ::kill(::getpid(), f.action == Fault::kill ? SIGKILL : SIGSTOP);
  }
}

}  // namespace mxn
