// Expert parallelism in the trainer (strategy.h has the overview). The training graph is cut at
// each MoE layer's exchanges (DecoderGraph::expert_cuts): a pass runs the Program's nodes up to a
// cut, moves rows between the group's ranks through the host, and goes on. The router's offsets
// say how many of this rank's permuted rows go to each expert; since xp is in expert order and a
// rank's experts are a contiguous range, the rows for rank q are one block of xp. A rank receives
// each sender's block grouped by expert and regroups the rows expert-major (within an expert,
// by sender: the single device's token order), so each expert's GEMM is over its rows in the
// order one chip would have them. The results and gradients travel the same ways back.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>

#include "core/error.h"
#include "core/text.h"
#include "io/hf_folder.h"
#include "parallel/balance.h"
#include "parallel/grad_sync.h"
#include "train/expert_exchange.h"
#include "train/strategy.h"
#include "train/trainer.h"

namespace mxn {
void check_expert_parallel(const TrainConfig& c, int64_t world) {
  const std::string ep = "--ep " + std::to_string(c.ep), pp = "--pp " + std::to_string(c.pp);
  if (c.pp > 1 && world % c.pp) return;                   // the pipeline's own message says so
  const int64_t ranks = c.pp > 1 ? world / c.pp : world;  // the ranks EP groups divide
  if (ranks % c.ep)
    throw Error(ep + " needs a multiple of " + std::to_string(c.ep) +
                (c.pp > 1 ? " replicas of each pipeline stage; " + pp + " over " +
                                std::to_string(world) + " ranks has " + std::to_string(ranks)
                          : " ranks; the job has " + std::to_string(world)));
  if (c.zero == 1) throw Error(ep + " is not combined with --zero 1 yet");
  if (c.batch < ranks)
    throw Error("the global batch (" + std::to_string(c.batch) +
                " sequences) is smaller than the " + std::to_string(ranks) +
                (c.pp > 1 ? " pipeline replicas" : " ranks") + ": each needs at least one");
  if (c.pp > 1) {  // an EP group's replicas run the same micro-batches, in step
    const int64_t rows = c.batch * c.accum, windows = c.eval_batches * c.batch;
    if (rows % ranks || windows % ranks)
      throw Error(ep + " with " + pp + ": the step's " + std::to_string(rows) +
                  " sequences and the " + std::to_string(windows) +
                  " validation windows must divide evenly over the " + std::to_string(ranks) +
                  " replicas, so that an EP group's replicas run the same micro-batches");
  } else {
    parse_split(c.split, int(world));
  }
  expert_weights(c.expert_split, c.ep);
}

void check_expert_model(const TrainConfig& c, const DecoderConfig& d) {
  const std::string ep = "--ep " + std::to_string(c.ep);
  if (d.experts == 0)
    throw Error(ep +
                " splits a mixture of experts' experts over ranks; this model is dense (train "
                "--arch mixtral, qwen2_moe, qwen3_moe or glm4_moe, or --model a folder of one)");
  if (c.ep > d.experts)
    throw Error(ep + ": more ranks than the model's " + std::to_string(d.experts) +
                " experts a layer; each rank needs at least one");
  if (c.expert_split == "even" && d.experts % c.ep)
    throw Error(ep + " --expert_split " + c.expert_split + ": the model's " +
                std::to_string(d.experts) + " experts a layer do not divide evenly over " +
                std::to_string(c.ep) + " ranks (give weights such as 3,2, or auto)");
}

std::vector<double> expert_weights(const std::string& s, int64_t ranks) {
  if (s == "auto") return {};
  if (s == "even") return std::vector<double>(size_t(ranks), 1.0);
  std::vector<double> w;
  double sum = 0;
  for (const std::string& item : split(s, ',')) {
    char* end = nullptr;
    const double x = std::strtod(item.c_str(), &end);
    if (item.empty() || *end != '\0' || !(x >= 0) || x > 1e9)
      throw Error("--expert_split '" + s + "': '" + item +
                  "' is not a number >= 0 (expected auto, even, or one weight per rank of an "
                  "--ep group such as 3,1; 0: none on that rank)");
    w.push_back(x);
    sum += x;
  }
  if (int64_t(w.size()) != ranks || !(sum > 0))
    throw Error("--expert_split '" + s + "' gives " + std::to_string(w.size()) + " weights" +
                (sum > 0 ? "" : ", none above 0,") + " for --ep " + std::to_string(ranks) +
                ": expected one a rank, at least one above 0");
  return w;
}

ExpertParallel::ExpertParallel(Trainer& t) : t_(t) {
  const DecoderConfig d = t.cfg_.decoder_config();
  ep_ = t.cfg_.ep;
  check_expert_parallel(t.cfg_, t.world_);
  check_expert_model(t.cfg_, d);
  index_ = t.rank_ % ep_;
  group_ = t.rank_ / ep_;
  groups_ = t.world_ / ep_;
  group_comm_ = t.comm_->split(int(group_), int(index_));
  replicas_ = t.comm_->split(int(index_), int(group_));
  row_sec_ = parse_split(t.cfg_.split, int(t.world_));  // both checked above
  std::vector<double> speed = expert_weights(t.cfg_.expert_split, ep_);
  const bool auto_experts = speed.empty();
  if (row_sec_.empty() || auto_experts) {  // auto: shares in proportion to the measured speed
    const std::array<double, 2> mine = measure_seconds(t);
    std::vector<double> both(size_t(2 * t.world_), 0.0);
    both[size_t(t.rank_)] = mine[0], both[size_t(t.world_ + t.rank_)] = mine[1];
    t.comm_->all_reduce_sum(both.data(), 2 * t.world_);
    if (row_sec_.empty()) row_sec_.assign(both.begin() + t.world_, both.end());
    if (auto_experts) {  // the mean over the groups, so that every group places the experts alike
      std::vector<double> sec(size_t(ep_), 0.0);
      for (int64_t r = 0; r < t.world_; ++r) sec[size_t(r % ep_)] += both[size_t(r)];
      for (double x : sec) speed.push_back(1 / x);
    }
    speeds_ = "; measured (ms) an expert's GEMM";
    for (int64_t k = 0; k < 2 * t.world_; ++k) {
      char ms[48];
      std::snprintf(ms, sizeof(ms), "%s %.3g", k == t.world_ ? ", a sequence's block" : "",
                    both[size_t(k)] * 1e3);
      speeds_ += ms;
    }
  }
  const std::vector<int64_t> n = place_experts(d.experts, speed, auto_experts);
  bounds_.assign(1, 0);
  for (int64_t x : n) bounds_.push_back(bounds_.back() + x);
  shard_ = {bounds_[size_t(index_)], n[size_t(index_)], 0};
}

ExpertParallel::~ExpertParallel() = default;

namespace {

// The faster of two timed runs of a Program, after a warm-up.
double best_of_runs(Program& prog, Device& dev) {
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    prog.run(0, prog.graph().nodes.size());
    dev.synchronize();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = rep == 1 ? s : std::min(best, s);
  }
  return best;
}

}  // namespace

