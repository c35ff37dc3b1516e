// Pipeline parallelism in the trainer: the ranks form replicas of cfg.pp stages (rank = replica x
// pp + stage), each stage a contiguous range of layers on its own chip. A step runs the 1F1B
// schedule (parallel/schedule.h) over micro-batches; activations cross stages as host-staged
// MPI messages (any pair of chips); a stage keeps each micro-batch's input only and recomputes
// the forward in its backward, so one arena serves every micro-batch in flight. Gradients are
// summed over the replicas of a stage, the tied embedding's over the first and last stage; the
// clipping norm is summed over stages. Rows are a pure function of (seed, step, row), so the
// losses equal the single-device run's.
#include <algorithm>
#include <array>
#include <cmath>

#include "core/error.h"
#include "core/rng.h"
#include "core/text.h"
#include "parallel/balance.h"
#include "parallel/grad_sync.h"
#include "parallel/schedule.h"
#include "train/expert_exchange.h"
#include "train/strategy.h"
#include "train/tensor_group.h"
#include "train/trainer.h"

namespace mxn {

namespace {
constexpr int kTagForward = 1, kTagBackward = 2, kTagEval = 3, kTagState = 4;
}

Pipeline::Pipeline(Trainer& t) : t_(t) {
  pp_ = t_.cfg_.pp;
  const DecoderConfig d = t_.cfg_.decoder_config();
  const std::string pp = std::to_string(pp_);
  if (t_.world_ % pp_)
    throw Error("--pp " + pp + " needs a multiple of " + pp + " ranks; the job has " +
                std::to_string(t_.world_));
  if (pp_ > d.layers)
    throw Error("--pp " + pp + ": more stages than the model's " + std::to_string(d.layers) +
                " layers");
  if (t_.cfg_.finetune != "full" || t_.cfg_.objective != "lm" || !t_.cfg_.sft.empty() ||
      t_.cfg_.zero == 1)
    throw Error("--pp " + pp +
                " trains every weight on next-token prediction for now: not with --finetune "
                "lora/ptuning, --objective glm, --sft or --zero 1");
  replicas_ = t_.world_ / pp_;
  if (t_.cfg_.batch < replicas_)
    throw Error("the global batch (" + std::to_string(t_.cfg_.batch) +
                " sequences) is smaller than the " + std::to_string(replicas_) +
                " pipeline replicas: each needs at least one");
  hidden_ = d.hidden;
  stage_ = t_.rank_ % pp_;
  replica_ = t_.rank_ / pp_;
  std::vector<int64_t> n;
  if (t_.cfg_.stages == "even") {
    for (int64_t s = 0; s < pp_; ++s) n.push_back(d.layers / pp_ + (s < d.layers % pp_));
  } else {
    int64_t sum = 0;
    for (const std::string& item : split(t_.cfg_.stages, ',')) {
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
      throw Error("stages '" + t_.cfg_.stages + "': expected " + pp +
                  " positive layer counts (one a stage) that sum to the model's " +
                  std::to_string(d.layers) + " layers, or even");
  }
  bounds_.assign(1, 0);
  for (int64_t x : n) bounds_.push_back(bounds_.back() + x);
  pipe_ = t_.comm_->split(int(replica_), int(stage_));
  dp_ = t_.comm_->split(int(stage_), int(replica_));
  const bool ends = d.tie_embeddings && (stage_ == 0 || stage_ == pp_ - 1);
  tied_ = t_.comm_->split(ends ? int(replica_) : int(replicas_ + t_.rank_), int(stage_));
  if (t_.cfg_.ep > 1) place_experts_here();
  if (t_.cfg_.tp > 1) split_blocks_here();
}

// --tp N: replicas [g N, (g + 1) N) of a stage form tensor-parallel group g and run the same
// micro-batches; the shares by --tp_split's weights, or (auto) by the measured GEMM speed of each
// place's chips in the stage; gradients summed over the replicas that hold the same share.
void Pipeline::split_blocks_here() {
  const DecoderConfig d = t_.cfg_.decoder_config();
  check_tensor_parallel(t_.cfg_, t_.world_, d);
  tp_ = t_.cfg_.tp;
  const int64_t index = replica_ % tp_, groups = replicas_ / tp_;
  std::string why;
  std::vector<double> w = TensorParallel::speeds(t_, stage_ * tp_ + index, pp_ * tp_, &why);
  if (int64_t(w.size()) == pp_ * tp_)
    w = std::vector<double>(w.begin() + stage_ * tp_, w.begin() + (stage_ + 1) * tp_);
  auto group = t_.comm_->split(int(stage_ * groups + replica_ / tp_), int(index));
  dp_ = t_.comm_->split(int(stage_ * tp_ + index), int(replica_ / tp_));
  // Tied embeddings live on the first and last stages, whose groups' chips may differ: both cut
  // the vocabulary evenly, so each copy's rows match the other's.
  tg_ = std::make_unique<TensorGroup>(std::move(group), index, d, w, d.tie_embeddings && pp_ > 1);
}

Pipeline::~Pipeline() = default;

// --ep N: replicas [g N, (g + 1) N) of a stage form EP group g; the experts are placed by
// --expert_split's weights, or (auto) by the measured speed of an expert's GEMM on each place's
// chips (a chip too slow for one holding none), the same in every group of the stage.
void Pipeline::place_experts_here() {
  const DecoderConfig d = t_.cfg_.decoder_config();
  check_expert_parallel(t_.cfg_, t_.world_);
  check_expert_model(t_.cfg_, d);
  ep_ = t_.cfg_.ep;
  index_ = replica_ % ep_;
  std::vector<double> w = expert_weights(t_.cfg_.expert_split, ep_);
  const bool measured = w.empty();
  if (measured) {  // auto: each place of a stage's groups by its chips' mean expert GEMM time
    std::vector<double> sec(size_t(pp_ * ep_), 0.0);
    sec[size_t(stage_ * ep_ + index_)] = ExpertParallel::measure_seconds(t_)[0];
    t_.comm_->all_reduce_sum(sec.data(), pp_ * ep_);
    for (int64_t i = 0; i < ep_; ++i) w.push_back(1 / sec[size_t(stage_ * ep_ + i)]);
  }
  const std::vector<int64_t> n = place_experts(d.experts, w, measured);
  expert_bounds_.assign(1, 0);
  for (int64_t x : n) expert_bounds_.push_back(expert_bounds_.back() + x);
  shard_ = {expert_bounds_[size_t(index_)], n[size_t(index_)], 0};
  const int64_t groups = replicas_ / ep_;
  group_ = t_.comm_->split(int(stage_ * groups + replica_ / ep_), int(index_));
  holders_ = t_.comm_->split(int(stage_ * ep_ + index_), int(replica_ / ep_));
}

int64_t Pipeline::pass_rows() {
  // Replicas share a step's rows and the validation windows evenly, in consecutive blocks.
  const int64_t G = t_.cfg_.batch * t_.cfg_.accum, W = t_.cfg_.eval_batches * t_.cfg_.batch;
  // (--tp: a tensor-parallel group's replicas take the same rows.)
  const int64_t shares = replicas_ / tp_, mine = replica_ / tp_;
  const std::vector<double> even(static_cast<size_t>(shares), 1.0);
  const std::vector<int64_t> rows = split_rows(G, even), eval = split_rows(W, even);
  t_.row_begin_ = t_.eval_begin_ = 0;
  for (int64_t r = 0; r < mine; ++r) {
    t_.row_begin_ += rows[size_t(r)];
    t_.eval_begin_ += eval[size_t(r)];
  }
  t_.rows_ = rows[size_t(mine)];
  t_.eval_rows_ = eval[size_t(mine)];
  const int64_t micro = t_.cfg_.micro > 0
                            ? std::min(t_.cfg_.micro, t_.rows_)
                            : std::max<int64_t>(1, (t_.rows_ + 2 * pp_ - 1) / (2 * pp_));
  shard_.rows_in = ep_ * micro;  // --ep: the group's micro-batches reach the experts together
  return micro;
}

std::array<int64_t, 2> Pipeline::layers() const {
  return {bounds_[size_t(stage_)], bounds_[size_t(stage_ + 1)]};
}

void Pipeline::plan() {
  t_.plan_.ranks.assign(size_t(t_.world_), {});
  const int64_t T = t_.cfg_.seq_len(), C = hidden_;
  const int64_t m = (t_.rows_ + t_.cap_ - 1) / t_.cap_, E = t_.cap_ * T * C;
  for (int64_t n : {t_.rows_, t_.eval_rows_}) {
    t_.variant_for(std::min(n, t_.cap_));
    if (n % t_.cap_) t_.variant_for(n % t_.cap_);
  }
  if (stage_ > 0) {
    stash_.resize(size_t(m * E));
    send_b_.resize(size_t(m * E));
  }
  if (stage_ < pp_ - 1) {
    send_f_.resize(size_t(m * E));
    recv_g_.resize(size_t(E));
  }
  if (replicas_ > 1) grad_host_.resize(size_t(t_.prog_->param_count()));
  if (tg_) tg_->plan(*t_.prog_, t_.m_);
  if (ep_ > 1) {
    x_ = std::make_unique<ExpertExchange>(t_, *group_, expert_bounds_, index_);
    split_ranges(t_.prog_->graph(), shared_, expert_);
  }
  if (tied_->size() > 1)
    tied_host_.resize(size_t(numel(t_.prog_->graph().v(t_.m_.embed_table).shape)));
  for (int64_t r = 0; r < t_.world_; ++r)
    t_.plan_.ranks[size_t(r)].rows = r / pp_ == replica_ ? t_.rows_ : 0;
  t_.plan_.pipeline = std::to_string(pp_) + " stages x " + std::to_string(replicas_) +
                      (replicas_ > 1 ? " replicas" : " replica") + ", layers";
  for (int64_t s = 0; s < pp_; ++s) {
    t_.plan_.pipeline += s ? '+' : ' ';
    t_.plan_.pipeline += std::to_string(bounds_[size_t(s + 1)] - bounds_[size_t(s)]);
  }
  t_.plan_.pipeline += "; " + std::to_string(m) + " micro-batches of up to " +
                       std::to_string(t_.cap_) +
                       " sequences a replica, 1F1B, each stage's activations recomputed in its "
                       "backward";
  if (ep_ > 1) {
    t_.plan_.pipeline += "; --ep " + std::to_string(ep_) + ": each " + std::to_string(ep_) +
                         " replicas of a stage split its MoE layers' experts (" +
                         t_.cfg_.expert_split + "; this stage";
    for (int64_t i = 0; i < ep_; ++i)
      t_.plan_.pipeline += (i ? ", " : " ") + std::to_string(expert_bounds_[size_t(i + 1)] -
                                                             expert_bounds_[size_t(i)]);
    t_.plan_.pipeline +=
        std::string("), 4 ") + x_->path() + " all-to-alls a MoE layer a micro-batch pass";
  }
  if (tg_)
    t_.plan_.pipeline += "; --tp " + std::to_string(tp_) + ": each " + std::to_string(tp_) +
                         " replicas of a stage split its blocks (" + t_.cfg_.tp_split +
                         "; this stage " + tg_->describe() + ")";
}

void Pipeline::rows_of(int64_t micro, int64_t n, uint64_t key) {
  const int64_t T = t_.cfg_.seq_len();
  for (int64_t b = 0; b < n; ++b) {
    const uint64_t row = uint64_t(t_.row_begin_ + micro * t_.cap_ + b);
    t_.offsets_[size_t(b)] = int64_t(mix64(key + row) % uint64_t(t_.data_.n_train() - T - 1));
    t_.row_ids_[size_t(b)] = row;
  }
}

double Pipeline::passes(uint64_t key, double total) {
  const int64_t T = t_.cfg_.seq_len(), C = hidden_;
  const int64_t m = (t_.rows_ + t_.cap_ - 1) / t_.cap_, E = t_.cap_ * T * C;
  const bool first = stage_ == 0, last = stage_ == pp_ - 1;
  const int up = int(stage_ - 1), down = int(stage_ + 1);
  const size_t nodes = t_.prog_->graph().nodes.size();
  double loss_sum = 0;
  for (int64_t k = 0; k < 2 * m; ++k) {
    const int64_t o = one_f_one_b(pp_, stage_, m, k);
    const bool fwd = o >= 0;
    const int64_t i = fwd ? o : -o - 1, n = std::min(t_.cap_, t_.rows_ - i * t_.cap_),
                  len = n * T * C;
    if (fwd && last) continue;  // the last stage's forward runs with its backward
    const Trainer::Pass& p = t_.passes_[size_t(n)];
    rows_of(i, n, key);
    const double counted = double(t_.fill_batch(t_.data_.train(), n, key, false));
    float* stash = stash_.data() + i * E;
    if (!first) {
      if (fwd || last) pipe_->recv(stash, len, up, kTagForward);
      t_.dev_->upload(p.hidden_in, stash);
    }
    if (x_) x_->set_timing(t_.steps_run_ > 0);
    if (fwd) {
      run(*t_.prog_, p.variant, t_.n_forward_);
      t_.count_experts(p);  // the routing of this stage's MoE layers (once: not the recompute)
      float* out = send_f_.data() + i * E;
      t_.dev_->download(out, p.hidden_out);
      pipe_->send(out, len, down, kTagForward);
      continue;
    }
    if (last) {  // the loss's share of the global batch's seeds the backward
      t_.seed_backward(p.variant, float(counted / total));
      run(*t_.prog_, p.variant, nodes);
      t_.count_experts(p);
      float loss = 0;
      t_.dev_->download(&loss, p.loss);
      loss_sum += double(loss) * counted / total;
    } else {
      pipe_->recv(recv_g_.data(), len, down, kTagBackward);
      t_.dev_->upload(p.grad_out, recv_g_.data());
      if (p.loss.buffer) t_.seed_backward(p.variant, float(counted / total));  // MoE's aux share
      run(*t_.prog_, p.variant, nodes);  // the forward again, then the backward
      if (p.loss.buffer) {
        float aux = 0;
        t_.dev_->download(&aux, p.loss);
        loss_sum += double(aux) * counted / total;
      }
    }
    if (!first) {
      float* back = send_b_.data() + i * E;
      t_.dev_->download(back, p.grad_in);
      pipe_->send(back, len, up, kTagBackward);
    }
  }
  pipe_->wait_sends();
  if (x_) x_->set_timing(false);
  if (tg_ && tg_->index() != 0) loss_sum = 0;  // a group's replicas have the same loss
  t_.comm_->all_reduce_sum(&loss_sum, 1);      // the last stages hold it; the others add 0
  return loss_sum;
}

void Pipeline::run(Program& prog, int variant, size_t end) {
  if (x_)
    x_->run(prog, variant, end);
  else if (tg_)
    tg_->run(prog, *t_.dev_, variant, end);
  else
    prog.run(0, end, variant);
}

double Pipeline::exchange_seconds() const { return x_ ? x_->seconds() : 0.0; }

// --ep: the replicated params' gradients summed over the stage's replicas, each expert's over the
// replicas that hold it; returns this rank's experts' sum of squares (the group's add up).
double Pipeline::reduce_experts() {
  const Tensor g = t_.prog_->grads_all();
  t_.dev_->download(grad_host_.data(), g);
  reduce_ranges(grad_host_, shared_, *dp_, pack_);
  if (holders_->size() > 1) reduce_ranges(grad_host_, expert_, *holders_, pack_);
  t_.dev_->upload(g, grad_host_.data());
  double sq = 0;
  for (auto [at, n] : expert_)
    for (int64_t i = at; i < at + n; ++i)
      sq += double(grad_host_[size_t(i)]) * grad_host_[size_t(i)];
  return sq;
}

double Pipeline::grad_sumsq() {
  double mine = 0, group = 0;  // --ep: this rank's experts' sum of squares, its group's
  // The tied embeddings' gradient: the first and last stage's copies summed (in `g`, or on the
  // device without it). The last stage's copy counts once in the norm (`duplicate`), over the
  // tensor-parallel group when the table is split by vocabulary rows.
  const Value& e = t_.prog_->graph().v(t_.m_.embed_table >= 0 ? t_.m_.embed_table : 0);
  const bool tied = tied_->size() > 1;
  auto sum_tied = [&](float* g) {
    const Tensor dev_grad = t_.prog_->tensor(e.grad);
    if (!g) t_.dev_->download(tied_host_.data(), dev_grad);
    float* x = g ? g + e.offset / 4 : tied_host_.data();
    tied_->all_reduce_sum(x, numel(e.shape));
    if (!g) t_.dev_->upload(dev_grad, tied_host_.data());
    double sq = 0;
    for (int64_t i = 0; stage_ == pp_ - 1 && i < numel(e.shape); ++i) sq += double(x[i]) * x[i];
    return sq;
  };
  double duplicate = 0;
  bool tied_done = false;
  if (ep_ > 1) {
    group = mine = reduce_experts();
    group_->all_reduce_sum(&group, 1);
  } else if (replicas_ > 1) {  // data parallel over the replicas of this stage (with my share)
    const Tensor g = t_.prog_->grads_all();
    t_.dev_->download(grad_host_.data(), g);
    if (dp_->size() > 1) dp_->all_reduce_sum(grad_host_.data(), int64_t(grad_host_.size()));
    if (tied) duplicate = sum_tied(grad_host_.data()), tied_done = true;
    if (tg_) group = tg_->reduce(grad_host_);  // the group's other split params' squares
    t_.dev_->upload(g, grad_host_.data());
  }
  if (tied && !tied_done) duplicate = sum_tied(nullptr);
  if (tied && tg_ && stage_ == pp_ - 1) tg_->comm().all_reduce_sum(&duplicate, 1);
  t_.dev_->run(t_.grad_sumsq_);
  float sumsq = 0;
  t_.dev_->download(&sumsq, t_.sumsq_);
  double total = double(sumsq) - duplicate - mine + group;
  pipe_->all_reduce_sum(&total, 1);
  return std::max(0.0, total);
}

double Pipeline::eval() {
  const int64_t T = t_.cfg_.seq_len(), C = hidden_;
  const int64_t W = t_.cfg_.eval_batches * t_.cfg_.batch, span = t_.data_.n_val() - T - 1;
  const uint64_t key = mix64(uint64_t(t_.cfg_.seed) ^ 0x5eed0e7a1ull);
  const double total = double(t_.loss_tokens(key, 0, W, true));
  const bool first = stage_ == 0, last = stage_ == pp_ - 1;
  t_.sft_set_ = nullptr;
  double sum = 0;
  for (int64_t done = 0; done < t_.eval_rows_;) {
    const int64_t n = std::min(t_.cap_, t_.eval_rows_ - done), len = n * T * C;
    for (int64_t b = 0; b < n; ++b) {
      t_.offsets_[size_t(b)] = (t_.eval_begin_ + done + b) * span / std::max<int64_t>(1, W - 1);
      t_.row_ids_[size_t(b)] = uint64_t(t_.eval_begin_ + done + b);
    }
    const Trainer::Pass& p = t_.passes_[size_t(n)];
    const double counted = double(t_.fill_batch(t_.data_.val(), n, key, true));
    if (!first) {
      pipe_->recv(stash_.data(), len, int(stage_ - 1), kTagEval);
      t_.dev_->upload(p.hidden_in, stash_.data());
    }
    t_.run_forward_only(p.variant);
    if (p.loss.buffer) {  // the last stage's loss, or an earlier one's load-balancing share
      float loss = 0;
      t_.dev_->download(&loss, p.loss);
      sum += double(loss) * counted / total;
    }
    if (!last) {
      t_.dev_->download(send_f_.data(), p.hidden_out);
      pipe_->send(send_f_.data(), len, int(stage_ + 1), kTagEval);
      pipe_->wait_sends();
    }
    done += n;
  }
  if (tg_ && tg_->index() != 0) sum = 0;  // a group's replicas have the same loss
  t_.comm_->all_reduce_sum(&sum, 1);
  return sum;
}

// A stage's copies: the whole weights in its --tp group; the replicas' (--ep: the replicated
// params over every replica, each expert over those holding it); the tied embeddings of the
// first and the last stage.
std::vector<Strategy::Copies> Pipeline::copies() {
  std::vector<Copies> c;
  const int64_t all = t_.prog_->param_count();
  if (tg_) c.push_back({&tg_->comm(), tg_->whole_ranges()});
  if (ep_ > 1) {
    c.push_back({dp_.get(), shared_});
    if (holders_->size() > 1) c.push_back({holders_.get(), expert_});
  } else if (dp_->size() > 1) {
    c.push_back({dp_.get(), {{0, all}}});
  }
  if (tied_->size() > 1) {
    const Value& e = t_.prog_->graph().v(t_.m_.embed_table);
    c.push_back({tied_.get(), {{int64_t(e.offset / 4), numel(e.shape)}}});
  }
  return c;
}

const TensorShard* Pipeline::tensor_shard() const { return tg_ ? &tg_->shard() : nullptr; }
TensorMap Pipeline::cut(const TensorMap& whole) const { return tg_ ? tg_->cut(whole) : whole; }

bool Pipeline::gather(Checkpoint& ck) {
  // replica 0's stages hand their weights and moments to rank 0 (with --ep, replica 0 of each
  // stage first gathers its EP group's experts)
  ck.weights.clear();
  ck.optimizer.clear();
  if (replica_ >= std::max(ep_, tp_)) return false;
  gather_stages(ck);
  return stage_ == 0 && replica_ == 0;
}

// This stage's params in its graph's order, each as weight, m, v: into `blob` (floats only: the
// same builder gives rank 0 the names and shapes) or, without one, into ck. With --ep an expert
// stack travels whole, gathered over the group to its first replica.
void Pipeline::own_state(std::vector<float>* blob, Checkpoint& ck) {
  // With --ep, the stage's whole params (a replica without experts still takes part in every
  // stack's gather); replica 0 keeps them.
  Graph whole;
  if (ep_ > 1 || tg_) {
    DecoderGraph m;
    size_t nf = 0;
    whole = train_graph(t_.cfg_, 1, &m, &nf, bounds_[size_t(stage_)], bounds_[size_t(stage_ + 1)]);
  }
  auto put = [&](const Value& v, int i, HostTensor&& h) {
    if (blob) {
      blob->insert(blob->end(), h.f32(), h.f32() + numel(v.shape));
    } else {
      put_state(ck, v.name, i, std::move(h));
    }
  };
  if (tg_)  // --tp: the split params pieced together on the group's first replica
    tg_->gather(whole, TensorParallel::mine(t_), *t_.dev_, put);
  else
    ExpertParallel::gather_state(t_, ep_ > 1 ? whole : t_.prog_->graph(), group_.get(),
                                 expert_bounds_, shard_.first, replica_ == 0, put);
}

void Pipeline::gather_stages(Checkpoint& ck) {
  if (stage_ != 0 || replica_ != 0) {
    std::vector<float> blob;
    own_state(&blob, ck);
    if (replica_ != 0) return;  // an EP group's other replicas: their experts went to replica 0
    pipe_->send(blob.data(), int64_t(blob.size()), 0, kTagState);
    pipe_->wait_sends();
    return;
  }
  own_state(nullptr, ck);
  for (int64_t s = 1; s < pp_; ++s) {
    DecoderGraph m;
    size_t nf = 0;
    const Graph g = train_graph(t_.cfg_, 1, &m, &nf, bounds_[size_t(s)], bounds_[size_t(s + 1)]);
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
