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
  Program(Graph g, Device& dev);

  void run(size_t begin, size_t end);  // nodes [begin, end)
  Tensor tensor(int value) const;
  // The flat span of params (or grads) with the given decay flag; `all` spans both groups.
  Tensor params_flat(bool decay) const;
  Tensor grads_flat(bool decay) const;
  Tensor grads_all() const;
  int64_t param_count() const { return n_decay_ + n_nodecay_; }

  const Graph& graph() const { return g_; }
  Device& device() { return dev_; }
  uint64_t arena_bytes() const { return arena_bytes_; }

 private:
  Graph g_;
  Device& dev_;
  std::unique_ptr<Buffer> params_, grads_, inputs_, arena_;
  uint64_t arena_bytes_ = 0;
  int64_t n_decay_ = 0, n_nodecay_ = 0;
  std::vector<mxn_op_call> calls_;
};

// Arena offsets for activations by liveness: values whose lifetimes overlap never share bytes.
// Returns the arena size. Exposed for tests.
uint64_t plan_arena(Graph& g);

}  // namespace mxn
