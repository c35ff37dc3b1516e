#pragma once
// The serving engine's first part: which requests run in the next pass, decided from the queue of
// waiting requests, the running ones and the KV pool alone (no model, no device), as vLLM's
// Scheduler.schedule() does. schedule() admits the oldest waiting requests while their blocks
// are there (the first ones shared with earlier requests that had the same prompt prefix), lets
// cancelled requests go, gives each decoding request one row and the requests still in prefill
// up to `chunk` prompt rows, oldest first, and returns the pass as a plain SchedulePlan. The
// runner (serve/runner.h) turns the plan into the batch; after the pass, ran() moves each request
// on and publishes the prompt blocks now written in full, and finish() frees a request's slot and
// blocks.
#include <cstdint>
#include <deque>
#include <vector>

#include "serve/engine_types.h"
#include "serve/kv_blocks.h"

namespace mxn {

struct QueueFull {};  // submit() with max_waiting requests already waiting

// What the scheduler must know of a P-Tuning adapter: its prefix's keys, of which the whole blocks
// are pinned in the pool and every request of that adapter starts its table with them.
struct PrefixBlocks {
  int64_t keys = 0;
  std::vector<int32_t> blocks;
};

struct SchedulerOptions {
  int64_t slots = 1;        // requests running at once (rows of the decode batch)
  int64_t capacity = 2;     // the most tokens a request holds: prompt and output
  int64_t chunk = 256;      // prompt rows a pass, over every request in prefill
  int64_t max_waiting = 0;  // 0: no limit
};

// A running request as the scheduler keeps it: one slot of the batch.
struct Seq {
  bool used = false;
  int64_t id = 0;
  EngineRequest req;
  int64_t len = 0;    // cache rows filled
  int64_t fed = 0;    // prompt tokens fed
  int64_t made = 0;   // tokens made
  int32_t next = -1;  // the token to feed next (decoding)
  bool cancelled = false;
  std::vector<int32_t> blocks;  // the block table
  int64_t published = 0;        // leading prompt blocks offered to later requests
  int64_t key0 = 0;             // keys before the prompt's (a P-Tuning prefix)
  bool share = true;            // its prompt blocks may be offered (not behind a prefix)

  bool prefilling() const { return fed < int64_t(req.prompt.size()); }
};

// One pass, in the order of its rows: a row for each decoding slot, then each prefill chunk.
struct SchedulePlan {
  struct Chunk {
    size_t slot = 0;
    int64_t from = 0, rows = 0;  // prompt tokens [from, from + rows)
    bool last = false;           // ends the prompt: its last row's logits start the answer
  };
  std::vector<int64_t> cancelled;  // requests that left before the pass (slots and blocks freed)
  std::vector<size_t> admitted;    // slots that took a waiting request
  std::vector<size_t> decode;      // slots that feed their next token
  std::vector<Chunk> prefill;      // oldest request first
  int64_t rows() const;
  int64_t logit_rows() const;  // decode rows, then each chunk that ends its prompt
  bool empty() const { return decode.empty() && prefill.empty(); }
};

class Scheduler {
 public:
  // `kv` is the pool the scheduler takes blocks from; `prefixes` the P-Tuning adapters (by adapter
  // number - 1; LoRA adapters have keys 0).
  Scheduler(const SchedulerOptions& o, KvBlocks& kv, std::vector<PrefixBlocks> prefixes = {});

  // An Error when the request can never fit: prompt + max_tokens over the capacity (less its
  // adapter's prefix) or over the whole pool.
  void check(const EngineRequest& r) const;
  bool full() const { return o_.max_waiting > 0 && waiting() >= o_.max_waiting; }
  // Queues a request (checked as above); returns its id. QueueFull when full().
  int64_t submit(EngineRequest r);
  void cancel(int64_t id);       // a waiting one leaves now; a running one at the next schedule()
  std::vector<int64_t> reset();  // every request leaves (their ids); their blocks are freed
  SchedulePlan schedule();
  // After the pass: its rows are in the cache (each decoding request one more, each chunk's
  // prompt rows); prompt blocks now written in full are published for later requests.
  void ran(const SchedulePlan& p);
  void finish(size_t slot);  // the request's slot and blocks are free

  Seq& seq(size_t slot) { return slots_[slot]; }
  const Seq& seq(size_t slot) const { return slots_[slot]; }
  int64_t slots() const { return int64_t(slots_.size()); }
  int64_t running() const { return running_; }
  int64_t waiting() const { return int64_t(waiting_.size()); }
  bool idle() const { return waiting_.empty() && running_ == 0; }
  const KvBlocks& kv() const { return kv_; }
  int64_t prompt_tokens() const { return prompt_tokens_; }  // admitted so far
  int64_t reused_tokens() const { return reused_tokens_; }  // of those, read from shared blocks

 private:
  bool admit(Seq& s);  // the front waiting request into s, when its blocks are there
  const PrefixBlocks* prefix_of(const EngineRequest& r) const;  // its P-Tuning prefix, if any

  SchedulerOptions o_;
  KvBlocks& kv_;
  std::vector<PrefixBlocks> prefixes_;
  std::vector<Seq> slots_;
  std::deque<std::pair<int64_t, EngineRequest>> waiting_;
  int64_t running_ = 0, next_id_ = 1, prompt_tokens_ = 0, reused_tokens_ = 0;
};

}  // namespace mxn
