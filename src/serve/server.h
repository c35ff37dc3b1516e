#pragma once
// mxn serve: an OpenAI-compatible HTTP server (cpp-httplib) over the serving engine. Each model
// has a replica on each serving device (serve/served_model.h: an engine and a worker thread that
// runs its passes, a router between them); HTTP threads submit requests and wait on their own
// channel of tokens. GET / is a chat page. Endpoints: GET /health, GET /metrics (Prometheus text:
// requests running and waiting, batch slots and KV blocks used, cached and free, prompt tokens
// and those read from shared prefix blocks, tokens made, latency histograms), GET /v1/models,
// POST /v1/completions and POST /v1/chat/completions (with "stream": true as server-sent
// events ending in "data: [DONE]"). Errors have OpenAI's JSON shape and a 4xx status.
#include <string>
#include <utility>
#include <vector>

namespace mxn {

struct ServeOptions {
  std::vector<std::pair<std::string, std::string>> models;  // name, folder (or .gguf, run)
  // Adapters served on a model's replicas beside it, asked for as "base:name":
  // {base, name, PEFT folder or mxn adapter run}.
  struct AdapterSpec {
    std::string base, name, path;
  };
  std::vector<AdapterSpec> adapters;
  std::string host = "127.0.0.1";
  int port = 8080;
  std::vector<std::string> devices{"cpu"};  // a replica of each model on each
  int64_t threads = 0;
  int64_t slots = 8;      // requests decoded together, per model
  int64_t context = 0;    // tokens per request (prompt + output); 0: the model's, at most 2048
  int64_t kv_blocks = 0;  // KV-cache blocks of 16 rows per model; 0: every slot at the context
  // "bf16": 2-D weights stored in bf16 (the CPU backend): half the memory, but a pass of many
  // rows widens them to f32 GEMM by GEMM, slower than "f32" here (docs/benchmarks.md).
  std::string weights = "f32";
  int64_t max_queue = 256;  // requests waiting per model beyond which new ones get 429
  std::string api_key;      // when set, requests (and /metrics) need "Authorization: Bearer <key>"
  int max_client_connections = 256;  // open at once from one address
  size_t max_body = 1 << 20;
  // Device bytes for all loaded models (weights and KV slots); 0: no limit, every model loaded at
  // the start. With a budget models load on first use and idle ones are evicted, least recently
  // used first.
  uint64_t memory_budget = 0;
};

// Loads the models, listens, and serves until SIGINT/SIGTERM. Returns the exit code.
int serve(const ServeOptions& o);

}  // namespace mxn
