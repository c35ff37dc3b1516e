#include "infer/generate.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "io/hf_folder.h"

namespace mxn {

Generator::Generator(const DecoderConfig& c, const TensorMap& weights, const std::string& source,
                     Device& dev, int64_t capacity, int64_t chunk, DType weights_dtype)
    : cfg_(c),
      wdt_(weights_dtype),
      dev_(dev),
      capacity_(capacity),
      chunk_(std::min(chunk, capacity)) {
  MXN_CHECK(capacity_ >= 1 && chunk_ >= 1, "generator sizes");
  if (c.gpt2() && capacity_ > c.max_pos)
    throw Error("the model has " + std::to_string(c.max_pos) + " learned positions; " +
                std::to_string(capacity_) + " tokens do not fit");
  Graph g = graph(chunk_, &m_);
  prog_ = std::make_unique<Program>(std::move(g), dev_, false);
  upload_weights(*prog_, weights, source);
  variants_.assign(size_t(chunk_), -1);
  variants_[size_t(chunk_ - 1)] = 0;
  positions_.resize(size_t(chunk_));
  logits_.resize(size_t(c.vocab_size));
}

Graph Generator::graph(int64_t rows, DecoderGraph* m) const {
  DecoderOptions o;
  o.kv_cache = capacity_;
  o.last_logits = true;
  o.weights = wdt_;
  Graph g;
  // bf16 weights: the prompt's many-row GEMMs run on the chip's bf16 units with the activations
  // rounded to bf16, as llama.cpp does; one row (decoding) stays f32 arithmetic, the GEMVs
  // widening each weight in registers (a bf16 head would round its whole table every token).
  if (wdt_ == DType::bf16 && rows > 1) g.matmul_compute = DType::bf16;
  *m = build_decoder(g, cfg_, 1, rows, o);
  return g;
}

int Generator::variant_for(int64_t rows) {
  int& v = variants_[size_t(rows - 1)];
  DecoderGraph m;
  if (v < 0) v = prog_->add_variant(graph(rows, &m));
  return v;
}

const std::vector<float>& Generator::feed(const int32_t* ids, int64_t n) {
  if (pos_ + n > capacity_)
    throw Error("the sequence would hold " + std::to_string(pos_ + n) + " tokens; this generator " +
                "holds " + std::to_string(capacity_));
  for (int64_t done = 0; done < n;) {
    const int64_t rows = std::min(chunk_, n - done);
    const int v = variant_for(rows);
    for (int64_t t = 0; t < rows; ++t) positions_[size_t(t)] = int32_t(pos_ + t);
    const int32_t last = int32_t(rows - 1);
    dev_.upload(prog_->tensor(m_.tokens, v), ids + done);
    dev_.upload(prog_->tensor(m_.positions, v), positions_.data());
    dev_.upload(prog_->tensor(m_.last_rows, v), &last);
    set_cache_position(m_, pos_, rows,
                       [&](size_t node) -> mxn_op_call& { return prog_->call(node, v); });
    prog_->run(0, prog_->graph().nodes.size(), v);
    pos_ += rows;
    done += rows;
  }
  dev_.download(logits_.data(), prog_->tensor(m_.logits));
  return logits_;
}

int32_t Sampler::next(const float* logits, int64_t V) {
  if (o_.temperature <= 0) return int32_t(std::max_element(logits, logits + V) - logits);
  cand_.resize(size_t(V));
  for (int64_t v = 0; v < V; ++v) cand_[size_t(v)] = {logits[v], int32_t(v)};
  const int64_t k = o_.top_k > 0 ? std::min(o_.top_k, V) : V;
  std::partial_sort(cand_.begin(), cand_.begin() + k, cand_.end(), [](auto a, auto b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  });
  p_.resize(size_t(k));
  double total = 0;
  for (int64_t j = 0; j < k; ++j)
    total += p_[size_t(j)] = std::exp((cand_[size_t(j)].first - cand_[0].first) / o_.temperature);
  int64_t keep = k;  // top-p: the smallest head of the sorted list reaching the mass
  if (o_.top_p < 1.0) {
    double acc = 0;
    for (int64_t j = 0; j < k; ++j)
      if ((acc += p_[size_t(j)] / total) >= o_.top_p) {
        keep = j + 1;
        break;
      }
    total = 0;
    for (int64_t j = 0; j < keep; ++j) total += p_[size_t(j)];
  }
  double r = rng_.uniform() * total;
  for (int64_t j = 0; j < keep; ++j)
    if ((r -= p_[size_t(j)]) <= 0) return cand_[size_t(j)].second;
  return cand_[size_t(keep - 1)].second;
}

}  // namespace mxn
