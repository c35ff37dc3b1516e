#include "serve/server.h"

#include <httplib.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "core/error.h"
#include "data/chat.h"
#include "data/tokenizer.h"
#include "infer/model.h"
#include "io/hf_folder.h"
#include "serve/answer.h"
#include "serve/chat_page.h"
#include "serve/engine.h"
#include "serve/http_guard.h"
#include "serve/request.h"
#include "serve/served_model.h"

namespace mxn {
namespace {

using json = nlohmann::json;

std::atomic<bool> g_stop{false};
void on_signal(int) { g_stop = true; }

// JSON text with invalid UTF-8 (a byte-level token's piece) replaced, never an exception.
std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

void send_error(httplib::Response& res, int status, const std::string& message,
                const std::string& type = "invalid_request_error", const std::string& code = "") {
  res.status = status;
  json e = {{"message", message}, {"type", type}, {"param", nullptr}};
  e["code"] = code.empty() ? json(nullptr) : json(code);
  res.set_content(dump(json{{"error", e}}), "application/json");
}

// Compares a client's secret with ours in time that does not depend on where they differ.
bool same_secret(const std::string& given, const std::string& ours) {
  unsigned char diff = given.size() != ours.size();
  for (size_t i = 0; i < ours.size(); ++i)
    diff |= uint8_t(ours[i] ^ (i < given.size() ? given[i] : 0));
  return diff == 0;
}

bool is_json(std::string type) {
  for (char& c : type) c = char(std::tolower(uint8_t(c)));
  return type.rfind("application/json", 0) == 0 &&
         (type.size() == 16 || type[16] == ';' || type[16] == ' ');
}

// A request's body, decoded, at most `max` bytes however it is framed: 413 past that, 400 when
// its framing or compression is broken or it came too slowly.
std::string read_body(const httplib::ContentReader& reader, httplib::Response& res, size_t max) {
  std::string body;
  bool over = false;
  const bool ok = reader([&](const char* data, size_t n) {
    if (n > max - body.size()) return !(over = true);
    body.append(data, n);
    return true;
  });
  if (over || res.status == 413) {
    GuardedServer::close_after();  // the rest of it is left unread
    throw HttpError{413, "the request body is too large: over " + std::to_string(max) +
                             " bytes (after decompression)"};
  }
  if (!ok) {
    GuardedServer::close_after();
    throw HttpError{400,
                    "the request body could not be read (broken chunked or compressed "
                    "framing, or it did not arrive in time)"};
  }
  return body;
}

int64_t now_s() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// The served models by name: each loaded on first use; when loading one would pass the memory
// budget, the least recently used idle ones are let go first (a busy one is never dropped).
class Registry {
 public:
  explicit Registry(const ServeOptions& o) : o_(o) {
    for (const auto& [name, path] : o.models) {
      if (entries_.count(name)) throw Error("model name '" + name + "' is given twice");
      if (!std::filesystem::exists(path))
        throw Error("model '" + name + "': '" + path + "' does not exist");
      entries_[name].path = path;
    }
    for (const ServeOptions::AdapterSpec& a : o.adapters) {
      const std::string id = a.base + ":" + a.name;
      if (!entries_.count(a.base))
        throw Error("adapter '" + id + "': no model named '" + a.base + "' (give it with --model)");
      if (!std::filesystem::exists(a.path))
        throw Error("adapter '" + id + "': '" + a.path + "' does not exist");
      if (std::find(adapters_.begin(), adapters_.end(), id) != adapters_.end())
        throw Error("adapter '" + id + "' is given twice");
      adapters_.push_back(id);
    }
  }
  const std::vector<std::string>& adapters() const { return adapters_; }  // "base:name"
  // A request's model: a served name, or "base:adapter" for an adapter served on base. The
  // model (nullptr: none such) and the engine's adapter number.
  std::pair<std::shared_ptr<ServedModel>, int> resolve(const std::string& name) {
    std::string base = name, adapter;
    if (!entries_.count(name) && name.rfind(':') != std::string::npos) {
      base = name.substr(0, name.rfind(':'));
      adapter = name.substr(name.rfind(':') + 1);
      if (std::find(adapters_.begin(), adapters_.end(), name) == adapters_.end()) return {};
    }
    std::shared_ptr<ServedModel> m = get(base);
    if (!m) return {};
    return {m, m->adapter_id(adapter)};
  }
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& [n, e] : entries_) out.push_back(n);
    return out;
  }
  // nullptr: no such model. HttpError 503 when the budget cannot make room (all busy). A model
  // loads outside the registry's lock: requests for other models go on meanwhile, and those for
  // the same one wait for it.
  std::shared_ptr<ServedModel> get(const std::string& name) {
    std::unique_lock<std::mutex> l(m_);
    auto it = entries_.find(name);
    if (it == entries_.end()) return nullptr;
    Entry& e = it->second;
    e.last = ++clock_;
    loaded_.wait(l, [&] { return !e.loading; });
    if (e.model) return e.model;
    const uint64_t need = estimate(e.path);
    make_room(name, need);
    e.loading = true;
    e.bytes = need;  // held for it while it loads, so a concurrent load cannot take the room
    l.unlock();
    std::shared_ptr<ServedModel> m;
    try {
      std::fprintf(stderr, "loading %s from %s\n", name.c_str(), e.path.c_str());
      if (const char* ms = std::getenv("MXN_TEST_SERVE_LOAD_MS"))  // tests: a slow load
        std::this_thread::sleep_for(std::chrono::milliseconds(std::atoi(ms)));
      m = std::make_shared<ServedModel>(name, e.path, o_);
    } catch (...) {
      l.lock();
      e.loading = false;
      e.bytes = 0;
      loaded_.notify_all();
      throw;
    }
    l.lock();
    e.model = m;
    e.bytes = m->bytes();
    e.loading = false;
    ++e.loads;
    loaded_.notify_all();
    return m;
  }
  // The loaded models none of whose replicas is up.
  std::vector<std::string> down() {
    std::lock_guard<std::mutex> l(m_);
    std::vector<std::string> out;
    for (const auto& [n, e] : entries_)
      if (e.model && !e.model->healthy()) out.push_back(n);
    return out;
  }
  std::string metrics() {
    std::lock_guard<std::mutex> l(m_);
    std::string out =
        "# TYPE mxn_model_loaded gauge\n# TYPE mxn_model_loads_total counter\n"
        "# TYPE mxn_model_bytes gauge\n";
    for (const auto& [n, e] : entries_) {
      const std::string lbl = "{model=\"" + n + "\"}";
      out += "mxn_model_loaded" + lbl + (e.model ? " 1\n" : " 0\n");
      out += "mxn_model_loads_total" + lbl + " " + std::to_string(e.loads) + "\n";
      out += "mxn_model_bytes" + lbl + " " + std::to_string(e.model ? e.bytes : 0) + "\n";
    }
    for (const auto& [n, e] : entries_)
      if (e.model) out += e.model->metrics();
    return out;
  }

