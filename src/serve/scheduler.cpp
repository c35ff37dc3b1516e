#include "serve/scheduler.h"

#include <algorithm>
#include <string>

#include "core/error.h"

namespace mxn {

namespace {
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
}  // namespace

int64_t SchedulePlan::rows() const {
  int64_t n = int64_t(decode.size());
  for (const Chunk& c : prefill) n += c.rows;
  return n;
}

int64_t SchedulePlan::logit_rows() const {
  int64_t n = int64_t(decode.size());
  for (const Chunk& c : prefill) n += c.last;
  return n;
}

Scheduler::Scheduler(const SchedulerOptions& o, KvBlocks& kv, std::vector<PrefixBlocks> prefixes)
    : o_(o), kv_(kv), prefixes_(std::move(prefixes)) {
  if (o.slots < 1 || o.capacity < 2 || o.chunk < 1 || o.max_waiting < 0)
    throw Error("the engine needs slots >= 1, a capacity >= 2 and a prefill chunk >= 1");
  slots_.resize(size_t(o.slots));
}

const PrefixBlocks* Scheduler::prefix_of(const EngineRequest& r) const {
  if (r.adapter < 1 || r.adapter > int(prefixes_.size())) return nullptr;
  const PrefixBlocks& p = prefixes_[size_t(r.adapter - 1)];
  return p.keys > 0 ? &p : nullptr;
}

void Scheduler::check(const EngineRequest& r) const {
  const PrefixBlocks* pre = prefix_of(r);
  const int64_t key0 = pre ? pre->keys : 0;
  // Compared with the room left, never summed first: max_tokens may come near 2^63.
  const int64_t room = o_.capacity - key0 - int64_t(r.prompt.size());
  if (room < 1 || r.max_tokens > room)
    throw Error("the prompt (" + std::to_string(r.prompt.size()) + " tokens) and max_tokens (" +
                std::to_string(r.max_tokens) + ") exceed the context of " +
                std::to_string(o_.capacity - key0) + " tokens" +
                (key0 > 0 ? " (its adapter's prefix takes " + std::to_string(key0) + ")" : ""));
  const int64_t n = key0 + int64_t(r.prompt.size()) + r.max_tokens;
  if (ceil_div(n, kv_.block()) > kv_.total())
    throw Error("the prompt and max_tokens need " + std::to_string(ceil_div(n, kv_.block())) +
                " KV blocks; the cache has " + std::to_string(kv_.total()));
}

int64_t Scheduler::submit(EngineRequest r) {
  if (full()) throw QueueFull{};
  check(r);
  const int64_t id = next_id_++;
  waiting_.emplace_back(id, std::move(r));
  return id;
}

void Scheduler::cancel(int64_t id) {
  for (Seq& s : slots_)
    if (s.used && s.id == id) s.cancelled = true;
  std::erase_if(waiting_, [&](const auto& w) { return w.first == id; });
}

std::vector<int64_t> Scheduler::reset() {
  std::vector<int64_t> ids;
  for (size_t i = 0; i < slots_.size(); ++i)
    if (slots_[i].used) {
      ids.push_back(slots_[i].id);
      finish(i);
    }
  for (const auto& [id, r] : waiting_) ids.push_back(id);
  waiting_.clear();
  return ids;
}

bool Scheduler::admit(Seq& s) {
  const EngineRequest& r = waiting_.front().second;
  const int64_t P = int64_t(r.prompt.size()), bs = kv_.block();
  const PrefixBlocks* pre = prefix_of(r);
  const int64_t key0 = pre ? pre->keys : 0, pinned = pre ? int64_t(pre->blocks.size()) : 0;
  // Shared blocks cover whole prompt blocks and leave at least its last token to compute (its
  // logits start the answer); the rest, to prompt + max_tokens, is taken now. A LoRA adapter's
  // blocks are its own (salted by its number); a P-Tuning request shares only its prefix's.
  const int64_t most = pre ? 0 : (P - 1) / bs;
  const uint64_t salt = uint64_t(r.adapter);
  const int64_t shared = int64_t(kv_.match(r.prompt, most, false, salt).size());
  const int64_t need = ceil_div(key0 + P + r.max_tokens, bs) - pinned - shared;
  MXN_CHECK(need >= 0, "a request's block count is negative (submit checks its sizes)");
  if (need > kv_.available()) return false;
  s = Seq{};
  s.used = true;
  s.id = waiting_.front().first;
  s.req = std::move(waiting_.front().second);
  waiting_.pop_front();
  s.key0 = key0;
  if (pre) {
    for (int32_t b : pre->blocks) kv_.hold(b);
    s.blocks = pre->blocks;
  } else {
    s.blocks = kv_.match(s.req.prompt, most, true, salt);
  }
  for (int64_t i = 0; i < need; ++i) s.blocks.push_back(kv_.take());
  s.published = shared;
  s.share = !pre;
  s.fed = s.len = shared * bs;
  prompt_tokens_ += P;
  reused_tokens_ += shared * bs;
  ++running_;
  return true;
}

SchedulePlan Scheduler::schedule() {
  SchedulePlan p;
  for (size_t i = 0; i < slots_.size(); ++i)  // cancelled ones leave first: their slots are free
    if (slots_[i].used && slots_[i].cancelled) {
      p.cancelled.push_back(slots_[i].id);
      finish(i);
    }
  for (size_t i = 0; i < slots_.size(); ++i) {  // in arrival order, while the front one fits
    if (slots_[i].used) continue;
    if (waiting_.empty() || !admit(slots_[i])) break;
    p.admitted.push_back(i);
  }
  for (size_t i = 0; i < slots_.size(); ++i)
    if (slots_[i].used && !slots_[i].prefilling()) p.decode.push_back(i);
  // Prompt rows: the oldest requests still in prefill first, `chunk` rows in all (chunked
  // prefill: a long prompt takes several passes and never stalls the others' decoding).
  std::vector<size_t> pre;
  for (size_t i = 0; i < slots_.size(); ++i)
    if (slots_[i].used && slots_[i].prefilling()) pre.push_back(i);
  std::sort(pre.begin(), pre.end(),
            [&](size_t x, size_t y) { return slots_[x].id < slots_[y].id; });
  int64_t budget = o_.chunk;
  for (size_t i : pre) {
    if (budget == 0) break;
    const Seq& s = slots_[i];
    const int64_t left = int64_t(s.req.prompt.size()) - s.fed;
    const int64_t n = std::min(budget, left);
    p.prefill.push_back({i, s.fed, n, n == left});
    budget -= n;
  }
  return p;
}

void Scheduler::ran(const SchedulePlan& p) {
  const int64_t bs = kv_.block();
  for (size_t i : p.decode) ++slots_[i].len;
  for (const SchedulePlan::Chunk& c : p.prefill) {
    Seq& s = slots_[c.slot];
    s.fed = s.len = c.from + c.rows;
    const int64_t prompt = int64_t(s.req.prompt.size());
    for (; s.share && (s.published + 1) * bs <= std::min(s.fed, prompt); ++s.published)
      kv_.publish(s.blocks, s.published, s.req.prompt, uint64_t(s.req.adapter));
  }
}

void Scheduler::finish(size_t slot) {
  Seq& s = slots_[slot];
  for (int32_t b : s.blocks) kv_.release(b);
  s = Seq{};
  --running_;
}

}  // namespace mxn
