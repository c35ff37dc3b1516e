#pragma once
// The serving engine: continuous batching over one model on one device, in three parts as vLLM
// keeps them. The scheduler (serve/scheduler.h) decides each pass from the queue and the paged KV
// pool (serve/kv_blocks.h): a request takes a slot (a row of the batch) and a table of blocks,
// enough for its prompt and max_tokens when it is admitted, the first ones shared with earlier
// requests that had the same prompt prefix; each pass holds one row for each decoding request
// plus up to `chunk` prompt rows of the requests still in prefill, oldest first (chunked
// prefill). The runner (serve/runner.h) turns the plan into the batch and runs the model graph;
// post-processing (serve/postprocess.h) turns each logits row into a token and an event. New
// requests join between steps; a finished or cancelled one frees its slot and its blocks at once.
#include <memory>
#include <string>
#include <vector>

#include "backend/device.h"
#include "infer/adapter.h"
#include "io/safetensors.h"
#include "models/decoder.h"
#include "serve/engine_types.h"
#include "serve/kv_blocks.h"
#include "serve/postprocess.h"
#include "serve/runner.h"
#include "serve/scheduler.h"

namespace mxn {

struct EngineOptions {
  int64_t slots = 1;        // requests decoding together
  int64_t capacity = 2;     // the most tokens of a request: prompt and output
  int64_t chunk = 256;      // prompt rows a pass
  int64_t blocks = 0;       // KV blocks in the pool (0: enough for every slot at capacity)
  int64_t block = 16;       // rows a block
  int64_t max_waiting = 0;  // submit() throws QueueFull past this many waiting (0: no limit)
  // LoRA or P-Tuning v2, numbered from 1, served in the same batches as the base: LoRA ranks
  // stacked beside the frozen weights, each row masked to its own adapter's; a P-Tuning
  // prefix's keys and values written once into cache blocks that its requests' tables start with.
  std::vector<Adapter> adapters;
  DType weights = DType::f32;  // bf16: 2-D weights stored in bf16 (the CPU backend)
};

class Engine {
 public:
  Engine(const DecoderConfig& c, const TensorMap& weights, const std::string& source, Device& dev,
         const EngineOptions& o);

  // Queues a request; returns its id. An Error when it can never fit (prompt + max_tokens over
  // the capacity or over the whole cache) or holds a token outside the vocabulary; QueueFull
  // when max_waiting requests wait.
  int64_t submit(EngineRequest r);
  void cancel(int64_t id) { sched_->cancel(id); }  // leaves at the next step
  // Drops every request, running and waiting (their ids, for the caller to end them), and frees
  // their blocks: after a failed pass, before the engine is tried again.
  std::vector<int64_t> reset() { return sched_->reset(); }
  // One forward pass (admitting queued requests into free slots first); returns the tokens made.
  std::vector<EngineEvent> step();
  bool idle() const { return sched_->idle(); }
  int64_t slots_in_use() const { return sched_->running(); }
  int64_t waiting() const { return sched_->waiting(); }
  int64_t slots() const { return sched_->slots(); }
  const KvBlocks& kv() const { return kv_; }
  int64_t prompt_tokens() const { return sched_->prompt_tokens(); }  // admitted so far
  int64_t reused_tokens() const { return sched_->reused_tokens(); }  // of those, from shared blocks

 private:
  DecoderConfig cfg_;
  int64_t adapters_ = 0;
  KvBlocks kv_;
  std::unique_ptr<Runner> runner_;
  std::unique_ptr<Scheduler> sched_;
  std::unique_ptr<PostProcessor> post_;
};

}  // namespace mxn