 private:
  struct Entry {
    std::string path;
    std::shared_ptr<ServedModel> model;
    bool loading = false;
    uint64_t last = 0, bytes = 0;
    int64_t loads = 0;
  };
  // A Hugging Face folder's size before loading it (others are known once loaded).
  uint64_t estimate(const std::string& path) const {
    if (!std::filesystem::exists(std::filesystem::path(path) / "config.json")) return 0;
    const DecoderConfig c = load_hf_config(path);
    return ServedModel::bytes_of(
               c, ServedModel::kv_blocks(
                      o_, std::min<int64_t>(c.max_pos, o_.context > 0 ? o_.context : 2048))) *
           o_.devices.size();
  }
  void make_room(const std::string& name, uint64_t need) {
    if (o_.memory_budget == 0) return;
    while (true) {
      uint64_t used = 0;
      for (const auto& [n, e] : entries_) used += e.model || e.loading ? e.bytes : 0;
      if (used + need <= o_.memory_budget) return;
      Entry* lru = nullptr;
      for (auto& [n, e] : entries_)
        if (e.model && n != name && e.model.use_count() == 1 && e.model->idle() &&
            (!lru || e.last < lru->last))
          lru = &e;
      if (!lru) {
        if (used == 0) return;  // alone it does not fit: load it anyway, the budget is a soft one
        throw HttpError{503, "the model memory budget is full and every loaded model is busy",
                        "server_error", "overloaded"};
      }
      lru->model.reset();
    }
  }
  const ServeOptions& o_;
  std::mutex m_;
  std::condition_variable loaded_;
  std::map<std::string, Entry> entries_;
  std::vector<std::string> adapters_;
  uint64_t clock_ = 0;
};

}  // namespace

