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
#include <map>

#include "core/error.h"
#include "core/text.h"
#include "io/hf_folder.h"
#include "parallel/balance.h"
#include "train/strategy.h"
#include "train/trainer.h"

namespace mxn {
namespace {

enum class Kind { rows_out, results_back, grads_out, grads_back };

// The first `rows` rows of a contiguous (rows', cols) tensor.
Tensor head_rows(const Tensor& t, int64_t rows) {
  return Tensor({rows, t.shape[1]}, t.dtype, t.buffer, t.offset);
}

}  // namespace

struct ExpertParallel::Exchange {
  struct Cut {
    size_t at, layer;
    Kind kind;
  };
  struct Layer {
    Tensor offsets, xp, xr, local, yr, yp, d_xp, d_yr, d_xr, d_yp;
  };
  std::vector<Cut> cuts;                     // in node order
  std::map<int, std::vector<Layer>> layers;  // by Program variant
  Device* dev = nullptr;
  Communicator* comm = nullptr;  // the group
  const std::vector<int64_t>* bounds = nullptr;
  int64_t E = 0, C = 0, ep = 1, me = 0;
  std::vector<int64_t> counts;  // (layers, ep, E): rows group rank p sends expert e this pass
  std::vector<double> sum;      // (ep, E): the counts' all-reduce
  std::vector<int32_t> off, local;
  std::vector<float> send, recv, stage;
  std::vector<int64_t> send_at, recv_at;  // ep + 1 float offsets, this rank's view of rows out
  double seconds = 0;                     // in training passes' exchanges, all steps
  bool timing = false;                    // in a training pass

  int64_t count(size_t l, int64_t p, int64_t e) const {
    return counts[(l * size_t(ep) + size_t(p)) * size_t(E) + size_t(e)];
  }
  int64_t first() const { return (*bounds)[size_t(me)]; }
  int64_t mine() const { return (*bounds)[size_t(me + 1)] - first(); }

  // The pass's routing of layer l, from every rank of the group (in the forward, once).
  void learn_counts(size_t l, const Tensor& offsets) {
    dev->download(off.data(), offsets);
    std::fill(sum.begin(), sum.end(), 0.0);
    for (int64_t e = 0; e < E; ++e)
      sum[size_t(me * E + e)] = double(off[size_t(e + 1)] - off[size_t(e)]);
    comm->all_reduce_sum(sum.data(), int64_t(sum.size()));
    for (size_t i = 0; i < sum.size(); ++i) counts[l * sum.size() + i] = int64_t(sum[i]);
  }

  // Blocks of layer l's rows out: to rank q the rows of q's experts; from rank p those of mine.
  // Also each local expert's first row in the regrouped rows.
  void layout(size_t l) {
    send_at.assign(1, 0);
    recv_at.assign(1, 0);
    for (int64_t q = 0; q < ep; ++q) {
      int64_t to = 0, from = 0;
      for (int64_t e = (*bounds)[size_t(q)]; e < (*bounds)[size_t(q + 1)]; ++e)
        to += count(l, me, e);
      for (int64_t e = first(); e < first() + mine(); ++e) from += count(l, q, e);
      send_at.push_back(send_at.back() + to * C);
      recv_at.push_back(recv_at.back() + from * C);
    }
    local.assign(1, 0);
    for (int64_t e = first(); e < first() + mine(); ++e) {
      int64_t n = 0;
      for (int64_t p = 0; p < ep; ++p) n += count(l, p, e);
      local.push_back(local.back() + int32_t(n));
    }
  }

  // Rows in global expert order (xp, d_yp) to their experts' ranks, arriving grouped by local
  // expert and, within one, by sender (xr, d_yr); with `offsets`, the groups' offsets too.
  void out(size_t l, const Tensor& from, const Tensor& to, const Tensor* offsets) {
    layout(l);
    const int64_t n_from = send_at.back() / C, n_to = local.back();
    if (n_from) dev->download(send.data(), head_rows(from, n_from));
    comm->all_to_all(send.data(), send_at, recv.data(), recv_at);
    float* at = stage.data();
    for (int64_t e = first(); e < first() + mine(); ++e)
      for (int64_t p = 0; p < ep; ++p) {
        int64_t skip = 0;  // p's rows for my experts before e
        for (int64_t f = first(); f < e; ++f) skip += count(l, p, f);
        const int64_t n = count(l, p, e) * C;
        std::memcpy(at, recv.data() + recv_at[size_t(p)] + skip * C, size_t(n) * 4);
        at += n;
      }
    if (n_to) dev->upload(head_rows(to, n_to), stage.data());
    if (offsets) dev->upload(*offsets, local.data());
  }

