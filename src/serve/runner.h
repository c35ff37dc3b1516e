#pragma once
// The serving engine's second part: a SchedulePlan into the batch's inputs (each row's token,
// position, cache row and block table; a LoRA mask row per row), padded to one of a few row counts
// so that few graph variants are ever built, and one forward pass of the model graph on the
// device. Each row names its cache row and sees only its own request's keys through its block
// table (the paged attention mask, SET_ROWS with destination rows), so a request's tokens do not
// depend on what else is in the batch.
#include <memory>
#include <string>
#include <vector>

#include "backend/device.h"
#include "graph/program.h"
#include "infer/adapter.h"
#include "io/safetensors.h"
#include "models/decoder.h"
#include "serve/scheduler.h"

namespace mxn {

struct RunnerOptions {
  int64_t slots = 1;           // decode rows a pass, at most
  int64_t chunk = 256;         // prompt rows a pass, at most
  int64_t table = 2;           // a block table's width: the key count, then a request's blocks
  DType weights = DType::f32;  // bf16: the 2-D weights stored in bf16 (the CPU backend)
};

class Runner {
 public:
  // The graph has room for `adapters`' LoRA ranks stacked (load_adapters fills them).
  Runner(const DecoderConfig& c, const TensorMap& weights, const std::string& source, Device& dev,
         const KvBlocks& kv, const RunnerOptions& o, const std::vector<Adapter>& adapters);

  // The adapters (numbered from 1): LoRA ranks stacked beside the frozen weights; a P-Tuning
  // prefix's keys and values written once into blocks taken from `kv`. Returns what the
  // scheduler must know of each.
  std::vector<PrefixBlocks> load_adapters(const std::vector<Adapter>& adapters, KvBlocks& kv);
  // A request just admitted: a P-Tuning prefix's last rows (past its whole blocks) copied into
  // the request's first own block.
  void admitted(const Seq& s);
  // One pass: the plan's rows for `sched`'s requests (their state before the pass). Returns the
  // logits of plan.logit_rows() rows (decode rows first, then each chunk that ends its prompt),
  // or nullptr when there are none.
  float* run(const SchedulePlan& plan, const Scheduler& sched);

 private:
  struct Served {  // an adapter as the runner holds it
    bool prefix = false;
    int64_t off = 0, r = 0;  // LoRA: its columns of the stacked ranks
    float scale = 0;
    PrefixBlocks keys;                     // P-Tuning: the prefix's whole blocks, pinned ...
    std::vector<std::vector<float>> tail;  // ... and each layer's k, v rows past the last one
  };
  Graph graph(int64_t rows, int64_t logit_rows, DecoderGraph* m) const;
  int variant_for(int64_t rows, int64_t logit_rows);
  void upload_rows(int value, int64_t row0, const float* src, int64_t rows);
  void add_row(const Seq& s, int32_t token, int64_t pos, int64_t row);
  void pad(int64_t from, int64_t to, int64_t logit_from, int64_t logit_to);
  void load_lora(Served& s, const Adapter& a, const std::string& which,
                 std::vector<std::vector<float>>& stacks);
  void load_prefix(Served& s, const Adapter& a, const std::string& which, KvBlocks& kv);

  DecoderConfig cfg_;
  Device& dev_;
  int64_t slots_, max_rows_, table_w_, block_, pool_blocks_, lora_rank_;
  std::vector<std::string> lora_targets_;
  DType weights_;
  std::vector<Served> adapters_;
  DecoderGraph m_;
  std::unique_ptr<Program> prog_;
  std::vector<int> variants_;  // by (rows - 1) * slots_ + logit_rows - 1; -1 until built
  std::vector<int32_t> tokens_, positions_, cache_rows_, tables_, last_rows_;
  std::vector<float> mask_, logits_;
};

}  // namespace mxn
