// Tensor parallelism (Megatron-LM's, uneven over mixed chips): each group of --tp consecutive
// ranks splits every block, its q/k/v and gate/up projections by output columns (whole kv heads
// with their query heads, MLP columns in blocks of 32) and its output and down projections by
// input rows, in proportion to each chip's measured GEMM speed (--tp_split). The ranks of a group
// run the same rows; a block's partial outputs are summed over the group in the forward, and the
// gradients of the norm outputs that feed the split projections in the backward: two host-staged
// all-reduces a block each way, in place at the graph's cut points (DecoderGraph::tp_sums and
// tp_grad_sums). The token embeddings and the head are split by vocabulary rows (shares by speed as
// well): an embedding's rows summed over the group like a block's output, and the loss
// Megatron-LM's vocab-parallel cross-entropy, one more sum of each row's (max, sum, target logit)
// a slice, so no rank holds (tokens, vocab) logits. Norms are whole on every rank of a group;
// the groups are data-parallel replicas, the rows split evenly between them and each gradient
// summed over the ranks that hold the same share. Checkpoints hold the ordinary layout (gathered).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>

#include "core/error.h"
#include "io/hf_folder.h"
#include "parallel/balance.h"
#include "parallel/grad_sync.h"
#include "train/strategy.h"
#include "train/tensor_group.h"
#include "train/trainer.h"

