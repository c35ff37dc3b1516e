#pragma once
// Generation with a KV cache: the prompt is run once (prefill, in chunks of rows), then each new
// token costs one row through the model, reading every earlier key and value from the cache.
#include <memory>
#include <vector>

#include "backend/device.h"
#include "core/rng.h"
#include "graph/program.h"
#include "io/safetensors.h"
#include "models/decoder.h"

namespace mxn {

class Generator {
 public:
  // `capacity`: the most tokens a sequence may hold (prompt and output); `chunk`: the most rows
  // per prefill pass. Weights are checked by name and shape (errors name `source`).
  // `weights_dtype` bf16 stores the 2-D weights in bf16 (half the bytes read per token); the
  // arithmetic stays f32.
  Generator(const DecoderConfig& c, const TensorMap& weights, const std::string& source,
            Device& dev, int64_t capacity, int64_t chunk = 64, DType weights_dtype = DType::f32);

  // Appends tokens to the sequence and returns the logits (vocab) that follow the last one.
  const std::vector<float>& feed(const int32_t* ids, int64_t n);
  void reset() { pos_ = 0; }
  int64_t length() const { return pos_; }
  int64_t capacity() const { return capacity_; }

 private:
  Graph graph(int64_t rows, DecoderGraph* m) const;  // one sequence, `rows` new tokens a run
  int variant_for(int64_t rows);
  DecoderConfig cfg_;
  DType wdt_;
  Device& dev_;
  int64_t capacity_, chunk_, pos_ = 0;
  DecoderGraph m_;
  std::unique_ptr<Program> prog_;
  std::vector<int> variants_;  // by rows - 1; -1 until built
  std::vector<int32_t> positions_;
  std::vector<float> logits_;
};

// Picks the next token: greedy at temperature 0, else softmax(logits / T) restricted to the top_k
// likeliest (0: all) and then to the smallest set whose probability reaches top_p.
struct SamplingOptions {
  double temperature = 0.8;
  int64_t top_k = 40;
  double top_p = 1.0;
  uint64_t seed = 1;
};
class Sampler {
 public:
  explicit Sampler(const SamplingOptions& o) : o_(o), rng_(o.seed) {}
  int32_t next(const float* logits, int64_t V);

 private:
  SamplingOptions o_;
  Rng rng_;
  std::vector<std::pair<float, int32_t>> cand_;
  std::vector<double> p_;
};

}  // namespace mxn