double gemm_seconds(Device& dev, int64_t rows, int64_t out, int64_t in) {
  Graph g;
  const int y =
      g.matmul(g.input("x", {rows, in}, DType::f32), g.param("w", {out, in}, true), false, true);
  g.mark_output(y);
  Program prog(std::move(g), dev, false);
  std::vector<float> zero(size_t(std::max(rows * in, prog.param_count())), 0.f);
  dev.upload(prog.tensor(0), zero.data());
  dev.upload(prog.params_all(), zero.data());
  return best_of_runs(prog, dev);
}

// This rank's seconds for (0) one expert's share of a pass: its gate projection's GEMM over the
// rows an even routing would give it; (1) one sequence's forward and backward through one block
// of the model's shape with a dense MLP as wide as a token's experts (the work that follows the
// rows: attention, norms, the head). Weights and tokens 0.
std::array<double, 2> ExpertParallel::measure_seconds(Trainer& t) {
  const DecoderConfig d = t.cfg_.decoder_config();
  const int64_t T = t.cfg_.seq_len();
  const int64_t rows = std::max<int64_t>(64, t.cfg_.batch / t.world_ * T * d.top_k / d.experts);
  std::array<double, 2> out{gemm_seconds(*t.dev_, rows, d.moe_ffn, d.hidden), 0.0};
  DecoderConfig one = d;
  one.layers = 1, one.experts = 0;
  one.ffn = d.moe_ffn * d.top_k + d.shared_ffn;
  Graph g;
  DecoderOptions o;
  o.with_loss = true;
  const DecoderGraph m = build_decoder(g, one, 1, T, o);
  append_backward(g, m.loss, -1, -1, nullptr);
  Program prog(std::move(g), *t.dev_);
  std::vector<int32_t> pos(static_cast<size_t>(T));
  for (int64_t i = 0; i < T; ++i) pos[size_t(i)] = int32_t(i);
  std::vector<float> zero(size_t(prog.param_count()), 0.f);
  t.dev_->upload(prog.tensor(m.positions), pos.data());
  std::fill(pos.begin(), pos.end(), 0);
  t.dev_->upload(prog.tensor(m.tokens), pos.data());
  t.dev_->upload(prog.tensor(m.targets), pos.data());
  t.dev_->upload(prog.params_all(), zero.data());
  out[1] = best_of_runs(prog, *t.dev_);
  return out;
}

