#pragma once
// Surviving faults: stop signals, the ranks' heartbeats, and the process that starts a job's
// ranks, watches them and restarts the job from its last checkpoint (`mxn train --devices ...`,
// `--max-restarts N`).
#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace mxn {

// SIGINT, SIGTERM and SIGUSR1 (what Slurm's --signal sends) ask training to stop after the
// current step, with a checkpoint. They are blocked in every thread (threads made later inherit
// the mask) and taken by one thread that waits for them, so a signal never interrupts a kernel:
// a handler run on whichever thread it hit used to corrupt oneDNN 2.6's sgemm on AVX-512 about one
// run in eight. A supervisor forwards them to its job as SIGUSR1.
void watch_stop_signals();
int stop_signal();  // the first stop signal this process took; 0: none

// A rank's heartbeat: with MXN_HEARTBEAT_DIR set (by the supervisor), a thread rewrites
// DIR/rank-R with "pid step" every `period` seconds, and "exit" when the rank ends by returning
// (an error included), so the supervisor tells a rank that hangs (SIGSTOP, a stuck device) from
// one that waits in a collective, and one that died from one that quit.
class Heartbeat {
 public:
  Heartbeat(int64_t rank, double period);
  ~Heartbeat();
  void step(int64_t s);
  Heartbeat(const Heartbeat&) = delete;
  Heartbeat& operator=(const Heartbeat&) = delete;

 private:
  struct State;
  State* s_ = nullptr;
};

struct Job {
  std::vector<std::string> devices;  // one rank each; one device: this program alone
  std::vector<std::string> argv;     // this program's command line (argv[0] first)
  std::string out;                   // the run folder
  int64_t threads = 0;               // 0: each rank gets its share of the cores
  int64_t max_restarts = 0;
  double hang_timeout = 0;  // seconds without a heartbeat (0: never)
  // Each restart, as a row for the run's record ({"event": "restart", "step", "cause", ...}).
  std::function<void(const nlohmann::json& row)> on_restart;
};

// Runs the job; when a rank dies or hangs, says which (rank, device, signal or silence) and, up
// to max_restarts times, starts it again from the run folder's newest good checkpoint: on the
// same devices, or without a device that failed twice with no new checkpoint in between. Each
// restart is passed to job.on_restart (`mxn train` writes it to metrics.jsonl). Returns the exit
// code.
int supervise(const Job& job);

}  // namespace mxn
