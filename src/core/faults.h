#pragma once
// Fault injection, for the fault tests (tests/faults) and bench/faults.sh: MXN_FAULTS holds
// faults separated by ';', each "attempt:action:where:step:rank". In run `attempt` of a
// supervised job (MXN_ATTEMPT, which `mxn train --max-restarts` sets; 0 for the first run), rank
// `rank` kills itself (action kill: SIGKILL) or stops (hang: SIGSTOP) when it reaches point
// `where` of step `step`: start (before the first step), step (inside a step, between the
// backward and the optimizer), allreduce (a gradient bucket's all-reduce posted, not finished),
// ckpt (a checkpoint half-written). Without MXN_FAULTS every point is one relaxed load.
#include <cstdint>

namespace mxn {

void fault_set_rank(int64_t rank);
void fault_set_step(int64_t step);  // the step now running (the trainer sets it)
// A point in the code; `step` -1: the one now running.
void fault_point(const char* where, int64_t step = -1);

}  // namespace mxn
