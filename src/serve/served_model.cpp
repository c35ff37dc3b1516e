#include "serve/served_model.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <thread>

#include "core/error.h"
#include "core/faults.h"
#include "infer/adapter.h"
#include "infer/model.h"
#include "io/hf_folder.h"

namespace mxn {

namespace {

using Clock = std::chrono::steady_clock;
double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// A Prometheus histogram of seconds.
struct Histogram {
  static constexpr double kBounds[11] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10};
  int64_t counts[12] = {};  // per bucket (the last: above every bound)
  double sum = 0;
  int64_t n = 0;
  void observe(double s) {
    size_t b = 0;
    while (b < 11 && s > kBounds[b]) ++b;
    ++counts[b];
    sum += s;
    ++n;
  }
  std::string text(const std::string& name, const std::string& labels) const {
    std::string out;
    int64_t acc = 0;
    char le[32];
    for (size_t b = 0; b < 12; ++b) {
      acc += counts[b];
      if (b < 11)
        std::snprintf(le, sizeof(le), "%g", kBounds[b]);
      else
        std::snprintf(le, sizeof(le), "+Inf");
      out += name + "_bucket{" + labels + ",le=\"" + le + "\"} " + std::to_string(acc) + "\n";
    }
    return out + name + "_sum{" + labels + "} " + std::to_string(sum) + "\n" + name + "_count{" +
           labels + "} " + std::to_string(n) + "\n";
  }
};

}  // namespace

size_t pick_replica(const std::vector<ReplicaLoad>& loads, int64_t tokens) {
  size_t best = SIZE_MAX;
  double best_t = std::numeric_limits<double>::infinity();
  for (size_t i = 0; i < loads.size(); ++i) {
    if (!loads[i].up) continue;
    const double t = double(loads[i].owed + tokens) / std::max(loads[i].tokens_per_s, 1e-9);
    if (best == SIZE_MAX || t < best_t) {
      best = i;
      best_t = t;
    }
  }
  return best;
}

// One device's copy of the model: an engine and the worker thread that runs its passes.
struct ServedModel::Replica {
  std::string model, device;
  std::unique_ptr<Device> dev;
  std::unique_ptr<Engine> engine;
  int64_t kv_bytes_per_token = 0;  // the KV cache's, over the layers (MLA: latent + RoPE key)
  std::string fault_place;         // "serve_step@DEVICE": where tests slow or fail a pass
  std::mutex m;
  std::condition_variable cv;
  bool stop = false;
  std::atomic<bool> failed{false};  // read by /health without the lock (a pass holds it)
  Clock::duration backoff = std::chrono::seconds(2);  // before the next try of a failed replica
  Clock::time_point retry_at;
  double speed = 0;  // output tokens a second while busy, averaged over recent passes
  int64_t owed = 0;  // output tokens still to make for its requests (max_tokens less those made)
  std::map<int64_t, std::shared_ptr<Channel>> live;
  int64_t tokens = 0, cancelled = 0, steps = 0, probe_prompt = 0;  // counters for /metrics
  struct Timing {
    Clock::time_point submitted, first;
    int64_t made = 0, left = 0;
  };
  std::map<int64_t, Timing> timing;
  Histogram ttft, tpot;
  std::thread worker;

  Replica(const std::string& name, const ModelSource& src, const std::string& spec,
          const ServeOptions& o, int64_t context, int64_t blocks,
          const std::vector<Adapter>& adapters)
      : model(name), dev(open_device(spec, int(o.threads))) {
    device = dev->name();
    kv_bytes_per_token = src.cfg.layers * src.cfg.kv_cache_width() * 4;
    // The HTTP threads share the cores with the passes: GEMMs split dynamically (the CPU
    // backend's option; others have none).
    dev->set_option("gemm_split", 1);
    fault_place = "serve_step@" + device;
    const bool cpu = device.rfind("cpu", 0) == 0;
    if (o.weights == "bf16" && !cpu)
      throw Error("--weights bf16 is for the CPU backend so far; " + device + " takes f32");
    const DType wdt = o.weights == "bf16" ? DType::bf16 : DType::f32;
    EngineOptions eo;
    eo.slots = o.slots;
    eo.capacity = context;
    eo.blocks = blocks;
    eo.block = kBlock;
    eo.max_waiting = o.max_queue;
    eo.adapters = adapters;
    eo.weights = wdt;
    engine = std::make_unique<Engine>(src.cfg, src.weights, src.what, *dev, eo);
    probe();
    worker = std::thread([this] { run(); });
  }
  ~Replica() {
    {
      std::lock_guard<std::mutex> l(m);
      stop = true;
    }
    cv.notify_all();
    worker.join();
  }

