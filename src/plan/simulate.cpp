#include "plan/simulate.h"

#include <algorithm>

#include "core/error.h"
#include "parallel/schedule.h"

namespace mxn {

PipelineRun simulate_1f1b(const std::vector<StageCost>& stages, int64_t micro, bool keep_events,
                          int64_t grads_final) {
  const int64_t p = int64_t(stages.size());
  MXN_CHECK(p > 0 && micro >= 0, "simulate_1f1b needs a stage and a micro-batch count");
  PipelineRun run;
  run.busy_s.assign(size_t(p), 0.0);
  if (micro == 0) return run;
  const double unknown = -1;
  // Arrival of micro-batch i's activation at stage s (forward) and of its gradient (backward).
  std::vector<double> f_in(size_t(p * micro), unknown), b_in(size_t(p * micro), unknown);
  std::vector<double> free_at(size_t(p), 0.0), link_f(size_t(p), 0.0), link_b(size_t(p), 0.0);
  std::vector<double> b_start(size_t(p * micro), 0.0), last_b_end(size_t(p), 0.0);
  std::vector<int64_t> next(size_t(p), 0);
  for (int64_t i = 0; i < micro; ++i) f_in[size_t(i)] = 0;  // stage 0 reads its data at once
  auto at = [micro](int64_t s, int64_t i) { return size_t(s * micro + i); };
  auto op = [p, micro](int64_t s, int64_t k) { return one_f_one_b(p, s, micro, k); };
  auto event = [&](int s, EventKind k, int64_t i, double a, double b) {
    if (keep_events) run.events.push_back({s, k, i, a, b});
  };
  int64_t left = 2 * p * micro;
  while (left > 0) {
    bool moved = false;
    for (int64_t s = 0; s < p; ++s) {
      while (next[size_t(s)] < 2 * micro) {
        const StageCost& st = stages[size_t(s)];
        const int64_t o = op(s, next[size_t(s)]);
        const bool fwd = o >= 0;
        const int64_t i = fwd ? o : -o - 1;
        const double ready = fwd ? f_in[at(s, i)] : b_in[at(s, i)];
        if (ready < 0) break;
        const double start = std::max(free_at[size_t(s)], ready);
        const double end = start + (fwd ? st.fwd_s : st.bwd_s);
        free_at[size_t(s)] = end;
        run.busy_s[size_t(s)] += end - start;
        event(int(s), fwd ? EventKind::forward : EventKind::backward, i, start, end);
        if (fwd && s + 1 < p) {  // the activation goes down the pipeline
          const double go = std::max(end, link_f[size_t(s)]);
          link_f[size_t(s)] = go + st.send_s;
          f_in[at(s + 1, i)] = go + st.send_s;
          event(int(s), EventKind::send, i, go, go + st.send_s);
        } else if (fwd) {  // the last stage's backward starts from its own loss
          b_in[at(s, i)] = end;
        } else if (s > 0) {  // the activation's gradient goes back up
          const double send = stages[size_t(s - 1)].send_s;
          const double go = std::max(end, link_b[size_t(s)]);
          link_b[size_t(s)] = go + send;
          b_in[at(s - 1, i)] = go + send;
          event(int(s), EventKind::send, i, go, go + send);
        }
        if (!fwd) {
          b_start[at(s, i)] = start;
          last_b_end[size_t(s)] = end;
        }
        ++next[size_t(s)];
        --left;
        moved = true;
      }
    }
    MXN_CHECK(moved, "1F1B schedule deadlocked");  // cannot happen: 1F1B's order is acyclic
  }
  for (int64_t s = 0; s < p; ++s) {
    const StageCost& st = stages[size_t(s)];
    run.last_backward_s = std::max(run.last_backward_s, last_b_end[size_t(s)]);
    // Buckets go as their layers' gradients are final, so the reduce overlaps the last backward
    // (the last grads_final: 1F1B runs a stage's backwards in micro-batch order).
    const double r0 = b_start[at(s, std::max<int64_t>(0, micro - grads_final))];
    const double r1 = std::max(last_b_end[size_t(s)], r0 + st.reduce_s);
    if (st.reduce_s > 0) event(int(s), EventKind::reduce, 0, r0, r1);
    const double o1 = r1 + st.optim_s;
    event(int(s), EventKind::optimizer, 0, r1, o1);
    const double g1 = o1 + st.gather_s;
    if (st.gather_s > 0) event(int(s), EventKind::gather, 0, o1, g1);
    run.step_s = std::max(run.step_s, g1);
  }
  return run;
}

PipelineRun simulate_pipeline(const std::vector<StageCost>& stages, int64_t micro, int64_t chunks,
                              bool keep_events) {
  for (const StageCost& s : stages) chunks = std::min(chunks, s.last - s.first);
  if (chunks <= 1 || stages.size() < 2) return simulate_1f1b(stages, micro, keep_events);
  std::vector<StageCost> pieces = stages;
  for (StageCost& s : pieces) {
    s.fwd_s /= double(chunks);
    s.bwd_s /= double(chunks);
  }
  return simulate_1f1b(pieces, micro * chunks, keep_events, chunks);
}

}  // namespace mxn
