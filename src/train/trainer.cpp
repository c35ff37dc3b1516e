#include "train/trainer.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <thread>

#include "core/error.h"
#include "core/faults.h"
#include "core/fs.h"
#include "core/rng.h"
#include "core/text.h"
#include "data/tokenizer.h"
#include "infer/adapter.h"
#include "io/hf_folder.h"
#include "parallel/balance.h"

namespace mxn {
namespace {

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

}  // namespace

Graph train_graph(const TrainConfig& c, int64_t rows, DecoderGraph* m, size_t* n_forward,
                  int64_t first, int64_t last, int* seed, int* grad_in) {
  Graph g;
  g.matmul_compute = c.dtype == "bf16" ? DType::bf16 : DType::f32;
  g.recompute = c.recompute == 1;
  DecoderOptions o;
  o.with_loss = true;
  if (c.objective == "glm") o.mask = MXN_MASK_PREFIX, o.block_positions = true;
  if (!c.sft.empty() && c.pack) o.mask = MXN_MASK_SEGMENTS;
  o.lora = c.lora_spec();
  o.freeze = c.finetune != "full";
  if (o.freeze && c.base_dtype == "bf16") o.weights = DType::bf16;
  DecoderConfig d = c.decoder_config();
  if (c.finetune == "ptuning") {
    d.prefix_len = c.prefix_len;
    o.prefix_projection = c.prefix_projection;
  }
  o.first_layer = first;
  o.last_layer = last;
  o.fused_head = c.fused_head;
  o.gelu_bf16 = c.gelu_bf16;
  o.attn_bf16 = c.attn_bf16;
  *m = build_decoder(g, d, rows, c.seq_len(), o);
  if (m->loss >= 0) {  // the whole model, or the last stage (which also sends d(hidden_in))
    int gi = -1;
    *n_forward = append_backward(g, m->loss, -1, m->hidden_in, &gi);
    if (grad_in) *grad_in = gi;
  } else {  // a stage before the last: the next stage's gradient seeds the backward
    const int s = g.input("grad_out", g.v(m->hidden_out).shape, DType::f32);
    int gi = -1;
    *n_forward = append_backward(g, m->hidden_out, s, m->hidden_in, &gi);
    if (seed) *seed = s;
    if (grad_in) *grad_in = gi;
  }
  return g;
}

// PEFT's LoRA initialisation: A as nn.Linear's default (Kaiming-uniform with a = sqrt(5), i.e.
// uniform in +-1/sqrt(in)), B zero, so training starts from the base model's outputs. P-Tuning
// v2's prefix rows: N(0, 0.02), like the model's own weights (small keys: the prefix starts with
// little attention and earns it).
void Trainer::init_adapter(int p) {
  const Value& v = prog_->graph().v(p);
  std::vector<float> w(size_t(numel(v.shape)), 0.f);
  const bool lora_a =
      v.name.size() > 14 && v.name.compare(v.name.size() - 14, 14, ".lora_A.weight") == 0;
  const bool prefix = v.name.rfind("prefix.", 0) == 0;
  // The prefix MLP as PyTorch's defaults: the embedding N(0, 1), each matrix uniform in
  // +-1/sqrt(in); its biases start at 0.
  const bool enc = v.name.rfind(kPrefixEncoder, 0) == 0 && v.shape.size() == 2;
  const bool emb = enc && v.name == std::string(kPrefixEncoder) + "embedding";
  if (lora_a || prefix || enc) {
    uint64_t h = uint64_t(cfg_.seed);
    for (char ch : v.name) h = mix64(h ^ uint64_t(uint8_t(ch)));
    Rng rng(h);
    const double bound = 1.0 / std::sqrt(double(v.shape[1]));
    for (float& x : w)
      x = float(emb      ? rng.normal()
                : prefix ? 0.02 * rng.normal()
                         : (2 * rng.uniform() - 1) * bound);
  }
  dev_->upload(prog_->tensor(p), w.data());
}

// Who takes which rows: with several ranks, measure each device (profile), split the global
// batch by the measured speeds (or the given weights) and predict the step time.
void Trainer::plan_ranks(const std::vector<double>& weights) {
  stats_.assign(size_t(1 + 2 * world_), 0.0);
  drift_.assign(size_t(world_) * kDriftWindow, 0.0);
  plan_.ranks.assign(size_t(world_), {});
  sec_per_row_ = auto_split_ ? std::vector<double>(size_t(world_), 1.0) : weights;
  if (pp_ > 1) {  // pp_plan() made the pipeline's split
    pp_ready();
    return;
  }
  if (comm_) {
    sync_ = std::make_unique<GradSync>(
        *prog_, *comm_, std::max<int64_t>(1, int64_t(cfg_.bucket_mb * (1 << 20) / 4)));
    plan_.buckets = sync_->buckets();
    plan_.device_direct = sync_->device_direct();
    profile();
  }
  apply_split(split_rows(cfg_.batch * cfg_.accum, sec_per_row_));
  for (int64_t r = 0; r < world_; ++r) plan_.ranks[size_t(r)].rows = split_[size_t(r)];
  double over = 0;
  for (const RankPlan& r : plan_.ranks) over = std::max(over, r.overhead_s);
  std::vector<double> measured(static_cast<size_t>(world_));
  for (int64_t r = 0; r < world_; ++r) measured[size_t(r)] = plan_.ranks[size_t(r)].sec_per_row;
  plan_.predicted_step_s = slowest_seconds(split_, measured) + over;
}

int64_t rows_per_pass(const TrainConfig& cfg, uint64_t free_bytes) {
  DecoderGraph m;
  size_t nf = 0;
  Graph one = train_graph(cfg, 1, &m, &nf);
  const double per_row = double(plan_arena(one)) * 1.05;  // one row's arena, planned, plus 5%
  // Trained weights take 16 bytes each (weight, gradient, two moments); a frozen base 4 or 2.
  double fixed = 0;
  for (int w : one.weights()) {
    const Value& v = one.v(w);
    fixed +=
        double(numel(v.shape)) * (v.kind == ValueKind::param ? 16.0 : double(dtype_size(v.dtype)));
  }
  const double room = double(free_bytes) * 0.9 - fixed;
  if (room < per_row) return 1;  // the allocation will then say how much is missing
  return std::clamp<int64_t>(int64_t(room / per_row), 1, cfg.batch);
}

int Trainer::variant_for(int64_t rows) {
  Pass& p = passes_[size_t(rows)];
  if (p.variant < 0) {
    DecoderGraph m;
    size_t nf = 0;
    const int64_t first = pp_ > 1 ? bounds_[size_t(stage_)] : 0;
    const int64_t last = pp_ > 1 ? bounds_[size_t(stage_ + 1)] : -1;
    p.variant =
        rows == cap_ ? 0 : prog_->add_variant(train_graph(cfg_, rows, &m, &nf, first, last));
    p.tokens = prog_->tensor(m_.tokens, p.variant);
    if (m_.loss >= 0) {  // the last stage (or the whole model)
      p.targets = prog_->tensor(m_.targets, p.variant);
      p.loss = prog_->tensor(m_.loss, p.variant);
    }
    if (m_.hidden_in >= 0) p.hidden_in = prog_->tensor(m_.hidden_in, p.variant);
    if (m_.hidden_out >= 0) p.hidden_out = prog_->tensor(m_.hidden_out, p.variant);
    if (seed_value_ >= 0) p.grad_out = prog_->tensor(seed_value_, p.variant);
    if (grad_in_value_ >= 0) p.grad_in = prog_->tensor(grad_in_value_, p.variant);
    if (glm_ || packed()) {
      p.positions = prog_->tensor(m_.positions, p.variant);
      if (glm_) p.block_positions = prog_->tensor(m_.block_positions, p.variant);
      p.prefix = prog_->tensor(m_.prefix, p.variant);
    }
  }
  return p.variant;
}

void Trainer::apply_split(const std::vector<int64_t>& split) {
  // Ranks take consecutive rows of the global batch; the validation windows are split alike.
  split_ = split;
  const int64_t W = cfg_.eval_batches * cfg_.batch;
  const std::vector<int64_t> eval = split_rows(W, sec_per_row_);
  row_begin_ = eval_begin_ = 0;
  for (int64_t r = 0; r < rank_; ++r) {
    row_begin_ += split_[size_t(r)];
    eval_begin_ += eval[size_t(r)];
  }
  rows_ = split_[size_t(rank_)];
  eval_rows_ = eval[size_t(rank_)];
  for (int64_t n : {rows_, eval_rows_}) {  // make every pass size this split needs now
    variant_for(std::min(n, cap_));
    if (n % cap_) variant_for(n % cap_);
  }
}

double Trainer::lr_at(int64_t s) const { return opt_->lr_at(s); }

void Trainer::profile() {
  // Each rank times its device on the real model: one warm-up pass, then the faster of two timed
  // forward + backward passes, and one all-reduce of the gradients (plus the optimizer's passes
  // over them, estimated as five sums of squares: AdamW streams seven arrays to the sum's one+).
  const int64_t T = cfg_.seq_len(), span = cfg_.sft.empty() ? data_.n_val() - T - 1 : 0;
  sft_set_ = cfg_.sft.empty() ? nullptr : &sft_val_;
  for (int64_t b = 0; b < cap_; ++b) {
    offsets_[size_t(b)] =
        sft_set_ ? b % int64_t(sft_val_.size()) : b * span / std::max<int64_t>(1, cap_);
    row_ids_[size_t(b)] = uint64_t(b);
  }
  const size_t nodes = prog_->graph().nodes.size();
  double pass_s = 0;
  for (int rep = 0; rep < 3; ++rep) {  // a warm-up, then the faster of two timed passes
    const auto t0 = std::chrono::steady_clock::now();
    fill_batch(data_.val(), cap_, 0, true);
    prog_->run(0, nodes, 0);
    dev_->synchronize();
    const double t = seconds_since(t0);
    pass_s = rep == 1 ? t : std::min(pass_s, t);
  }
  double reduce_s = 0;
  for (int rep = 0; rep < 2; ++rep) {  // the first one also sets up MPI's connections
    comm_->barrier();
    const auto t0 = std::chrono::steady_clock::now();
    sync_->run(nodes, nodes, 0);
    reduce_s = seconds_since(t0);
  }
  sync_->reset_exposed_seconds();  // the run's figure counts training steps only
  double opt_s = 0;
  for (int rep = 0; rep < 2; ++rep) {  // the first run may compile the kernel (PoCL does)
    const auto t0 = std::chrono::steady_clock::now();
    dev_->run(grad_sumsq_);
    float sumsq = 0;
    dev_->download(&sumsq, sumsq_);
    opt_s = 5 * seconds_since(t0);
  }
  dev_->run(zero_grads_);
  std::fill(stats_.begin(), stats_.end(), 0.0);
  stats_[size_t(1 + rank_)] = pass_s / double(cap_);
  stats_[size_t(1 + world_ + rank_)] = reduce_s + opt_s;
  comm_->all_reduce_sum(stats_.data(), int64_t(stats_.size()));
  std::vector<double> caps(size_t(3 * world_), 0.0);
  caps[size_t(rank_)] = double(cap_);
  caps[size_t(world_ + rank_)] = double(free_bytes_);
  caps[size_t(2 * world_ + rank_)] = double(optimizer_bytes());
  comm_->all_reduce_sum(caps.data(), int64_t(caps.size()));
  for (int64_t r = 0; r < world_; ++r) {
    RankPlan& rp = plan_.ranks[size_t(r)];
    rp.sec_per_row = stats_[size_t(1 + r)];
    rp.overhead_s = stats_[size_t(1 + world_ + r)];
    rp.cap = int64_t(caps[size_t(r)]);
    rp.free_bytes = uint64_t(caps[size_t(world_ + r)]);
    rp.optimizer_bytes = uint64_t(caps[size_t(2 * world_ + r)]);
    if (auto_split_) sec_per_row_[size_t(r)] = rp.sec_per_row;
  }
}

void Trainer::follow_drift() {
  // stats_ came back from the step's all-reduce: [loss, each rank's compute seconds, ...]. Each
  // rank's seconds per sequence is the median of its last five steps, so one hiccup moves nothing
  // and a lasting change (a throttling chip, a neighbour on it) moves rows within a few steps.
  if (!auto_split_) return;
  const size_t slot = size_t(steps_run_ % kDriftWindow);
  for (int64_t r = 0; r < world_; ++r) {
    double* h = &drift_[size_t(r) * kDriftWindow];
    h[slot] = stats_[size_t(1 + r)] / double(split_[size_t(r)]);
    if (steps_run_ < kDriftWindow) continue;
    std::array<double, kDriftWindow> m;
    std::copy(h, h + kDriftWindow, m.begin());
    std::nth_element(m.begin(), m.begin() + kDriftWindow / 2, m.end());
    sec_per_row_[size_t(r)] = m[kDriftWindow / 2];
  }
  if (steps_run_ < kDriftWindow) return;
  if (++steps_since_change_ < 5) return;
  const std::vector<int64_t> next = rebalance(split_, sec_per_row_, 0.03);
  if (next == split_) return;
  std::string change = "rebalanced after step " + std::to_string(step_) + ": rows";
  for (int64_t r = 0; r < world_; ++r) {
    char part[64];
    std::snprintf(part, sizeof(part), " %lld->%lld", (long long)split_[size_t(r)],
                  (long long)next[size_t(r)]);
    change += part;
  }
  char pred[96];
  std::snprintf(pred, sizeof(pred), " (slowest rank %.3f -> %.3f s)",
                slowest_seconds(split_, sec_per_row_), slowest_seconds(next, sec_per_row_));
  plan_.last_change = change + pred;
  ++plan_.rebalances;
  steps_since_change_ = 0;
  apply_split(next);
}

std::string Trainer::take_plan_change() {
  std::string s;
  s.swap(plan_.last_change);
  return s;
}

double Trainer::mean_exposed_reduce_seconds() const {
  return sync_ && steps_run_ > 0 ? sync_->exposed_seconds() / double(steps_run_) : 0.0;
}

double Trainer::mean_step_seconds() const {
  return steps_timed_ > 0 ? step_seconds_sum_ / double(steps_timed_) : 0.0;
}

float Trainer::step() {
  const auto t_start = std::chrono::steady_clock::now();
  const int64_t s = step_ + 1, T = cfg_.seq_len(), G = cfg_.batch * cfg_.accum;
  const size_t nodes = prog_->graph().nodes.size();
  fault_set_step(s);
  dev_->run(zero_grads_);
  fault_point("compute", s);  // tests: a chip that throttles from some step on
  // Row r of a step's global batch is a pure function of (seed, step, r): resuming needs no
  // data-loader state, and any split over ranks, passes or micro-batches sees the same rows.
  const uint64_t key = mix64(uint64_t(cfg_.seed) ^ mix64(uint64_t(s)));
  const double total = double(loss_tokens(key, 0, G, false));
  sft_set_ = cfg_.sft.empty() ? nullptr : &sft_train_;
  double loss_sum = 0;
  if (pp_ > 1) loss_sum = pp_passes(key, total);
  for (int64_t done = 0; pp_ == 1 && done < rows_;) {
    const int64_t n = std::min(cap_, rows_ - done);
    for (int64_t b = 0; b < n; ++b) {
      const uint64_t row = uint64_t(row_begin_ + done + b);
      offsets_[size_t(b)] = sft_set_
                                ? sft_row(key, int64_t(row), false)
                                : int64_t(mix64(key + row) % uint64_t(data_.n_train() - T - 1));
      row_ids_[size_t(b)] = row;
    }
    const Pass& p = passes_[size_t(n)];
    const double counted = double(fill_batch(data_.train(), n, key, false));
    // The loss is a mean over this pass's loss tokens; seeding its backward with their share
    // of the global batch's makes every gradient a share of the global mean, so passes and
    // ranks simply add up (rows weigh alike for next-token loss; GLM's rows differ).
    seed_backward(p.variant, float(counted / total));
    done += n;
    if (sync_ && done == rows_) {
      prog_->run(0, n_forward_, p.variant);
      sync_->run(n_forward_, nodes, p.variant);  // reduces overlap this last backward
    } else {
      prog_->run(0, nodes, p.variant);
    }
    float loss = 0;
    dev_->download(&loss, p.loss);
    loss_sum += double(loss) * counted / total;
  }
  if (comm_ && pp_ == 1) {
    const double compute_s =
        std::chrono::duration<double>(sync_->backward_done() - t_start).count();
    std::fill(stats_.begin(), stats_.end(), 0.0);
    stats_[0] = loss_sum;
    stats_[size_t(1 + rank_)] = compute_s;
    comm_->all_reduce_sum(stats_.data(), int64_t(stats_.size()));
    loss_sum = stats_[0];
  }
  fault_point("step");
  // Global norm of the mean gradient, then one scale for clipping.
  float sumsq = 0;
  if (pp_ > 1) {
    sumsq = float(pp_reduce_norm());
  } else {
    dev_->run(grad_sumsq_);
    dev_->download(&sumsq, sumsq_);
  }
  grad_norm_ = opt_->step(s, sumsq);
  dev_->synchronize();
  step_ = s;
  if (steps_run_++ > 0) {
    step_seconds_sum_ += seconds_since(t_start);
    ++steps_timed_;
  }
  if (comm_ && pp_ == 1) follow_drift();
  return float(loss_sum);
}

void Trainer::seed_backward(int variant, float dloss) {
  set_params(prog_->call(n_forward_, variant), ScalarParams{dloss});  // the loss's FILL
  if (head_node_ != SIZE_MAX)
    with_params<ClassifierParams>(prog_->call(head_node_, variant),
                                  [&](ClassifierParams& c) { c.dloss = dloss; });
}

void Trainer::run_forward_only(int variant) {
  // A fused head computes its gradients in the forward pass; evaluation needs only the loss.
  const Graph& g = prog_->graph();
  size_t head = n_forward_;
  for (size_t i = 0; i < n_forward_; ++i)
    if (g.nodes[i].op == MXN_OP_CLASSIFIER_CE) head = i;
  int grads = 0;
  auto swap_grads = [&] {
    if (head < n_forward_)
      with_params<ClassifierParams>(prog_->call(head, variant),
                                    [&](ClassifierParams& c) { std::swap(c.grads, grads); });
  };
  swap_grads();
  prog_->run(0, n_forward_, variant);
  swap_grads();
}

float Trainer::eval_loss() {
  if (pp_ > 1) return float(pp_eval());
  // The same fixed windows for any split: each rank takes its windows, and the token-weighted
  // losses are summed over ranks (collective: every rank calls this).
  const int64_t T = cfg_.seq_len(), W = cfg_.eval_batches * cfg_.batch;
  const int64_t span = cfg_.sft.empty() ? data_.n_val() - T - 1 : 0;
  const uint64_t key = mix64(uint64_t(cfg_.seed) ^ 0x5eed0e7a1ull);
  const double total = double(loss_tokens(key, 0, W, true));
  sft_set_ = cfg_.sft.empty() ? nullptr : &sft_val_;
  double sum = 0;
  for (int64_t done = 0; done < eval_rows_;) {
    const int64_t n = std::min(cap_, eval_rows_ - done);
    for (int64_t b = 0; b < n; ++b) {
      offsets_[size_t(b)] = sft_set_
                                ? sft_row(key, eval_begin_ + done + b, true)
                                : (eval_begin_ + done + b) * span / std::max<int64_t>(1, W - 1);
      row_ids_[size_t(b)] = uint64_t(eval_begin_ + done + b);
    }
    const Pass& p = passes_[size_t(n)];
    const double counted = double(fill_batch(data_.val(), n, key, true));
    run_forward_only(p.variant);
    float loss = 0;
    dev_->download(&loss, p.loss);
    sum += double(loss) * counted / total;
    done += n;
  }
  if (comm_) comm_->all_reduce_sum(&sum, 1);
  return float(sum);
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

TensorMap Trainer::frozen_weights() const {
  TensorMap out;
  for (int p : prog_->graph().weights()) {
    const Value& v = prog_->graph().v(p);
    if (v.kind != ValueKind::frozen) continue;
    HostTensor h(v.shape, v.dtype);
    dev_->download(h.bytes.data(), prog_->tensor(p));
    out.emplace(v.name, std::move(h));
  }
  return out;
}

namespace {
// m[name], made (or remade) only when it is missing or of another shape: checkpoints after the
// first reuse the host buffers of the one before.
HostTensor& slot(TensorMap& m, const std::string& name, const Shape& shape, DType dt) {
  auto it = m.find(name);
  if (it == m.end() || it->second.shape != shape || it->second.dtype != dt)
    it = m.insert_or_assign(name, HostTensor(shape, dt)).first;
  return it->second;
}
}  // namespace

bool Trainer::snapshot(Checkpoint& ck) {
  ck.files.clear();
  ck.tensors.clear();
  if (pp_ > 1) {  // replica 0's stages hand their weights and moments to rank 0
    ck.weights.clear();
    ck.optimizer.clear();
    if (replica_ != 0) return false;
    pp_gather(ck);
    if (stage_ != 0) return false;
  } else {  // the moments by name (with ZeRO-1 rank 0 first gathers every share), the weights
    if (!opt_->save(ck.optimizer, 0)) return false;
    for (int p : prog_->graph().params()) {
      const Value& v = prog_->graph().v(p);
      dev_->download(slot(ck.weights, v.name, v.shape, DType::f32).bytes.data(), prog_->tensor(p));
    }
  }
  ck.trainer = {{"step", step_}, {"config", to_json(cfg_)}, {"format", "mxn-checkpoint-1"}};
  ck.trainer["model"] = cfg_.decoder_config().to_json();
  if (cfg_.finetune != "full") {  // every checkpoint is also a PEFT folder
    Adapter a;
    const DecoderConfig d = cfg_.decoder_config();
    a.prefix = cfg_.finetune == "ptuning";
    a.spec = cfg_.lora_spec();
    a.dropout = cfg_.lora_dropout;
    a.prefix_len = cfg_.prefix_len;
    a.layers = d.layers;
    a.kv_dim = d.n_kv_heads() * d.hd();
    a.base = cfg_.model.dir;
    // With the prefix MLP, the rows it gives now (the MLP itself stays in the checkpoint).
    a.tensors =
        a.prefix && cfg_.prefix_projection > 0 ? project_prefix(ck.weights, d.layers) : ck.weights;
    ck.files.emplace_back("adapter_config.json", adapter_config_json(a, d));
    ck.tensors.emplace_back("adapter_model.safetensors", adapter_peft_tensors(a));
  }
  return true;
}

std::string Trainer::save() {
  Checkpoint ck;
  if (!snapshot(ck)) return "";
  std::filesystem::create_directories(cfg_.out);
  return save_checkpoint(cfg_.out, step_, ck, int(cfg_.ckpt_keep));
}

CheckpointWriter::Result Trainer::save_async(CheckpointWriter& w) {
  CheckpointWriter::Result last = w.wait();  // the host copy is free again
  if (snapshot(snap_)) {
    std::filesystem::create_directories(cfg_.out);
    w.start(cfg_.out, step_, &snap_, int(cfg_.ckpt_keep));
  }
  return last;
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
  for (int p : prog_->graph().params()) put(ck.weights, prog_->graph().v(p).name, prog_->tensor(p));
  opt_->load(ck.optimizer);
  step_ = ck.trainer.at("step").get<int64_t>();
}

}  // namespace mxn