std::vector<int64_t> place_experts(int64_t E, const std::vector<double>& speed, bool drop_slow) {
  std::vector<size_t> order;  // the ranks that may hold experts, fastest first
  for (size_t r = 0; r < speed.size(); ++r)
    if (speed[r] > 0) order.push_back(r);
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return speed[a] > speed[b]; });
  std::vector<int64_t> best;
  double best_s = 0;
  // Every candidate rank, then (drop_slow) without the slowest, the two slowest, ...: the
  // placement whose slowest rank ends first (ties keep more ranks).
  for (size_t m = std::min(order.size(), size_t(E)); m >= 1; --m) {
    std::vector<double> sec;
    for (size_t i = 0; i < m; ++i) sec.push_back(1 / speed[order[i]]);
    const std::vector<int64_t> n = split_rows(E, sec);
    std::vector<int64_t> out(speed.size(), 0);
    double s = 0;
    for (size_t i = 0; i < m; ++i) {
      out[order[i]] = n[i];
      s = std::max(s, double(n[i]) * sec[i]);
    }
    if (best.empty() || s < best_s * (1 - 1e-9)) best = out, best_s = s;
    if (!drop_slow) break;
  }
  return best;
}

namespace {

// Every rank runs the same number of passes, each of at least one row and at most the rank's
// memory allows: the fewest that fit; a rank with fewer rows than passes gets some from the rank
// with the most (whole sequences: a slow chip's share is at least the pass count).
int64_t common_passes(std::vector<int64_t>& rows, const std::vector<int64_t>& cap) {
  int64_t n = 1;
  for (size_t r = 0; r < rows.size(); ++r) n = std::max(n, (rows[r] + cap[r] - 1) / cap[r]);
  for (;;) {
    const auto small = std::min_element(rows.begin(), rows.end());
    if (*small >= n) return n;
    const auto big = std::max_element(rows.begin(), rows.end());
    if (*big <= n)
      throw Error("expert parallelism: " + std::to_string(rows.size()) + " ranks cannot each " +
                  "run " + std::to_string(n) + " passes of at least one sequence (a rank's " +
                  "memory takes few sequences a pass: raise --batch, or give --split weights)");
    --*big;
    ++*small;
  }
}

int64_t most_a_pass(int64_t rows, int64_t passes) { return (rows + passes - 1) / passes; }

}  // namespace

// Each rank's rows of a step and of the validation windows, and the passes every rank runs: from
// every rank's memory (sequences a pass) and the rows' weights. The local experts take up to the
// group's largest passes together.
int64_t ExpertParallel::pass_rows() {
  const int64_t world = t_.world_;
  std::vector<double> caps(size_t(world), 0.0);
  caps[size_t(t_.rank_)] = double(rows_per_pass(t_.cfg_, t_.free_bytes_));
  t_.comm_->all_reduce_sum(caps.data(), world);
  const std::vector<int64_t> cap(caps.begin(), caps.end());
  rows_ = split_rows(t_.cfg_.batch * t_.cfg_.accum, row_sec_);
  eval_rows_ = split_rows(t_.cfg_.eval_batches * t_.cfg_.batch, row_sec_);
  passes_ = common_passes(rows_, cap);
  eval_passes_ = common_passes(eval_rows_, cap);
  int64_t in = 0, eval_in = 0;
  for (int64_t r = group_ * ep_; r < (group_ + 1) * ep_; ++r) {
    in += most_a_pass(rows_[size_t(r)], passes_);
    eval_in += most_a_pass(eval_rows_[size_t(r)], eval_passes_);
  }
  shard_.rows_in = std::max(in, eval_in);
  const size_t me = size_t(t_.rank_);
  return std::max(most_a_pass(rows_[me], passes_), most_a_pass(eval_rows_[me], eval_passes_));
}

