#include "serve/server.h"

#include <httplib.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>

#include "core/error.h"
#include "serve/http_guard.h"
#include "serve/registry.h"
#include "serve/routes.h"

namespace mxn {
namespace {

std::atomic<bool> g_stop{false};
void on_signal(int) { g_stop = true; }

// A streaming answer holds its worker until it ends: enough workers for every slot of every
// model, and some for the requests that wait (128 at least), /metrics and /health.
HttpLimits http_limits(const ServeOptions& o) {
  HttpLimits limits;
  limits.threads = size_t(std::max<int64_t>(128, 2 * o.slots * int64_t(o.models.size()) + 16));
  limits.per_client = o.max_client_connections;
  return limits;
}

// Without a budget every model loads at the start, after the port is bound: /health says 503
// until they are all in, and a folder that fails to load stops the server with its error.
std::thread load_all(ServeContext& ctx, std::string& error) {
  return std::thread([&ctx, &error] {
    if (ctx.ready) return;
    try {
      for (const std::string& n : ctx.models.names()) ctx.models.get(n);
      ctx.ready = true;
      std::fprintf(stderr, "mxn serve: ready\n");
    } catch (const std::exception& e) {
      error = e.what();
      g_stop = true;
    }
  });
}

}  // namespace

int serve(const ServeOptions& o) {
  if (o.models.empty()) throw Error("mxn serve needs at least one --model NAME=PATH");
  Registry models(o);
  ServeContext ctx{o, models};
  ctx.ready = o.memory_budget > 0;  // with a budget, models load on demand
  GuardedServer svr(http_limits(o));
  svr.set_payload_max_length(o.max_body);
  add_routes(svr, ctx);

  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  std::thread watcher([&] {
    while (!g_stop) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    svr.stop();
  });
  if (!svr.bind_to_port(o.host.c_str(), o.port)) {
    g_stop = true;
    watcher.join();
    throw Error("cannot listen on " + o.host + ":" + std::to_string(o.port) +
                " (in use, or not an address of this machine)");
  }
  std::printf("mxn serve: listening on http://%s:%d (%zu model%s)\n", o.host.c_str(), o.port,
              o.models.size(), o.models.size() == 1 ? "" : "s");
  std::fflush(stdout);
  std::string load_error;
  std::thread loader = load_all(ctx, load_error);
  svr.listen_after_bind();
  svr.shut_down();
  g_stop = true;
  watcher.join();
  loader.join();
  if (!load_error.empty()) throw Error(load_error);
  return 0;
}

}  // namespace mxn