  // The first decode speed, from 8 tokens of a 4-token prompt alone (it also builds the
  // single-row pass); live traffic refines it.
  void probe() {
    EngineRequest r;
    r.prompt = {0, 1, 2, 3};
    r.max_tokens = 8;
    r.ignore_eos = true;
    r.sampling.temperature = 0;
    const int64_t before = engine->prompt_tokens();
    engine->submit(std::move(r));
    engine->step();  // the prefill and the first token
    const Clock::time_point t0 = Clock::now();
    int64_t made = 0;
    while (!engine->idle()) made += int64_t(engine->step().size());
    speed = double(made) / std::max(seconds(Clock::now() - t0), 1e-9);
    probe_prompt += engine->prompt_tokens() - before;  // not the clients' (for /metrics)
  }

  ReplicaLoad load() {
    std::lock_guard<std::mutex> l(m);
    return {!failed, speed, owed};
  }

  std::pair<int64_t, std::shared_ptr<Channel>> submit(EngineRequest r) {
    auto ch = std::make_shared<Channel>();
    std::lock_guard<std::mutex> l(m);
    if (failed) throw NoReplica{};
    const int64_t left = r.max_tokens;
    const int64_t id = engine->submit(std::move(r));
    live[id] = ch;
    timing[id] = {Clock::now(), {}, 0, left};
    owed += left;
    cv.notify_all();
    return {id, ch};
  }

  void cancel(int64_t id) {
    std::lock_guard<std::mutex> l(m);
    if (!failed) engine->cancel(id);
  }

  std::string metrics() {
    std::lock_guard<std::mutex> l(m);
    const std::string lbl = "model=\"" + model + "\",device=\"" + device + "\"";
    auto line = [&](const char* name, double v) {
      char num[64];
      std::snprintf(num, sizeof(num), "%.10g", v);
      return std::string(name) + "{" + lbl + "} " + num + "\n";
    };
    const int64_t used = engine->slots_in_use();
    const KvBlocks& kv = engine->kv();
    return line("mxn_replica_up", failed ? 0 : 1) + line("mxn_decode_tokens_per_second", speed) +
           line("mxn_requests_running", double(used)) +
           line("mxn_requests_waiting", double(engine->waiting())) +
           line("mxn_batch_slots_used", double(used)) +
           line("mxn_batch_slots_free", double(engine->slots() - used)) +
           line("mxn_kv_blocks_used", double(kv.used())) +
           line("mxn_kv_blocks_cached", double(kv.cached())) +
           line("mxn_kv_blocks_free", double(kv.free())) +
           line("mxn_kv_cache_bytes_per_token", double(kv_bytes_per_token)) +
           line("mxn_prompt_tokens_total", double(engine->prompt_tokens() - probe_prompt)) +
           line("mxn_prefix_cache_tokens_total", double(engine->reused_tokens())) +
           line("mxn_engine_steps_total", double(steps)) +
           line("mxn_generated_tokens_total", double(tokens)) +
           line("mxn_requests_cancelled_total", double(cancelled)) +
           ttft.text("mxn_time_to_first_token_seconds", lbl) +
           tpot.text("mxn_time_per_output_token_seconds", lbl);
  }

  bool idle() {
    std::lock_guard<std::mutex> l(m);
    return failed || (engine->idle() && live.empty());
  }

  void deliver(const EngineEvent& e) {
    auto it = live.find(e.id);
    if (it == live.end()) return;
    {
      std::lock_guard<std::mutex> cl(it->second->m);
      it->second->events.push_back(e);
    }
    it->second->cv.notify_all();
    if (e.finished) live.erase(it);
  }

  // Out of rotation: every request it holds ends with an error event.
  void fail(const std::string& why) {
    std::fprintf(stderr, "mxn serve: model %s on %s failed: %s; taken out of rotation\n",
                 model.c_str(), device.c_str(), why.c_str());
    failed = true;
    retry_at = Clock::now() + backoff;
    owed = 0;
    timing.clear();
    engine->reset();  // its blocks back; the requests end below
    for (auto it = live.begin(); it != live.end();) {
      EngineEvent e;
      e.id = it->first;
      e.finished = true;
      e.reason = "error";
      e.error = "the replica on " + device + " failed: " + why;
      ++it;
      deliver(e);
    }
  }

  // A failed replica's next try: a probe pass on an emptied engine. It rejoins when that passes;
  // else the wait before the next try doubles, to 60 s.
  void retry() {
    try {
      engine->reset();
      probe();
      failed = false;
      backoff = std::chrono::seconds(2);
      std::fprintf(stderr, "mxn serve: model %s on %s rejoined\n", model.c_str(), device.c_str());
    } catch (const std::exception& e) {
      backoff = std::min<Clock::duration>(2 * backoff, std::chrono::seconds(60));
      retry_at = Clock::now() + backoff;
      std::fprintf(stderr, "mxn serve: model %s on %s still fails: %s; next try in %.0f s\n",
                   model.c_str(), device.c_str(), e.what(), seconds(backoff));
    }
  }