void ExpertParallel::plan() {
  Trainer& t = t_;
  const int64_t world = t.world_;
  const size_t me = size_t(t.rank_);
  t.rows_ = rows_[me];
  t.eval_rows_ = eval_rows_[me];
  t.row_begin_ = t.eval_begin_ = 0;
  for (size_t r = 0; r < me; ++r) t.row_begin_ += rows_[r], t.eval_begin_ += eval_rows_[r];
  for (auto [n, k] : {std::pair{t.rows_, passes_}, std::pair{t.eval_rows_, eval_passes_}}) {
    t.variant_for(n / k);  // passes of n / k rows, and the first n % k of one more
    if (n % k) t.variant_for(n / k + 1);
  }
  const DecoderConfig d = t.cfg_.decoder_config();
  const Graph& g = t.prog_->graph();
  x_ = std::make_unique<ExpertExchange>(t, *group_comm_, bounds_, index_);
  split_ranges(g, shared_, expert_);
  grads_host_.assign(size_t(t.prog_->param_count()), 0.f);
  pack_.reserve(grads_host_.size());
  t.plan_.ranks.assign(size_t(world), {});
  for (int64_t r = 0; r < world; ++r)
    t.plan_.ranks[size_t(r)].rows = rows_[size_t(r)],
    t.plan_.ranks[size_t(r)].cap = most_a_pass(rows_[size_t(r)], passes_);
  t.plan_.expert_bounds = bounds_;
  std::string& s = t.plan_.experts;
  s = std::to_string(groups_) + (groups_ > 1 ? " groups" : " group") + " of " +
      std::to_string(ep_) + " ranks split each MoE layer's " + std::to_string(d.experts) +
      " experts (" + t.cfg_.expert_split + ") and the ranks the rows (" + t.cfg_.split + ") in " +
      std::to_string(passes_) + (passes_ > 1 ? " passes" : " pass") + " a step; 4 " + x_->path() +
      " all-to-alls a MoE layer a pass" + speeds_;
}

void ExpertParallel::run(Program& prog, int variant, size_t end) { x_->run(prog, variant, end); }

std::vector<Strategy::Copies> ExpertParallel::copies() {
  std::vector<Copies> c{{t_.comm_, shared_}};
  if (groups_ > 1) c.push_back({replicas_.get(), expert_});
  return c;
}

double ExpertParallel::exchange_seconds() const { return x_ ? x_->seconds() : 0.0; }

double ExpertParallel::passes(uint64_t key, double total) {
  Trainer& t = t_;
  const size_t nodes = t.prog_->graph().nodes.size();
  double loss_sum = 0;
  for (int64_t i = 0, done = 0; i < passes_; ++i) {
    const int64_t n = t.rows_ / passes_ + (i < t.rows_ % passes_);
    t.pick_rows(key, done, n);
    const Trainer::Pass& p = t.passes_[size_t(n)];
    const double counted = double(t.fill_batch(t.data_.train(), n, key, false));
    t.seed_backward(p.variant, float(counted / total));  // as DataParallel: shares add up
    x_->set_timing(t.steps_run_ > 0);                    // the first step left out (warm-up)
    run(*t.prog_, p.variant, nodes);
    x_->set_timing(false);
    float loss = 0;
    t.dev_->download(&loss, p.loss);
    loss_sum += double(loss) * counted / total;
    t.count_experts(p);
    done += n;
  }
  t.comm_->all_reduce_sum(&loss_sum, 1);
  return loss_sum;
}

void reduce_ranges(std::vector<float>& flat, const std::vector<std::array<int64_t, 2>>& ranges,
                   Communicator& c, std::vector<float>& pack) {
  pack.clear();
  for (auto [at, n] : ranges) pack.insert(pack.end(), &flat[size_t(at)], &flat[size_t(at)] + n);
  c.all_reduce_sum(pack.data(), int64_t(pack.size()));
  const float* from = pack.data();
  for (auto [at, n] : ranges) {
    std::copy(from, from + n, &flat[size_t(at)]);
    from += n;
  }
}

