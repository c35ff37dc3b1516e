// Tensor parallelism (Megatron-LM's, uneven over mixed chips): each group of --tp consecutive
// ranks splits every block, its q/k/v and gate/up projections by output columns (whole kv heads
// with their query heads, MLP columns in blocks of 32) and its output and down projections by
// input rows, in proportion to each chip's measured GEMM speed (--tp_split). The ranks of a group
// run the same rows; a block's partial outputs are summed over the group in the forward, and the
// gradients of the norm outputs that feed the split projections in the backward: two host-staged
// all-reduces a block each way, in place at the graph's cut points (DecoderGraph::tp_sums and
// tp_grad_sums). Norms, embeddings and the head are whole on every rank of a group; the groups
// are data-parallel replicas, the rows split evenly between them and each gradient summed over
// the ranks that hold the same share. Checkpoints hold the ordinary layout (gathered).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>

#include "core/error.h"
#include "io/hf_folder.h"
#include "parallel/balance.h"
#include "parallel/grad_sync.h"
#include "train/strategy.h"
#include "train/trainer.h"

namespace mxn {

void check_tensor_parallel(const TrainConfig& c, int64_t world, const DecoderConfig& d) {
  const std::string tp = "--tp " + std::to_string(c.tp);
  if (world % c.tp)
    throw Error(tp + " needs a multiple of " + std::to_string(c.tp) + " ranks; the job has " +
                std::to_string(world));
  if (c.pp > 1 || c.ep > 1)
    throw Error(tp + " is not combined with " + (c.pp > 1 ? "--pp" : "--ep") + " yet");
  if (c.zero == 1) throw Error(tp + " is not combined with --zero 1 yet");
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
  const int64_t replicas = world / c.tp;
  if (c.batch < replicas)
    throw Error("the global batch (" + std::to_string(c.batch) +
                " sequences) is smaller than the " + std::to_string(replicas) +
                " tensor-parallel groups: each needs at least one");
  expert_weights(c.tp_split, c.tp);  // the same syntax: auto, even or one weight a rank
}

std::vector<TensorShard> tensor_shards(const DecoderConfig& d, const std::vector<double>& speed) {
  const int64_t n = int64_t(speed.size()), G = d.n_kv_heads(), F = d.ffn_width();
  const int64_t q_per_kv = d.heads / G;
  std::vector<double> sec;
  for (double s : speed) sec.push_back(1 / s);
  const std::vector<int64_t> kv = split_rows(G, sec);
  const int64_t block = F % 32 == 0 && F / 32 >= n ? 32 : 1;
  const std::vector<int64_t> blocks = split_rows(F / block, sec);
  std::vector<TensorShard> out(static_cast<size_t>(n));
  int64_t k0 = 0, f0 = 0;
  for (size_t r = 0; r < out.size(); ++r) {
    TensorShard& s = out[r];
    s.ranks = n;
    s.kv0 = k0, s.kv = kv[r], s.head0 = k0 * q_per_kv, s.heads = kv[r] * q_per_kv;
    s.ffn0 = f0, s.ffn = blocks[r] * block;
    k0 += s.kv, f0 += s.ffn;
  }
  return out;
}

void move_pieces(const ShardPieces& s, const Shape& whole, float* w, float* shard, bool to_shard) {
  const int64_t rows = whole[0], cols = whole.size() > 1 ? numel(whole) / rows : 1;
  int64_t width = 0;  // the shard's extent along the axis
  for (auto [from, n] : s.pieces) width += n;
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
  int64_t width = 0;
  for (auto [from, n] : s.pieces) width += n;
  whole[size_t(s.axis)] = width;
  return whole;
}

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

}  // namespace

TensorParallel::TensorParallel(Trainer& t) : t_(t) {
  const DecoderConfig d = t.cfg_.decoder_config();
  tp_ = t.cfg_.tp;
  check_tensor_parallel(t.cfg_, t.world_, d);
  index_ = t.rank_ % tp_;
  replica_ = t.rank_ / tp_;
  replicas_ = t.world_ / tp_;
  group_ = t.comm_->split(int(replica_), int(index_));
  dp_ = t.comm_->split(int(index_), int(replica_));
  std::vector<double> speed = expert_weights(t.cfg_.tp_split, tp_);
  if (speed.empty()) {  // auto: each index's mean GEMM seconds over the replicas
    std::vector<double> sec(size_t(t.world_), 0.0), mean(size_t(tp_), 0.0);
    const int64_t rows = std::min<int64_t>(t.cfg_.batch / replicas_, 4) * t.cfg_.seq_len();
    sec[size_t(t.rank_)] = gemm_seconds(*t.dev_, rows, d.ffn_width(), d.hidden);
    t.comm_->all_reduce_sum(sec.data(), t.world_);
    speeds_ = "; measured (ms) a GEMM";
    for (int64_t r = 0; r < t.world_; ++r) {
      mean[size_t(r % tp_)] += sec[size_t(r)] / double(replicas_);
      char ms[32];
      std::snprintf(ms, sizeof ms, " %.3g", sec[size_t(r)] * 1e3);
      speeds_ += ms;
    }
    for (double s : mean) speed.push_back(1 / s);
  }
  for (double& s : speed) s = std::max(s, 1e-9);  // a weight of 0 still gets one head
  shards_ = tensor_shards(d, speed);
  shard_ = shards_[size_t(index_)];
}

