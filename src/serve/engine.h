#pragma once
// The serving engine's core: continuous batching over one model on one device. The KV cache is
// paged (serve/kv_blocks.h): one device buffer of blocks of rows; a request takes a slot (a row
// of the batch) and a table of blocks, enough for its prompt and max_tokens when it is admitted,
// the first ones shared with earlier requests that had the same prompt prefix. Every step() is
// one forward pass that holds one row for each decoding request plus up to `chunk` prompt rows
// of the requests still in prefill, oldest first (chunked prefill: a long prompt takes several
// passes and does not stall the others).
// Each row names its cache row and sees only its own request's keys through its block table
// (ATTENTION mask 5, SET_ROWS with destination rows), so a request's tokens do not depend on
// what else is in the batch. New requests join between steps; a finished or cancelled one
// frees its slot and its blocks at once.
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "backend/device.h"
#include "graph/program.h"
#include "infer/adapter.h"
#include "infer/generate.h"
#include "io/safetensors.h"
#include "models/decoder.h"
#include "serve/kv_blocks.h"

namespace mxn {

struct EngineRequest {
  std::vector<int32_t> prompt;
  int64_t max_tokens = 16;
  SamplingOptions sampling;
  bool ignore_eos = false;
  std::vector<int32_t> stop_ids;  // ends the request too, like the model's eos (a chat turn's end)
  // OpenAI's penalties on the logits of tokens already generated: presence once a token has
  // appeared, frequency times its count.
  float presence_penalty = 0, frequency_penalty = 0;
  std::vector<std::pair<int32_t, float>> logit_bias;  // OpenAI's: added to those tokens' logits
  int64_t logprobs = -1;  // >= 0: each token's log-probability and this many alternatives
  int adapter = 0;        // 0: the base model; k: the engine's k-th adapter
};

struct EngineEvent {
  int64_t id = 0;
  int32_t token = -1;     // -1: none (the request ended without one, e.g. cancelled)
  bool finished = false;  // the request's last event
  std::string reason;     // with finished: "length", "stop" (an end-of-sequence token), "cancel"
                          // (or "error", from a server whose replica failed; `error` says why)
  std::string error;
  float logprob = 0;  // with EngineRequest::logprobs >= 0: log p(token) under the model
  std::vector<std::pair<int32_t, float>> top;  // the likeliest tokens and their log-probabilities
};

class Engine {
 public:
  // `slots` requests decode together, each of at most `capacity` tokens (prompt and output);
  // the cache holds `blocks` blocks of `block` rows (0: enough for every slot at capacity).
  // `adapters` (LoRA or P-Tuning v2, numbered from 1) serve requests in the same batches as the
  // base: LoRA ranks stacked beside the frozen weights, each row masked to its own adapter's;
  // a P-Tuning prefix's keys and values written once into cache blocks that its requests'
  // tables start with.
  Engine(const DecoderConfig& c, const TensorMap& weights, const std::string& source, Device& dev,
         int64_t slots, int64_t capacity, int64_t chunk = 256, int64_t blocks = 0,
         int64_t block = 16, const std::vector<Adapter>& adapters = {},
         DType weight_dtype = DType::f32);  // bf16: 2-D weights stored in bf16 (the CPU backend)

  // Queues a request; returns its id. An Error when it can never fit (prompt + max_tokens over
  // the capacity or over the whole cache) or holds a token outside the vocabulary.
  int64_t submit(EngineRequest r);
  void cancel(int64_t id);  // leaves at the next step; its slot is free at once
  // Drops every request, running and waiting (their ids, for the caller to end them), and frees
  // their blocks: after a failed pass, before the engine is tried again.
  std::vector<int64_t> reset();
  // One forward pass (admitting queued requests into free slots first); returns the tokens made.
  std::vector<EngineEvent> step();
  bool idle() const { return waiting_.empty() && active_ == 0; }
  int64_t slots_in_use() const { return active_; }
  int64_t waiting() const { return int64_t(waiting_.size()); }
  int64_t slots() const { return int64_t(slots_.size()); }
  const KvBlocks& kv() const { return kv_; }
  int64_t prompt_tokens() const { return prompt_tokens_; }  // admitted so far
  int64_t reused_tokens() const { return reused_tokens_; }  // of those, read from shared blocks

 private:
  struct Slot {
    bool used = false;
    int64_t id = 0, len = 0, fed = 0,
            made = 0;  // cache rows filled; prompt tokens fed; tokens made
    EngineRequest req;
    std::unique_ptr<Sampler> sampler;
    int32_t next = -1;                                // the token to feed next (decoding)
    std::vector<std::pair<int32_t, int32_t>> counts;  // generated token -> times (penalties)
    bool cancelled = false;
    std::vector<int32_t> blocks;  // the block table
    int64_t published = 0;        // leading prompt blocks offered to later requests
    int64_t key0 = 0;             // keys before the prompt's (a P-Tuning prefix)
    bool share = true;            // its prompt blocks may be offered (not behind a prefix)
  };
  struct Served {  // an adapter as the engine holds it
    bool prefix = false;
    int64_t off = 0, r = 0;  // LoRA: its columns of the stacked ranks
    float scale = 0;
    int64_t P = 0;                         // P-Tuning: prefix keys, the whole blocks of them pinned
    std::vector<int32_t> blocks;           // ...
    std::vector<std::vector<float>> tail;  // ... and each layer's k, v rows past the last one
  };
  void setup_adapters(const std::vector<Adapter>& adapters);
  void upload_rows(int value, int64_t row0, const float* src, int64_t rows);
  bool admit(Slot& s);  // the front waiting request into s, when its blocks are there
  void release(Slot& s);
  int variant_for(int64_t rows, int64_t logit_rows);
  Graph graph(int64_t rows, int64_t logit_rows, DecoderGraph* m) const;

  DecoderConfig cfg_;
  Device& dev_;
  int64_t capacity_, chunk_, max_rows_, active_ = 0, next_id_ = 1;
  int64_t table_w_, prompt_tokens_ = 0, reused_tokens_ = 0;
  KvBlocks kv_;
  DType weights_;
  int64_t lora_rank_ = 0;                  // the adapters' stacked LoRA ranks
  std::vector<std::string> lora_targets_;  // every module one of them adapts
  std::vector<Served> adapters_;
  std::vector<float> mask_;
  DecoderGraph m_;
  std::unique_ptr<Program> prog_;
  std::vector<int> variants_;  // by (rows - 1) * max_rows_ + logit_rows - 1; -1 until built
  std::vector<Slot> slots_;
  std::deque<std::pair<int64_t, EngineRequest>> waiting_;
  std::vector<int32_t> tokens_, positions_, cache_rows_, tables_, last_rows_;
  std::vector<float> logits_;
};

}  // namespace mxn
