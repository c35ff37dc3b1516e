// Pipeline parallelism in the trainer: the ranks form replicas of cfg.pp stages (rank = replica x
// pp + stage), each stage a contiguous range of layers on its own chip. A step runs the 1F1B
// schedule (parallel/schedule.h) over micro-batches; activations cross stages as host-staged
// MPI messages (any pair of chips); a stage keeps each micro-batch's input only and recomputes
// the forward in its backward, so one arena serves every micro-batch in flight. Gradients are
// summed over the replicas of a stage, the tied embedding's over the first and last stage; the
// clipping norm is summed over stages. Rows are a pure function of (seed, step, row), so the
// losses equal the single-device run's.
#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "core/rng.h"
#include "core/text.h"
#include "parallel/balance.h"
#include "parallel/schedule.h"
#include "train/trainer.h"

namespace mxn {

namespace {
constexpr int kTagForward = 1, kTagBackward = 2, kTagEval = 3, kTagState = 4;
}

void Trainer::pp_setup() {
  pp_ = cfg_.pp;
  const DecoderConfig d = cfg_.decoder_config();
  const std::string pp = std::to_string(pp_);
  if (world_ % pp_)
    throw Error("--pp " + pp + " needs a multiple of " + pp + " ranks; the job has " +
                std::to_string(world_));
  if (pp_ > d.layers)
    throw Error("--pp " + pp + ": more stages than the model's " + std::to_string(d.layers) +
                " layers");
  if (cfg_.finetune != "full" || cfg_.objective != "lm" || !cfg_.sft.empty() || cfg_.zero)
    throw Error("--pp " + pp +
                " trains every weight on next-token prediction for now: not with --finetune "
                "lora/ptuning, --objective glm, --sft or --zero 1");
  replicas_ = world_ / pp_;
  hidden_ = d.hidden;
  stage_ = rank_ % pp_;
  replica_ = rank_ / pp_;
  std::vector<int64_t> n;
  if (cfg_.stages == "even") {
    for (int64_t s = 0; s < pp_; ++s) n.push_back(d.layers / pp_ + (s < d.layers % pp_));
  } else {
    int64_t sum = 0;
    for (const std::string& item : split(cfg_.stages, ',')) {
      char* end = nullptr;
      const long long x = std::strtoll(item.c_str(), &end, 10);
      if (item.empty() || *end != '\0' || x < 1) {
        n.clear();
        break;
      }
      n.push_back(x);
      sum += x;
    }
    if (int64_t(n.size()) != pp_ || sum != d.layers)
      throw Error("stages '" + cfg_.stages + "': expected " + pp +
                  " positive layer counts (one a stage) that sum to the model's " +
                  std::to_string(d.layers) + " layers, or even");
  }
  bounds_.assign(1, 0);
  for (int64_t x : n) bounds_.push_back(bounds_.back() + x);
  pipe_ = comm_->split(int(replica_), int(stage_));
  dp_ = comm_->split(int(stage_), int(replica_));
  const bool ends = d.tie_embeddings && (stage_ == 0 || stage_ == pp_ - 1);
  tied_ = comm_->split(ends ? int(replica_) : int(replicas_ + rank_), int(stage_));
}

void Trainer::pp_plan() {
  // Replicas share a step's rows and the validation windows evenly, in consecutive blocks.
  const int64_t G = cfg_.batch * cfg_.accum, W = cfg_.eval_batches * cfg_.batch;
  const std::vector<double> even(static_cast<size_t>(replicas_), 1.0);
  const std::vector<int64_t> rows = split_rows(G, even), eval = split_rows(W, even);
  row_begin_ = eval_begin_ = 0;
  for (int64_t r = 0; r < replica_; ++r) {
    row_begin_ += rows[size_t(r)];
    eval_begin_ += eval[size_t(r)];
  }
  rows_ = rows[size_t(replica_)];
  eval_rows_ = eval[size_t(replica_)];
  cap_ = cfg_.micro > 0 ? std::min(cfg_.micro, rows_)
                        : std::max<int64_t>(1, (rows_ + 2 * pp_ - 1) / (2 * pp_));
}

void Trainer::pp_ready() {
  const int64_t T = cfg_.seq_len(), C = hidden_;
  const int64_t m = (rows_ + cap_ - 1) / cap_, E = cap_ * T * C;
  for (int64_t n : {rows_, eval_rows_}) {
    variant_for(std::min(n, cap_));
    if (n % cap_) variant_for(n % cap_);
  }
  if (stage_ > 0) {
    stash_.resize(size_t(m * E));
    send_b_.resize(size_t(m * E));
  }
  if (stage_ < pp_ - 1) {
    send_f_.resize(size_t(m * E));
    recv_g_.resize(size_t(E));
  }
  if (replicas_ > 1) grad_host_.resize(size_t(prog_->param_count()));
  if (tied_->size() > 1) tied_host_.resize(size_t(numel(prog_->graph().v(m_.embed_table).shape)));
  for (int64_t r = 0; r < world_; ++r)
    plan_.ranks[size_t(r)].rows = r / pp_ == replica_ ? rows_ : 0;
  plan_.pipeline = std::to_string(pp_) + " stages x " + std::to_string(replicas_) +
                   (replicas_ > 1 ? " replicas" : " replica") + ", layers";
  for (int64_t s = 0; s < pp_; ++s) {
    plan_.pipeline += s ? '+' : ' ';
    plan_.pipeline += std::to_string(bounds_[size_t(s + 1)] - bounds_[size_t(s)]);
  }
  plan_.pipeline += "; " + std::to_string(m) + " micro-batches of up to " + std::to_string(cap_) +
                    " sequences a replica, 1F1B, each stage's activations recomputed in its "
                    "backward";
}

void Trainer::pp_rows(int64_t micro, int64_t n, uint64_t key) {
  const int64_t T = cfg_.seq_len();
  for (int64_t b = 0; b < n; ++b) {
    const uint64_t row = uint64_t(row_begin_ + micro * cap_ + b);
    offsets_[size_t(b)] = int64_t(mix64(key + row) % uint64_t(data_.n_train() - T - 1));
    row_ids_[size_t(b)] = row;
  }
}

double Trainer::pp_passes(uint64_t key, double total) {
  const int64_t T = cfg_.seq_len(), C = hidden_;
  const int64_t m = (rows_ + cap_ - 1) / cap_, E = cap_ * T * C;
  const bool first = stage_ == 0, last = stage_ == pp_ - 1;
  const int up = int(stage_ - 1), down = int(stage_ + 1);
  const size_t nodes = prog_->graph().nodes.size();
  double loss_sum = 0;
  for (int64_t k = 0; k < 2 * m; ++k) {
    const int64_t o = one_f_one_b(pp_, stage_, m, k);
    const bool fwd = o >= 0;
    const int64_t i = fwd ? o : -o - 1, n = std::min(cap_, rows_ - i * cap_), len = n * T * C;
    if (fwd && last) continue;  // the last stage's forward runs with its backward
    const Pass& p = passes_[size_t(n)];
    pp_rows(i, n, key);
    const double counted = double(fill_batch(data_.train(), n, key, false));
    float* stash = stash_.data() + i * E;
    if (!first) {
      if (fwd || last) pipe_->recv(stash, len, up, kTagForward);
      dev_->upload(p.hidden_in, stash);
    }
    if (fwd) {
      prog_->run(0, n_forward_, p.variant);
      float* out = send_f_.data() + i * E;
      dev_->download(out, p.hidden_out);
      pipe_->send(out, len, down, kTagForward);
      continue;
    }
    if (last) {  // the loss's share of the global batch's seeds the backward
      seed_backward(p.variant, float(counted / total));
      prog_->run(0, nodes, p.variant);
      float loss = 0;
      dev_->download(&loss, p.loss);
      loss_sum += double(loss) * counted / total;
    } else {
      pipe_->recv(recv_g_.data(), len, down, kTagBackward);
      dev_->upload(p.grad_out, recv_g_.data());
      prog_->run(0, nodes, p.variant);  // the forward again, then the backward
    }
    if (!first) {
      float* back = send_b_.data() + i * E;
      dev_->download(back, p.grad_in);
      pipe_->send(back, len, up, kTagBackward);
    }
  }
  pipe_->wait_sends();
  comm_->all_reduce_sum(&loss_sum, 1);  // the last stages hold it; the others add 0
  return loss_sum;
}

double Trainer::pp_reduce_norm() {
  if (replicas_ > 1) {  // data parallel over the replicas of this stage
    const Tensor g = prog_->grads_all();
    dev_->download(grad_host_.data(), g);
    dp_->all_reduce_sum(grad_host_.data(), int64_t(grad_host_.size()));
    dev_->upload(g, grad_host_.data());
  }
  double duplicate = 0;  // the last stage's copy of the tied embeddings counts once in the norm
  if (tied_->size() > 1) {
    const Tensor g = prog_->tensor(prog_->graph().v(m_.embed_table).grad);
    dev_->download(tied_host_.data(), g);
    tied_->all_reduce_sum(tied_host_.data(), int64_t(tied_host_.size()));
    dev_->upload(g, tied_host_.data());
    if (stage_ == pp_ - 1)
      for (float x : tied_host_) duplicate += double(x) * double(x);
  }
  dev_->run(grad_sumsq_);
  float sumsq = 0;
  dev_->download(&sumsq, sumsq_);
  double total = double(sumsq) - duplicate;
  pipe_->all_reduce_sum(&total, 1);
  return std::max(0.0, total);
}

double Trainer::pp_eval() {
  const int64_t T = cfg_.seq_len(), C = hidden_;
  const int64_t W = cfg_.eval_batches * cfg_.batch, span = data_.n_val() - T - 1;
  const uint64_t key = mix64(uint64_t(cfg_.seed) ^ 0x5eed0e7a1ull);
  const double total = double(loss_tokens(key, 0, W, true));
  const bool first = stage_ == 0, last = stage_ == pp_ - 1;
  sft_set_ = nullptr;
  double sum = 0;
  for (int64_t done = 0; done < eval_rows_;) {
    const int64_t n = std::min(cap_, eval_rows_ - done), len = n * T * C;
    for (int64_t b = 0; b < n; ++b) {
      offsets_[size_t(b)] = (eval_begin_ + done + b) * span / std::max<int64_t>(1, W - 1);
      row_ids_[size_t(b)] = uint64_t(eval_begin_ + done + b);
    }
    const Pass& p = passes_[size_t(n)];
    const double counted = double(fill_batch(data_.val(), n, key, true));
    if (!first) {
      pipe_->recv(stash_.data(), len, int(stage_ - 1), kTagEval);
      dev_->upload(p.hidden_in, stash_.data());
    }
    run_forward_only(p.variant);
    if (last) {
      float loss = 0;
      dev_->download(&loss, p.loss);
      sum += double(loss) * counted / total;
    } else {
      dev_->download(send_f_.data(), p.hidden_out);
      pipe_->send(send_f_.data(), len, int(stage_ + 1), kTagEval);
      pipe_->wait_sends();
    }
    done += n;
  }
  comm_->all_reduce_sum(&sum, 1);
  return sum;
}

void Trainer::pp_gather(Checkpoint& ck) {
  // Each stage's params in its graph's order, each as weight, m, v: the same builder gives rank 0
  // the names and shapes, so only floats travel.
  auto own = [&](std::vector<float>* blob) {
    for (int id : prog_->graph().params()) {
      const Value& v = prog_->graph().v(id);
      const int64_t n = numel(v.shape);
      HostTensor h[3] = {{v.shape, DType::f32}, {v.shape, DType::f32}, {v.shape, DType::f32}};
      dev_->download(h[0].bytes.data(), prog_->tensor(id));
      dev_->download(h[1].bytes.data(), opt_->moment(0, v));
      dev_->download(h[2].bytes.data(), opt_->moment(1, v));
      if (blob) {
        for (const HostTensor& t : h) blob->insert(blob->end(), t.f32(), t.f32() + n);
      } else {
        ck.weights.emplace(v.name, std::move(h[0]));
        ck.optimizer.emplace("m." + v.name, std::move(h[1]));
        ck.optimizer.emplace("v." + v.name, std::move(h[2]));
      }
    }
  };
  if (stage_ != 0) {
    std::vector<float> blob;
    own(&blob);
    pipe_->send(blob.data(), int64_t(blob.size()), 0, kTagState);
    pipe_->wait_sends();
    return;
  }
  own(nullptr);
  for (int64_t s = 1; s < pp_; ++s) {
    DecoderGraph m;
    size_t nf = 0;
    const Graph g = train_graph(cfg_, 1, &m, &nf, bounds_[size_t(s)], bounds_[size_t(s + 1)]);
    int64_t count = 0;
    for (int id : g.params()) count += numel(g.v(id).shape);
    std::vector<float> blob(size_t(3 * count));
    pipe_->recv(blob.data(), 3 * count, int(s), kTagState);
    const float* at = blob.data();
    for (int id : g.params()) {
      const Value& v = g.v(id);
      const int64_t n = numel(v.shape);
      for (const std::string& key : {v.name, "m." + v.name, "v." + v.name}) {
        HostTensor h(v.shape, DType::f32);
        std::copy(at, at + n, h.f32());
        at += n;
        TensorMap& into = key == v.name ? ck.weights : ck.optimizer;
        into.emplace(key, std::move(h));  // the tied embeddings' second copy is left out
      }
    }
  }
}

}  // namespace mxn
