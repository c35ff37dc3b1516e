#pragma once
// One model that mxn serve answers for: its tokenizer and chat format, and a replica (engine and
// worker thread) on each serving device. A new request goes to the replica with the lowest
// predicted finish time: the output tokens it still owes plus this request's, over its measured
// decode speed, so a fast chip takes more. A replica whose pass fails is taken out of rotation
// with a log line; its requests end with an error event and the others go on. It is tried again
// (a probe request) after 2 s, then 4, 8, ... up to 60 s, and rejoins when the probe passes.
#include <chrono>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "data/chat.h"
#include "data/tokenizer.h"
#include "serve/engine.h"
#include "serve/request.h"
#include "serve/server.h"

namespace mxn {

// A request's tokens as its replica's worker makes them.
struct Channel {
  std::mutex m;
  std::condition_variable cv;
  std::deque<EngineEvent> events;
  EngineEvent next() {
    std::unique_lock<std::mutex> l(m);
    cv.wait(l, [&] { return !events.empty(); });
    EngineEvent e = events.front();
    events.pop_front();
    return e;
  }
  // The next event, or none after `wait` (so a waiting handler can see its client leave).
  std::optional<EngineEvent> next_for(std::chrono::milliseconds wait) {
    std::unique_lock<std::mutex> l(m);
    if (!cv.wait_for(l, wait, [&] { return !events.empty(); })) return std::nullopt;
    EngineEvent e = events.front();
    events.pop_front();
    return e;
  }
};

struct NoReplica {};  // every replica of the model has failed

struct Ticket {  // a submitted request: its replica and its id there
  size_t replica = 0;
  int64_t id = 0;
};

// The router's view of one replica.
struct ReplicaLoad {
  bool up = true;
  double tokens_per_s = 0;  // measured decode speed (output tokens a second while busy)
  int64_t owed = 0;         // output tokens its admitted and waiting requests may still make
};
// The replica that would finish `tokens` more soonest, (owed + tokens) / speed; ties to the
// lower index. SIZE_MAX when none is up.
size_t pick_replica(const std::vector<ReplicaLoad>& loads, int64_t tokens);

class ServedModel {
 public:
  ServedModel(std::string name, const std::string& path, const ServeOptions& o);
  ~ServedModel();
  const std::string& name() const { return name_; }
  const Tokenizer* tokenizer() const { return tok_.get(); }
  bool has_chat() const { return has_chat_; }
  ChatFormat chat() const { return chat_; }
  int64_t context() const { return context_; }
  ModelLimits limits() const {  // what a request is checked against
    return {tok_.get(), has_chat_, chat_, context_, cfg_.vocab_size};
  }
  bool healthy() const;  // a replica is up (failed ones are retried)
  // The engine's number of the adapter `name` (1..), 0 for "" (the base), -1 for none such.
  int adapter_id(const std::string& name) const;

  // Throws an Error (the engine refuses it: a 400), QueueFull or NoReplica.
  std::pair<Ticket, std::shared_ptr<Channel>> submit(EngineRequest r);
  void cancel(const Ticket& t);
  std::string device_of(const Ticket& t) const;  // "cpu:0"
  std::string metrics();                         // Prometheus lines, a set per replica
  bool idle();
  // Device bytes: weights (f32) and KV blocks, on each replica's device.
  uint64_t bytes() const { return bytes_of(cfg_, blocks_) * replicas_.size(); }
  static uint64_t bytes_of(const DecoderConfig& c, int64_t blocks);
  static constexpr int64_t kBlock = 16;  // KV rows a block
  // --kv-blocks, or enough for every slot at the full context.
  static int64_t kv_blocks(const ServeOptions& o, int64_t context) {
    return o.kv_blocks > 0 ? o.kv_blocks : o.slots * ((context + kBlock - 1) / kBlock);
  }

 private:
  struct Replica;
  std::string name_;
  DecoderConfig cfg_;
  std::shared_ptr<Tokenizer> tok_;
  ChatFormat chat_{};
  bool has_chat_ = false;
  int64_t context_ = 0, blocks_ = 0;
  std::vector<std::string> adapter_names_;
  std::mutex route_;  // one routing decision at a time
  std::vector<std::unique_ptr<Replica>> replicas_;
};

}  // namespace mxn
