#pragma once
// A Program is a Graph made ready to run on one Device: params and grads each in one buffer
// (decayed params first, so AdamW runs as two flat ops), inputs in one buffer, and every
// activation at a planned offset in one arena. The op calls are built once; running a step
// allocates nothing.
#include <memory>

#include "backend/device.h"
#include "graph/graph.h"

namespace mxn {

class Program {
 public:
  // with_grads = false: inference only, no gradient buffer.
  Program(Graph g, Device& dev, bool with_grads = true);

  // Nodes [begin, end) of the graph (variant 0) or of a variant with fewer rows.
  void run(size_t begin, size_t end, int variant = 0);
  Tensor tensor(int value, int variant = 0) const;
  // The op call of one node, to change a scalar between runs (e.g. the loss seed's scale).
  mxn_op_call& call(size_t node, int variant = 0) { return variants_[size_t(variant)].calls[node]; }

  // The same model with fewer rows per run: `smaller` must be this Program's graph built for a
  // smaller batch (the same nodes and values, no value larger). Its op calls use this Program's
  // buffers at the same offsets, so a rank can run any share of a batch without new memory.
  // Returns the variant's index for run().
  int add_variant(Graph smaller);
  // The flat span of params (or grads) with the given decay flag; `all` spans both groups.
  Tensor params_flat(bool decay) const;
  Tensor grads_flat(bool decay) const;
  Tensor grads_all() const;
  Tensor params_all() const;  // both groups: a param's float index is its offset / 4
  int64_t param_count() const { return n_decay_ + n_nodecay_; }

  const Graph& graph() const { return g_; }
  Device& device() { return dev_; }
  uint64_t arena_bytes() const { return arena_bytes_; }

 private:
  Graph g_;
  Device& dev_;
  std::unique_ptr<Buffer> params_, frozen_, grads_, inputs_, arena_;
  uint64_t arena_bytes_ = 0;
  int64_t n_decay_ = 0, n_nodecay_ = 0;
  struct Variant {
    Graph g;  // the shapes (variant 0 leaves it empty and uses g_); offsets are always g_'s
    std::vector<mxn_op_call> calls;
  };
  std::vector<Variant> variants_;
  std::vector<mxn_op_call> build_calls(const Graph& shapes) const;
  Tensor view(int id, const Shape& shape) const;  // value `id`'s place, seen with `shape`
};

// Arena offsets for activations by liveness: values whose lifetimes overlap never share bytes.
// Returns the arena size. Exposed for tests.
uint64_t plan_arena(Graph& g);

}  // namespace mxn
