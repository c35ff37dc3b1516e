#include "serve/engine.h"

#include <algorithm>
#include <bit>
#include <cmath>

#include "core/error.h"
#include "io/hf_folder.h"

namespace mxn {

namespace {
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
}  // namespace

Engine::Engine(const DecoderConfig& c, const TensorMap& weights, const std::string& source,
               Device& dev, int64_t slots, int64_t capacity, int64_t chunk, int64_t blocks,
               int64_t block, const std::vector<Adapter>& adapters, DType weight_dtype)
    : cfg_(c),
      dev_(dev),
      capacity_(capacity),
      chunk_(chunk),
      max_rows_(slots + chunk),
      table_w_(1 + ceil_div(capacity, std::max<int64_t>(block, 1))),
      kv_(blocks > 0 ? blocks : slots * ceil_div(capacity, std::max<int64_t>(block, 1)), block),
      weights_(weight_dtype) {
  if (slots < 1 || capacity < 2 || chunk < 1)
    throw Error("the engine needs slots >= 1, a capacity >= 2 and a prefill chunk >= 1");
  if (c.gpt2() && capacity > c.max_pos)
    throw Error("the model has " + std::to_string(c.max_pos) + " learned positions; a slot of " +
                std::to_string(capacity) + " tokens does not fit");
  slots_.resize(size_t(slots));
  for (const Adapter& a : adapters) {
    if (a.prefix) continue;
    lora_rank_ += a.spec.r;
    for (const std::string& t : a.spec.targets)
      if (std::find(lora_targets_.begin(), lora_targets_.end(), t) == lora_targets_.end())
        lora_targets_.push_back(t);
  }
  Graph g = graph(max_rows_, slots, &m_);
  prog_ = std::make_unique<Program>(std::move(g), dev_, false);
  upload_weights(*prog_, weights, source);
  for (int c : m_.caches)  // touched now, not page by page in the first passes
    dev_.run(make_op_call(MXN_OP_FILL, {}, {prog_->tensor(c)}, {}, {0.f}));
  setup_adapters(adapters);
  mask_.resize(size_t(max_rows_ * lora_rank_));
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
  o.serve_rows = (kv_.total() + 1) * kv_.block();  // and a spare block for padding rows
  o.serve_block = kv_.block();
  o.serve_blocks = table_w_ - 1;
  o.logit_rows = logit_rows;
  o.serve_lora = lora_rank_;
  o.weights = weights_;
  o.lora.targets = lora_targets_;
  Graph g;
  // bf16 weights: many-row GEMMs round the activations to bf16 too and run on the chip's bf16
  // units (AVX512-BF16, AMX), as llama.cpp does with a bf16 model; one row stays f32 arithmetic.
  if (weights_ == DType::bf16) g.matmul_compute = DType::bf16;
  *m = build_decoder(g, cfg_, 1, rows, o);
  return g;
}

void Engine::upload_rows(int value, int64_t row0, const float* src, int64_t rows) {
  const Tensor t = prog_->tensor(value);
  const int64_t w = t.shape.back();
  dev_.upload(Tensor({rows, w}, DType::f32, t.buffer, t.offset + uint64_t(row0 * w) * 4), src);
}

void Engine::setup_adapters(const std::vector<Adapter>& adapters) {
  const int64_t bs = kv_.block(), kvw = cfg_.n_kv_heads() * cfg_.hd();
  int64_t off = 0;
  std::vector<std::vector<float>> stacks(m_.lora_inputs.size());  // zeros: no adapter's update
  for (size_t i = 0; i < m_.lora_inputs.size(); ++i)
    stacks[i].assign(size_t(numel(prog_->tensor(m_.lora_inputs[i].second).shape)), 0.f);
  for (size_t k = 0; k < adapters.size(); ++k) {
    const Adapter& a = adapters[k];
    Served s;
    s.prefix = a.prefix;
    const std::string which = "adapter " + std::to_string(k + 1);
    if (a.prefix) {  // the prefix's keys and values into cache blocks, once
      if (a.layers != cfg_.layers || a.kv_dim != kvw)
        throw Error(which + ": a P-Tuning prefix for " + std::to_string(a.layers) + " layers of " +
                    std::to_string(a.kv_dim) + " key columns; the model has " +
                    std::to_string(cfg_.layers) + " of " + std::to_string(kvw));
      s.P = a.prefix_len;
      for (int64_t b = 0; b < s.P / bs; ++b) {
        const int32_t blk = kv_.take();
        if (blk < 0) throw Error(which + ": the KV cache has no room for its prefix");
        s.blocks.push_back(blk);
      }
      for (int64_t l = 0; l < cfg_.layers; ++l)
        for (int kv = 0; kv < 2; ++kv) {
          const HostTensor& t = a.tensors.at(kv ? prefix_value_name(l) : prefix_key_name(l));
          const float* rows = reinterpret_cast<const float*>(t.bytes.data());
          const int value = m_.caches[size_t(2 * l + kv)];
          for (size_t b = 0; b < s.blocks.size(); ++b)
            upload_rows(value, s.blocks[b] * bs, rows + int64_t(b) * bs * kvw, bs);
          const int64_t done = int64_t(s.blocks.size()) * bs;
          s.tail.emplace_back(rows + done * kvw, rows + s.P * kvw);
        }
    } else {  // LoRA: its A rows and B columns into the stacks
      s.off = off;
      s.r = a.spec.r;
      s.scale = a.spec.alpha / float(a.spec.r);
      off += s.r;
      for (size_t i = 0; i < m_.lora_inputs.size(); ++i) {
        const auto& [name, value] = m_.lora_inputs[i];
        auto it = a.tensors.find(name);
        if (it == a.tensors.end()) continue;  // a module this adapter leaves alone
        const Shape want = prog_->tensor(value).shape;
        const bool is_a = name.ends_with(".lora_A.weight");
        const Shape has = it->second.shape;
        const int64_t other = is_a ? want[1] : want[0];
        if (has.size() != 2 || has[0] != (is_a ? s.r : other) || has[1] != (is_a ? other : s.r))
          throw Error(which + ": tensor '" + name + "' is " + shape_str(has) + "; expected " +
                      shape_str(is_a ? Shape{s.r, other} : Shape{other, s.r}));
        const float* src = reinterpret_cast<const float*>(it->second.bytes.data());
        float* dst = stacks[i].data();
        const int64_t R = lora_rank_;
        for (int64_t x = 0; x < s.r; ++x)
          for (int64_t y = 0; y < other; ++y)
            if (is_a)
              dst[(s.off + x) * other + y] = src[x * other + y];
            else
              dst[y * R + s.off + x] = src[y * s.r + x];
      }
    }
    adapters_.push_back(std::move(s));
  }
  for (size_t i = 0; i < m_.lora_inputs.size(); ++i)
    dev_.upload(prog_->tensor(m_.lora_inputs[i].second), stacks[i].data());
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
  if (r.adapter < 0 || r.adapter > int(adapters_.size()))
    throw Error("adapter " + std::to_string(r.adapter) + " is not one of the engine's " +
                std::to_string(adapters_.size()));
  const int64_t key0 = r.adapter > 0 ? adapters_[size_t(r.adapter - 1)].P : 0;
  // Compared with the room left, never summed first: max_tokens may come near 2^63.
  const int64_t room = capacity_ - key0 - int64_t(r.prompt.size());
  if (room < 1 || r.max_tokens > room)
    throw Error("the prompt (" + std::to_string(r.prompt.size()) + " tokens) and max_tokens (" +
                std::to_string(r.max_tokens) + ") exceed the context of " +
                std::to_string(capacity_ - key0) + " tokens" +
                (key0 > 0 ? " (its adapter's prefix takes " + std::to_string(key0) + ")" : ""));
  const int64_t n = key0 + int64_t(r.prompt.size()) + r.max_tokens;
  if (ceil_div(n, kv_.block()) > kv_.total())
    throw Error("the prompt and max_tokens need " + std::to_string(ceil_div(n, kv_.block())) +
                " KV blocks; the cache has " + std::to_string(kv_.total()));
  for (int32_t t : r.prompt)
    if (t < 0 || t >= cfg_.vocab_size)
      throw Error("prompt token " + std::to_string(t) + " is outside the vocabulary [0, " +
                  std::to_string(cfg_.vocab_size) + ")");
  for (const auto& [t, b] : r.logit_bias)
    if (t < 0 || t >= cfg_.vocab_size || !std::isfinite(b))
      throw Error("logit_bias names token " + std::to_string(t) + ", outside the vocabulary");
  const int64_t id = next_id_++;
  waiting_.emplace_back(id, std::move(r));
  return id;
}

std::vector<int64_t> Engine::reset() {
  std::vector<int64_t> ids;
  for (Slot& s : slots_)
    if (s.used) {
      ids.push_back(s.id);
      release(s);
    }
  for (const auto& [id, r] : waiting_) ids.push_back(id);
  waiting_.clear();
  return ids;
}

void Engine::cancel(int64_t id) {
  for (Slot& s : slots_)
    if (s.used && s.id == id) s.cancelled = true;
  std::erase_if(waiting_, [&](const auto& w) { return w.first == id; });
}

bool Engine::admit(Slot& s) {
  const EngineRequest& r = waiting_.front().second;
  const int64_t P = int64_t(r.prompt.size()), bs = kv_.block();
  const Served* ad = r.adapter > 0 ? &adapters_[size_t(r.adapter - 1)] : nullptr;
  const bool prefixed = ad && ad->prefix;
  const int64_t key0 = prefixed ? ad->P : 0, pinned = prefixed ? int64_t(ad->blocks.size()) : 0;
  // Shared blocks cover whole prompt blocks and leave at least its last token to compute (its
  // logits start the answer); the rest, to prompt + max_tokens, is taken now. A LoRA adapter's
  // blocks are its own (salted by its number); a P-Tuning request shares only its prefix's.
  const int64_t most = prefixed ? 0 : (P - 1) / bs;
  const uint64_t salt = uint64_t(r.adapter);
  const int64_t shared = int64_t(kv_.match(r.prompt, most, false, salt).size());
  const int64_t need = ceil_div(key0 + P + r.max_tokens, bs) - pinned - shared;
  MXN_CHECK(need >= 0, "a request's block count is negative (submit checks its sizes)");
  if (need > kv_.available()) return false;
  s = Slot{};
  s.used = true;
  s.id = waiting_.front().first;
  s.req = std::move(waiting_.front().second);
  waiting_.pop_front();
  s.key0 = key0;
  if (prefixed) {
    for (int32_t b : ad->blocks) kv_.hold(b);
    s.blocks = ad->blocks;
  } else {
    s.blocks = kv_.match(s.req.prompt, most, true, salt);
  }
  for (int64_t i = 0; i < need; ++i) s.blocks.push_back(kv_.take());
  if (prefixed && !ad->tail.empty() && !ad->tail[0].empty()) {  // the prefix's last rows: a copy
    const int64_t rows = key0 % bs, first = s.blocks[size_t(pinned)] * bs;
    for (size_t c = 0; c < ad->tail.size(); ++c)
      upload_rows(m_.caches[c], first, ad->tail[c].data(), rows);
  }
  s.published = shared;
  s.share = !prefixed;
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
    const int64_t j = s.key0 + pos;  // its key's index
    cache_rows_[size_t(rows)] = int32_t(s.blocks[size_t(j / bs)] * bs + j % bs);
    int32_t* t = tables_.data() + rows * tw;
    t[0] = int32_t(j + 1);
    if (lora_rank_ > 0) {  // its adapter's columns of the stacked ranks, scaled; others 0
      float* mrow = mask_.data() + rows * lora_rank_;
      std::fill(mrow, mrow + lora_rank_, 0.f);
      if (s.req.adapter > 0) {
        const Served& a = adapters_[size_t(s.req.adapter - 1)];
        if (!a.prefix) std::fill(mrow + a.off, mrow + a.off + a.r, a.scale);
      }
    }
    std::copy(s.blocks.begin(), s.blocks.end(), t + 1);
    std::fill(t + 1 + s.blocks.size(), t + tw, 0);  // so a request's rows have equal tables
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
  // Prompt rows: the oldest requests still in prefill first, `chunk` rows in all (chunked
  // prefill: a long prompt takes several passes and never stalls the others' decoding).
  std::vector<size_t> pre;
  for (size_t si = 0; si < slots_.size(); ++si)
    if (slots_[si].used && slots_[si].fed < int64_t(slots_[si].req.prompt.size()))
      pre.push_back(si);
  std::sort(pre.begin(), pre.end(),
            [&](size_t x, size_t y) { return slots_[x].id < slots_[y].id; });
  int64_t budget = chunk_;
  for (size_t k = 0; k < pre.size(); ++k) {
    if (budget == 0) {
      pre.resize(k);
      break;
    }
    Slot& s = slots_[pre[k]];
    const int64_t n = std::min<int64_t>(budget, int64_t(s.req.prompt.size()) - s.fed);
    for (int64_t t = 0; t < n; ++t) add_row(pre[k], s.req.prompt[size_t(s.fed + t)], s.fed + t);
    s.fed += n;
    s.len += n;
    budget -= n;
    if (s.fed == int64_t(s.req.prompt.size())) {
      last_rows_[size_t(lr++)] = int32_t(rows - 1);
      logit_slot.push_back(pre[k]);
    }
  }
  if (rows == 0) return events;
  // Row counts go up to a few sizes (powers of two to 64, then multiples of 64), so few graph
  // variants are ever built: padding rows write the spare block past the allocator's and see
  // one key there; padding logit rows repeat row 0 and are not read.
  const int64_t rows_b = std::min<int64_t>(
      max_rows_, rows <= 64 ? int64_t(std::bit_ceil(uint64_t(rows))) : ceil_div(rows, 64) * 64);
  const int64_t lr_b = std::min<int64_t>(
      int64_t(slots_.size()), int64_t(std::bit_ceil(uint64_t(std::max<int64_t>(lr, 1)))));
  const int32_t spare = int32_t(kv_.total());
  for (; rows < rows_b; ++rows) {
    tokens_[size_t(rows)] = 0;
    positions_[size_t(rows)] = 0;
    cache_rows_[size_t(rows)] = int32_t(spare * bs);
    int32_t* t = tables_.data() + rows * tw;
    t[0] = 1;
    std::fill(t + 1, t + tw, spare);
    if (lora_rank_ > 0)
      std::fill(mask_.data() + rows * lora_rank_, mask_.data() + (rows + 1) * lora_rank_, 0.f);
  }
  for (int64_t r = lr; r < lr_b; ++r) last_rows_[size_t(r)] = 0;
  const int v = variant_for(rows_b, lr_b);
  dev_.upload(prog_->tensor(m_.tokens, v), tokens_.data());
  dev_.upload(prog_->tensor(m_.positions, v), positions_.data());
  dev_.upload(prog_->tensor(m_.cache_rows, v), cache_rows_.data());
  dev_.upload(prog_->tensor(m_.key_ranges, v), tables_.data());
  dev_.upload(prog_->tensor(m_.last_rows, v), last_rows_.data());
  if (lora_rank_ > 0) dev_.upload(prog_->tensor(m_.lora_mask, v), mask_.data());
  prog_->run(0, prog_->graph().nodes.size(), v);
  for (size_t si : pre) {  // prompt blocks now written in full: offered to later requests
    Slot& s = slots_[si];
    for (; s.share &&
           (s.published + 1) * bs <= std::min<int64_t>(s.fed, int64_t(s.req.prompt.size()));
         ++s.published)
      kv_.publish(s.blocks, s.published, s.req.prompt, uint64_t(s.req.adapter));
  }
  if (lr == 0) return events;
  dev_.download(logits_.data(), prog_->tensor(m_.logits, v));
  const int64_t V = cfg_.vocab_size;
  for (int64_t r = 0; r < lr; ++r) {
    Slot& s = slots_[logit_slot[size_t(r)]];
    float* row = logits_.data() + r * V;
    for (const auto& [t, n] : s.counts)
      row[t] -= s.req.presence_penalty + s.req.frequency_penalty * float(n);
    for (const auto& [t, b] : s.req.logit_bias) row[t] += b;
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
    const auto& stops = s.req.stop_ids;  // a chat turn's end (Llama 3's <|eot_id|>, ...)
    const bool eos =
        !s.req.ignore_eos && (std::find(cfg_.eos.begin(), cfg_.eos.end(), tok) != cfg_.eos.end() ||
                              std::find(stops.begin(), stops.end(), tok) != stops.end());
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
