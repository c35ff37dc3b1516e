#include "serve/engine.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "io/hf_folder.h"

namespace mxn {

namespace {
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
}  // namespace

Engine::Engine(const DecoderConfig& c, const TensorMap& weights, const std::string& source,
               Device& dev, int64_t slots, int64_t capacity, int64_t chunk, int64_t blocks,
               int64_t block)
    : cfg_(c),
      dev_(dev),
      capacity_(capacity),
      chunk_(chunk),
      max_rows_(slots + chunk),
      table_w_(1 + ceil_div(capacity, std::max<int64_t>(block, 1))),
      kv_(blocks > 0 ? blocks : slots * ceil_div(capacity, std::max<int64_t>(block, 1)), block) {
  if (slots < 1 || capacity < 2 || chunk < 1)
    throw Error("the engine needs slots >= 1, a capacity >= 2 and a prefill chunk >= 1");
  if (c.gpt2() && capacity > c.max_pos)
    throw Error("the model has " + std::to_string(c.max_pos) + " learned positions; a slot of " +
                std::to_string(capacity) + " tokens does not fit");
  slots_.resize(size_t(slots));
  Graph g = graph(max_rows_, slots, &m_);
  prog_ = std::make_unique<Program>(std::move(g), dev_, false);
  upload_weights(*prog_, weights, source);
  variants_.assign(size_t(max_rows_ * slots), -1);
  variants_.back() = 0;
  tokens_.resize(size_t(max_rows_));
  positions_.resize(size_t(max_rows_));
  cache_rows_.resize(size_t(max_rows_));
  tables_.resize(size_t(max_rows_ * table_w_));
  last_rows_.resize(size_t(slots));
  logits_.resize(size_t(slots * c.vocab_size));
}

Graph Engine::graph(int64_t rows, int64_t logit_rows, DecoderGraph* m) const {
  DecoderOptions o;
  o.serve_rows = kv_.total() * kv_.block();
  o.serve_block = kv_.block();
  o.serve_blocks = table_w_ - 1;
  o.logit_rows = logit_rows;
  Graph g;
  *m = build_decoder(g, cfg_, 1, rows, o);
  return g;
}

int Engine::variant_for(int64_t rows, int64_t logit_rows) {
  int& v = variants_[size_t((rows - 1) * int64_t(slots_.size()) + logit_rows - 1)];
  DecoderGraph m;
  if (v < 0) v = prog_->add_variant(graph(rows, logit_rows, &m));
  return v;
}

int64_t Engine::submit(EngineRequest r) {
  if (r.prompt.empty()) throw Error("the prompt is empty");
  if (r.max_tokens < 1) throw Error("max_tokens must be >= 1");
  const int64_t n = int64_t(r.prompt.size()) + r.max_tokens;
  if (n > capacity_)
    throw Error("the prompt (" + std::to_string(r.prompt.size()) + " tokens) and max_tokens (" +
                std::to_string(r.max_tokens) + ") exceed the context of " +
                std::to_string(capacity_) + " tokens");
  if (ceil_div(n, kv_.block()) > kv_.total())
    throw Error("the prompt and max_tokens need " + std::to_string(ceil_div(n, kv_.block())) +
                " KV blocks; the cache has " + std::to_string(kv_.total()));
  for (int32_t t : r.prompt)
    if (t < 0 || t >= cfg_.vocab_size)
      throw Error("prompt token " + std::to_string(t) + " is outside the vocabulary [0, " +
                  std::to_string(cfg_.vocab_size) + ")");
  const int64_t id = next_id_++;
  waiting_.emplace_back(id, std::move(r));
  return id;
}

void Engine::cancel(int64_t id) {
  for (Slot& s : slots_)
    if (s.used && s.id == id) s.cancelled = true;
  std::erase_if(waiting_, [&](const auto& w) { return w.first == id; });
}

bool Engine::admit(Slot& s) {
  const EngineRequest& r = waiting_.front().second;
  const int64_t P = int64_t(r.prompt.size()), bs = kv_.block();
  // Shared blocks cover whole prompt blocks and leave at least its last token to compute (its
  // logits start the answer); the rest, to prompt + max_tokens, is taken now.
  const int64_t most = (P - 1) / bs;
  const int64_t shared = int64_t(kv_.match(r.prompt, most, false).size());
  const int64_t need = ceil_div(P + r.max_tokens, bs) - shared;
  if (need > kv_.available()) return false;
  s = Slot{};
  s.used = true;
  s.id = waiting_.front().first;
  s.req = std::move(waiting_.front().second);
  waiting_.pop_front();
  s.blocks = kv_.match(s.req.prompt, most);
  for (int64_t i = 0; i < need; ++i) s.blocks.push_back(kv_.take());
  s.published = shared;
  s.fed = s.len = shared * bs;
  s.sampler = std::make_unique<Sampler>(s.req.sampling);
  prompt_tokens_ += P;
  reused_tokens_ += shared * bs;
  ++active_;
  return true;
}

void Engine::release(Slot& s) {
  for (int32_t b : s.blocks) kv_.release(b);
  s = Slot{};
  --active_;
}

std::vector<EngineEvent> Engine::step() {
  std::vector<EngineEvent> events;
  for (Slot& s : slots_)  // cancelled ones leave first: their slots take new requests now
    if (s.used && s.cancelled) {
      EngineEvent e;
      e.id = s.id;
      e.finished = true;
      e.reason = "cancel";
      events.push_back(std::move(e));
      release(s);
    }
  for (Slot& s : slots_)  // in arrival order, while the front one's blocks are there
    if (!s.used && (waiting_.empty() || !admit(s))) break;
  // The pass: a row per decoding request, then one prefilling request's next chunk.
  const int64_t bs = kv_.block(), tw = table_w_;
  int64_t rows = 0, lr = 0;
  std::vector<size_t> logit_slot;
  auto add_row = [&](size_t si, int32_t token, int64_t pos) {
    const Slot& s = slots_[si];
    tokens_[size_t(rows)] = token;
    positions_[size_t(rows)] = int32_t(pos);
    cache_rows_[size_t(rows)] = int32_t(s.blocks[size_t(pos / bs)] * bs + pos % bs);
    int32_t* t = tables_.data() + rows * tw;
    t[0] = int32_t(pos + 1);
    std::copy(s.blocks.begin(), s.blocks.end(), t + 1);
    ++rows;
  };
  for (size_t si = 0; si < slots_.size(); ++si) {
    Slot& s = slots_[si];
    if (!s.used || s.fed < int64_t(s.req.prompt.size())) continue;
    add_row(si, s.next, s.len);
    last_rows_[size_t(lr++)] = int32_t(rows - 1);
    logit_slot.push_back(si);
    ++s.len;
  }
  size_t pre = slots_.size();  // the oldest request still in prefill
  for (size_t si = 0; si < slots_.size(); ++si) {
    const Slot& s = slots_[si];
    if (s.used && s.fed < int64_t(s.req.prompt.size()) &&
        (pre == slots_.size() || s.id < slots_[pre].id))
      pre = si;
  }
  if (pre < slots_.size()) {
    Slot& s = slots_[pre];
    const int64_t n = std::min<int64_t>(chunk_, int64_t(s.req.prompt.size()) - s.fed);
    for (int64_t t = 0; t < n; ++t) add_row(pre, s.req.prompt[size_t(s.fed + t)], s.fed + t);
    s.fed += n;
    s.len += n;
    if (s.fed == int64_t(s.req.prompt.size())) {
      last_rows_[size_t(lr++)] = int32_t(rows - 1);
      logit_slot.push_back(pre);
    }
  }
  if (rows == 0) return events;
  const int v = lr > 0 ? variant_for(rows, lr) : variant_for(rows, 1);
  if (lr == 0) last_rows_[0] = 0;  // a prefill chunk with no token yet: any row, unread
  dev_.upload(prog_->tensor(m_.tokens, v), tokens_.data());
  dev_.upload(prog_->tensor(m_.positions, v), positions_.data());
  dev_.upload(prog_->tensor(m_.cache_rows, v), cache_rows_.data());
  dev_.upload(prog_->tensor(m_.key_ranges, v), tables_.data());
  dev_.upload(prog_->tensor(m_.last_rows, v), last_rows_.data());
  prog_->run(0, prog_->graph().nodes.size(), v);
  if (pre < slots_.size()) {  // its prompt blocks now written in full: offered to later requests
    Slot& s = slots_[pre];
    for (; (s.published + 1) * bs <= std::min<int64_t>(s.fed, int64_t(s.req.prompt.size()));
         ++s.published)
      kv_.publish(s.blocks, s.published, s.req.prompt);
  }
  if (lr == 0) return events;
  dev_.download(logits_.data(), prog_->tensor(m_.logits, v));
  const int64_t V = cfg_.vocab_size;
  for (int64_t r = 0; r < lr; ++r) {
    Slot& s = slots_[logit_slot[size_t(r)]];
    float* row = logits_.data() + r * V;
    for (const auto& [t, n] : s.counts)
      row[t] -= s.req.presence_penalty + s.req.frequency_penalty * float(n);
    const int32_t tok = s.sampler->next(row, V);
    ++s.made;
    auto c =
        std::find_if(s.counts.begin(), s.counts.end(), [&](auto& p) { return p.first == tok; });
    if (c == s.counts.end())
      s.counts.emplace_back(tok, 1);
    else
      ++c->second;
    EngineEvent e;
    e.id = s.id;
    e.token = tok;
    if (s.req.logprobs >= 0) {  // log-softmax of the (penalised) logits, in double
      const float mx = *std::max_element(row, row + V);
      double sum = 0;
      for (int64_t v = 0; v < V; ++v) sum += std::exp(double(row[v] - mx));
      const double lse = double(mx) + std::log(sum);
      e.logprob = float(double(row[tok]) - lse);
      const int64_t k = std::min<int64_t>(s.req.logprobs, V);
      std::vector<int32_t> idx(static_cast<size_t>(V));
      for (int64_t v = 0; v < V; ++v) idx[size_t(v)] = int32_t(v);
      std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int32_t a, int32_t b) {
        return row[a] > row[b] || (row[a] == row[b] && a < b);
      });
      for (int64_t j = 0; j < k; ++j)
        e.top.emplace_back(idx[size_t(j)], float(double(row[idx[size_t(j)]]) - lse));
    }
    const bool eos =
        !s.req.ignore_eos && std::find(cfg_.eos.begin(), cfg_.eos.end(), tok) != cfg_.eos.end();
    if (eos || s.made >= s.req.max_tokens) {
      e.finished = true;
      e.reason = eos ? "stop" : "length";
      release(s);
    } else {
      s.next = tok;
    }
    events.push_back(std::move(e));
  }
  return events;
}

}  // namespace mxn