int serve(const ServeOptions& o) {
  if (o.models.empty()) throw Error("mxn serve needs at least one --model NAME=PATH");
  // The HTTP threads share the cores with the passes: GEMMs split dynamically (matmul.cpp), unless
  // the environment says otherwise.
  setenv("MXN_CPU_GEMM_SPLIT", "1", 0);
  Registry models(o);
  // Without a budget every model loads at the start, after the port is bound: /health says 503
  // until they are all in, and a folder that fails to load stops the server with its error.
  std::atomic<bool> ready{o.memory_budget > 0};
  std::string load_error;
  std::atomic<int64_t> next_id{1};
  HttpLimits limits;
  // A streaming answer holds its worker until it ends: enough workers for every slot of every
  // model, and some for the requests that wait (128 at least), /metrics and /health.
  limits.threads = size_t(std::max<int64_t>(128, 2 * o.slots * int64_t(o.models.size()) + 16));
  limits.per_client = o.max_client_connections;
  GuardedServer svr(limits);
  svr.set_payload_max_length(o.max_body);
  svr.set_pre_routing_handler([&](const httplib::Request& req, httplib::Response& res) {
    if (!o.api_key.empty() && req.path != "/" && req.path != "/health" &&
        !same_secret(req.get_header_value("Authorization"), "Bearer " + o.api_key)) {
      send_error(res, 401, "invalid API key: send 'Authorization: Bearer <key>'",
                 "invalid_request_error", "invalid_api_key");
      return httplib::Server::HandlerResponse::Handled;
    }
    // A web page may POST text/plain to any address without asking first (no CORS preflight);
    // JSON it may not, so only JSON is taken.
    if (req.method == "POST" && !is_json(req.get_header_value("Content-Type"))) {
      send_error(res, 415, "the body must be JSON, sent with 'Content-Type: application/json'");
      GuardedServer::close_after();  // its body is left unread
      return httplib::Server::HandlerResponse::Handled;
    }
    return httplib::Server::HandlerResponse::Unhandled;
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
  svr.Get("/", [](const httplib::Request&, httplib::Response& res) {
    res.set_content(kChatPage, "text/html; charset=utf-8");
  });
  svr.Get("/health", [&](const httplib::Request&, httplib::Response& res) {
    if (!ready) {
      res.status = 503;
      res.set_content(R"({"status":"loading"})", "application/json");
      return;
    }
    const std::vector<std::string> down = models.down();
    if (down.empty()) return res.set_content(R"({"status":"ok"})", "application/json");
    res.status = 503;  // a model whose every replica failed (each is retried meanwhile)
    res.set_content(dump(json{{"status", "unhealthy"}, {"models_without_replica", down}}),
                    "application/json");
  });
  svr.Get("/metrics", [&](const httplib::Request&, httplib::Response& res) {
    std::string out =
        "# TYPE mxn_requests_running gauge\n# TYPE mxn_requests_waiting gauge\n"
        "# TYPE mxn_batch_slots_used gauge\n# TYPE mxn_batch_slots_free gauge\n"
        "# TYPE mxn_kv_blocks_used gauge\n# TYPE mxn_kv_blocks_cached gauge\n"
        "# TYPE mxn_kv_blocks_free gauge\n# TYPE mxn_prompt_tokens_total counter\n"
        "# TYPE mxn_prefix_cache_tokens_total counter\n# TYPE mxn_engine_steps_total counter\n"
        "# TYPE mxn_generated_tokens_total counter\n# TYPE mxn_requests_cancelled_total counter\n";
    res.set_content(out + models.metrics(), "text/plain; version=0.0.4");
  });
  svr.Get("/v1/models", [&](const httplib::Request&, httplib::Response& res) {
    json data = json::array();
    for (const std::string& name : models.names())
      data.push_back({{"id", name}, {"object", "model"}, {"created", 0}, {"owned_by", "mxn"}});
    for (const std::string& name : models.adapters()) {  // as vLLM lists LoRA modules
      const std::string base = name.substr(0, name.rfind(':'));
      data.push_back({{"id", name},
                      {"object", "model"},
                      {"created", 0},
                      {"owned_by", "mxn"},
                      {"root", base},
                      {"parent", base}});
    }
    res.set_content(dump(json{{"object", "list"}, {"data", data}}), "application/json");
  });

  auto handle = [&](httplib::Response& res, const httplib::ContentReader& reader, bool chat) {
    try {
      const json j = parse_body(read_body(reader, res, o.max_body));
      if (!j.contains("model") || !j["model"].is_string())
        throw HttpError{400, "'model' is missing (a string naming one of /v1/models)"};
      const std::string name = j["model"].get<std::string>();
      // Kept alive by the request; "base:adapter" names an adapter served on base.
      const auto [held, adapter] = models.resolve(name);
      if (!held || adapter < 0)
        throw HttpError{404, "the model '" + name.substr(0, 256) + "' does not exist",
                        "invalid_request_error", "model_not_found"};
      ServedModel& model = *held;
      ApiRequest api = read_request(j, chat, model.limits(), uint64_t(next_id.load()));
      EngineRequest& r = api.engine;
      r.adapter = adapter;
      AnswerSpec spec;
      spec.chat = chat;
      spec.model = name;
      spec.n_prompt = int64_t(r.prompt.size());
      spec.logprobs = r.logprobs >= 0;
      spec.stops = api.stops;
      std::pair<Ticket, std::shared_ptr<Channel>> sub;
      try {
        sub = model.submit(std::move(r));
      } catch (const Error& e) {
        throw HttpError{400, e.what(), "invalid_request_error", ""};
      } catch (const QueueFull&) {
        throw HttpError{429,
                        "the model '" + name + "' has " + std::to_string(o.max_queue) +
                            " requests waiting (--max-queue); try again later",
                        "rate_limit_error", "queue_full"};
      } catch (const NoReplica&) {
        throw HttpError{503, "every replica of the model '" + name + "' has failed", "server_error",
                        "overloaded"};
      }
      spec.id = (chat ? "chatcmpl-" : "cmpl-") + std::to_string(next_id++);
      spec.created = now_s();
      answer(res, api.stream, spec, held, sub.first, sub.second);
    } catch (const HttpError& e) {
      send_error(res, e.status, e.message, e.type, e.code);
    } catch (const std::exception& e) {
      send_error(res, 500, e.what(), "server_error");
    }
  };
  // Bodies are read through content readers, bounded decoded (chunked, gzip, deflate, br).
  svr.Post("/v1/completions", [&](const httplib::Request&, httplib::Response& r,
                                  const httplib::ContentReader& c) { handle(r, c, false); });
  svr.Post("/v1/chat/completions", [&](const httplib::Request&, httplib::Response& r,
                                       const httplib::ContentReader& c) { handle(r, c, true); });
  // Any other method with a body gets its 404 without httplib reading the body whole first.
  const auto no_such = [](const httplib::Request&, httplib::Response& r,
                          const httplib::ContentReader&) {
    send_error(r, 404, "no such endpoint", "invalid_request_error", "not_found");
    GuardedServer::close_after();  // its body is left unread
  };
  svr.Post(".*", no_such).Put(".*", no_such).Patch(".*", no_such).Delete(".*", no_such);

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
  std::thread loader([&] {
    if (ready) return;
    try {
      for (const std::string& n : models.names()) models.get(n);
      ready = true;
      std::fprintf(stderr, "mxn serve: ready\n");
    } catch (const std::exception& e) {
      load_error = e.what();
      g_stop = true;
    }
  });
  svr.listen_after_bind();
  svr.shut_down();
  g_stop = true;
  watcher.join();
  loader.join();
  if (!load_error.empty()) throw Error(load_error);
  return 0;
}

}  // namespace mxn
