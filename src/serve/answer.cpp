#include "serve/answer.h"

#include <chrono>
#include <nlohmann/json.hpp>
#include <optional>

#include "infer/text_stream.h"
#include "serve/http.h"
#include "serve/http_guard.h"
#include "serve/request.h"

namespace mxn {

namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

json bytes(const std::string& s) {
  json b = json::array();
  for (unsigned char ch : s) b.push_back(int(ch));
  return b;
}

// The answer's state between events (a stream's chunks are made by later calls).
class Answer {
 public:
  Answer(const AnswerSpec& spec, std::shared_ptr<ServedModel> model, const Ticket& t,
         std::shared_ptr<Channel> ch)
      : s_(spec),
        model_(std::move(model)),
        t_(t),
        ch_(std::move(ch)),
        tok_(model_->tokenizer()),
        stop_(s_.stops),
        fingerprint_("mxn:" + model_->device_of(t_)) {}

  void whole(httplib::Response& res) {
    std::string text, reason, error;
    json lp = new_lp();
    while (true) {
      const std::optional<EngineEvent> e = next();
      if (!e) return GuardedServer::close_after();  // the client left: nobody to answer
      if (take(*e, text, reason, lp, error)) break;
    }
    if (reason == "error") throw HttpError{503, error, "server_error", "replica_failed"};
    if (!stopped_) text += stop_.flush();
    json body = head(s_.chat ? "chat.completion" : "text_completion");
    body["choices"] = json::array({choice(text, reason, false, lp)});
    body["usage"] = usage();
    res.set_content(dump(body), "application/json");
  }

  // The next chunk of a stream; false ends the stream early (the client left).
  bool chunk(httplib::DataSink& sink) {
    std::string text, reason, error;
    json lp = new_lp();
    const std::optional<EngineEvent> e = next();
    if (!e) return false;
    const bool done = take(*e, text, reason, lp, error);
    if (done && reason == "error") {  // an error chunk in OpenAI's shape, then the end
      ended_ = true;
      const json err = {{"error",
                         {{"message", error},
                          {"type", "server_error"},
                          {"param", nullptr},
                          {"code", "replica_failed"}}}};
      send(sink, "data: " + dump(err) + "\n\ndata: [DONE]\n\n");
      sink.done();
      return true;
    }
    if (done && !stopped_) text += stop_.flush();
    if (!text.empty() || done || (s_.logprobs && lp != new_lp())) {
      json c = head(s_.chat ? "chat.completion.chunk" : "text_completion");
      c["choices"] = json::array({choice(text, done ? json(reason) : json(nullptr), true, lp)});
      if (done) c["usage"] = usage();
      if (!send(sink, "data: " + dump(c) + "\n\n")) {  // gone: its slot is freed at the next pass
        model_->cancel(t_);
        return false;
      }
    }
    if (done) {
      ended_ = true;
      send(sink, "data: [DONE]\n\n");
      sink.done();
    }
    return true;
  }

  // The stream ended, whole or not.
  void released() {
    if (!ended_) model_->cancel(t_);
  }

 private:
  static bool send(httplib::DataSink& sink, const std::string& s) {
    return sink.write(s.data(), s.size());
  }

  // The next event, or none once the client has hung up (the request is then cancelled). The
  // client is looked for every 20 ms, while waiting and between events: a hang-up is cancelled
  // within the pass it happens in.
  std::optional<EngineEvent> next() {
    while (true) {
      std::optional<EngineEvent> e = ch_->next_for(std::chrono::milliseconds(20));
      if (Clock::now() >= look_) {
        look_ = Clock::now() + std::chrono::milliseconds(20);
        if (GuardedServer::peer_gone()) {
          model_->cancel(t_);
          return std::nullopt;
        }
      }
      if (e) return e;
    }
  }

  // One event: its text (empty for an end-of-turn token), and whether the request ended. A
  // failed replica's event: reason "error", with its message in `error`.
  bool take(const EngineEvent& e, std::string& text, std::string& reason, json& lp,
            std::string& error) {
    if (e.token >= 0 && e.reason != "stop") {
      for (char ch : tok_->piece(e.token)) text += stop_.push(utf8_.push(uint8_t(ch)), stopped_);
      ++made_;
      if (s_.logprobs) add_lp(lp, e);
    }
    if (stopped_ && !e.finished) {  // a stop string: the engine may let go
      model_->cancel(t_);
      reason = "stop";
      return true;
    }
    if (e.finished) {
      reason = e.reason == "length" ? "length" : e.reason == "error" ? "error" : "stop";
      error = e.error;
      return true;
    }
    return false;
  }

  json head(const char* object) const {
    return {{"id", s_.id},
            {"object", object},
            {"created", s_.created},
            {"model", s_.model},
            {"system_fingerprint", fingerprint_}};  // the chip answering
  }

  json usage() const {
    return {{"prompt_tokens", s_.n_prompt},
            {"completion_tokens", made_},
            {"total_tokens", s_.n_prompt + made_}};
  }

  json choice(const std::string& text, const json& reason, bool delta, const json& lp) const {
    json c = {{"index", 0}, {"finish_reason", reason}, {"logprobs", nullptr}};
    if (s_.logprobs) c["logprobs"] = lp;
    if (!s_.chat)
      c["text"] = text;
    else if (delta)
      c["delta"] = {{"role", "assistant"}, {"content", text}};
    else
      c["message"] = {{"role", "assistant"}, {"content", text}};
    return c;
  }

  json new_lp() const {
    return s_.chat ? json{{"content", json::array()}}
                   : json{{"tokens", json::array()},
                          {"token_logprobs", json::array()},
                          {"top_logprobs", json::array()}};
  }

  // One token's log-probabilities in OpenAI's shape (chat: content entries; completions: the
  // legacy parallel lists).
  void add_lp(json& lp, const EngineEvent& e) const {
    const std::string piece = tok_->piece(e.token);
    if (s_.chat) {
      json top = json::array();
      for (const auto& [t, l] : e.top)
        top.push_back(
            {{"token", tok_->piece(t)}, {"logprob", l}, {"bytes", bytes(tok_->piece(t))}});
      lp["content"].push_back({{"token", piece},
                               {"logprob", e.logprob},
                               {"bytes", bytes(piece)},
                               {"top_logprobs", top}});
    } else {
      json top = json::object();
      for (const auto& [t, l] : e.top) top[tok_->piece(t)] = l;
      lp["tokens"].push_back(piece);
      lp["token_logprobs"].push_back(e.logprob);
      lp["top_logprobs"].push_back(top);
    }
  }

  AnswerSpec s_;
  std::shared_ptr<ServedModel> model_;  // kept alive (and loaded) while it answers
  Ticket t_;
  std::shared_ptr<Channel> ch_;
  const Tokenizer* tok_;
  Utf8Stream utf8_;
  StopFilter stop_;
  bool stopped_ = false, ended_ = false;
  int64_t made_ = 0;
  std::string fingerprint_;
  Clock::time_point look_ = Clock::now();
};

}  // namespace

void answer(httplib::Response& res, bool stream, const AnswerSpec& spec,
            std::shared_ptr<ServedModel> model, const Ticket& t, std::shared_ptr<Channel> ch) {
  auto a = std::make_shared<Answer>(spec, std::move(model), t, std::move(ch));
  if (!stream) return a->whole(res);
  res.set_chunked_content_provider(
      "text/event-stream", [a](size_t, httplib::DataSink& sink) { return a->chunk(sink); },
      [a](bool) { a->released(); });
}

}  // namespace mxn
