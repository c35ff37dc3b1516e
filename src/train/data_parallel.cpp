// Data parallelism over any mix of chips: every rank holds the whole model and takes a share of
// each step's global batch, in proportion to its measured speed (or --split's weights); the
// shares follow drift (a throttling chip, a neighbour on it) within a few steps. Each pass's loss
// is seeded with its share of the global batch's loss tokens, so gradients of passes and ranks
// simply add up, and GradSync sums them over the ranks while the last backward runs. One rank
// alone is this strategy with a world of one.
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>

#include "core/error.h"
#include "core/rng.h"
#include "parallel/balance.h"
#include "train/trainer.h"

namespace mxn {
namespace {

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

// m[name], made (or remade) only when it is missing or of another shape: checkpoints after the
// first reuse the host buffers of the one before.
HostTensor& slot(TensorMap& m, const std::string& name, const Shape& shape, DType dt) {
  auto it = m.find(name);
  if (it == m.end() || it->second.shape != shape || it->second.dtype != dt)
    it = m.insert_or_assign(name, HostTensor(shape, dt)).first;
  return it->second;
}

}  // namespace

DataParallel::DataParallel(Trainer& t) : t_(t) {
  if (t.cfg_.batch < t.world_)
    throw Error("the global batch (" + std::to_string(t.cfg_.batch) +
                " sequences) is smaller than the " + std::to_string(t.world_) +
                " ranks: each needs at least one");
  // One rank takes everything, whatever the split says (a run saved with --split 3,1 resumes
  // on one device as it is).
  sec_per_row_ = t.world_ > 1 ? parse_split(t.cfg_.split, int(t.world_)) : std::vector<double>{1.0};
  auto_split_ = sec_per_row_.empty();
}

// Rows per forward pass: the batch, or fewer if the device's free memory cannot hold it (the
// rest of a rank's share then runs in further passes).
int64_t DataParallel::pass_rows() {
  return t_.comm_ ? rows_per_pass(t_.cfg_, t_.free_bytes_) : t_.cfg_.batch;
}

// Who takes which rows: with several ranks, measure each device (profile), split the global
// batch by the measured speeds (or the given weights) and predict the step time.
void DataParallel::plan() {
  const int64_t world = t_.world_;
  stats_.assign(size_t(1 + 2 * world), 0.0);
  drift_.assign(size_t(world) * kDriftWindow, 0.0);
  t_.plan_.ranks.assign(size_t(world), {});
  if (auto_split_) sec_per_row_.assign(size_t(world), 1.0);
  if (t_.comm_) {
    sync_ = std::make_unique<GradSync>(
        *t_.prog_, *t_.comm_, std::max<int64_t>(1, int64_t(t_.cfg_.bucket_mb * (1 << 20) / 4)));
    t_.plan_.buckets = sync_->buckets();
    t_.plan_.device_direct = sync_->device_direct();
    profile();
  }
  apply_split(split_rows(t_.cfg_.batch * t_.cfg_.accum, sec_per_row_));
  for (int64_t r = 0; r < world; ++r) t_.plan_.ranks[size_t(r)].rows = split_[size_t(r)];
  double over = 0;
  for (const RankPlan& r : t_.plan_.ranks) over = std::max(over, r.overhead_s);
  std::vector<double> measured(static_cast<size_t>(world));
  for (int64_t r = 0; r < world; ++r) measured[size_t(r)] = t_.plan_.ranks[size_t(r)].sec_per_row;
  t_.plan_.predicted_step_s = slowest_seconds(split_, measured) + over;
}

void DataParallel::apply_split(const std::vector<int64_t>& split) {
  // Ranks take consecutive rows of the global batch; the validation windows are split alike.
  split_ = split;
  const int64_t W = t_.cfg_.eval_batches * t_.cfg_.batch;
  const std::vector<int64_t> eval = split_rows(W, sec_per_row_);
  t_.row_begin_ = t_.eval_begin_ = 0;
  for (int64_t r = 0; r < t_.rank_; ++r) {
    t_.row_begin_ += split_[size_t(r)];
    t_.eval_begin_ += eval[size_t(r)];
  }
  t_.rows_ = split_[size_t(t_.rank_)];
  t_.eval_rows_ = eval[size_t(t_.rank_)];
  for (int64_t n : {t_.rows_, t_.eval_rows_}) {  // make every pass size this split needs now
    t_.variant_for(std::min(n, t_.cap_));
    if (n % t_.cap_) t_.variant_for(n % t_.cap_);
  }
}

double DataParallel::passes(uint64_t key, double total) {
  Trainer& t = t_;
  const size_t nodes = t.prog_->graph().nodes.size();
  double loss_sum = 0;
  for (int64_t done = 0; done < t.rows_;) {
    const int64_t n = std::min(t.cap_, t.rows_ - done);
    t.pick_rows(key, done, n);
    const Trainer::Pass& p = t.passes_[size_t(n)];
    const double counted = double(t.fill_batch(t.data_.train(), n, key, false));
    // The loss is a mean over this pass's loss tokens; seeding its backward with their share
    // of the global batch's makes every gradient a share of the global mean, so passes and
    // ranks simply add up (rows weigh alike for next-token loss; GLM's rows differ).
    t.seed_backward(p.variant, float(counted / total));
    done += n;
    if (sync_ && done == t.rows_) {
      t.prog_->run(0, t.n_forward_, p.variant);
      sync_->run(t.n_forward_, nodes, p.variant);  // reduces overlap this last backward
    } else {
      t.prog_->run(0, nodes, p.variant);
    }
    float loss = 0;
    t.dev_->download(&loss, p.loss);
    loss_sum += double(loss) * counted / total;
    t.count_experts(p);
  }
  if (t.comm_) {
    const double compute_s =
        std::chrono::duration<double>(sync_->backward_done() - step_start_).count();
    std::fill(stats_.begin(), stats_.end(), 0.0);
    stats_[0] = loss_sum;
    stats_[size_t(1 + t.rank_)] = compute_s;
    t.comm_->all_reduce_sum(stats_.data(), int64_t(stats_.size()));
    loss_sum = stats_[0];
  }
  return loss_sum;
}

double DataParallel::grad_sumsq() {  // GradSync has summed the gradients already
  t_.dev_->run(t_.grad_sumsq_);
  float sumsq = 0;
  t_.dev_->download(&sumsq, t_.sumsq_);
  return sumsq;
}

double DataParallel::eval() {
  // The same fixed windows for any split: each rank takes its windows, and the token-weighted
  // losses are summed over ranks (collective: every rank calls this).
  double sum = t_.eval_share();
  if (t_.comm_) t_.comm_->all_reduce_sum(&sum, 1);
  return sum;
}

// The moments by name (with ZeRO-1 rank 0 first gathers every share), the weights.
bool DataParallel::gather(Checkpoint& ck) {
  if (!t_.opt_->save(ck.optimizer, 0)) return false;
  const Graph& g = t_.prog_->graph();
  for (int p : g.params()) {
    const Value& v = g.v(p);
    t_.dev_->download(slot(ck.weights, v.name, v.shape, DType::f32).bytes.data(),
                      t_.prog_->tensor(p));
  }
  return true;
}

double DataParallel::exposed_reduce_seconds() const {
  return sync_ && t_.steps_run_ > 0 ? sync_->exposed_seconds() / double(t_.steps_run_) : 0.0;
}

void DataParallel::profile() {
  // Each rank times its device on the real model: one warm-up pass, then the faster of two timed
  // forward + backward passes, and one all-reduce of the gradients (plus the optimizer's passes
  // over them, estimated as five sums of squares: AdamW streams seven arrays to the sum's one+).
  Trainer& t = t_;
  const int64_t T = t.cfg_.seq_len(), span = t.cfg_.sft.empty() ? t.data_.n_val() - T - 1 : 0;
  const int64_t world = t.world_, rank = t.rank_, cap = t.cap_;
  t.sft_set_ = t.cfg_.sft.empty() ? nullptr : &t.sft_val_;
  for (int64_t b = 0; b < cap; ++b) {
    t.offsets_[size_t(b)] =
        t.sft_set_ ? b % int64_t(t.sft_val_.size()) : b * span / std::max<int64_t>(1, cap);
    t.row_ids_[size_t(b)] = uint64_t(b);
  }
  const size_t nodes = t.prog_->graph().nodes.size();
  double pass_s = 0;
  for (int rep = 0; rep < 3; ++rep) {  // a warm-up, then the faster of two timed passes
    const auto t0 = std::chrono::steady_clock::now();
    t.fill_batch(t.data_.val(), cap, 0, true);
    t.prog_->run(0, nodes, 0);
    t.dev_->synchronize();
    const double s = seconds_since(t0);
    pass_s = rep == 1 ? s : std::min(pass_s, s);
  }
  double reduce_s = 0;
  for (int rep = 0; rep < 2; ++rep) {  // the first one also sets up MPI's connections
    t.comm_->barrier();
    const auto t0 = std::chrono::steady_clock::now();
    sync_->run(nodes, nodes, 0);
    reduce_s = seconds_since(t0);
  }
  sync_->reset_exposed_seconds();  // the run's figure counts training steps only
  double opt_s = 0;
  for (int rep = 0; rep < 2; ++rep) {  // the first run may compile the kernel (PoCL does)
    const auto t0 = std::chrono::steady_clock::now();
    grad_sumsq();
    opt_s = 5 * seconds_since(t0);
  }
  t.dev_->run(t.zero_grads_);
  std::fill(stats_.begin(), stats_.end(), 0.0);
  stats_[size_t(1 + rank)] = pass_s / double(cap);
  stats_[size_t(1 + world + rank)] = reduce_s + opt_s;
  t.comm_->all_reduce_sum(stats_.data(), int64_t(stats_.size()));
  std::vector<double> caps(size_t(3 * world), 0.0);
  caps[size_t(rank)] = double(cap);
  caps[size_t(world + rank)] = double(t.free_bytes_);
  caps[size_t(2 * world + rank)] = double(t.optimizer_bytes());
  t.comm_->all_reduce_sum(caps.data(), int64_t(caps.size()));
  for (int64_t r = 0; r < world; ++r) {
    RankPlan& rp = t.plan_.ranks[size_t(r)];
    rp.sec_per_row = stats_[size_t(1 + r)];
    rp.overhead_s = stats_[size_t(1 + world + r)];
    rp.cap = int64_t(caps[size_t(r)]);
    rp.free_bytes = uint64_t(caps[size_t(world + r)]);
    rp.optimizer_bytes = uint64_t(caps[size_t(2 * world + r)]);
    if (auto_split_) sec_per_row_[size_t(r)] = rp.sec_per_row;
  }
}

void DataParallel::follow_drift() {
  // stats_ came back from the step's all-reduce: [loss, each rank's compute seconds, ...]. Each
  // rank's seconds per sequence is the median of its last five steps, so one hiccup moves nothing
  // and a lasting change (a throttling chip, a neighbour on it) moves rows within a few steps.
  if (!t_.comm_ || !auto_split_) return;
  const int64_t world = t_.world_, steps_run = t_.steps_run_;
  const size_t at = size_t(steps_run % kDriftWindow);
  for (int64_t r = 0; r < world; ++r) {
    double* h = &drift_[size_t(r) * kDriftWindow];
    h[at] = stats_[size_t(1 + r)] / double(split_[size_t(r)]);
    if (steps_run < kDriftWindow) continue;
    std::array<double, kDriftWindow> m;
    std::copy(h, h + kDriftWindow, m.begin());
    std::nth_element(m.begin(), m.begin() + kDriftWindow / 2, m.end());
    sec_per_row_[size_t(r)] = m[kDriftWindow / 2];
  }
  if (steps_run < kDriftWindow) return;
  if (++steps_since_change_ < 5) return;
  const std::vector<int64_t> next = rebalance(split_, sec_per_row_, 0.03);
  if (next == split_) return;
  std::string change = "rebalanced after step " + std::to_string(t_.step_) + ": rows";
  for (int64_t r = 0; r < world; ++r) {
    char part[64];
    std::snprintf(part, sizeof(part), " %lld->%lld", (long long)split_[size_t(r)],
                  (long long)next[size_t(r)]);
    change += part;
  }
  char pred[96];
  std::snprintf(pred, sizeof(pred), " (slowest rank %.3f -> %.3f s)",
                slowest_seconds(split_, sec_per_row_), slowest_seconds(next, sec_per_row_));
  t_.plan_.last_change = change + pred;
  ++t_.plan_.rebalances;
  steps_since_change_ = 0;
  apply_split(next);
}

std::vector<Strategy::Copies> DataParallel::copies() {
  if (!t_.comm_) return {};
  return {{t_.comm_, {{0, t_.prog_->param_count()}}}};
}

void compare_copies(const std::vector<Strategy::Copies>& cs, const std::vector<float>& mine,
                    double* worst, bool* same) {
  std::vector<float> root;
  for (const Strategy::Copies& c : cs)
    for (auto [at, n] : c.ranges) {
      root.assign(mine.begin() + at, mine.begin() + at + n);
      c.comm->broadcast(root.data(), n * 4, 0);
      for (int64_t i = 0; i < n; ++i) {
        const float x = mine[size_t(at + i)];
        *worst = std::max(*worst, std::fabs(double(x) - double(root[size_t(i)])));
        *same = *same && std::memcmp(&x, &root[size_t(i)], 4) == 0;
      }
    }
}

void put_state(Checkpoint& ck, const std::string& name, int i, HostTensor&& h) {
  if (i == 0)
    ck.weights.insert_or_assign(name, std::move(h));
  else
    ck.optimizer.insert_or_assign((i == 1 ? "m." : "v.") + name, std::move(h));
}

void align_copies(const std::vector<Strategy::Copies>& cs, std::vector<float>& params) {
  for (const Strategy::Copies& c : cs)
    for (auto [at, n] : c.ranges) c.comm->broadcast(&params[size_t(at)], n * 4, 0);
}

}  // namespace mxn