  // The inverse: rows grouped by local expert (yr, d_xr) back to their ranks, in the order they
  // left (yp, d_xp).
  void back(size_t l, const Tensor& from, const Tensor& to) {
    layout(l);
    const int64_t n_from = local.back(), n_to = send_at.back() / C;
    if (n_from) dev->download(stage.data(), head_rows(from, n_from));
    for (int64_t p = 0; p < ep; ++p) {
      float* at = send.data() + recv_at[size_t(p)];
      for (int64_t e = first(); e < first() + mine(); ++e) {
        int64_t row = local[size_t(e - first())];  // expert e's rows from ranks before p
        for (int64_t q = 0; q < p; ++q) row += count(l, q, e);
        const int64_t n = count(l, p, e) * C;
        std::memcpy(at, stage.data() + row * C, size_t(n) * 4);
        at += n;
      }
    }
    comm->all_to_all(send.data(), recv_at, recv.data(), send_at);
    if (n_to) dev->upload(head_rows(to, n_to), recv.data());
  }
};

void check_expert_parallel(const TrainConfig& c, int64_t world) {
  const std::string ep = "--ep " + std::to_string(c.ep);
  if (world % c.ep)
    throw Error(ep + " needs a multiple of " + std::to_string(c.ep) + " ranks; the job has " +
                std::to_string(world));
  if (c.finetune == "ptuning" || c.zero || c.pp > 1)
    throw Error(ep + " is not combined with --finetune ptuning, --zero 1 or --pp yet");
  if (c.batch < world)
    throw Error("the global batch (" + std::to_string(c.batch) +
                " sequences) is smaller than the " + std::to_string(world) +
                " ranks: each needs at least one");
  parse_split(c.split, int(world));
  expert_weights(c.expert_split, c.ep);
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
  if (d.experts == 0)
    throw Error("--ep " + std::to_string(ep_) +
                " splits a mixture of experts' experts over ranks; this model is dense (train "
                "--arch mixtral, qwen2_moe, qwen3_moe or glm4_moe, or --model a folder of one)");
  if (ep_ > d.experts)
    throw Error("--ep " + std::to_string(ep_) + ": more ranks than the model's " +
                std::to_string(d.experts) + " experts a layer; each rank needs at least one");
  if (t.cfg_.expert_split == "even" && d.experts % ep_)
    throw Error("--ep " + std::to_string(ep_) + " --expert_split even: the model's " +
                std::to_string(d.experts) + " experts a layer do not divide evenly over " +
                std::to_string(ep_) + " ranks (give weights such as 3,2, or auto)");
  index_ = t.rank_ % ep_;
  group_ = t.rank_ / ep_;
  groups_ = t.world_ / ep_;
  group_comm_ = t.comm_->split(int(group_), int(index_));
  replicas_ = t.comm_->split(int(index_), int(group_));
  row_sec_ = parse_split(t.cfg_.split, int(t.world_));  // both checked above
  std::vector<double> speed = expert_weights(t.cfg_.expert_split, ep_);
  const bool auto_experts = speed.empty();
  if (row_sec_.empty() || auto_experts) {  // auto: shares in proportion to the measured speed
    const std::array<double, 2> mine = measure_seconds();
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

// This rank's seconds for (0) one expert's share of a pass: its gate projection's GEMM over the
// rows an even routing would give it; (1) one sequence's forward and backward through one block
// of the model's shape with a dense MLP as wide as a token's experts (the work that follows the
// rows: attention, norms, the head). Weights and tokens 0.
std::array<double, 2> ExpertParallel::measure_seconds() {
  const DecoderConfig d = t_.cfg_.decoder_config();
  const int64_t T = t_.cfg_.seq_len();
  const int64_t rows = std::max<int64_t>(64, t_.cfg_.batch / t_.world_ * T * d.top_k / d.experts);
  std::array<double, 2> out{};
  {
    Graph g;
    const int y = g.matmul(g.input("x", {rows, d.hidden}, DType::f32),
                           g.param("w", {d.moe_ffn, d.hidden}, true), false, true);
    g.mark_output(y);
    Program prog(std::move(g), *t_.dev_, false);
    std::vector<float> zero(size_t(std::max(rows * d.hidden, prog.param_count())), 0.f);
    t_.dev_->upload(prog.tensor(0), zero.data());
    t_.dev_->upload(prog.params_all(), zero.data());
    out[0] = best_of_runs(prog, *t_.dev_);
  }
  DecoderConfig one = d;
  one.layers = 1, one.experts = 0;
  one.ffn = d.moe_ffn * d.top_k + d.shared_ffn;
  Graph g;
  DecoderOptions o;
  o.with_loss = true;
  const DecoderGraph m = build_decoder(g, one, 1, T, o);
  append_backward(g, m.loss, -1, -1, nullptr);
  Program prog(std::move(g), *t_.dev_);
  std::vector<int32_t> pos(static_cast<size_t>(T));
  for (int64_t i = 0; i < T; ++i) pos[size_t(i)] = int32_t(i);
  std::vector<float> zero(size_t(prog.param_count()), 0.f);
  t_.dev_->upload(prog.tensor(m.positions), pos.data());
  std::fill(pos.begin(), pos.end(), 0);
  t_.dev_->upload(prog.tensor(m.tokens), pos.data());
  t_.dev_->upload(prog.tensor(m.targets), pos.data());
  t_.dev_->upload(prog.params_all(), zero.data());
  out[1] = best_of_runs(prog, *t_.dev_);
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
  x_ = std::make_unique<Exchange>();
  Exchange& x = *x_;
  x.dev = t.dev_.get();
  x.comm = group_comm_.get();
  x.bounds = &bounds_;
  x.E = d.experts, x.C = d.hidden, x.ep = ep_, x.me = index_;
  // The cuts: before the first node that reads what crosses, after the last that writes what
  // leaves (checked: the graph's order must allow it).
  auto first_reading = [&](int v) {
    for (size_t i = 0; i < g.nodes.size(); ++i)
      if (std::find(g.nodes[i].in.begin(), g.nodes[i].in.end(), v) != g.nodes[i].in.end()) return i;
    return g.nodes.size();
  };
  auto cut = [&](size_t l, Kind k, int leaves, int arrives) {
    const size_t at = first_reading(arrives);
    for (size_t i = at; i < g.nodes.size(); ++i)
      for (int o : g.nodes[i].out)
        MXN_CHECK(leaves < 0 || o != leaves,
                  "expert parallelism: a cut's rows are written after it");
    x.cuts.push_back({at, l, k});
  };
  const std::vector<ExpertCut>& ec = t.m_.expert_cuts;
  for (size_t l = 0; l < ec.size(); ++l) {  // without local experts, out and back at one point
    const bool here = ec[l].xr >= 0;
    cut(l, Kind::rows_out, ec[l].xp, here ? ec[l].xr : ec[l].yp);
    cut(l, Kind::results_back, ec[l].yr, ec[l].yp);
    cut(l, Kind::grads_out, ec[l].d_yp, here ? ec[l].d_yr : ec[l].d_xp);
    cut(l, Kind::grads_back, ec[l].d_xr, ec[l].d_xp);
  }
  std::stable_sort(x.cuts.begin(), x.cuts.end(),
                   [](const Exchange::Cut& a, const Exchange::Cut& b) { return a.at < b.at; });
  for (const Trainer::Pass& p : t.passes_) {
    if (p.variant < 0) continue;
    std::vector<Exchange::Layer>& ls = x.layers[p.variant];
    for (const ExpertCut& c : ec) {
      auto at = [&](int v) { return v < 0 ? Tensor{} : t.prog_->tensor(v, p.variant); };
      ls.push_back({at(c.offsets), at(c.xp), at(c.xr), at(c.local_offsets), at(c.yr), at(c.yp),
                    at(c.d_xp), at(c.d_yr), at(c.d_xr), at(c.d_yp)});
    }
  }
  const int64_t rows_out = ec.empty() ? 0 : numel(g.v(ec[0].xp).shape);
  const int64_t rows_in = ec.empty() || ec[0].xr < 0 ? 0 : numel(g.v(ec[0].xr).shape);
  x.counts.assign(ec.size() * size_t(ep_ * d.experts), 0);
  x.sum.assign(size_t(ep_ * d.experts), 0.0);
  x.off.assign(size_t(d.experts + 1), 0);
  x.send.assign(size_t(std::max(rows_out, rows_in)), 0.f);
  x.recv.assign(x.send.size(), 0.f);
  x.stage.assign(size_t(rows_in), 0.f);
  // The flat gradient's ranges: an expert stack's own, the rest shared by every rank.
  for (int p : g.params()) {
    const Value& v = g.v(p);
    const std::array<int64_t, 2> r{int64_t(v.offset / 4), numel(v.shape)};
    (stacked_experts(v.name, v.shape) ? expert_ : shared_).push_back(r);
  }
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
      std::to_string(passes_) + (passes_ > 1 ? " passes" : " pass") +
      " a step; 4 host-staged all-to-alls a MoE layer a pass" + speeds_;
}

void ExpertParallel::run(Program& prog, int variant, size_t end) {
  const std::vector<Exchange::Layer>& ls = x_->layers.at(variant);
  size_t at = 0;
  for (const Exchange::Cut& c : x_->cuts) {
    if (c.at >= end) break;
    prog.run(at, c.at, variant);
    at = c.at;
    const Exchange::Layer& L = ls[c.layer];
    std::chrono::steady_clock::time_point t0;
    if (x_->timing) {  // the exchange's own time: the device has finished the piece before it
      t_.dev_->synchronize();
      t0 = std::chrono::steady_clock::now();
    }
    switch (c.kind) {
      case Kind::rows_out:
        x_->learn_counts(c.layer, L.offsets);
        x_->out(c.layer, L.xp, L.xr, L.local.buffer ? &L.local : nullptr);
        break;
      case Kind::results_back:
        x_->back(c.layer, L.yr, L.yp);
        break;
      case Kind::grads_out:
        x_->out(c.layer, L.d_yp, L.d_yr, nullptr);
        break;
      case Kind::grads_back:
        x_->back(c.layer, L.d_xr, L.d_xp);
        break;
    }
    if (x_->timing)
      x_->seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  prog.run(at, end, variant);
}

double ExpertParallel::exchange_seconds() const { return x_ ? x_->seconds : 0.0; }

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
    x_->timing = t.steps_run_ > 0;                       // the first step left out (warm-up)
    run(*t.prog_, p.variant, nodes);
    x_->timing = false;
    float loss = 0;
    t.dev_->download(&loss, p.loss);
    loss_sum += double(loss) * counted / total;
    t.count_experts(p);
    done += n;
  }
  t.comm_->all_reduce_sum(&loss_sum, 1);
  return loss_sum;
}

void ExpertParallel::reduce_ranges(const std::vector<std::array<int64_t, 2>>& ranges,
                                   Communicator& c) {
  pack_.clear();
  for (auto [at, n] : ranges)
    pack_.insert(pack_.end(), &grads_host_[size_t(at)], &grads_host_[size_t(at)] + n);
  c.all_reduce_sum(pack_.data(), int64_t(pack_.size()));
  const float* from = pack_.data();
  for (auto [at, n] : ranges) {
    std::copy(from, from + n, &grads_host_[size_t(at)]);
    from += n;
  }
}

double ExpertParallel::grad_sumsq() {
  const Tensor g = t_.prog_->grads_all();
  t_.dev_->download(grads_host_.data(), g);
  reduce_ranges(shared_, *t_.comm_);
  if (groups_ > 1) reduce_ranges(expert_, *replicas_);
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
  const bool lead = index_ == 0;
  std::map<std::string, int> have;
  for (int p : t_.prog_->graph().params()) have[t_.prog_->graph().v(p).name] = p;
  DecoderGraph m;
  size_t nf = 0;
  const Graph whole = train_graph(t_.cfg_, 1, &m, &nf);  // every param, whole
  std::vector<float> buf;
  for (int w : whole.params()) {
    const Value& v = whole.v(w);
    const auto it = have.find(v.name);
    const bool stack = stacked_experts(v.name, v.shape);
    MXN_CHECK(stack || it != have.end(), "expert parallelism: a rank lacks " + v.name);
    for (int i = 0; i < 3; ++i) {
      const Value* mine = it == have.end() ? nullptr : &t_.prog_->graph().v(it->second);
      const Tensor src = !mine    ? Tensor{}
                         : i == 0 ? t_.prog_->tensor(it->second)
                                  : t_.opt_->moment(i - 1, *mine);
      const std::string key = i == 0 ? v.name : (i == 1 ? "m." : "v.") + v.name;
      if (!stack && !lead) continue;
      HostTensor h(v.shape, DType::f32);
      if (!stack) {
        t_.dev_->download(h.bytes.data(), src);
      } else {
        const int64_t per = v.shape[1] * v.shape[2];
        buf.resize(size_t(numel(v.shape)));
        if (mine) t_.dev_->download(buf.data() + bounds_[size_t(index_)] * per, src);
        std::vector<int64_t> at;
        for (int64_t b : bounds_) at.push_back(b * per);
        group_comm_->gather(buf.data(), at, 0);
        if (!lead) continue;
        std::memcpy(h.bytes.data(), buf.data(), h.bytes.size());
      }
      (i == 0 ? ck.weights : ck.optimizer).emplace(key, std::move(h));
    }
  }
  return lead;
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
