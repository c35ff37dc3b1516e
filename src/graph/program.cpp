#include "graph/program.h"

#include <algorithm>

#include "core/error.h"

namespace mxn {
namespace {
constexpr uint64_t kAlign = 64;
uint64_t align_up(uint64_t x) { return (x + kAlign - 1) / kAlign * kAlign; }
uint64_t bytes_of(const Value& v) { return uint64_t(numel(v.shape)) * dtype_size(v.dtype); }
}  // namespace

uint64_t plan_arena(Graph& g) {
  const size_t nv = g.values.size();
  std::vector<int64_t> first(nv, -1), last(nv, -1);
  for (size_t i = 0; i < g.nodes.size(); ++i) {
    auto touch = [&](int id) {
      if (first[size_t(id)] < 0) first[size_t(id)] = int64_t(i);
      last[size_t(id)] = int64_t(i);
    };
    for (int id : g.nodes[i].out) touch(id);
    for (int id : g.nodes[i].in) touch(id);
  }
  for (auto [id, at] : g.runner_uses) {  // live while the runner touches it, before node `at`
    if (first[size_t(id)] < 0 || int64_t(at) < first[size_t(id)]) first[size_t(id)] = int64_t(at);
    last[size_t(id)] = std::max(last[size_t(id)], int64_t(at));
  }
  for (size_t i = 0; i < nv; ++i)
    if (g.values[i].output && first[i] >= 0) last[i] = int64_t(g.nodes.size());
  // An op that may write its output over an input (docs/backends.md, "In place") takes over that
  // input's bytes when this is the input's last use: the cross-entropy backward writes the
  // logits' gradient where the logits were (B*T*V floats, the largest activation of an LM).
  std::vector<int> alias(nv, -1);  // value -> the value whose bytes it reuses
  // CLASSIFIER_CE_BWD scales its gradients in place the same way.
  for (size_t i = 0; i < g.nodes.size(); ++i) {
    const Node& n = g.nodes[i];
    std::vector<std::pair<int, int>> pairs;  // (input, output) that may share bytes
    if (n.op == MXN_OP_CROSS_ENTROPY_BWD) pairs.push_back({n.in[1], n.out[0]});
    if (n.op == MXN_OP_CLASSIFIER_CE_BWD)
      for (size_t j = 0; j < n.out.size() && j + 1 < n.in.size(); ++j)
        pairs.push_back({n.in[j + 1], n.out[j]});
    for (auto [in, out] : pairs) {
      int root = in;
      while (alias[size_t(root)] >= 0) root = alias[size_t(root)];
      const Value &a = g.values[size_t(root)], &b = g.values[size_t(out)];
      if (a.kind != ValueKind::activation || b.kind != ValueKind::activation ||
          last[size_t(root)] != int64_t(i) || first[size_t(out)] != int64_t(i) ||
          bytes_of(a) != bytes_of(b) || a.output)
        continue;
      alias[size_t(out)] = root;
      last[size_t(root)] = last[size_t(out)];
    }
  }
  std::vector<int> order;
  for (size_t i = 0; i < nv; ++i)
    if (g.values[i].kind == ValueKind::activation && first[i] >= 0 && alias[i] < 0)
      order.push_back(int(i));
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    return bytes_of(g.values[size_t(a)]) > bytes_of(g.values[size_t(b)]);
  });
  struct Placed {
    uint64_t lo, hi;
    int64_t first, last;
  };
  std::vector<Placed> placed;
  uint64_t total = 0;
  for (int id : order) {
    const uint64_t size = align_up(bytes_of(g.values[size_t(id)]));
    const int64_t f = first[size_t(id)], l = last[size_t(id)];
    std::vector<std::pair<uint64_t, uint64_t>> busy;
    for (const Placed& p : placed)
      if (p.first <= l && f <= p.last) busy.emplace_back(p.lo, p.hi);
    std::sort(busy.begin(), busy.end());
    uint64_t off = 0;
    for (auto [lo, hi] : busy) {
      if (off + size <= lo) break;
      off = std::max(off, hi);
    }
    g.values[size_t(id)].offset = off;
    placed.push_back({off, off + size, f, l});
    total = std::max(total, off + size);
  }
  for (size_t i = 0; i < nv; ++i)
    if (alias[i] >= 0) g.values[i].offset = g.values[size_t(alias[i])].offset;
  return total;
}

