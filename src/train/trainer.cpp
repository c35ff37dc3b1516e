#include "train/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <span>

#include "core/error.h"
#include "core/faults.h"
#include "core/rng.h"
#include "infer/adapter.h"
#include "io/hf_folder.h"

namespace mxn {
namespace {

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

// Sequence parallelism's backward (DecoderGraph::SeqCut): each cut's d(to) (from `grads`, at
// `first`) goes to the runner; a gather's backward readers read `again` instead of `to`, gathered
// from the norm output recomputed just before (as Megatron-LM re-gathers rather than keeps the
// whole rows); the arena keeps what the runner touches live at its cut points.
void seq_backward(Graph& g, DecoderGraph& m, const std::vector<int>& grads, size_t first,
                  size_t n_forward) {
  for (size_t i = 0; i < m.seq_cuts.size(); ++i) {
    DecoderGraph::SeqCut& x = m.seq_cuts[i];
    x.d_to = grads[first + i];
    MXN_CHECK(x.d_to >= 0, "sequence parallelism: a cut's rows have no gradient");
    g.values[size_t(x.d_to)].output = false;  // read by the runner at the cut, not kept
    if (!x.gather) continue;
    x.again = g.activation(g.v(x.to).shape);
    for (size_t n = n_forward; n < g.nodes.size(); ++n)
      std::replace(g.nodes[n].in.begin(), g.nodes[n].in.end(), x.to, x.again);
    const char* what = "sequence parallelism: a norm's output is rewritten";
    const size_t at = std::min(g.cut_before(x.again, -1, what), g.cut_before(x.d_from, -1, what));
    size_t norm = 0;
    while (norm < n_forward && g.nodes[norm].out[0] != x.from) ++norm;
    MXN_CHECK(norm < n_forward &&
                  (g.nodes[norm].op == MXN_OP_LAYERNORM || g.nodes[norm].op == MXN_OP_RMSNORM),
              "sequence parallelism gathers a norm's output");
    Node again = g.nodes[norm];
    for (int& o : again.out) o = g.activation(g.v(o).shape, g.v(o).dtype);
    x.again_from = again.out[0];
    g.nodes.insert(g.nodes.begin() + int64_t(at), std::move(again));
  }
  for (const DecoderGraph::SeqCut& x : m.seq_cuts) {  // (after the insertions: node indexes)
    const SeqCutPoints at = seq_cut_points(g, x);
    for (int v : {x.from, x.to}) g.runner_uses.push_back({v, at.forward});
    if (x.again >= 0)
      for (int v : {x.again_from, x.again}) g.runner_uses.push_back({v, at.again});
    for (int v : {x.d_to, x.d_from}) g.runner_uses.push_back({v, at.backward});
  }
}

}  // namespace

Graph train_graph(const TrainConfig& c, int64_t rows, DecoderGraph* m, size_t* n_forward,
                  int64_t first, int64_t last, int* seed, int* grad_in, const ExpertShard* experts,
                  const TensorShard* tp) {
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
  if (experts) {  // a token sends its k experts' owner one row each
    o.expert_cut = true;
    o.expert_first = experts->first;
    o.expert_count = experts->count;
    o.expert_rows = experts->rows_in * c.seq_len() * std::min(d.top_k, experts->count);
  }
  if (tp) o.tp = *tp;
  *m = build_decoder(g, d, rows, c.seq_len(), o);
  for (int off : m->router_offsets) g.mark_output(off);  // the step's expert load
  // The backward's cut points: each exchanged row block's gradient seeds it and each received
  // one's leaves it (expert parallelism); a stage before the last is seeded by the next stage's
  // gradient (grad_out), with its MoE layers' load-balancing share as its loss, and a stage after
  // the first returns its input's gradient.
  BackwardCuts cuts;
  for (ExpertCut& x : m->expert_cuts) {
    const std::string& yp = g.v(x.yp).name;  // <block>ep.yp
    const std::string at = yp.substr(0, yp.size() - 2);
    x.d_xp = g.input(at + "d_xp", g.v(x.xp).shape, DType::f32);
    cuts.seeds.push_back({x.xp, x.d_xp});
    cuts.wrts.push_back(x.yp);
    if (x.xr < 0) continue;  // no local experts
    x.d_yr = g.input(at + "d_yr", g.v(x.yr).shape, DType::f32);
    cuts.seeds.push_back({x.yr, x.d_yr});
    cuts.wrts.push_back(x.xr);
  }
  int s = -1;
  if (m->loss < 0) {
    s = g.input("grad_out", g.v(m->hidden_out).shape, DType::f32);
    cuts.seeds.push_back({m->hidden_out, s});
  }
  if (m->hidden_in >= 0) cuts.wrts.push_back(m->hidden_in);
  cuts.sums = m->tp_grad_of;  // tensor parallelism: partial gradients, summed over the group
  const size_t seq_wrts = cuts.wrts.size();
  for (DecoderGraph::SeqCut& x : m->seq_cuts) {  // sequence parallelism: d(to) -> d(from)
    x.d_from = g.activation(g.v(x.from).shape);  // written by the runner
    cuts.seeds.push_back({x.from, x.d_from});
    cuts.wrts.push_back(x.to);
  }
  *n_forward = append_backward(g, m->loss >= 0 ? m->loss : m->aux_loss, cuts);
  m->tp_grad_sums = cuts.sum_grads;
  seq_backward(g, *m, cuts.wrt_grads, seq_wrts, *n_forward);
  cuts.wrts.resize(seq_wrts);
  cuts.wrt_grads.resize(seq_wrts);
  size_t w = 0;
  for (ExpertCut& x : m->expert_cuts) {
    x.d_yp = cuts.wrt_grads[w++];
    if (x.xr >= 0) x.d_xr = cuts.wrt_grads[w++];
    MXN_CHECK(x.d_yp >= 0 && (x.xr < 0 || x.d_xr >= 0), "an expert cut has no gradient");
  }
  MXN_CHECK(m->hidden_in < 0 || cuts.wrt_grads[w] >= 0, "the stage's input has no gradient");
  if (seed) *seed = s;
  if (grad_in) *grad_in = m->hidden_in >= 0 ? cuts.wrt_grads[w] : -1;
  return g;
}

// PEFT's LoRA initialisation: A as nn.Linear's default (Kaiming-uniform with a = sqrt(5), i.e.
// uniform in +-1/sqrt(in)), B zero, so training starts from the base model's outputs. P-Tuning
// v2's prefix rows: N(0, 0.02), like the model's own weights (small keys: the prefix starts with
// little attention and earns it).
std::vector<float> Trainer::adapter_values(const Value& v, int64_t first) const {
  std::vector<float> w(size_t(numel(v.shape)), 0.f);
  const bool lora_a =
      v.name.size() > 14 && v.name.compare(v.name.size() - 14, 14, ".lora_A.weight") == 0;
  const bool prefix = v.name.rfind("prefix.", 0) == 0;
  // The prefix MLP as PyTorch's defaults: the embedding N(0, 1), each matrix uniform in
  // +-1/sqrt(in); its biases start at 0.
  const bool enc = v.name.rfind(kPrefixEncoder, 0) == 0 && v.shape.size() == 2;
  const bool emb = enc && v.name == std::string(kPrefixEncoder) + "embedding";
  // An expert stack's A (experts, r, in): each expert's own draw, seeded by its PEFT name, so a
  // rank holding experts first.. (--ep) draws what one device does.
  const bool stack = lora_a && stacked_experts(v.name, v.shape);
  const int64_t parts = stack ? v.shape[0] : 1, per = numel(v.shape) / parts;
  for (int64_t e = 0; (lora_a || prefix || enc) && e < parts; ++e) {
    uint64_t h = uint64_t(cfg_.seed);
    for (char ch : stack ? expert_name(v.name, first + e) : v.name)
      h = mix64(h ^ uint64_t(uint8_t(ch)));
    Rng rng(h);
    const double bound = 1.0 / std::sqrt(double(v.shape.back()));
    for (float& x : std::span<float>(w).subspan(size_t(e * per), size_t(per)))
      x = float(emb      ? rng.normal()
                : prefix ? 0.02 * rng.normal()
                         : (2 * rng.uniform() - 1) * bound);
  }
  return w;
}

void Trainer::init_adapter(int p) {
  const std::vector<float> w =
      adapter_values(prog_->graph().v(p), par_->experts() ? par_->experts()->first : 0);
  dev_->upload(prog_->tensor(p), w.data());
}

int64_t rows_per_pass(const TrainConfig& cfg, uint64_t free_bytes, const TensorShard* tp) {
  DecoderGraph m;
  size_t nf = 0;
  Graph one = train_graph(cfg, 1, &m, &nf, 0, -1, nullptr, nullptr, nullptr, tp);
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
    const auto [first, last] = par_->layers();
    p.variant =
        rows == cap_
            ? 0
            : prog_->add_variant(train_graph(cfg_, rows, &m, &nf, first, last, nullptr, nullptr,
                                             par_->experts(), par_->tensor_shard()));
    p.tokens = prog_->tensor(m_.tokens, p.variant);
    if (m_.loss >= 0) {  // the last stage (or the whole model)
      p.targets = prog_->tensor(m_.targets, p.variant);
      p.loss = prog_->tensor(m_.loss, p.variant);
    } else if (m_.aux_loss >= 0) {  // a stage before the last: its load-balancing share
      p.loss = prog_->tensor(m_.aux_loss, p.variant);
    }
    if (m_.hidden_in >= 0) p.hidden_in = prog_->tensor(m_.hidden_in, p.variant);
    for (int off : m_.router_offsets) p.router_offsets.push_back(prog_->tensor(off, p.variant));
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

double Trainer::lr_at(int64_t s) const { return opt_->lr_at(s); }

Trainer::Drift Trainer::replica_drift() {
  if (!comm_) return {};
  const std::vector<Strategy::Copies> copies = par_->copies();
  if (comm_->all(copies.empty())) return {};  // (a middle stage may hold no copies; others do)
  std::vector<float> mine(static_cast<size_t>(prog_->param_count()));
  dev_->download(mine.data(), prog_->params_all());
  double worst = 0;
  bool same = true;
  compare_copies(copies, mine, &worst, &same);
  std::vector<double> each(size_t(world_), 0.0);
  each[size_t(rank_)] = worst;
  comm_->all_reduce_sum(each.data(), world_);
  return {true, comm_->all(same), *std::max_element(each.begin(), each.end()), !whole_replicas()};
}

std::string Trainer::take_plan_change() {
  std::string s;
  s.swap(plan_.last_change);
  return s;
}

double Trainer::mean_exposed_reduce_seconds() const { return par_->exposed_reduce_seconds(); }

double Trainer::mean_exchange_seconds() const {
  return steps_timed_ > 0 ? par_->exchange_seconds() / double(steps_timed_) : 0.0;
}

double Trainer::mean_step_seconds() const {
  return steps_timed_ > 0 ? step_seconds_sum_ / double(steps_timed_) : 0.0;
}

float Trainer::step() {
  const auto t_start = std::chrono::steady_clock::now();
  const int64_t s = step_ + 1, G = cfg_.batch * cfg_.accum;
  fault_set_step(s);
  par_->before_step();
  dev_->run(zero_grads_);
  fault_point("compute", s);  // tests: a chip that throttles from some step on
  // Row r of a step's global batch is a pure function of (seed, step, r): resuming needs no
  // data-loader state, and any split over ranks, passes or micro-batches sees the same rows.
  const uint64_t key = mix64(uint64_t(cfg_.seed) ^ mix64(uint64_t(s)));
  const double total = double(loss_tokens(key, 0, G, false));
  sft_set_ = cfg_.sft.empty() ? nullptr : &sft_train_;
  std::fill(expert_load_.begin(), expert_load_.end(), 0.0);
  const double loss = par_->passes(key, total);
  if (comm_ && !expert_load_.empty())
    comm_->all_reduce_sum(expert_load_.data(), int64_t(expert_load_.size()));
  fault_point("step");
  // Global norm of the mean gradient, then one scale for clipping.
  grad_norm_ = opt_->step(s, float(par_->grad_sumsq()));
  if (cfg_.router_bias_update > 0) update_router_bias();
  dev_->synchronize();
  step_ = s;
  if (steps_run_++ > 0) {
    step_seconds_sum_ += seconds_since(t_start);
    ++steps_timed_;
  }
  par_->after_step();
  if (align_) {  // mixed chips under --pp, --ep, --tp: every copy made its first holder's
    const Tensor all = prog_->params_all();
    dev_->download(align_host_.data(), all);
    align_copies(par_->copies(), align_host_);
    dev_->upload(all, align_host_.data());
  }
  return float(loss);
}

void Trainer::count_experts(const Pass& p) {
  if (p.router_offsets.empty()) return;
  const size_t E = offsets_host_.size() - 1;
  for (size_t l = 0; l < p.router_offsets.size(); ++l) {
    dev_->download(offsets_host_.data(), p.router_offsets[l]);
    for (size_t e = 0; e < E; ++e)
      expert_load_[(size_t(moe_first_) + l) * E + e] +=
          double(offsets_host_[e + 1] - offsets_host_[e]);
  }
}

// DeepSeek-V3's aux-loss-free balancing: b_e += rate * sign(mean load - load_e), per router, the
// same on every rank (the load is summed over them).
void Trainer::update_router_bias() {
  const size_t E = bias_host_.size();
  for (size_t i = 0; i < router_bias_values_.size(); ++i) {
    const Tensor b = prog_->tensor(router_bias_values_[i]);
    dev_->download(bias_host_.data(), b);
    const size_t l = size_t(moe_first_) + i;  // among the model's MoE layers
    double mean = 0;
    for (size_t e = 0; e < E; ++e) mean += expert_load_[l * E + e] / double(E);
    for (size_t e = 0; e < E; ++e) {
      const double d = mean - expert_load_[l * E + e];
      bias_host_[e] += float(cfg_.router_bias_update) * float((d > 0) - (d < 0));
    }
    dev_->upload(b, bias_host_.data());
  }
}

nlohmann::json Trainer::expert_load() const {
  nlohmann::json j = nlohmann::json::array();
  const size_t E = offsets_host_.empty() ? 0 : offsets_host_.size() - 1;
  for (size_t i = 0; E > 0 && i < expert_load_.size(); i += E)
    j.push_back(std::vector<int64_t>(expert_load_.begin() + int64_t(i),
                                     expert_load_.begin() + int64_t(i + E)));
  return j;
}

void Trainer::seed_backward(int variant, float dloss) {
  // The loss's FILL, the first backward node (gone where nothing reads it: a fused head takes
  // d(loss) itself)
  if (prog_->graph().nodes[n_forward_].op == MXN_OP_FILL)
    set_params(prog_->call(n_forward_, variant), ScalarParams{dloss});
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
  par_->run(*prog_, variant, n_forward_);
  swap_grads();
}

void Strategy::run(Program& prog, int variant, size_t end) { prog.run(0, end, variant); }

void Trainer::pick_rows(uint64_t key, int64_t done, int64_t n) {
  const int64_t T = cfg_.seq_len();
  for (int64_t b = 0; b < n; ++b) {
    const uint64_t row = uint64_t(row_begin_ + done + b);
    offsets_[size_t(b)] = sft_set_ ? sft_row(key, int64_t(row), false)
                                   : int64_t(mix64(key + row) % uint64_t(data_.n_train() - T - 1));
    row_ids_[size_t(b)] = row;
  }
}

double Trainer::eval_share(int64_t passes) {
  const int64_t T = cfg_.seq_len(), W = cfg_.eval_batches * cfg_.batch;
  const int64_t span = cfg_.sft.empty() ? data_.n_val() - T - 1 : 0;
  const uint64_t key = mix64(uint64_t(cfg_.seed) ^ 0x5eed0e7a1ull);
  const double total = double(loss_tokens(key, 0, W, true));
  sft_set_ = cfg_.sft.empty() ? nullptr : &sft_val_;
  double sum = 0;
  for (int64_t done = 0, i = 0; done < eval_rows_; ++i) {
    const int64_t n = passes > 0 ? eval_rows_ / passes + (i < eval_rows_ % passes)
                                 : std::min(cap_, eval_rows_ - done);
    for (int64_t b = 0; b < n; ++b) {
      const int64_t row = eval_begin_ + done + b;
      offsets_[size_t(b)] =
          sft_set_ ? sft_row(key, row, true) : row * span / std::max<int64_t>(1, W - 1);
      row_ids_[size_t(b)] = uint64_t(row);
    }
    const Pass& p = passes_[size_t(n)];
    const double counted = double(fill_batch(data_.val(), n, key, true));
    run_forward_only(p.variant);
    float loss = 0;
    dev_->download(&loss, p.loss);
    sum += double(loss) * counted / total;
    done += n;
  }
  return sum;
}

float Trainer::eval_loss() { return float(par_->eval()); }

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

bool Trainer::snapshot(Checkpoint& ck) {
  ck.files.clear();
  ck.tensors.clear();
  if (!par_->gather(ck)) return false;  // the weights and moments, on the rank that writes
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
  if (const ExpertShard* sh = par_->experts()) {  // the whole stacks sliced to this rank's experts
    const TensorMap w = expert_slices(ck.weights, *sh), o = expert_slices(ck.optimizer, *sh);
    for (int p : prog_->graph().params()) put(w, prog_->graph().v(p).name, prog_->tensor(p));
    opt_->load(o);
  } else if (par_->tensor_shard()) {  // the whole tensors cut to this rank's share
    const TensorMap w = par_->cut(ck.weights);
    for (int p : prog_->graph().params()) put(w, prog_->graph().v(p).name, prog_->tensor(p));
    opt_->load(par_->cut(ck.optimizer));
  } else {
    for (int p : prog_->graph().params())
      put(ck.weights, prog_->graph().v(p).name, prog_->tensor(p));
    opt_->load(ck.optimizer);
  }
  step_ = ck.trainer.at("step").get<int64_t>();
}

}  // namespace mxn
