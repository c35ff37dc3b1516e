#pragma once
// Fault injection, for the fault tests (tests/faults) and bench/faults.sh: MXN_FAULTS holds
// faults separated by ';', each "attempt:action:where:step:rank". In run `attempt` of a
// supervised job (MXN_ATTEMPT, which `mxn train --max-restarts` sets; 0 for the first run), rank
// `rank` kills itself (action kill: SIGKILL) or stops (hang: SIGSTOP) when it reaches point
// `where` of step `step`: start (before the first step), step (inside a step, between the
// backward and the optimizer), allreduce (a gradient bucket's all-reduce posted, not finished),
// ckpt (a checkpoint half-written). Without MXN_FAULTS every point is one relaxed load.
// The same entries are the tests' switches: action "sleep=MS" waits there (a slow chip, a slow
// load, a wide window), "error" throws an Error there (a failing pass); attempt "*" is every
// attempt, step "*" every step and "N+" step N on, rank "*" every rank, and a place ending in '*'
// every place that starts so. More points: compute (the
// start of a training step), serve_load (a model loading for mxn serve), serve_step@DEVICE (a
// serving pass on that device; its steps counted from 1).
#include <cstdint>

namespace mxn {

void fault_set_rank(int64_t rank);
void fault_set_step(int64_t step);  // the step now running (the trainer sets it)
// A point in the code; `step` -1: the one now running.
void fault_point(const char* where, int64_t step = -1);

}  // namespace mxn