TensorParallel::~TensorParallel() = default;

int64_t TensorParallel::pass_rows() {
  std::vector<double> caps(size_t(t_.world_), 0.0);  // the group's smallest: they run in step
  caps[size_t(t_.rank_)] = double(rows_per_pass(t_.cfg_, t_.free_bytes_, &shard_));
  t_.comm_->all_reduce_sum(caps.data(), t_.world_);
  double cap = 1e18;
  for (int64_t i = 0; i < tp_; ++i) cap = std::min(cap, caps[size_t(replica_ * tp_ + i)]);
  return int64_t(cap);
}

void TensorParallel::plan() {
  Trainer& t = t_;
  const std::vector<int64_t> rows = split_rows(t.cfg_.batch * t.cfg_.accum,
                                               std::vector<double>(size_t(replicas_), 1.0)),
                             eval = split_rows(t.cfg_.eval_batches * t.cfg_.batch,
                                               std::vector<double>(size_t(replicas_), 1.0));
  t.row_begin_ = t.eval_begin_ = 0;
  for (int64_t r = 0; r < replica_; ++r)
    t.row_begin_ += rows[size_t(r)], t.eval_begin_ += eval[size_t(r)];
  t.rows_ = rows[size_t(replica_)];
  t.eval_rows_ = eval[size_t(replica_)];
  for (int64_t n : {t.rows_, t.eval_rows_}) {
    t.variant_for(std::min(n, t.cap_));
    if (n % t.cap_) t.variant_for(n % t.cap_);
  }
  // The cuts: a sum over the group before the first node that reads each value.
  const Graph& g = t.prog_->graph();
  int64_t most = 0;
  for (const std::vector<int>* vs : {&t.m_.tp_sums, &t.m_.tp_grad_sums})
    for (int v : *vs) {
      MXN_CHECK(v >= 0, "tensor parallelism: a split projection's input has no gradient");
      size_t at = g.nodes.size();
      for (size_t i = 0; i < g.nodes.size() && at == g.nodes.size(); ++i)
        if (std::find(g.nodes[i].in.begin(), g.nodes[i].in.end(), v) != g.nodes[i].in.end()) at = i;
      for (size_t i = at; i < g.nodes.size(); ++i)
        for (int o : g.nodes[i].out)
          MXN_CHECK(o != v, "tensor parallelism: a summed value is written after it is read");
      cuts_.push_back({at, v});
      most = std::max(most, numel(g.v(v).shape));
    }
  std::stable_sort(cuts_.begin(), cuts_.end(),
                   [](const Cut& a, const Cut& b) { return a.at < b.at; });
  host_.assign(size_t(most), 0.f);
  // The gradient's ranges: split params (summed over the group for the norm), replicated ones.
  const DecoderConfig d = t.cfg_.decoder_config();
  for (int p : g.params()) {
    const Value& v = g.v(p);
    const std::array<int64_t, 2> r{int64_t(v.offset / 4), numel(v.shape)};
    (shard_pieces(v.name, d, shard_).pieces.empty() ? whole_ : split_).push_back(r);
    if (partial_gradient(v.name, d, shard_)) partial_.push_back(r);
  }
  pack_.reserve(grads_host_.size());
  grads_host_.assign(size_t(t.prog_->param_count()), 0.f);
  const std::string chip = std::string(t.dev_->api()->name) + ": " + t.dev_->props().name;
  mixed_group_ = !same_everywhere(*group_, chip);
  mixed_dp_ = replicas_ > 1 && !same_everywhere(*dp_, chip);
  if (replicas_ > 1) sync_ = std::make_unique<GradSync>(*t.prog_, *dp_);
  t.plan_.ranks.assign(size_t(t.world_), {});
  for (int64_t r = 0; r < t.world_; ++r)
    t.plan_.ranks[size_t(r)].rows = rows[size_t(r / tp_)], t.plan_.ranks[size_t(r)].cap = t.cap_;
  std::string& s = t.plan_.tensor;
  s = std::to_string(replicas_) + (replicas_ > 1 ? " groups" : " group") + " of " +
      std::to_string(tp_) + " ranks split each block (" + t.cfg_.tp_split + "): kv heads";
  for (const TensorShard& sh : shards_) s.append(" ").append(std::to_string(sh.kv));
  s += ", MLP columns";
  for (const TensorShard& sh : shards_) s.append(" ").append(std::to_string(sh.ffn));
  s += "; 2 host-staged all-reduces a block each way" + speeds_;
}

