#include "train/optimizer.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "core/error.h"
#include "parallel/balance.h"

namespace mxn {

namespace {
Tensor slice(const Tensor& flat, int64_t begin, int64_t n) {
  return Tensor({n}, DType::f32, flat.buffer, flat.offset + uint64_t(begin) * 4);
}
}  // namespace

Optimizer::Optimizer(Program& prog, Device& dev, const OptimizerOptions& o, Communicator* comm,
                     const std::vector<double>& free_bytes)
    : prog_(prog), dev_(dev), o_(o), comm_(comm) {
  const int64_t P = prog_.param_count();
  lo_ = 0, hi_ = P;
  if (comm_ && comm_->size() > 1 && int64_t(free_bytes.size()) == comm_->size()) {
    shards_ = shard_bounds(P, free_bytes, 16);
    lo_ = shards_[size_t(comm_->rank())], hi_ = shards_[size_t(comm_->rank() + 1)];
    host_.resize(size_t(P));
  }
  const int64_t own = hi_ - lo_;
  const uint64_t bytes = uint64_t(std::max<int64_t>(own, 1)) * 4;
  m_ = dev_.alloc(bytes);
  v_ = dev_.alloc(bytes);
  const Tensor m_all({own}, DType::f32, m_->handle());
  const Tensor v_all({own}, DType::f32, v_->handle());
  int64_t begin = 0;
  for (bool decay : {true, false}) {  // decayed params first, as the Program lays them out
    const Tensor p = prog_.params_flat(decay), g = prog_.grads_flat(decay);
    const int64_t n = p.numel();
    // This group's part of the rank's share (all of it unsharded; maybe none).
    const int64_t a = std::clamp(lo_, begin, begin + n), b = std::clamp(hi_, begin, begin + n);
    adamw_[decay ? 0 : 1] = make_op_call(
        MXN_OP_ADAMW, {slice(g, a - begin, b - a)},
        {slice(p, a - begin, b - a), slice(m_all, a - lo_, b - a), slice(v_all, a - lo_, b - a)});
    begin += n;
  }
}

double Optimizer::lr_at(int64_t s) const {
  if (o_.warmup > 0 && s <= o_.warmup) return o_.lr * double(s) / double(o_.warmup);
  const double span = double(std::max<int64_t>(1, o_.steps - o_.warmup));
  const double t = std::min(1.0, double(s - o_.warmup) / span);
  return o_.min_lr + 0.5 * (o_.lr - o_.min_lr) * (1.0 + std::cos(M_PI * t));
}

float Optimizer::step(int64_t s, float sumsq) {
  const float norm = std::sqrt(sumsq);
  float gscale = 1.f;
  if (o_.clip > 0 && norm > o_.clip) gscale = float(o_.clip) / norm;
  const float lr = float(lr_at(s));
  for (int group = 0; group < 2; ++group) {
    mxn_op_call& c = adamw_[group];
    if (c.outputs[0].shape[0] == 0) continue;
    set_params(c, AdamwParams{s, lr, float(o_.beta1), float(o_.beta2), float(o_.eps),
                              group == 0 ? float(o_.weight_decay) : 0.f, gscale});
    dev_.run(c);
  }
  if (!shards_.empty()) gather_params();
  return norm;
}

void Optimizer::zero() {
  const int64_t own = hi_ - lo_;
  for (Buffer* b : {m_.get(), v_.get()})
    dev_.run(
        make_op_call(MXN_OP_FILL, {}, {Tensor({own}, DType::f32, b->handle())}, ScalarParams{0.f}));
}

void Optimizer::gather_params() {
  const Tensor all = prog_.params_all();
  dev_.download(host_.data() + lo_, slice(all, lo_, hi_ - lo_));
  comm_->all_gather(host_.data(), shards_);
  dev_.upload(all, host_.data());
}

Tensor Optimizer::moment(int i, const Value& v) const {
  MXN_CHECK(shards_.empty(), "a parameter's moment is whole on a rank only unsharded");
  return Tensor(v.shape, DType::f32, (i ? v_ : m_)->handle(), v.offset);
}

bool Optimizer::save(TensorMap& out, int root) {
  const int rank = comm_ ? comm_->rank() : 0;
  if (shards_.empty() && rank != root) return false;
  if (!shards_.empty()) {  // the root first gathers every rank's share
    for (int i = 0; i < 2; ++i) {
      std::vector<float>& full = moments_[i];
      full.resize(size_t(prog_.param_count()));
      dev_.download(full.data() + lo_, Tensor({hi_ - lo_}, DType::f32, (i ? v_ : m_)->handle()));
      comm_->gather(full.data(), shards_, root);
    }
    if (rank != root) return false;
  }
  for (int p : prog_.graph().params()) {
    const Value& v = prog_.graph().v(p);
    for (int i = 0; i < 2; ++i) {
      const std::string key = (i ? "v." : "m.") + v.name;
      auto it = out.find(key);
      if (it == out.end() || it->second.shape != v.shape)
        it = out.insert_or_assign(key, HostTensor(v.shape, DType::f32)).first;
      HostTensor& h = it->second;
      if (shards_.empty())
        dev_.download(h.bytes.data(), moment(i, v));
      else
        std::memcpy(h.bytes.data(), moments_[i].data() + v.offset / 4, h.bytes.size());
    }
  }
  return true;
}

void Optimizer::load(const TensorMap& in) {
  for (int p : prog_.graph().params()) {
    const Value& v = prog_.graph().v(p);
    // The part of this param that falls in the rank's share (a checkpoint of any world size,
    // sharded or not, holds every param's moments whole).
    const int64_t first = int64_t(v.offset / 4), n = numel(v.shape);
    const int64_t a = std::clamp(lo_, first, first + n), b = std::clamp(hi_, first, first + n);
    for (int i = 0; i < 2; ++i) {
      const std::string key = (i ? "v." : "m.") + v.name;
      auto it = in.find(key);
      if (it == in.end()) throw Error("checkpoint is missing tensor '" + key + "'");
      if (it->second.shape != v.shape || it->second.dtype != DType::f32)
        throw Error("checkpoint tensor '" + key + "' has shape " + shape_str(it->second.shape) +
                    ", expected " + shape_str(v.shape) + " f32");
      if (b > a)
        dev_.upload(Tensor({b - a}, DType::f32, (i ? v_ : m_)->handle(), uint64_t(a - lo_) * 4),
                    it->second.bytes.data() + (a - first) * 4);
    }
  }
}

}  // namespace mxn