namespace mxn {

void check_tensor_parallel(const TrainConfig& c, int64_t world, const DecoderConfig& d) {
  const std::string tp = "--tp " + std::to_string(c.tp);
  if (world % c.tp)
    throw Error(tp + " needs a multiple of " + std::to_string(c.tp) + " ranks; the job has " +
                std::to_string(world));
  if (c.ep > 1) throw Error(tp + " is not combined with --ep yet");
  const int64_t pp = std::max<int64_t>(c.pp, 1);
  if (world % (c.tp * pp))
    throw Error(tp + " --pp " + std::to_string(pp) + " needs a multiple of " +
                std::to_string(c.tp * pp) + " ranks; the job has " + std::to_string(world));
  if (c.zero == 1) throw Error(tp + " is not combined with --zero 1 yet");
  if (c.sequence_parallel == 1 && pp > 1)
    throw Error(tp + " --sequence_parallel 1 is not combined with --pp yet");
  if (c.finetune == "lora" && c.lora_dropout > 0) {
    char p[32];
    std::snprintf(p, sizeof p, "%g", c.lora_dropout);
    throw Error(tp + " with --lora_dropout " + p +
                ": dropout on a split linear's inputs is not drawn as on one device yet (use 0)");
  }
  if (d.experts > 0 || d.mla())
    throw Error(tp + " splits dense blocks; this model has " +
                (d.mla() ? "multi-head latent attention" : "mixture-of-experts layers (use --ep)"));
  const int64_t G = d.n_kv_heads();
  if (G < c.tp)
    throw Error(tp + ": the model has " + std::to_string(G) +
                " kv heads; each rank of a group needs at least one");
  if (c.tp_split == "even" && (G % c.tp || d.ffn_width() % c.tp))
    throw Error(tp + " --tp_split even: the model's " + std::to_string(G) + " kv heads and " +
                std::to_string(d.ffn_width()) + " MLP columns must divide by " +
                std::to_string(c.tp) + " (give weights such as 2,1, or auto)");
  const int64_t replicas = world / c.tp / pp;
  if (c.batch < replicas)
    throw Error("the global batch (" + std::to_string(c.batch) +
                " sequences) is smaller than the " + std::to_string(replicas) +
                " tensor-parallel groups: each needs at least one");
  expert_weights(c.tp_split, c.tp);  // the same syntax: auto, even or one weight a rank
}

std::vector<double> TensorParallel::speeds(Trainer& t, int64_t place, int64_t places,
                                           std::string* why) {
  std::vector<double> w = expert_weights(t.cfg_.tp_split, t.cfg_.tp);  // checked before
  if (!w.empty()) return w;
  const DecoderConfig d = t.cfg_.decoder_config();
  std::vector<double> sec(size_t(t.world_), 0.0), mean(size_t(places), 0.0), n(size_t(places), 0.0);
  const int64_t rows = std::min<int64_t>(t.cfg_.batch, 4) * t.cfg_.seq_len();
  sec[size_t(t.rank_)] = gemm_seconds(*t.dev_, rows, d.ffn_width(), d.hidden);
  std::vector<double> at(size_t(t.world_), 0.0);
  at[size_t(t.rank_)] = double(place);
  t.comm_->all_reduce_sum(sec.data(), t.world_);
  t.comm_->all_reduce_sum(at.data(), t.world_);
  *why = "; measured (ms) a GEMM";
  for (int64_t r = 0; r < t.world_; ++r) {
    mean[size_t(at[size_t(r)])] += sec[size_t(r)];
    n[size_t(at[size_t(r)])] += 1;
    char ms[32];
    std::snprintf(ms, sizeof ms, " %.3g", sec[size_t(r)] * 1e3);
    *why += ms;
  }
  for (size_t i = 0; i < mean.size(); ++i) w.push_back(n[i] / mean[i]);
  return w;
}

TensorParallel::TensorParallel(Trainer& t) : t_(t) {
  const DecoderConfig d = t.cfg_.decoder_config();
  tp_ = t.cfg_.tp;
  check_tensor_parallel(t.cfg_, t.world_, d);
  const int64_t index = t.rank_ % tp_;
  replica_ = t.rank_ / tp_;
  replicas_ = t.world_ / tp_;
  auto group = t.comm_->split(int(replica_), int(index));
  dp_ = t.comm_->split(int(index), int(replica_));
  tg_ = std::make_unique<TensorGroup>(std::move(group), index, d, speeds(t, index, tp_, &speeds_),
                                      false, t.cfg_.sequence_parallel == 1);
}

TensorParallel::~TensorParallel() = default;

int64_t TensorParallel::pass_rows() {
  std::vector<double> caps(size_t(t_.world_), 0.0);  // the group's smallest: they run in step
  caps[size_t(t_.rank_)] = double(rows_per_pass(t_.cfg_, t_.free_bytes_, &tg_->shard()));
  t_.comm_->all_reduce_sum(caps.data(), t_.world_);
  double cap = 1e18;
  for (int64_t i = 0; i < tp_; ++i) cap = std::min(cap, caps[size_t(replica_ * tp_ + i)]);
  return int64_t(cap);
}

void TensorParallel::plan() {
  Trainer& t = t_;
  const std::vector<double> even(static_cast<size_t>(replicas_), 1.0);
  const std::vector<int64_t> rows = split_rows(t.cfg_.batch * t.cfg_.accum, even),
                             eval = split_rows(t.cfg_.eval_batches * t.cfg_.batch, even);
  t.row_begin_ = t.eval_begin_ = 0;
  for (int64_t r = 0; r < replica_; ++r)
    t.row_begin_ += rows[size_t(r)], t.eval_begin_ += eval[size_t(r)];
  t.rows_ = rows[size_t(replica_)];
  t.eval_rows_ = eval[size_t(replica_)];
  for (int64_t n : {t.rows_, t.eval_rows_}) {
    t.variant_for(std::min(n, t.cap_));
    if (n % t.cap_) t.variant_for(n % t.cap_);
  }
  tg_->plan(*t.prog_, t.m_);
  grads_host_.assign(size_t(t.prog_->param_count()), 0.f);
  if (replicas_ > 1) sync_ = std::make_unique<GradSync>(*t.prog_, *dp_);
  t.plan_.ranks.assign(size_t(t.world_), {});
  for (int64_t r = 0; r < t.world_; ++r)
    t.plan_.ranks[size_t(r)].rows = rows[size_t(r / tp_)], t.plan_.ranks[size_t(r)].cap = t.cap_;
  t.plan_.tensor =
      std::to_string(replicas_) + (replicas_ > 1 ? " groups" : " group") + " of " +
      std::to_string(tp_) + " ranks split each block (" + t.cfg_.tp_split +
      "): " + tg_->describe() + "; 2 " + tg_->path() +
      (t.cfg_.sequence_parallel == 1
           ? " reduce-scatters and all-gathers a block each way (sequence parallel: "
             "the rows between blocks split)"
           : " all-reduces a block each way, 2 for the vocabulary's embedding and loss") +
      speeds_;
}

void TensorParallel::run(Program& prog, int variant, size_t end) {
  tg_->run(prog, *t_.dev_, variant, end);
}

double TensorParallel::passes(uint64_t key, double total) {
  Trainer& t = t_;
  const size_t nodes = t.prog_->graph().nodes.size();
  double loss_sum = 0;
  tg_->set_timing(t.steps_run_ > 0);
  for (int64_t done = 0; done < t.rows_;) {
    const int64_t n = std::min(t.cap_, t.rows_ - done);
    t.pick_rows(key, done, n);
    const Trainer::Pass& p = t.passes_[size_t(n)];
    const double counted = double(t.fill_batch(t.data_.train(), n, key, false));
    t.seed_backward(p.variant, float(counted / total));  // as DataParallel: shares add up
    run(*t.prog_, p.variant, nodes);
    done += n;
    if (sync_ && done == t.rows_) sync_->run(nodes, nodes, p.variant);  // over the replicas
    float loss = 0;
    t.dev_->download(&loss, p.loss);
    loss_sum += double(loss) * counted / total;
  }
  tg_->set_timing(false);
  dp_->all_reduce_sum(&loss_sum, 1);  // a group's ranks all have their replica's loss
  return loss_sum;
}

double TensorParallel::grad_sumsq() {
  const Tensor grads = t_.prog_->grads_all();
  t_.dev_->download(grads_host_.data(), grads);
  const double others = tg_->reduce(grads_host_);
  if (tg_->has_partial()) t_.dev_->upload(grads, grads_host_.data());
  double sq = 0;
  for (float x : grads_host_) sq += double(x) * x;
  return sq + others;
}

std::vector<Strategy::Copies> TensorParallel::copies() {
  std::vector<Copies> c{{&tg_->comm(), tg_->whole_ranges()}};
  if (replicas_ > 1) c.push_back({dp_.get(), {{0, t_.prog_->param_count()}}});
  return c;
}

double TensorParallel::eval() {
  double sum = t_.eval_share();
  dp_->all_reduce_sum(&sum, 1);
  return sum;
}

bool TensorParallel::gather(Checkpoint& ck) {
  // The first replica's group gathers each split param (weights and moments) to rank 0, pieced
  // back into the whole model's layout.
  ck.weights.clear();
  ck.optimizer.clear();
  if (replica_ != 0) return false;
  DecoderGraph m;
  size_t nf = 0;
  const Graph whole = train_graph(t_.cfg_, 1, &m, &nf);
  tg_->gather(whole, mine(t_), *t_.dev_, [&](const Value& v, int i, HostTensor&& h) {
    put_state(ck, v.name, i, std::move(h));
  });
  return tg_->index() == 0;
}

std::function<Tensor(const std::string&, int)> TensorParallel::mine(Trainer& t) {
  auto have = std::make_shared<std::map<std::string, int>>();
  const Graph& g = t.prog_->graph();
  for (int id : g.params()) (*have)[g.v(id).name] = id;
  return [&t, have](const std::string& name, int i) {
    const int id = have->at(name);
    return i == 0 ? t.prog_->tensor(id) : t.opt_->moment(i - 1, t.prog_->graph().v(id));
  };
}

TensorMap TensorParallel::cut(const TensorMap& whole) const { return tg_->cut(whole); }
const TensorShard* TensorParallel::tensor_shard() const { return &tg_->shard(); }
double TensorParallel::exchange_seconds() const { return tg_->seconds(); }

}  // namespace mxn
