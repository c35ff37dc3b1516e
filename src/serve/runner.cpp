#include "serve/runner.h"

#include <algorithm>
#include <bit>

#include "core/error.h"
#include "io/hf_folder.h"

namespace mxn {

namespace {
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
}  // namespace

Runner::Runner(const DecoderConfig& c, const TensorMap& weights, const std::string& source,
               Device& dev, const KvBlocks& kv, const RunnerOptions& o,
               const std::vector<Adapter>& adapters)
    : cfg_(c),
      dev_(dev),
      slots_(o.slots),
      max_rows_(o.slots + o.chunk),
      table_w_(o.table),
      block_(kv.block()),
      pool_blocks_(kv.total()),
      lora_rank_(0),
      weights_(o.weights) {
  const int64_t slots = o.slots;
  for (const Adapter& a : adapters) {  // every LoRA adapter's ranks, stacked; every module adapted
    if (a.prefix) continue;
    lora_rank_ += a.spec.r;
    for (const std::string& t : a.spec.targets)
      if (std::find(lora_targets_.begin(), lora_targets_.end(), t) == lora_targets_.end())
        lora_targets_.push_back(t);
  }
  Graph g = graph(max_rows_, slots, &m_);
  prog_ = std::make_unique<Program>(std::move(g), dev_, false);
  upload_weights(*prog_, weights, source);
  for (int v : m_.caches)  // touched now, not page by page in the first passes
    dev_.run(make_op_call(MXN_OP_FILL, {}, {prog_->tensor(v)}, ScalarParams{0.f}));
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

Graph Runner::graph(int64_t rows, int64_t logit_rows, DecoderGraph* m) const {
  DecoderOptions o;
  o.serve_rows = (pool_blocks_ + 1) * block_;  // and a spare block for padding rows
  o.serve_block = block_;
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

int Runner::variant_for(int64_t rows, int64_t logit_rows) {
  int& v = variants_[size_t((rows - 1) * slots_ + logit_rows - 1)];
  DecoderGraph m;
  if (v < 0) v = prog_->add_variant(graph(rows, logit_rows, &m));
  return v;
}

void Runner::upload_rows(int value, int64_t row0, const float* src, int64_t rows) {
  const Tensor t = prog_->tensor(value);
  const int64_t w = t.shape.back();
  dev_.upload(Tensor({rows, w}, DType::f32, t.buffer, t.offset + uint64_t(row0 * w) * 4), src);
}

std::vector<PrefixBlocks> Runner::load_adapters(const std::vector<Adapter>& adapters,
                                                KvBlocks& kv) {
  std::vector<std::vector<float>> stacks(m_.lora_inputs.size());  // zeros: no adapter's update
  for (size_t i = 0; i < m_.lora_inputs.size(); ++i)
    stacks[i].assign(size_t(numel(prog_->tensor(m_.lora_inputs[i].second).shape)), 0.f);
  std::vector<PrefixBlocks> out;
  int64_t off = 0;
  for (size_t k = 0; k < adapters.size(); ++k) {
    Served s;
    s.prefix = adapters[k].prefix;
    const std::string which = "adapter " + std::to_string(k + 1);
    if (s.prefix) {
      load_prefix(s, adapters[k], which, kv);
    } else {
      s.off = off;
      off += adapters[k].spec.r;
      load_lora(s, adapters[k], which, stacks);
    }
    out.push_back(s.keys);
    adapters_.push_back(std::move(s));
  }
  for (size_t i = 0; i < m_.lora_inputs.size(); ++i)
    dev_.upload(prog_->tensor(m_.lora_inputs[i].second), stacks[i].data());
  return out;
}

// The prefix's keys and values into cache blocks, once.
void Runner::load_prefix(Served& s, const Adapter& a, const std::string& which, KvBlocks& kv) {
  const int64_t bs = block_, kvw = cfg_.n_kv_heads() * cfg_.hd();
  if (a.layers != cfg_.layers || a.kv_dim != kvw)
    throw Error(which + ": a P-Tuning prefix for " + std::to_string(a.layers) + " layers of " +
                std::to_string(a.kv_dim) + " key columns; the model has " +
                std::to_string(cfg_.layers) + " of " + std::to_string(kvw));
  s.keys.keys = a.prefix_len;
  for (int64_t b = 0; b < s.keys.keys / bs; ++b) {
    const int32_t blk = kv.take();
    if (blk < 0) throw Error(which + ": the KV cache has no room for its prefix");
    s.keys.blocks.push_back(blk);
  }
  for (int64_t l = 0; l < cfg_.layers; ++l)
    for (int c = 0; c < 2; ++c) {
      const HostTensor& t = a.tensors.at(c ? prefix_value_name(l) : prefix_key_name(l));
      const float* rows = reinterpret_cast<const float*>(t.bytes.data());
      const int value = m_.caches[size_t(2 * l + c)];
      for (size_t b = 0; b < s.keys.blocks.size(); ++b)
        upload_rows(value, s.keys.blocks[b] * bs, rows + int64_t(b) * bs * kvw, bs);
      const int64_t done = int64_t(s.keys.blocks.size()) * bs;
      s.tail.emplace_back(rows + done * kvw, rows + s.keys.keys * kvw);
    }
}

// Its A rows and B columns into the stacks.
void Runner::load_lora(Served& s, const Adapter& a, const std::string& which,
                       std::vector<std::vector<float>>& stacks) {
  s.r = a.spec.r;
  s.scale = a.spec.alpha / float(a.spec.r);
  for (const auto& [name, t] : a.tensors) {  // every tensor must adapt one of the model's linears
    bool used = false;
    for (const auto& in : m_.lora_inputs) used = used || in.first == name;
    if (!used)
      throw Error(which + ": tensor '" + name + "' adapts no linear layer of the model (an " +
                  "adapter for another base, or a module the model does not have)");
  }
  for (size_t i = 0; i < m_.lora_inputs.size(); ++i) {
    const auto& [name, value] = m_.lora_inputs[i];
    auto it = a.tensors.find(name);
    if (it == a.tensors.end()) continue;  // a module this adapter leaves alone
    // 2-D, or a routed experts' stack: (E, r, in) and (E, out, r), expert by expert.
    const Shape want = prog_->tensor(value).shape;
    const bool is_a = name.ends_with(".lora_A.weight");
    const Shape has = it->second.shape;
    const int64_t E = want.size() == 3 ? want[0] : 1;
    const int64_t other = is_a ? want[want.size() - 1] : want[want.size() - 2];
    Shape expect = is_a ? Shape{s.r, other} : Shape{other, s.r};
    if (want.size() == 3) expect.insert(expect.begin(), E);
    if (has != expect)
      throw Error(which + ": tensor '" + name + "' is " + shape_str(has) + "; expected " +
                  shape_str(expect));
    for (int64_t e = 0; e < E; ++e) {
      const float* src = reinterpret_cast<const float*>(it->second.bytes.data()) + e * s.r * other;
      float* dst = stacks[i].data() + e * lora_rank_ * other;
      for (int64_t x = 0; x < s.r; ++x)
        for (int64_t y = 0; y < other; ++y)
          if (is_a)
            dst[(s.off + x) * other + y] = src[x * other + y];
          else
            dst[y * lora_rank_ + s.off + x] = src[y * s.r + x];
    }
  }
}

void Runner::admitted(const Seq& s) {
  if (s.req.adapter < 1) return;
  const Served& ad = adapters_[size_t(s.req.adapter - 1)];
  if (!ad.prefix || ad.tail.empty() || ad.tail[0].empty()) return;
  const int64_t rows = s.key0 % block_;
  const int64_t first = s.blocks[ad.keys.blocks.size()] * block_;
  for (size_t c = 0; c < ad.tail.size(); ++c)
    upload_rows(m_.caches[c], first, ad.tail[c].data(), rows);
}

void Runner::add_row(const Seq& s, int32_t token, int64_t pos, int64_t row) {
  tokens_[size_t(row)] = token;
  positions_[size_t(row)] = int32_t(pos);
  const int64_t j = s.key0 + pos;  // its key's index
  cache_rows_[size_t(row)] = int32_t(s.blocks[size_t(j / block_)] * block_ + j % block_);
  int32_t* t = tables_.data() + row * table_w_;
  t[0] = int32_t(j + 1);
  if (lora_rank_ > 0) {  // its adapter's columns of the stacked ranks, scaled; others 0
    float* mrow = mask_.data() + row * lora_rank_;
    std::fill(mrow, mrow + lora_rank_, 0.f);
    if (s.req.adapter > 0) {
      const Served& a = adapters_[size_t(s.req.adapter - 1)];
      if (!a.prefix) std::fill(mrow + a.off, mrow + a.off + a.r, a.scale);
    }
  }
  std::copy(s.blocks.begin(), s.blocks.end(), t + 1);
  std::fill(t + 1 + s.blocks.size(), t + table_w_, 0);  // so a request's rows have equal tables
}

// Padding rows write the spare block past the pool's and see one key there; padding logit rows
// repeat row 0 and are not read.
void Runner::pad(int64_t from, int64_t to, int64_t logit_from, int64_t logit_to) {
  const int32_t spare = int32_t(pool_blocks_);
  for (int64_t row = from; row < to; ++row) {
    tokens_[size_t(row)] = 0;
    positions_[size_t(row)] = 0;
    cache_rows_[size_t(row)] = int32_t(spare * block_);
    int32_t* t = tables_.data() + row * table_w_;
    t[0] = 1;
    std::fill(t + 1, t + table_w_, spare);
    if (lora_rank_ > 0)
      std::fill(mask_.data() + row * lora_rank_, mask_.data() + (row + 1) * lora_rank_, 0.f);
  }
  for (int64_t r = logit_from; r < logit_to; ++r) last_rows_[size_t(r)] = 0;
}

float* Runner::run(const SchedulePlan& plan, const Scheduler& sched) {
  int64_t rows = 0, lr = 0;
  for (size_t i : plan.decode) {
    const Seq& s = sched.seq(i);
    add_row(s, s.next, s.len, rows++);
    last_rows_[size_t(lr++)] = int32_t(rows - 1);
  }
  for (const SchedulePlan::Chunk& c : plan.prefill) {
    const Seq& s = sched.seq(c.slot);
    for (int64_t t = 0; t < c.rows; ++t)
      add_row(s, s.req.prompt[size_t(c.from + t)], c.from + t, rows++);
    if (c.last) last_rows_[size_t(lr++)] = int32_t(rows - 1);
  }
  if (rows == 0) return nullptr;
  // Row counts go up to a few sizes (powers of two to 64, then multiples of 64), so few graph
  // variants are ever built.
  const int64_t rows_b = std::min<int64_t>(
      max_rows_, rows <= 64 ? int64_t(std::bit_ceil(uint64_t(rows))) : ceil_div(rows, 64) * 64);
  const int64_t lr_b =
      std::min<int64_t>(slots_, int64_t(std::bit_ceil(uint64_t(std::max<int64_t>(lr, 1)))));
  pad(rows, rows_b, lr, lr_b);
  const int v = variant_for(rows_b, lr_b);
  dev_.upload(prog_->tensor(m_.tokens, v), tokens_.data());
  dev_.upload(prog_->tensor(m_.positions, v), positions_.data());
  dev_.upload(prog_->tensor(m_.cache_rows, v), cache_rows_.data());
  dev_.upload(prog_->tensor(m_.key_ranges, v), tables_.data());
  dev_.upload(prog_->tensor(m_.last_rows, v), last_rows_.data());
  if (lora_rank_ > 0) dev_.upload(prog_->tensor(m_.lora_mask, v), mask_.data());
  prog_->run(0, prog_->graph().nodes.size(), v);
  if (lr == 0) return nullptr;
  dev_.download(logits_.data(), prog_->tensor(m_.logits, v));
  return logits_.data();
}

}  // namespace mxn
