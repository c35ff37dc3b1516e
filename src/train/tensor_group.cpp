// One rank's part in a tensor-parallel group (tensor_group.h).
#include "train/tensor_group.h"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "core/error.h"
#include "parallel/balance.h"
#include "parallel/grad_sync.h"
#include "train/strategy.h"

namespace mxn {

std::vector<TensorShard> tensor_shards(const DecoderConfig& d, const std::vector<double>& speed,
                                       bool even_vocab) {
  const int64_t n = int64_t(speed.size()), G = d.n_kv_heads(), F = d.ffn_width();
  const int64_t q_per_kv = d.heads / G;
  std::vector<double> sec;
  for (double s : speed) sec.push_back(1 / s);
  const std::vector<int64_t> kv = split_rows(G, sec);
  const int64_t block = F % 32 == 0 && F / 32 >= n ? 32 : 1;
  const std::vector<int64_t> blocks = split_rows(F / block, sec);
  const std::vector<int64_t> vocab =
      split_rows(d.vocab_size, even_vocab ? std::vector<double>(sec.size(), 1.0) : sec);
  std::vector<TensorShard> out(static_cast<size_t>(n));
  int64_t k0 = 0, f0 = 0, v0 = 0;
  for (size_t r = 0; r < out.size(); ++r) {
    TensorShard& s = out[r];
    s.ranks = n, s.rank = int64_t(r);
    s.kv0 = k0, s.kv = kv[r], s.head0 = k0 * q_per_kv, s.heads = kv[r] * q_per_kv;
    s.ffn0 = f0, s.ffn = blocks[r] * block;
    s.vocab0 = v0, s.vocab = vocab[r];
    k0 += s.kv, f0 += s.ffn, v0 += s.vocab;
  }
  return out;
}

void move_pieces(const ShardPieces& s, const Shape& whole, float* w, float* shard, bool to_shard) {
  const int64_t rows = whole[0], cols = whole.size() > 1 ? numel(whole) / rows : 1;
  const int64_t width = s.width();
  int64_t at = 0;
  for (auto [from, n] : s.pieces) {
    for (int64_t r = 0; r < (s.axis == 0 ? n : rows); ++r) {
      const int64_t span = s.axis == 0 ? cols : n;
      float* a = s.axis == 0 ? w + (from + r) * cols : w + r * cols + from;
      float* b = s.axis == 0 ? shard + (at + r) * cols : shard + r * width + at;
      std::memcpy(to_shard ? b : a, to_shard ? a : b, size_t(span) * 4);
    }
    at += n;
  }
}

namespace {

Shape shard_shape(const ShardPieces& s, Shape whole) {
  whole[size_t(s.axis)] = s.width();
  return whole;
}

}  // namespace

TensorGroup::TensorGroup(std::unique_ptr<Communicator> group, int64_t index, const DecoderConfig& d,
                         const std::vector<double>& speed, bool even_vocab, bool seq)
    : group_(std::move(group)), index_(index), d_(d) {
  std::vector<double> s = speed;
  for (double& x : s) x = std::max(x, 1e-9);  // a weight of 0 still gets one head
  shards_ = tensor_shards(d, s, even_vocab);
  for (TensorShard& t : shards_) t.seq = seq;
}

TensorGroup::~TensorGroup() = default;

void TensorGroup::plan(Program& prog, const DecoderGraph& m) {
  // The cuts: a sum over the group before the first node that reads each value.
  const Graph& g = prog.graph();
  int64_t most = 0;
  for (const std::vector<int>* vs : {&m.tp_sums, &m.tp_grad_sums})
    for (int v : *vs) {
      MXN_CHECK(v >= 0, "tensor parallelism: a split projection's input has no gradient");
      const size_t at =
          g.cut_before(v, v, "tensor parallelism: a summed value is written after it is read");
      cuts_.push_back({at, v});
      most = std::max(most, numel(g.v(v).shape));
    }
  for (const DecoderGraph::SeqCut& c : m.seq_cuts) {  // sequence parallelism's gathers, scatters
    const SeqCutPoints p = seq_cut_points(g, c);
    const Cut::Kind fwd = c.gather ? Cut::gather : Cut::scatter;
    cuts_.push_back({p.forward, c.from, fwd, c.to});
    if (c.gather) cuts_.push_back({p.again, c.again_from, Cut::gather, c.again});
    cuts_.push_back({p.backward, c.d_to, c.gather ? Cut::scatter : Cut::gather, c.d_from});
    most = std::max(most, numel(g.v(c.gather ? c.to : c.from).shape));  // the whole rows
  }
  std::stable_sort(cuts_.begin(), cuts_.end(),
                   [](const Cut& a, const Cut& b) { return a.at < b.at; });
  host_.assign(size_t(most), 0.f);
  for (int p : g.params()) {
    const Value& v = g.v(p);
    const std::array<int64_t, 2> r{int64_t(v.offset / 4), numel(v.shape)};
    (shard_pieces(v.name, d_, shard()).pieces.empty() ? whole_ : split_).push_back(r);
    if (partial_gradient(v.name, d_, shard())) partial_.push_back(r);
  }
  Device& dev = prog.device();
  if (m.seq_cuts.empty() && device_group(*group_, dev, kGroup)) {  // (sequence parallel: MPI)
    slots_ = dev.alloc(uint64_t(group_->size() + 1) * uint64_t(most) * 4);
    wire_.reserve(size_t(2 * group_->size()));
    direct_ = true;
  }
}

void TensorGroup::sum_on_device(Device& dev, const Tensor& x) {
  const int n = group_->size(), me = group_->rank();
  const uint64_t bytes = uint64_t(numel(x.shape)) * 4, most = host_.size() * 4;
  auto slot = [&](int r) {
    return r == me ? x : Tensor(x.shape, DType::f32, slots_->handle(), uint64_t(r) * most);
  };
  wire_.clear();
  for (int q = 0; q < n; ++q)
    if (q != me) {
      wire_.push_back({x.buffer, x.offset, bytes, q, 0});
      const Tensor in = slot(q);
      wire_.push_back({in.buffer, in.offset, bytes, q, 1});
    }
  dev.exchange(kGroup, wire_);
  // v0 + v1 + ... in rank order on every rank, the last sum into x
  const Tensor acc(x.shape, DType::f32, slots_->handle(), uint64_t(n) * most);
  for (int r = 1; r < n; ++r)
    dev.run(make_op_call(MXN_OP_ADD, {r == 1 ? slot(0) : acc, slot(r)}, {r == n - 1 ? x : acc}));
}

void TensorGroup::run(Program& prog, Device& dev, int variant, size_t end) {
  size_t at = 0;
  for (const Cut& c : cuts_) {
    if (c.at >= end) break;
    prog.run(at, c.at, variant);
    at = c.at;
    if (timing_) dev.synchronize();  // the sum's own time: the piece before it has finished
    const auto t0 = std::chrono::steady_clock::now();
    const Tensor x = prog.tensor(c.value, variant);
    if (c.kind != Cut::sum) {
      move_rows(dev, c, x, prog.tensor(c.to, variant));
    } else if (direct_) {
      sum_on_device(dev, x);
      if (timing_) dev.synchronize();
    } else {
      dev.download(host_.data(), x);
      group_->all_reduce_sum(host_.data(), numel(x.shape));
      dev.upload(x, host_.data());
    }
    if (timing_)
      seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  prog.run(at, end, variant);
}

void TensorGroup::move_rows(Device& dev, const Cut& c, const Tensor& from, const Tensor& to) {
  // A gather: every rank's rows of the whole (N, C) into `to`; a scatter: the partial whole rows
  // summed over the group (a reduce-scatter: each rank gets only its rows), its rows into `to`.
  const Tensor& whole = c.kind == Cut::gather ? to : from;
  const int64_t C = whole.shape.back(), N = numel(whole.shape) / C;
  const int64_t r0 = seq_rows(shard(), N)[0] * C;
  bounds_.assign(1, 0);
  for (const TensorShard& s : shards_) bounds_.push_back(bounds_.back() + seq_rows(s, N)[1] * C);
  if (c.kind == Cut::gather) {
    dev.download(host_.data() + r0, from);
    group_->all_gather(host_.data(), bounds_);
    dev.upload(to, host_.data());
  } else {
    dev.download(host_.data(), from);
    group_->reduce_scatter(host_.data(), bounds_);
    dev.upload(to, host_.data() + r0);
  }
}

double TensorGroup::reduce(std::vector<float>& grads) {
  if (!partial_.empty()) reduce_ranges(grads, partial_, *group_, pack_);
  double mine = 0;
  for (auto [at, n] : split_)
    for (int64_t i = at; i < at + n; ++i) mine += double(grads[size_t(i)]) * grads[size_t(i)];
  double all = mine;
  group_->all_reduce_sum(&all, 1);
  return all - mine;
}

TensorMap TensorGroup::cut(const TensorMap& whole) const {
  TensorMap out;
  for (const auto& [name, t] : whole) {
    const bool moment = name.rfind("m.", 0) == 0 || name.rfind("v.", 0) == 0;
    const ShardPieces s = shard_pieces(moment ? name.substr(2) : name, d_, shard());
    if (s.pieces.empty() || t.dtype != DType::f32) {
      out.emplace(name, t);
      continue;
    }
    int64_t end = 0;  // the pieces must lie inside the tensor (a checkpoint of another shape)
    for (auto [from, n] : s.pieces) end = std::max(end, from + n);
    if (size_t(s.axis) >= t.shape.size() || t.shape[size_t(s.axis)] < end)
      throw Error("checkpoint tensor '" + name + "' has shape " + shape_str(t.shape) +
                  ", too small for this model's heads and MLP columns");
    HostTensor h(shard_shape(s, t.shape), DType::f32);
    move_pieces(s, t.shape, const_cast<float*>(t.f32()), h.f32(), true);
    out.emplace(name, std::move(h));
  }
  return out;
}

void TensorGroup::gather(const Graph& whole,
                         const std::function<Tensor(const std::string&, int)>& mine, Device& dev,
                         const std::function<void(const Value&, int, HostTensor&&)>& put) {
  std::vector<float> buf;
  for (int w : whole.params()) {
    const Value& v = whole.v(w);
    const bool split = !shard_pieces(v.name, d_, shard()).pieces.empty();
    if (!split && index_ != 0) continue;
    std::vector<int64_t> at{0};
    for (const TensorShard& s : shards_)
      at.push_back(at.back() +
                   (split ? numel(shard_shape(shard_pieces(v.name, d_, s), v.shape)) : 0));
    for (int i = 0; i < 3; ++i) {
      HostTensor h(v.shape, DType::f32);
      if (split) {
        buf.resize(size_t(at.back()));
        dev.download(buf.data() + at[size_t(index_)], mine(v.name, i));
        group_->gather(buf.data(), at, 0);
        if (index_ != 0) continue;
        for (size_t r = 0; r < shards_.size(); ++r)
          move_pieces(shard_pieces(v.name, d_, shards_[r]), v.shape, h.f32(), buf.data() + at[r],
                      false);
      } else {
        dev.download(h.bytes.data(), mine(v.name, i));
      }
      put(v, i, std::move(h));
    }
  }
}

std::string TensorGroup::describe() const {
  std::string s = "kv heads";
  for (const TensorShard& sh : shards_) s.append(" ").append(std::to_string(sh.kv));
  s += ", MLP columns";
  for (const TensorShard& sh : shards_) s.append(" ").append(std::to_string(sh.ffn));
  s += ", vocabulary rows";
  for (const TensorShard& sh : shards_) s.append(" ").append(std::to_string(sh.vocab));
  return s;
}

}  // namespace mxn
