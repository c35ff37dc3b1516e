#include "serve/routes.h"

#include <nlohmann/json.hpp>
#include <string>

#include "core/error.h"
#include "serve/answer.h"
#include "serve/chat_page.h"
#include "serve/http.h"
#include "serve/request.h"

namespace mxn {
namespace {

using json = nlohmann::json;
using Handled = httplib::Server::HandlerResponse;

// Before any route: the API key (all but the page and /health), and JSON bodies only.
void add_guards(GuardedServer& svr, const ServeOptions& o) {
  svr.set_pre_routing_handler([&o](const httplib::Request& req, httplib::Response& res) {
    if (!o.api_key.empty() && req.path != "/" && req.path != "/health" &&
        !same_secret(req.get_header_value("Authorization"), "Bearer " + o.api_key)) {
      send_error(res, 401, "invalid API key: send 'Authorization: Bearer <key>'",
                 "invalid_request_error", "invalid_api_key");
      return Handled::Handled;
    }
    // A web page may POST text/plain to any address without asking first (no CORS preflight);
    // JSON it may not, so only JSON is taken.
    if (req.method == "POST" && !is_json(req.get_header_value("Content-Type"))) {
      send_error(res, 415, "the body must be JSON, sent with 'Content-Type: application/json'");
      GuardedServer::close_after();  // its body is left unread
      return Handled::Handled;
    }
    return Handled::Unhandled;
  });
  svr.set_error_handler([](const httplib::Request&, httplib::Response& res) {
    if (!res.body.empty()) return;
    if (res.status == 413)
      send_error(res, 413, "the request body is too large");
    else if (res.status == 404)
      send_error(res, 404, "no such endpoint", "invalid_request_error", "not_found");
    else
      send_error(res, res.status, "request failed");
  });
}

void health(ServeContext& ctx, httplib::Response& res) {
  if (!ctx.ready) {
    res.status = 503;
    res.set_content(R"({"status":"loading"})", "application/json");
    return;
  }
  const std::vector<std::string> down = ctx.models.down();
  if (down.empty()) return res.set_content(R"({"status":"ok"})", "application/json");
  res.status = 503;  // a model whose every replica failed (each is retried meanwhile)
  res.set_content(dump(json{{"status", "unhealthy"}, {"models_without_replica", down}}),
                  "application/json");
}

void metrics(ServeContext& ctx, httplib::Response& res) {
  const std::string types =
      "# TYPE mxn_requests_running gauge\n# TYPE mxn_requests_waiting gauge\n"
      "# TYPE mxn_batch_slots_used gauge\n# TYPE mxn_batch_slots_free gauge\n"
      "# TYPE mxn_kv_blocks_used gauge\n# TYPE mxn_kv_blocks_cached gauge\n"
      "# TYPE mxn_kv_blocks_free gauge\n# TYPE mxn_prompt_tokens_total counter\n"
      "# TYPE mxn_prefix_cache_tokens_total counter\n# TYPE mxn_engine_steps_total counter\n"
      "# TYPE mxn_generated_tokens_total counter\n# TYPE mxn_requests_cancelled_total counter\n";
  res.set_content(types + ctx.models.metrics(), "text/plain; version=0.0.4");
}

void models(ServeContext& ctx, httplib::Response& res) {
  json data = json::array();
  for (const std::string& name : ctx.models.names())
    data.push_back({{"id", name}, {"object", "model"}, {"created", 0}, {"owned_by", "mxn"}});
  for (const std::string& name : ctx.models.adapters()) {  // as vLLM lists LoRA modules
    const std::string base = name.substr(0, name.rfind(':'));
    data.push_back({{"id", name},
                    {"object", "model"},
                    {"created", 0},
                    {"owned_by", "mxn"},
                    {"root", base},
                    {"parent", base}});
  }
  res.set_content(dump(json{{"object", "list"}, {"data", data}}), "application/json");
}

// The request's model, kept alive by the request; "base:adapter" names an adapter served on base.
std::pair<std::shared_ptr<ServedModel>, int> model_of(ServeContext& ctx, const json& j) {
  if (!j.contains("model") || !j["model"].is_string())
    throw HttpError{400, "'model' is missing (a string naming one of /v1/models)"};
  const std::string name = j["model"].get<std::string>();
  auto found = ctx.models.resolve(name);
  if (!found.first || found.second < 0)
    throw HttpError{404, "the model '" + name.substr(0, 256) + "' does not exist",
                    "invalid_request_error", "model_not_found"};
  return found;
}

// Engine refusals as HTTP answers: 400 (never fits), 429 (queue full), 503 (no replica).
std::pair<Ticket, std::shared_ptr<Channel>> submit(ServeContext& ctx, ServedModel& model,
                                                   const std::string& name, EngineRequest r) {
  try {
    return model.submit(std::move(r));
  } catch (const Error& e) {
    throw HttpError{400, e.what(), "invalid_request_error", ""};
  } catch (const QueueFull&) {
    throw HttpError{429,
                    "the model '" + name + "' has " + std::to_string(ctx.o.max_queue) +
                        " requests waiting (--max-queue); try again later",
                    "rate_limit_error", "queue_full"};
  } catch (const NoReplica&) {
    throw HttpError{503, "every replica of the model '" + name + "' has failed", "server_error",
                    "overloaded"};
  }
}

// /v1/completions and /v1/chat/completions.
void generate(ServeContext& ctx, httplib::Response& res, const httplib::ContentReader& reader,
              bool chat) {
  try {
    const json j = parse_body(read_body(reader, res, ctx.o.max_body));
    const auto [held, adapter] = model_of(ctx, j);
    const uint64_t seed = uint64_t(ctx.next_id.load());
    ApiRequest api =
        chat ? read_chat(j, held->limits(), seed) : read_completion(j, held->limits(), seed);
    api.engine.adapter = adapter;
    AnswerSpec spec;
    spec.chat = chat;
    spec.model = j["model"].get<std::string>();
    spec.n_prompt = int64_t(api.engine.prompt.size());
    spec.logprobs = api.engine.logprobs >= 0;
    spec.stops = api.stops;
    auto [ticket, channel] = submit(ctx, *held, spec.model, std::move(api.engine));
    spec.id = (chat ? "chatcmpl-" : "cmpl-") + std::to_string(ctx.next_id++);
    spec.created = now_s();
    answer(res, api.stream, spec, held, ticket, channel);
  } catch (const HttpError& e) {
    send_error(res, e.status, e.message, e.type, e.code);
  } catch (const std::exception& e) {
    send_error(res, 500, e.what(), "server_error");
  }
}

}  // namespace

void add_routes(GuardedServer& svr, ServeContext& ctx) {
  using Req = httplib::Request;
  using Res = httplib::Response;
  using Reader = httplib::ContentReader;
  add_guards(svr, ctx.o);
  svr.Get("/",
          [](const Req&, Res& res) { res.set_content(kChatPage, "text/html; charset=utf-8"); });
  svr.Get("/health", [&ctx](const Req&, Res& res) { health(ctx, res); });
  svr.Get("/metrics", [&ctx](const Req&, Res& res) { metrics(ctx, res); });
  svr.Get("/v1/models", [&ctx](const Req&, Res& res) { models(ctx, res); });
  // Bodies are read through content readers, bounded decoded (chunked, gzip, deflate, br).
  svr.Post("/v1/completions",
           [&ctx](const Req&, Res& r, const Reader& c) { generate(ctx, r, c, false); });
  svr.Post("/v1/chat/completions",
           [&ctx](const Req&, Res& r, const Reader& c) { generate(ctx, r, c, true); });
  // Any other method with a body gets its 404 without httplib reading the body whole first.
  const auto no_such = [](const Req&, Res& r, const Reader&) {
    send_error(r, 404, "no such endpoint", "invalid_request_error", "not_found");
    GuardedServer::close_after();  // its body is left unread
  };
  svr.Post(".*", no_such).Put(".*", no_such).Patch(".*", no_such).Delete(".*", no_such);
}

}  // namespace mxn