double ExpertParallel::grad_sumsq() {
  const Tensor g = t_.prog_->grads_all();
  t_.dev_->download(grads_host_.data(), g);
  reduce_ranges(grads_host_, shared_, *t_.comm_, pack_);
  if (groups_ > 1) reduce_ranges(grads_host_, expert_, *replicas_, pack_);
  t_.dev_->upload(g, grads_host_.data());
  double sq[2] = {0, 0};  // the shared params' (alike on every rank), this rank's experts'
  for (int k = 0; k < 2; ++k)
    for (auto [at, n] : k ? expert_ : shared_)
      for (int64_t i = at; i < at + n; ++i)
        sq[k] += double(grads_host_[size_t(i)]) * grads_host_[size_t(i)];
  group_comm_->all_reduce_sum(&sq[1], 1);
  return sq[0] + sq[1];
}

double ExpertParallel::eval() {
  double sum = t_.eval_share(eval_passes_);
  t_.comm_->all_reduce_sum(&sum, 1);
  return sum;
}

bool ExpertParallel::gather(Checkpoint& ck) {
  // Group 0 holds every expert once: its ranks gather each stack (weights and moments) to rank 0,
  // in the whole model's param order (a rank without experts takes part with nothing).
  ck.weights.clear();
  ck.optimizer.clear();
  if (group_ != 0) return false;
  DecoderGraph m;
  size_t nf = 0;
  const Graph whole = train_graph(t_.cfg_, 1, &m, &nf);  // every param, whole
  gather_state(
      t_, whole, group_comm_.get(), bounds_, shard_.first, index_ == 0,
      [&](const Value& v, int i, HostTensor&& h) { put_state(ck, v.name, i, std::move(h)); });
  return index_ == 0;
}

void ExpertParallel::gather_state(Trainer& t, const Graph& whole, Communicator* group,
                                  const std::vector<int64_t>& bounds, int64_t first, bool lead,
                                  const std::function<void(const Value&, int, HostTensor&&)>& put) {
  const Graph& g = t.prog_->graph();
  std::map<std::string, int> have;
  for (int id : g.params()) have[g.v(id).name] = id;
  std::vector<float> buf;
  std::vector<int64_t> at;
  for (int w : whole.params()) {
    const Value& v = whole.v(w);
    const auto it = have.find(v.name);
    const Value* mine = it == have.end() ? nullptr : &g.v(it->second);
    const bool stack = group && stacked_experts(v.name, v.shape);
    MXN_CHECK(stack || mine, "a rank lacks " + v.name);
    for (int i = 0; i < 3; ++i) {
      const Tensor src = !mine    ? Tensor{}
                         : i == 0 ? t.prog_->tensor(it->second)
                                  : t.opt_->moment(i - 1, *mine);
      if (!stack && !lead) continue;
      HostTensor h(v.shape, DType::f32);
      if (!stack) {
        t.dev_->download(h.bytes.data(), src);
      } else {
        const int64_t per = v.shape[1] * v.shape[2];
        buf.resize(size_t(numel(v.shape)));
        if (mine) t.dev_->download(buf.data() + first * per, src);
        at.clear();
        for (int64_t b : bounds) at.push_back(b * per);
        group->gather(buf.data(), at, 0);
        if (!lead) continue;
        std::memcpy(h.bytes.data(), buf.data(), h.bytes.size());
      }
      put(v, i, std::move(h));
    }
  }
}

void split_ranges(const Graph& g, std::vector<std::array<int64_t, 2>>& shared,
                  std::vector<std::array<int64_t, 2>>& expert) {
  for (int p : g.params()) {
    const Value& v = g.v(p);
    const std::array<int64_t, 2> r{int64_t(v.offset / 4), numel(v.shape)};
    (stacked_experts(v.name, v.shape) ? expert : shared).push_back(r);
  }
}

TensorMap expert_slices(const TensorMap& whole, const ExpertShard& shard) {
  TensorMap out;
  for (const auto& [name, t] : whole) {
    if (!stacked_experts(name, t.shape) || t.dtype != DType::f32) {
      out.emplace(name, t);
      continue;
    }
    if (shard.first + shard.count > t.shape[0])
      throw Error("checkpoint tensor '" + name + "' has " + std::to_string(t.shape[0]) +
                  " experts; this rank holds experts " + std::to_string(shard.first) + ".." +
                  std::to_string(shard.first + shard.count - 1));
    HostTensor h({shard.count, t.shape[1], t.shape[2]}, DType::f32);
    const size_t per = size_t(t.shape[1] * t.shape[2]) * 4;
    std::memcpy(h.bytes.data(), t.bytes.data() + size_t(shard.first) * per, h.bytes.size());
    out.emplace(name, std::move(h));
  }
  return out;
}

}  // namespace mxn
