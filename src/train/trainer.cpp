#include "train/trainer.h"

#include <cmath>
#include <filesystem>

#include "core/error.h"
#include "core/rng.h"

namespace mxn {
namespace {

Tensor slice(const Tensor& flat, int64_t begin, int64_t n) {
  return Tensor({n}, DType::f32, flat.buffer, flat.offset + uint64_t(begin) * 4);
}

}  // namespace

Trainer::Trainer(const TrainConfig& cfg, const std::string& resume, Communicator* comm)
    : cfg_(cfg), comm_(comm && comm->size() > 1 ? comm : nullptr) {
  Checkpoint ck;
  if (!resume.empty()) {
    ck = load_checkpoint(resume, true);
  }
  cfg_.validate();
  dev_ = open_device(cfg_.device, int(cfg_.threads));
  data_ = TokenData::open(cfg_.data);
  if (data_.vocab() > cfg_.model.vocab_size)
    throw Error("data '" + cfg_.data + "' has vocab " + std::to_string(data_.vocab()) +
                " but the model's vocab_size is " + std::to_string(cfg_.model.vocab_size));
  const int64_t world = comm_ ? comm_->size() : 1, rank = comm_ ? comm_->rank() : 0;
  if (cfg_.batch < world)
    throw Error("the global batch (" + std::to_string(cfg_.batch) +
                " sequences) is smaller than the " + std::to_string(world) +
                " ranks: each rank needs at least one");
  // Even shares for now; the first batch % world ranks take one more sequence.
  local_batch_ = cfg_.batch / world + (rank < cfg_.batch % world ? 1 : 0);
  row_begin_ = rank * (cfg_.batch / world) + std::min<int64_t>(rank, cfg_.batch % world);
  const int64_t B = local_batch_, T = cfg_.seq_len();
  if (data_.n_train() < T + 2 || data_.n_val() < T + 2)
    throw Error("data '" + cfg_.data + "' is too small: " + std::to_string(data_.n_train()) +
                " train and " + std::to_string(data_.n_val()) +
                " validation tokens, need more than " + std::to_string(T + 1) +
                " of each for seq " + std::to_string(T));
  Graph g;
  g.matmul_compute = cfg_.dtype == "bf16" ? DType::bf16 : DType::f32;
  m_ = build_gpt2(g, cfg_.model, B, T, true);
  n_forward_ = append_backward(g, m_.loss);
  prog_ = std::make_unique<Program>(std::move(g), *dev_);

  const uint64_t pbytes = uint64_t(prog_->param_count()) * 4;
  opt_m_ = dev_->alloc(pbytes);
  opt_v_ = dev_->alloc(pbytes);
  scalar_ = dev_->alloc(64);
  tok_host_.resize(size_t(B * T));
  tgt_host_.resize(size_t(B * T));
  offsets_.resize(size_t(B));
  std::vector<int32_t> pos(size_t(B * T));
  for (int64_t i = 0; i < B * T; ++i) pos[size_t(i)] = int32_t(i % T);
  dev_->upload(prog_->tensor(m_.positions), pos.data());

  if (comm_) host_grads_.resize(size_t(prog_->param_count()));
  sumsq_ = Tensor({1}, DType::f32, scalar_->handle());
  loss_ = prog_->tensor(m_.loss);
  tokens_ = prog_->tensor(m_.tokens);
  targets_ = prog_->tensor(m_.targets);
  zero_grads_ = make_op_call(MXN_OP_FILL, {}, {prog_->grads_all()}, {}, {0.f});
  grad_sumsq_ = make_op_call(MXN_OP_SUM_SQUARES, {prog_->grads_all()}, {sumsq_});
  const Tensor m_all({prog_->param_count()}, DType::f32, opt_m_->handle());
  const Tensor v_all({prog_->param_count()}, DType::f32, opt_v_->handle());
  int64_t begin = 0;
  for (bool decay : {true, false}) {  // decayed params first, as the Program lays them out
    const Tensor p = prog_->params_flat(decay);
    const int64_t n = p.numel();
    adamw_[decay ? 0 : 1] = make_op_call(MXN_OP_ADAMW, {prog_->grads_flat(decay)},
                                         {p, slice(m_all, begin, n), slice(v_all, begin, n)});
    begin += n;
  }
  if (!resume.empty()) {
    load(ck);
    return;
  }
  for (int p : prog_->graph().params()) {
    const Value& v = prog_->graph().v(p);
    auto w = gpt2_init_param(v.name, numel(v.shape), cfg_.model, uint64_t(cfg_.seed));
    dev_->upload(prog_->tensor(p), w.data());
  }
  dev_->run(make_op_call(MXN_OP_FILL, {}, {m_all}, {}, {0.f}));
  dev_->run(make_op_call(MXN_OP_FILL, {}, {v_all}, {}, {0.f}));
}

double Trainer::lr_at(int64_t s) const {
  if (cfg_.warmup > 0 && s <= cfg_.warmup) return cfg_.lr * double(s) / double(cfg_.warmup);
  const double span = double(std::max<int64_t>(1, cfg_.steps - cfg_.warmup));
  const double t = std::min(1.0, double(s - cfg_.warmup) / span);
  return cfg_.min_lr + 0.5 * (cfg_.lr - cfg_.min_lr) * (1.0 + std::cos(M_PI * t));
}

void Trainer::fill_batch(const uint16_t* tokens, const std::vector<int64_t>& offsets) {
  const int64_t T = cfg_.seq_len();
  for (size_t b = 0; b < offsets.size(); ++b)
    for (int64_t t = 0; t < T; ++t) {
      tok_host_[b * size_t(T) + size_t(t)] = tokens[offsets[b] + t];
      tgt_host_[b * size_t(T) + size_t(t)] = tokens[offsets[b] + t + 1];
    }
  dev_->upload(tokens_, tok_host_.data());
  dev_->upload(targets_, tgt_host_.data());
}

float Trainer::step() {
  const int64_t s = step_ + 1, T = cfg_.seq_len();
  dev_->run(zero_grads_);
  double loss_sum = 0;
  for (int64_t micro = 0; micro < cfg_.accum; ++micro) {
    // Row r of a step's global batch is a pure function of (seed, step, r): resuming needs no
    // data-loader state, and accum x batch sees the same rows as one batch of accum * batch.
    const uint64_t key = mix64(uint64_t(cfg_.seed) ^ mix64(uint64_t(s)));
    for (size_t b = 0; b < offsets_.size(); ++b) {
      const uint64_t row = uint64_t(micro * cfg_.batch + row_begin_) + b;
      offsets_[b] = int64_t(mix64(key + row) % uint64_t(data_.n_train() - T - 1));
    }
    fill_batch(data_.train(), offsets_);
    prog_->run(0, prog_->graph().nodes.size());
    float loss = 0;
    dev_->download(&loss, loss_);
    loss_sum += loss;
  }
  if (comm_) {
    // Host-staged all-reduce: each rank's gradient is a mean over its own tokens, so it is
    // weighted by its share of the global batch before the sum.
    const float w = float(local_batch_) / float(cfg_.batch);
    const Tensor g = prog_->grads_all();
    dev_->download(host_grads_.data(), g);
    for (float& x : host_grads_) x *= w;
    comm_->all_reduce_sum(host_grads_.data(), int64_t(host_grads_.size()));
    dev_->upload(g, host_grads_.data());
    double l = loss_sum * w;
    comm_->all_reduce_sum(&l, 1);
    loss_sum = l;
  }
  // Global norm of the mean gradient over micro-batches, then one scale for mean and clipping.
  dev_->run(grad_sumsq_);
  float sumsq = 0;
  dev_->download(&sumsq, sumsq_);
  const float inv_accum = 1.f / float(cfg_.accum);
  grad_norm_ = std::sqrt(sumsq) * inv_accum;
  float gscale = inv_accum;
  if (cfg_.clip > 0 && grad_norm_ > cfg_.clip) gscale *= float(cfg_.clip) / grad_norm_;
  const float lr = float(lr_at(s));
  for (int group = 0; group < 2; ++group) {
    mxn_op_call& c = adamw_[group];
    if (c.outputs[0].shape[0] == 0) continue;
    c.ip[0] = s;
    const float fp[6] = {lr,
                         float(cfg_.beta1),
                         float(cfg_.beta2),
                         float(cfg_.eps),
                         group == 0 ? float(cfg_.weight_decay) : 0.f,
                         gscale};
    std::copy(fp, fp + 6, c.fp);
    dev_->run(c);
  }
  dev_->synchronize();
  step_ = s;
  return float(loss_sum / double(cfg_.accum));
}

float Trainer::eval_loss() {
  // The same fixed windows for any number of ranks: each rank takes its rows of every batch,
  // and the token-weighted losses are summed over ranks (collective: every rank calls this).
  const int64_t T = cfg_.seq_len(), G = cfg_.batch;
  const int64_t windows = cfg_.eval_batches * G;
  const int64_t span = data_.n_val() - T - 1;
  double sum = 0;
  for (int64_t e = 0; e < cfg_.eval_batches; ++e) {
    for (int64_t b = 0; b < local_batch_; ++b)
      offsets_[size_t(b)] = (e * G + row_begin_ + b) * span / std::max<int64_t>(1, windows - 1);
    fill_batch(data_.val(), offsets_);
    prog_->run(0, n_forward_);
    float loss = 0;
    dev_->download(&loss, loss_);
    sum += double(loss) * double(local_batch_) / double(G);
  }
  if (comm_) comm_->all_reduce_sum(&sum, 1);
  return float(sum / double(cfg_.eval_batches));
}

TensorMap Trainer::weights() const {
  TensorMap out;
  for (int p : prog_->graph().params()) {
    const Value& v = prog_->graph().v(p);
    HostTensor h(v.shape, DType::f32);
    dev_->download(h.bytes.data(), prog_->tensor(p));
    out.emplace(v.name, std::move(h));
  }
  return out;
}

std::string Trainer::save() {
  Checkpoint ck;
  ck.weights = weights();
  for (int p : prog_->graph().params()) {
    const Value& v = prog_->graph().v(p);
    for (auto [prefix, buf] : {std::pair{"m.", opt_m_.get()}, std::pair{"v.", opt_v_.get()}}) {
      HostTensor h(v.shape, DType::f32);
      dev_->download(h.bytes.data(), Tensor(v.shape, DType::f32, buf->handle(), v.offset));
      ck.optimizer.emplace(prefix + v.name, std::move(h));
    }
  }
  ck.trainer = {{"step", step_}, {"config", to_json(cfg_)}, {"format", "mxn-checkpoint-1"}};
  ck.trainer["model"] = {{"arch", "gpt2"},
                         {"n_layer", cfg_.model.n_layer},
                         {"n_head", cfg_.model.n_head},
                         {"n_embd", cfg_.model.n_embd},
                         {"n_ctx", cfg_.model.n_ctx},
                         {"vocab_size", cfg_.model.vocab_size}};
  std::filesystem::create_directories(cfg_.out);
  return save_checkpoint(cfg_.out, step_, ck);
}

void Trainer::load(const Checkpoint& ck) {
  auto put = [&](const TensorMap& m, const std::string& key, const Tensor& dst) {
    auto it = m.find(key);
    if (it == m.end()) throw Error("checkpoint is missing tensor '" + key + "'");
    if (it->second.shape != dst.shape || it->second.dtype != DType::f32)
      throw Error("checkpoint tensor '" + key + "' has shape " + shape_str(it->second.shape) +
                  ", expected " + shape_str(dst.shape) + " f32");
    dev_->upload(dst, it->second.bytes.data());
  };
  for (int p : prog_->graph().params()) {
    const Value& v = prog_->graph().v(p);
    put(ck.weights, v.name, prog_->tensor(p));
    put(ck.optimizer, "m." + v.name, Tensor(v.shape, DType::f32, opt_m_->handle(), v.offset));
    put(ck.optimizer, "v." + v.name, Tensor(v.shape, DType::f32, opt_v_->handle(), v.offset));
  }
  step_ = ck.trainer.at("step").get<int64_t>();
}

}  // namespace mxn
