#pragma once
// One pipeline replica's training step, event by event: a 1F1B schedule (each stage warms up
// with p - s - 1 forwards, then alternates one forward and one backward, then drains), each
// activation and activation gradient sent over its stage boundary's link (one message at a time
// per direction), then the gradient reduce of every stage's weights (it may start during the
// last backward: buckets go as their layers finish), the optimizer on the stage's shard, and
// with ZeRO-1 the all-gather of the updated weights. The planner prices layouts with it; the
// timeline SVG draws its events.
#include <cstdint>
#include <vector>

namespace mxn {

struct StageCost {
  int group = 0;                // the cluster group of the stage's chip
  int64_t first = 0, last = 0;  // its layers, [first, last)
  bool recompute = false;       // activations recomputed in the backward (only inputs kept)
  int64_t tp = 1;               // chips of the stage: a tensor-parallel group of one type
  double fwd_s = 0, bwd_s = 0;  // one micro-batch; bwd_s includes the recomputation
  double send_s = 0;            // one micro-batch's activation to the next stage (and back)
  double reduce_s = 0;          // gradient all-reduce (ZeRO-1: reduce-scatter)
  double optim_s = 0;           // AdamW over the stage's (sharded) state
  double gather_s = 0;          // ZeRO-1: all-gather of the updated weights; 0 otherwise
  double tp_s = 0;              // of fwd_s + bwd_s: the tensor-parallel group's all-reduces
  double params = 0;            // weights each of its chips holds
  double mem_bytes = 0;         // its predicted peak
};

enum class EventKind { forward, backward, send, reduce, optimizer, gather };

struct Event {
  int stage = 0;
  EventKind kind = EventKind::forward;
  int64_t micro = 0;
  double start = 0, end = 0;
};

struct PipelineRun {
  double last_backward_s = 0;  // when the last stage's work of the micro-batches ended
  double step_s = 0;           // when the slowest stage finished its optimizer (and gather)
  std::vector<double> busy_s;  // per stage: compute seconds (forward + backward)
  std::vector<Event> events;   // with keep_events
};

// `micro` micro-batches through `stages` (at least one); micro 0 is an idle replica (step 0).
// `grads_final`: the stage's gradients are final in parts over its last that many backward
// passes (a chunk's each, interleaved), so its reduce starts with the first of them; 1: buckets
// go during the last backward.
PipelineRun simulate_1f1b(const std::vector<StageCost>& stages, int64_t micro,
                          bool keep_events = false, int64_t grads_final = 1);

// Megatron-LM's interleaved 1F1B: each stage holds `chunks` model chunks (virtual stages), so a
// micro-batch visits every device `chunks` times with 1/chunks of its work each; priced as
// 1F1B over chunks x micro pieces of that size, which keeps the schedule's work and divides its
// bubble, (p - 1)(f + b), by the chunks. At most the fewest layers a stage holds; 1: plain 1F1B.
// A chunk's gradient reduce starts once its last backward is done (Megatron-LM launches each
// chunk's grad sync then): priced as the reduce starting with the stage's chunks-th last
// backward piece, earlier than 1F1B's last one (in Megatron's order the chunks finish p pieces
// apart, so this is the cautious side).
PipelineRun simulate_pipeline(const std::vector<StageCost>& stages, int64_t micro, int64_t chunks,
                              bool keep_events = false);

}  // namespace mxn
