#include "train/infer.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "backend/device.h"
#include "core/error.h"
#include "core/rng.h"
#include "data/shard.h"
#include "data/tokenizer.h"
#include "graph/program.h"
#include "io/checkpoint.h"
#include "models/gpt2/gpt2.h"
#include "train/config.h"

namespace mxn {
namespace {

struct Loaded {
  TrainConfig cfg;
  std::unique_ptr<Device> dev;
  GPT2Graph m;
  std::unique_ptr<Program> prog;
};

Loaded load_for_inference(const std::string& checkpoint, const std::string& device, int64_t threads,
                          int64_t B, int64_t T, bool with_loss) {
  Checkpoint ck = load_checkpoint(checkpoint, false);
  Loaded l;
  from_json(l.cfg, ck.trainer.at("config"));
  l.cfg.model.validate();
  if (T <= 0 || T > l.cfg.model.n_ctx) T = l.cfg.model.n_ctx;
  l.dev = open_device(device, int(threads));
  Graph g;
  l.m = build_gpt2(g, l.cfg.model, B, T, with_loss);
  l.prog = std::make_unique<Program>(std::move(g), *l.dev);
  for (int p : l.prog->graph().params()) {
    const Value& v = l.prog->graph().v(p);
    auto it = ck.weights.find(v.name);
    if (it == ck.weights.end()) throw Error("checkpoint is missing tensor '" + v.name + "'");
    if (it->second.shape != v.shape || it->second.dtype != DType::f32)
      throw Error("checkpoint tensor '" + v.name + "' has shape " + shape_str(it->second.shape) +
                  ", expected " + shape_str(v.shape));
    l.dev->upload(l.prog->tensor(p), it->second.bytes.data());
  }
  std::vector<int32_t> pos(size_t(B * T));
  for (int64_t i = 0; i < B * T; ++i) pos[size_t(i)] = int32_t(i % T);
  l.dev->upload(l.prog->tensor(l.m.positions), pos.data());
  return l;
}

// A byte-level model can sample bytes that are not UTF-8; text goes out only in whole valid
// characters, and an invalid byte becomes U+FFFD, so a terminal never sees broken sequences.
class Utf8Stream {
 public:
  std::string push(uint8_t b) {
    std::string out;
    if (need_ == 0) {
      if (b < 0x80) return std::string(1, char(b));
      need_ = b >= 0xf0 && b < 0xf5 ? 3 : b >= 0xe0 ? 2 : b >= 0xc2 && b < 0xe0 ? 1 : -1;
      if (need_ < 0) {
        need_ = 0;
        return "\xEF\xBF\xBD";
      }
      pending_.assign(1, char(b));
      return out;
    }
    if ((b & 0xc0) != 0x80) {  // broken sequence: replace it and start over with this byte
      need_ = 0;
      pending_.clear();
      return "\xEF\xBF\xBD" + push(b);
    }
    pending_.push_back(char(b));
    if (--need_ == 0) out.swap(pending_);
    return out;
  }

 private:
  int need_ = 0;
  std::string pending_;
};

}  // namespace

double eval_checkpoint(const std::string& checkpoint, const std::string& data_path,
                       const std::string& device, int64_t threads, int64_t batch) {
  TokenData data = TokenData::open(data_path);
  Checkpoint probe = load_checkpoint(checkpoint, false);
  TrainConfig cfg;
  from_json(cfg, probe.trainer.at("config"));
  const int64_t T = std::min<int64_t>(cfg.seq_len(), data.n_val() - 1);
  if (T < 1) throw Error("data '" + data_path + "' has too few validation tokens to evaluate");
  if (data.vocab() > cfg.model.vocab_size)
    throw Error("data '" + data_path + "' has vocab " + std::to_string(data.vocab()) +
                ", the model's is " + std::to_string(cfg.model.vocab_size));
  const int64_t windows = (data.n_val() - 1) / T;
  const int64_t B = std::max<int64_t>(1, std::min(batch, windows));
  Loaded l = load_for_inference(checkpoint, device, threads, B, T, true);
  std::vector<int32_t> tok(size_t(B * T)), tgt(size_t(B * T));
  double sum = 0;
  int64_t n = 0;
  // Non-overlapping windows over the whole split; the last partial batch is dropped.
  for (int64_t w0 = 0; w0 + B <= windows; w0 += B) {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t) {
        tok[size_t(b * T + t)] = data.val()[(w0 + b) * T + t];
        tgt[size_t(b * T + t)] = data.val()[(w0 + b) * T + t + 1];
      }
    l.dev->upload(l.prog->tensor(l.m.tokens), tok.data());
    l.dev->upload(l.prog->tensor(l.m.targets), tgt.data());
    l.prog->run(0, l.prog->graph().nodes.size());
    float loss;
    l.dev->download(&loss, l.prog->tensor(l.m.loss));
    sum += loss;
    ++n;
  }
  return sum / double(n);
}

void generate_text(const std::string& checkpoint, const GenerateOptions& o,
                   void (*emit)(const std::string&, void*), void* user) {
  if (o.temperature < 0) throw Error("temperature must be >= 0");
  if (o.max_tokens < 0) throw Error("max_tokens must be >= 0");
  Loaded l = load_for_inference(checkpoint, o.device, o.threads, 1, 0, false);
  const int64_t T = l.cfg.model.n_ctx, V = l.cfg.model.vocab_size;
  ByteTokenizer tokz;
  std::vector<int32_t> ids = tokz.encode(o.prompt);
  if (ids.empty()) ids.push_back('\n');
  std::vector<int32_t> window(size_t(T), 0);
  std::vector<float> logits(size_t(T * V));
  std::vector<std::pair<float, int32_t>> cand(static_cast<size_t>(V));
  Rng rng(uint64_t(o.seed));
  Utf8Stream utf8;
  for (int64_t i = 0; i < o.max_tokens; ++i) {
    // No KV cache yet: each token reruns the forward pass over the last n_ctx tokens.
    const int64_t len = std::min<int64_t>(int64_t(ids.size()), T);
    std::copy(ids.end() - len, ids.end(), window.begin());
    l.dev->upload(l.prog->tensor(l.m.tokens), window.data());
    l.prog->run(0, l.prog->graph().nodes.size());
    l.dev->download(logits.data(), l.prog->tensor(l.m.logits));
    const float* row = logits.data() + (len - 1) * V;
    int32_t next = 0;
    if (o.temperature == 0) {
      next = int32_t(std::max_element(row, row + V) - row);
    } else {
      for (int64_t v = 0; v < V; ++v) cand[size_t(v)] = {row[v], int32_t(v)};
      const int64_t k = o.top_k > 0 ? std::min(o.top_k, V) : V;
      std::partial_sort(cand.begin(), cand.begin() + k, cand.end(),
                        [](auto a, auto b) { return a.first > b.first; });
      double total = 0;
      std::vector<double> p(static_cast<size_t>(k));
      for (int64_t j = 0; j < k; ++j)
        total += p[size_t(j)] = std::exp((cand[size_t(j)].first - cand[0].first) / o.temperature);
      double r = rng.uniform() * total;
      next = cand[size_t(k - 1)].second;
      for (int64_t j = 0; j < k; ++j)
        if ((r -= p[size_t(j)]) <= 0) {
          next = cand[size_t(j)].second;
          break;
        }
    }
    ids.push_back(next);
    const std::string piece = utf8.push(uint8_t(next));
    if (!piece.empty()) emit(piece, user);
  }
}

}  // namespace mxn