  void run() {
    std::unique_lock<std::mutex> l(m);
    while (true) {
      if (failed) {
        cv.wait_until(l, retry_at, [&] { return stop; });
        if (stop) return;
        if (Clock::now() >= retry_at) retry();
        continue;
      }
      cv.wait(l, [&] { return stop || failed || !engine->idle(); });
      if (stop) return;
      if (failed) continue;
      const Clock::time_point t0 = Clock::now();  // (a test's slowed pass is a slower chip)
      ++steps;
      std::string injected;  // tests slow a pass down, or fail it (core/faults.h)
      l.unlock();
      try {
        fault_point(fault_place.c_str(), steps);
      } catch (const std::exception& e) {
        injected = e.what();
      }
      l.lock();
      std::vector<EngineEvent> events;
      try {
        if (!injected.empty()) throw Error(injected);
        events = engine->step();
      } catch (const std::exception& e) {
        fail(e.what());
        continue;
      }
      const Clock::time_point now = Clock::now();
      int64_t made = 0;
      for (const EngineEvent& e : events) {
        made += e.token >= 0;
        cancelled += e.reason == "cancel";
        if (auto t = timing.find(e.id); t != timing.end()) {  // latencies; tokens still owed
          if (e.token >= 0) {
            --owed;
            --t->second.left;
            if (t->second.made++ == 0) {
              t->second.first = now;
              ttft.observe(seconds(now - t->second.submitted));
            }
          }
          if (e.finished) {
            if (t->second.made > 1)
              tpot.observe(seconds(now - t->second.first) / double(t->second.made - 1));
            owed -= t->second.left;
            timing.erase(t);
          }
        }
        deliver(e);
      }
      tokens += made;
      if (made > 0) speed = 0.7 * speed + 0.3 * double(made) / std::max(seconds(now - t0), 1e-9);
    }
  }
};

ServedModel::ServedModel(std::string name, const std::string& path, const ServeOptions& o)
    : name_(std::move(name)) {
  ModelSource src = load_model(path);
  cfg_ = src.cfg;
  tok_ = model_tokenizer(src);
  if (tok_) {
    try {
      chat_ = model_chat_format(src, *tok_);
      has_chat_ = true;
    } catch (const Error&) {  // a base model: completions only
    }
  }
  context_ = std::min<int64_t>(cfg_.max_pos, o.context > 0 ? o.context : 2048);
  blocks_ = kv_blocks(o, context_);
  std::vector<Adapter> adapters;
  for (const ServeOptions::AdapterSpec& a : o.adapters) {
    if (a.base != name_) continue;
    try {
      adapters.push_back(load_adapter(a.path));
    } catch (const Error& e) {
      throw Error("adapter '" + a.base + ":" + a.name + "': " + e.what());
    }
    adapter_names_.push_back(a.name);
  }
  for (const std::string& d : o.devices)
    replicas_.push_back(std::make_unique<Replica>(name_, src, d, o, context_, blocks_, adapters));
}

int ServedModel::adapter_id(const std::string& name) const {
  if (name.empty()) return 0;
  for (size_t i = 0; i < adapter_names_.size(); ++i)
    if (adapter_names_[i] == name) return int(i + 1);
  return -1;
}

ServedModel::~ServedModel() = default;

uint64_t ServedModel::bytes_of(const DecoderConfig& c, int64_t blocks) {
  return uint64_t(c.param_count()) * 4 +
         uint64_t(blocks * kBlock * c.layers * c.kv_cache_width()) * 4;
}

std::pair<Ticket, std::shared_ptr<Channel>> ServedModel::submit(EngineRequest r) {
  std::lock_guard<std::mutex> l(route_);
  std::vector<ReplicaLoad> loads;
  for (auto& rep : replicas_) loads.push_back(rep->load());
  const size_t i = pick_replica(loads, r.max_tokens);
  if (i == SIZE_MAX) throw NoReplica{};
  auto [id, ch] = replicas_[i]->submit(std::move(r));
  return {Ticket{i, id}, ch};
}

void ServedModel::cancel(const Ticket& t) { replicas_[t.replica]->cancel(t.id); }

std::string ServedModel::device_of(const Ticket& t) const { return replicas_[t.replica]->device; }

std::string ServedModel::metrics() {
  std::string out;
  for (auto& rep : replicas_) out += rep->metrics();
  return out;
}

bool ServedModel::healthy() const {
  for (const auto& rep : replicas_)
    if (!rep->failed) return true;
  return false;
}

bool ServedModel::idle() {
  for (auto& rep : replicas_)
    if (!rep->idle()) return false;
  return true;
}

}  // namespace mxn
