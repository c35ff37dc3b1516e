#include "serve/engine.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace mxn {

namespace {
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t pool_blocks(const EngineOptions& o) {
  const int64_t bs = std::max<int64_t>(o.block, 1);
  return o.blocks > 0 ? o.blocks : o.slots * ceil_div(o.capacity, bs);
}
}  // namespace

Engine::Engine(const DecoderConfig& c, const TensorMap& weights, const std::string& source,
               Device& dev, const EngineOptions& o)
    : cfg_(c), adapters_(int64_t(o.adapters.size())), kv_(pool_blocks(o), o.block) {
  if (o.slots < 1 || o.capacity < 2 || o.chunk < 1)
    throw Error("the engine needs slots >= 1, a capacity >= 2 and a prefill chunk >= 1");
  if (c.gpt2() && o.capacity > c.max_pos)
    throw Error("the model has " + std::to_string(c.max_pos) + " learned positions; a slot of " +
                std::to_string(o.capacity) + " tokens does not fit");
  const int64_t table = 1 + ceil_div(o.capacity, std::max<int64_t>(o.block, 1));
  runner_ = std::make_unique<Runner>(c, weights, source, dev, kv_,
                                     RunnerOptions{o.slots, o.chunk, table, o.weights}, o.adapters);
  SchedulerOptions so{o.slots, o.capacity, o.chunk, o.max_waiting};
  sched_ = std::make_unique<Scheduler>(so, kv_, runner_->load_adapters(o.adapters, kv_));
  post_ = std::make_unique<PostProcessor>(o.slots, c.vocab_size, c.eos);
}

int64_t Engine::submit(EngineRequest r) {
  if (sched_->full()) throw QueueFull{};
  if (r.prompt.empty()) throw Error("the prompt is empty");
  if (r.max_tokens < 1) throw Error("max_tokens must be >= 1");
  if (r.adapter < 0 || r.adapter > adapters_)
    throw Error("adapter " + std::to_string(r.adapter) + " is not one of the engine's " +
                std::to_string(adapters_));
  sched_->check(r);
  for (int32_t t : r.prompt)
    if (t < 0 || t >= cfg_.vocab_size)
      throw Error("prompt token " + std::to_string(t) + " is outside the vocabulary [0, " +
                  std::to_string(cfg_.vocab_size) + ")");
  for (const auto& [t, b] : r.logit_bias)
    if (t < 0 || t >= cfg_.vocab_size || !std::isfinite(b))
      throw Error("logit_bias names token " + std::to_string(t) + ", outside the vocabulary");
  return sched_->submit(std::move(r));
}

std::vector<EngineEvent> Engine::step() {
  const SchedulePlan plan = sched_->schedule();
  std::vector<EngineEvent> events;
  for (int64_t id : plan.cancelled) {
    EngineEvent e;
    e.id = id;
    e.finished = true;
    e.reason = "cancel";
    events.push_back(std::move(e));
  }
  for (size_t i : plan.admitted) {
    runner_->admitted(sched_->seq(i));
    post_->start(i, sched_->seq(i).req);
  }
  if (plan.empty()) return events;
  float* logits = runner_->run(plan, *sched_);
  sched_->ran(plan);
  if (!logits) return events;
  // Logit rows: the decoding requests', then each chunk's that ended its prompt.
  auto sample = [&](size_t slot) {
    EngineEvent e = post_->next(slot, sched_->seq(slot), logits);
    logits += cfg_.vocab_size;
    if (e.finished) sched_->finish(slot);
    events.push_back(std::move(e));
  };
  for (size_t i : plan.decode) sample(i);
  for (const SchedulePlan::Chunk& c : plan.prefill)
    if (c.last) sample(c.slot);
  return events;
}

}  // namespace mxn
