#pragma once
// mxn serve's routes: the guards every request passes (API key, JSON only), the pages and
// information (/, /health, /metrics, /v1/models), and the two generation endpoints
// (/v1/completions, /v1/chat/completions): body -> typed request (serve/request.h) -> a replica
// -> the answer (serve/answer.h).
#include <atomic>
#include <cstdint>

#include "serve/http_guard.h"
#include "serve/registry.h"
#include "serve/server.h"

namespace mxn {

struct ServeContext {
  const ServeOptions& o;
  Registry& models;
  std::atomic<bool> ready{false};  // every model loaded (or loading on demand: a budget)
  std::atomic<int64_t> next_id{1};
};

void add_routes(GuardedServer& svr, ServeContext& ctx);

}  // namespace mxn