Program::Program(Graph g, Device& dev, bool with_grads) : g_(std::move(g)), dev_(dev) {
  uint64_t poff = 0, ioff = 0;
  for (bool decay : {true, false})
    for (Value& v : g_.values)
      if (v.kind == ValueKind::param && v.decay == decay) {
        if (v.dtype != DType::f32) poff = align_up(poff);  // bf16 weights (inference only)
        v.offset = poff;
        g_.values[size_t(v.grad)].offset = poff;
        poff += bytes_of(v);
        if (v.dtype != DType::f32) poff = align_up(poff);
        (decay ? n_decay_ : n_nodecay_) += numel(v.shape);
      }
  uint64_t foff = 0;
  for (Value& v : g_.values)
    if (v.kind == ValueKind::input || v.kind == ValueKind::frozen) {
      uint64_t& off = v.kind == ValueKind::input ? ioff : foff;
      v.offset = off;
      off += align_up(bytes_of(v));
    }
  arena_bytes_ = plan_arena(g_);
  params_ = dev_.alloc(std::max<uint64_t>(poff, kAlign));  // frozen-only graphs train nothing
  if (foff > 0) frozen_ = dev_.alloc(foff);
  if (with_grads) grads_ = dev_.alloc(std::max<uint64_t>(poff, kAlign));
  inputs_ = dev_.alloc(ioff);
  arena_ = dev_.alloc(arena_bytes_);
  variants_.push_back({Graph{}, build_calls(g_)});
}

std::vector<mxn_op_call> Program::build_calls(const Graph& shapes) const {
  std::vector<mxn_op_call> calls;
  for (const Node& n : shapes.nodes) {
    std::vector<Tensor> in, out;
    for (int id : n.in) in.push_back(view(id, shapes.v(id).shape));
    for (int id : n.out) out.push_back(view(id, shapes.v(id).shape));
    calls.push_back(make_op_call(n.op, in, out, n.ip, n.fp));
  }
  return calls;
}

int Program::add_variant(Graph smaller) {
  MXN_CHECK(smaller.nodes.size() == g_.nodes.size() && smaller.values.size() == g_.values.size(),
            "a Program variant must have the same nodes and values as its graph");
  for (size_t i = 0; i < g_.values.size(); ++i) {
    const Value &a = g_.values[i], &b = smaller.values[i];
    MXN_CHECK(
        a.kind == b.kind && a.dtype == b.dtype && bytes_of(b) <= bytes_of(a) &&
            ((a.kind != ValueKind::param && a.kind != ValueKind::frozen) || a.shape == b.shape),
        "Program variant value '" + b.name + "' does not fit its slot");
  }
  for (size_t i = 0; i < g_.nodes.size(); ++i)
    MXN_CHECK(g_.nodes[i].op == smaller.nodes[i].op, "Program variant ops differ");
  std::vector<mxn_op_call> calls = build_calls(smaller);
  variants_.push_back({std::move(smaller), std::move(calls)});
  return int(variants_.size()) - 1;
}

Tensor Program::tensor(int id, int variant) const {
  const Graph& shapes = variant == 0 ? g_ : variants_[size_t(variant)].g;
  return view(id, shapes.v(id).shape);
}

Tensor Program::view(int id, const Shape& shape) const {
  const Value& v = g_.v(id);
  Buffer* b = nullptr;
  switch (v.kind) {
    case ValueKind::param:
      b = params_.get();
      break;
    case ValueKind::frozen:
      b = frozen_.get();
      break;
    case ValueKind::grad:
      b = grads_ ? grads_.get() : params_.get();  // inference: never read, any valid place
      break;
    case ValueKind::input:
      b = inputs_.get();
      break;
    case ValueKind::activation:
      b = arena_.get();
      break;
  }
  return Tensor(shape, v.dtype, b->handle(), v.offset);
}

Tensor Program::params_flat(bool decay) const {
  return Tensor({decay ? n_decay_ : n_nodecay_}, DType::f32, params_->handle(),
                decay ? 0 : uint64_t(n_decay_) * 4);
}

Tensor Program::grads_flat(bool decay) const {
  return Tensor({decay ? n_decay_ : n_nodecay_}, DType::f32, grads_->handle(),
                decay ? 0 : uint64_t(n_decay_) * 4);
}

Tensor Program::params_all() const {
  return Tensor({n_decay_ + n_nodecay_}, DType::f32, params_->handle(), 0);
}

Tensor Program::grads_all() const {
  return Tensor({n_decay_ + n_nodecay_}, DType::f32, grads_->handle(), 0);
}

void Program::run(size_t begin, size_t end, int variant) {
  const std::vector<mxn_op_call>& calls = variants_[size_t(variant)].calls;
  for (size_t i = begin; i < end; ++i) dev_.run(calls[i]);
}

}  // namespace mxn