void TensorParallel::run(Program& prog, int variant, size_t end) {
  size_t at = 0;
  for (const Cut& c : cuts_) {
    if (c.at >= end) break;
    prog.run(at, c.at, variant);
    at = c.at;
    const auto t0 = std::chrono::steady_clock::now();
    const Tensor x = prog.tensor(c.value, variant);
    t_.dev_->download(host_.data(), x);
    group_->all_reduce_sum(host_.data(), numel(x.shape));
    t_.dev_->upload(x, host_.data());
    if (timing_) seconds_ += seconds_since(t0);
  }
  prog.run(at, end, variant);
}

double TensorParallel::passes(uint64_t key, double total) {
  Trainer& t = t_;
  const size_t nodes = t.prog_->graph().nodes.size();
  double loss_sum = 0;
  timing_ = t.steps_run_ > 0;
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
  timing_ = false;
  dp_->all_reduce_sum(&loss_sum, 1);  // a group's ranks all have their replica's loss
  return loss_sum;
}

double TensorParallel::grad_sumsq() {  // the split params' squares summed over the group
  const Tensor grads = t_.prog_->grads_all();
  t_.dev_->download(grads_host_.data(), grads);
  if (!partial_.empty()) {  // whole weights with a part of their gradient on each rank
    reduce_ranges(grads_host_, partial_, *group_, pack_);
    t_.dev_->upload(grads, grads_host_.data());
  }
  double sq[2] = {0, 0};
  for (int k = 0; k < 2; ++k)
    for (auto [at, n] : k ? split_ : whole_)
      for (int64_t i = at; i < at + n; ++i)
        sq[k] += double(grads_host_[size_t(i)]) * grads_host_[size_t(i)];
  group_->all_reduce_sum(&sq[1], 1);
  return sq[0] + sq[1];
}

// On mixed chips each rank's AdamW rounds differently: the replicated weights are copied from
// the group's first rank, and every weight from the first replica's, so that no two copies of a
// weight ever differ.
void TensorParallel::after_step() {
  if (!mixed_group_ && !mixed_dp_) return;
  const Tensor all = t_.prog_->params_all();
  t_.dev_->download(grads_host_.data(), all);
  if (mixed_dp_) dp_->broadcast(grads_host_.data(), int64_t(grads_host_.size()) * 4, 0);
  if (mixed_group_)
    for (auto [at, n] : whole_) group_->broadcast(&grads_host_[size_t(at)], n * 4, 0);
  t_.dev_->upload(all, grads_host_.data());
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
  const DecoderConfig d = t_.cfg_.decoder_config();
  DecoderGraph m;
  size_t nf = 0;
  const Graph whole = train_graph(t_.cfg_, 1, &m, &nf);
  const Graph& g = t_.prog_->graph();
  std::map<std::string, int> have;
  for (int id : g.params()) have[g.v(id).name] = id;
  std::vector<float> buf, part;
  for (int w : whole.params()) {
    const Value& v = whole.v(w);
    const Value& mine = g.v(have.at(v.name));
    const bool split = !shard_pieces(v.name, d, shard_).pieces.empty();
    if (!split && index_ != 0) continue;
    std::vector<int64_t> at{0};
    for (const TensorShard& s : shards_)
      at.push_back(at.back() +
                   (split ? numel(shard_shape(shard_pieces(v.name, d, s), v.shape)) : 0));
    for (int i = 0; i < 3; ++i) {
      const Tensor src = i == 0 ? t_.prog_->tensor(have.at(v.name)) : t_.opt_->moment(i - 1, mine);
      HostTensor h(v.shape, DType::f32);
      if (split) {
        buf.resize(size_t(at.back()));
        t_.dev_->download(buf.data() + at[size_t(index_)], src);
        group_->gather(buf.data(), at, 0);
        if (index_ != 0) continue;
        for (size_t r = 0; r < shards_.size(); ++r)
          move_pieces(shard_pieces(v.name, d, shards_[r]), v.shape, h.f32(), buf.data() + at[r],
                      false);
      } else {
        t_.dev_->download(h.bytes.data(), src);
      }
      const std::string key = i == 0 ? v.name : (i == 1 ? "m." : "v.") + v.name;
      (i == 0 ? ck.weights : ck.optimizer).emplace(key, std::move(h));
    }
  }
  return index_ == 0;
}

TensorMap TensorParallel::cut(const TensorMap& whole) const {
  const DecoderConfig d = t_.cfg_.decoder_config();
  TensorMap out;
  for (const auto& [name, t] : whole) {
    const bool moment = name.rfind("m.", 0) == 0 || name.rfind("v.", 0) == 0;
    const ShardPieces s = shard_pieces(moment ? name.substr(2) : name, d, shard_);
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

double TensorParallel::exchange_seconds() const { return seconds_; }

}  // namespace mxn
