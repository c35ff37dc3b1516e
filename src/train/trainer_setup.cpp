#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#include "core/error.h"
#include "core/fs.h"
#include "core/text.h"
#include "data/chat.h"
#include "data/tokenizer.h"
#include "infer/adapter.h"
#include "io/hf_folder.h"
#include "parallel/grad_sync.h"
#include "train/trainer.h"

// The Trainer's setup, step by step: the adapter it starts from, the data, the devices' kernels,
// the ranks and their shares, the Program, the optimizer's state, the weights.
namespace mxn {

Trainer::Trainer(const TrainConfig& cfg, const std::string& resume, Communicator* comm)
    : Trainer(cfg,
              resume.empty() ? nullptr
                             : std::make_unique<Checkpoint>(load_checkpoint(resume, true)).get(),
              comm) {}

Trainer::Trainer(const TrainConfig& cfg, const Checkpoint* resume, Communicator* comm)
    : cfg_(cfg), comm_(comm && comm->size() > 1 ? comm : nullptr) {
  cfg_.resolve_model();
  const Adapter start = resume ? Adapter{} : start_adapter();
  open_data();
  setup_glm();
  cfg_.validate();
  const DecoderConfig model = cfg_.decoder_config();
  if (glm_ && model.vocab_size < data_.vocab() + 5)
    throw Error("the glm objective needs vocab_size >= " + std::to_string(data_.vocab() + 5) +
                " (the data's vocabulary and five special tokens); the model has " +
                std::to_string(model.vocab_size));
  dev_ = open_device(cfg_.device, int(cfg_.threads));
  choose_dtype();
  choose_kernels();
  setup_ranks(model);
  build_program();
  setup_optimizer();
  alloc_rows();
  load_weights(resume, start, model);
  par_->plan();
}

// --adapter: the adapter training starts from; its shape becomes the run's.
Adapter Trainer::start_adapter() {
  Adapter start;
  if (cfg_.finetune == "full" || cfg_.adapter.empty()) return start;
  start = load_adapter(cfg_.adapter);
  if (start.prefix != (cfg_.finetune == "ptuning"))
    throw Error("adapter '" + cfg_.adapter + "' is a " +
                (start.prefix ? "P-Tuning v2 prefix" : "LoRA adapter") + "; --finetune " +
                cfg_.finetune + " trains " + (start.prefix ? "LoRA adapters" : "prefixes"));
  cfg_.lora_r = start.spec.r;
  cfg_.lora_alpha = start.spec.alpha;
  cfg_.lora_dropout = start.dropout;
  cfg_.lora_targets.clear();
  for (const std::string& t : start.spec.targets)
    cfg_.lora_targets += (cfg_.lora_targets.empty() ? "" : ",") + t;
  if (start.prefix) {
    if (cfg_.prefix_projection > 0)
      throw Error("adapter '" + cfg_.adapter +
                  "' holds prefix rows; --prefix_projection trains an MLP that makes them and "
                  "cannot start from rows (use --prefix_projection 0)");
    cfg_.prefix_len = start.prefix_len;
    const DecoderConfig d = cfg_.decoder_config();
    if (start.layers != d.layers || start.kv_dim != d.n_kv_heads() * d.hd())
      throw Error("adapter for another base: the prefix in '" + cfg_.adapter + "' has " +
                  std::to_string(start.layers) + " layers of " + std::to_string(start.kv_dim) +
                  " key/value columns (tensor 'prompt_embeddings'); the model has " +
                  std::to_string(d.layers) + " of " + std::to_string(d.n_kv_heads() * d.hd()));
  }
  return start;
}

// The token shard or text, or for SFT the conversations rendered once (the last 10%, at least
// one, validate).
void Trainer::open_data() {
  if (cfg_.sft.empty()) {
    data_ = TokenData::open(cfg_.data);
  } else {  // conversations rendered once; the last 10% (at least one) validate
    cfg_.validate();
    const auto tok = load_tokenizer(cfg_.model.dir);
    const ChatFormat f = chat_format(cfg_.model.dir, *tok);
    const std::vector<std::string> lines = split(read_file(cfg_.sft, "SFT data"), '\n');
    std::vector<ChatTokens> all;
    for (size_t i = 0; i < lines.size(); ++i)
      if (lines[i].find_first_not_of(" \t\r") != std::string::npos)
        all.push_back(chat_conversation(
            f, chat_messages_from_json(lines[i], cfg_.sft + ":" + std::to_string(i + 1)), *tok));
    if (all.size() < 2)
      throw Error("SFT data '" + cfg_.sft + "' has " + std::to_string(all.size()) +
                  " conversations; at least 2 are needed (one for validation)");
    const size_t n_val = std::max<size_t>(1, all.size() / 10);
    sft_val_.assign(all.end() - int64_t(n_val), all.end());
    all.resize(all.size() - n_val);
    sft_train_ = std::move(all);
  }
}

// GLM's blank infilling: five special tokens follow the data's vocabulary.
void Trainer::setup_glm() {
  glm_ = cfg_.objective == "glm";
  if (glm_) {
    // Five special tokens follow the data's vocabulary: [CLS] [MASK] [gMASK] [sop] [eop].
    if (!cfg_.model.dir.empty())
      throw Error(
          "--objective glm takes a fresh model on byte-level or shard data for now; a "
          "model folder's own [MASK]/[gMASK]/sop/eop tokens are not looked up yet");
    const int32_t v = int32_t(data_.vocab());
    glm_tokens_ = GlmTokens::after(v);
    if (cfg_.decoder.is_null() || cfg_.decoder.empty())
      cfg_.model.vocab_size = std::max<int64_t>(cfg_.model.vocab_size, v + 5);
  }
}

// --dtype auto: the model's widest GEMM (up to 1,024 of a pass's rows, times the MLP's up
// projection, cut to 2^30 multiply-adds) timed on this rank's device in f32 and with bf16
// operands, and bf16 chosen where it is at least 10% faster. oneDNN's bf16 GEMM runs at half its
// f32 rate on a Xeon with AVX512-BF16 and no AMX, and at 1.8x on the EPYC of these notes: a fixed
// default is wrong on one of them. Each rank chooses for its own chip.
void Trainer::choose_dtype() {
  if (cfg_.dtype != "auto") return;
  const DecoderConfig d = cfg_.decoder_config();
  int64_t M = std::min<int64_t>(std::min<int64_t>(cfg_.batch, 4) * cfg_.seq_len(), 1024);
  const int64_t K = d.hidden;
  int64_t N = d.ffn_width();
  // At most 2^30 multiply-adds (rows first, then columns): a wide model's rate is reached well
  // before its whole GEMM, which on a slow chip would take seconds a try (and the operands a GiB).
  const int64_t budget = int64_t(1) << 30;
  while (M > 64 && M * K * N > budget) M /= 2;
  while (N > 256 && M * K * N > budget) N /= 2;
  std::unique_ptr<Buffer> buf = dev_->alloc(uint64_t(M * K + N * K + M * N) * 4);
  const Tensor a({M, K}, DType::f32, buf->handle()),
      b({N, K}, DType::f32, buf->handle(), uint64_t(M * K) * 4),
      c({M, N}, DType::f32, buf->handle(), uint64_t(M * K + N * K) * 4);
  dev_->run(make_op_call(MXN_OP_FILL, {}, {a}, ScalarParams{0.01f}));
  dev_->run(make_op_call(MXN_OP_FILL, {}, {b}, ScalarParams{0.02f}));
  auto seconds = [&](int32_t compute) {
    const mxn_op_call call =
        make_op_call(MXN_OP_MATMUL, {a, b}, {c}, MatmulParams{false, true, false, compute});
    if (!dev_->supports(call)) return 0.0;
    double best = 1e30;
    for (int rep = 0; rep < 4; ++rep) {  // the first warms up (oneDNN builds its kernel)
      dev_->synchronize();
      const auto t0 = std::chrono::steady_clock::now();
      dev_->run(call);
      dev_->synchronize();
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (rep) best = std::min(best, s);
    }
    return best;
  };
  const double f32 = seconds(MXN_DTYPE_F32), bf16 = seconds(MXN_DTYPE_BF16);
  const bool pick = bf16 > 0 && bf16 < 0.9 * f32;
  cfg_.dtype = pick ? "bf16" : "f32";
  char why[200];
  const int n = std::snprintf(why, sizeof why, "auto: a %lldx%lldx%lld GEMM took %.2f ms in f32",
                              (long long)M, (long long)K, (long long)N, f32 * 1e3);
  if (bf16 > 0)
    std::snprintf(why + n, sizeof why - size_t(n), " and %.2f ms with bf16 operands", bf16 * 1e3);
  else
    std::snprintf(why + n, sizeof why - size_t(n), "; no bf16 GEMM here");
  plan_.dtype_why = why;
  if (comm_) {  // every rank's choice, for the plan
    std::vector<double> each(size_t(comm_->size()), 0.0);
    each[size_t(comm_->rank())] = pick ? 1.0 : 0.0;
    comm_->all_reduce_sum(each.data(), int64_t(each.size()));
    for (double e : each) plan_.rank_dtypes.push_back(e > 0 ? "bf16" : "f32");
  }
}

// The fused head + cross-entropy where the device has it; values kept for the backward in bf16
// where every rank's device takes them (so that all ranks round the same values).
void Trainer::choose_kernels() {
  const char* fused = std::getenv("MXN_FUSED_HEAD");
  cfg_.fused_head =
      !(fused && std::string(fused) == "0") &&
      dev_->supports(MXN_OP_CLASSIFIER_CE, cfg_.dtype == "bf16" ? DType::bf16 : DType::f32);
  const char* acts = std::getenv("MXN_BF16_ACTS");
  const bool on = !(acts && std::string(acts) == "0") && cfg_.dtype == "bf16" &&
                  dev_->supports(MXN_OP_CAST, DType::bf16);
  auto takes = [&](mxn_op fwd, mxn_op bwd) {
    return on && dev_->supports(fwd, DType::bf16) && dev_->supports(bwd, DType::bf16);
  };
  double able[3] = {double(takes(MXN_OP_GELU, MXN_OP_GELU_BWD)),
                    double(takes(MXN_OP_ATTENTION, MXN_OP_ATTENTION_BWD)), 1.0};
  if (comm_) comm_->all_reduce_sum(able, 3);
  cfg_.gelu_bf16 = able[0] == able[2];
  cfg_.attn_bf16 = able[1] == able[2];
}

// This rank's place and its strategy: pipeline stages and replicas with --pp over several ranks,
// else data parallelism (one rank: the whole model, whatever --pp says).
void Trainer::setup_ranks(const DecoderConfig& model) {
  if (cfg_.sft.empty() && data_.vocab() > model.vocab_size)
    throw Error("data '" + cfg_.data + "' has vocab " + std::to_string(data_.vocab()) +
                " but the model's vocab_size is " + std::to_string(model.vocab_size));
  world_ = comm_ ? comm_->size() : 1;
  rank_ = comm_ ? comm_->rank() : 0;
  if (comm_ && cfg_.pp > 1)
    par_ = std::make_unique<Pipeline>(*this);
  else if (comm_ && cfg_.ep > 1)
    par_ = std::make_unique<ExpertParallel>(*this);
  else if (comm_ && cfg_.tp > 1)
    par_ = std::make_unique<TensorParallel>(*this);
  else
    par_ = std::make_unique<DataParallel>(*this);
  // Where the ranks' chips differ each rounds its own way, so copies of a weight updated on two
  // chips drift apart. Data parallelism then turns ZeRO-1 on by default: each weight is updated
  // by one rank and copied to the others, so every replica is bit-identical by construction. The
  // other strategies copy each weight from its first holder after every step (align_copies).
  const bool differ =
      comm_ && !same_everywhere(*comm_, std::string(dev_->api()->name) + ": " + dev_->props().name);
  zero_ = cfg_.zero == 1;
  if (cfg_.zero < 0 && whole_replicas() && differ) {
    zero_ = true;
    plan_.zero_why =
        "on by default: the ranks' chips differ, so that their replicas stay "
        "bit-identical";
  }
  align_ = differ && !whole_replicas();
  const int64_t T = cfg_.seq_len();
  if (cfg_.sft.empty() && (data_.n_train() < T + 2 || data_.n_val() < T + 2))
    throw Error("data '" + cfg_.data + "' is too small: " + std::to_string(data_.n_train()) +
                " train and " + std::to_string(data_.n_val()) +
                " validation tokens, need more than " + std::to_string(T + 1) +
                " of each for seq " + std::to_string(T));
}

// Rows per forward pass and the training graph on the device.
void Trainer::build_program() {
  free_bytes_ = dev_->free_memory();
  cap_ = par_->pass_rows();  // what fits the device, or the pipeline's micro-batch
  const auto [first, last] = par_->layers();
  Graph g = train_graph(cfg_, cap_, &m_, &n_forward_, first, last, &seed_value_, &grad_in_value_,
                        par_->experts(), par_->tensor_shard());
  prog_ = std::make_unique<Program>(std::move(g), *dev_);
  for (size_t n = 0; n < prog_->graph().nodes.size(); ++n) {
    const Node& node = prog_->graph().nodes[n];
    if (node.op == MXN_OP_DROPOUT) dropout_nodes_.push_back(n);
    if (node.op == MXN_OP_CLASSIFIER_CE && node.params<ClassifierParams>().direct) head_node_ = n;
  }
  passes_.resize(size_t(cap_) + 1);
  variant_for(cap_);
  const DecoderConfig d = cfg_.decoder_config();  // MoE: the load's and the biases' buffers
  if (d.experts > 0) {  // every MoE layer of the model (a pipeline stage fills its own)
    int64_t n = 0;
    for (int64_t l = 0; l < d.layers; ++l) {
      if (l == first) moe_first_ = n;
      n += d.moe_layer(l);
    }
    expert_load_.assign(size_t(n * d.experts), 0.0);
    offsets_host_.assign(size_t(d.experts) + 1, 0);
    bias_host_.assign(size_t(d.experts), 0.f);
  }
  for (int p : prog_->graph().weights())
    if (prog_->graph().v(p).name.ends_with(kRouterBias)) router_bias_values_.push_back(p);
}

// The optimizer (ZeRO-1: each rank keeps AdamW's moments for a share of the params, in
// proportion to its device's free memory) and the gradient calls of a step.
void Trainer::setup_optimizer() {
  std::vector<double> free;
  if (zero_ && comm_ && world_ > 1) {
    free.assign(static_cast<size_t>(world_), 0.0);
    free[size_t(rank_)] = double(free_bytes_);
    comm_->all_reduce_sum(free.data(), world_);
  }
  OptimizerOptions oo;
  oo.lr = cfg_.lr, oo.min_lr = cfg_.min_lr, oo.warmup = cfg_.warmup, oo.steps = cfg_.steps;
  oo.beta1 = cfg_.beta1, oo.beta2 = cfg_.beta2, oo.eps = cfg_.eps;
  oo.weight_decay = cfg_.weight_decay, oo.clip = cfg_.clip;
  opt_ = std::make_unique<Optimizer>(*prog_, *dev_, oo, comm_, free);
  if (align_) align_host_.resize(size_t(prog_->param_count()));
  scalar_ = dev_->alloc(64);
  sumsq_ = Tensor({1}, DType::f32, scalar_->handle());
  zero_grads_ = make_op_call(MXN_OP_FILL, {}, {prog_->grads_all()}, ScalarParams{0.f});
  grad_sumsq_ = make_op_call(MXN_OP_SUM_SQUARES, {prog_->grads_all()}, {sumsq_});
}

// The host rows a pass reads: tokens, targets, positions, block positions, prefixes.
void Trainer::alloc_rows() {
  const int64_t T = cfg_.seq_len();
  tok_host_.resize(size_t(cap_ * T));
  tgt_host_.resize(size_t(cap_ * T));
  pos_host_.resize(size_t(cap_ * T));
  blk_host_.resize(size_t(cap_ * T));
  pre_host_.resize(size_t(cap_ * T));  // GLM: a prefix per row; packed SFT: a start per token
  offsets_.resize(size_t(cap_));
  row_ids_.resize(size_t(cap_));
  std::vector<int32_t> pos(size_t(cap_ * T));
  for (int64_t i = 0; i < cap_ * T; ++i) pos[size_t(i)] = int32_t(i % T);
  dev_->upload(prog_->tensor(m_.positions), pos.data());
}

// The weights: a checkpoint's (resuming), the adapter's, fresh adapters on the folder's frozen
// base, the folder's (fine-tuning), or a fresh initialisation; moments zero unless resuming.
void Trainer::load_weights(const Checkpoint* ck, const Adapter& start, const DecoderConfig& model) {
  const bool adapters = cfg_.finetune != "full";
  if (adapters && cfg_.base_dtype == "bf16" && dev_->name().rfind("cpu", 0) != 0)
    throw Error("--base_dtype bf16 keeps the frozen base in bf16 on the CPU backend only; " +
                dev_->name() + " takes f32");
  const ExpertShard* shard = par_->experts();  // expert parallel: this rank's experts
  const bool tp = par_->tensor_shard();        // tensor parallel: whole tensors, cut
  const std::string folder = "model folder '" + cfg_.model.dir + "'";
  auto folder_cut = [&] {
    return par_->cut(decoder_weights(model, load_hf_weights(cfg_.model.dir), folder));
  };
  if (adapters && tp)  // the frozen base, from its folder (checkpoints hold the adapters only)
    upload_weights(*prog_, folder_cut(), folder, WeightSet::frozen);
  else if (adapters)
    upload_hf_weights(*prog_, cfg_.model.dir, WeightSet::frozen, shard ? shard->first : 0);
  if (ck) {
    load(*ck);
  } else {
    if (adapters && !start.tensors.empty()) {
      upload_weights(*prog_,
                     shard ? expert_slices(start.tensors, *shard) : par_->cut(start.tensors),
                     "adapter '" + cfg_.adapter + "'", WeightSet::trained);
    } else if (adapters && tp) {
      upload_weights(*prog_, par_->cut(whole_fresh(model)), "fresh adapters", WeightSet::trained);
    } else if (adapters) {
      for (int p : prog_->graph().params()) init_adapter(p);
    } else if (!cfg_.model.dir.empty() && tp) {  // the folder's, cut
      upload_weights(*prog_, folder_cut(), folder);
    } else if (!cfg_.model.dir
                    .empty()) {  // fine-tuning: the folder's weights (this rank's experts)
      upload_hf_weights(*prog_, cfg_.model.dir, WeightSet::all,
                        par_->experts() ? par_->experts()->first : 0);
    } else if (tp) {  // fresh: the whole model's values, cut
      upload_weights(*prog_, par_->cut(whole_fresh(model)), "fresh weights");
    } else {  // fresh: an expert stack's share of the whole one's values
      for (int p : prog_->graph().params()) {
        const Value& v = prog_->graph().v(p);
        const int64_t n = numel(v.shape);
        const ExpertShard* sh = stacked_experts(v.name, v.shape) ? par_->experts() : nullptr;
        const int64_t per = sh ? n / sh->count : 0;
        auto w =
            decoder_init_param(v.name, sh ? per * model.experts : n, model, uint64_t(cfg_.seed));
        dev_->upload(prog_->tensor(p), w.data() + (sh ? per * sh->first : 0));
      }
    }
    opt_->zero();
  }
}

TensorMap Trainer::whole_fresh(const DecoderConfig& model) const {
  DecoderGraph m;
  size_t nf = 0;
  const Graph whole = train_graph(cfg_, 1, &m, &nf);
  TensorMap out;
  for (int p : whole.params()) {
    const Value& v = whole.v(p);
    HostTensor h(v.shape, DType::f32);
    const std::vector<float> w =
        cfg_.finetune != "full" ? adapter_values(v, 0)
                                : decoder_init_param(v.name, h.numel(), model, uint64_t(cfg_.seed));
    std::memcpy(h.bytes.data(), w.data(), h.bytes.size());
    out.emplace(v.name, std::move(h));
  }
  return out;
}

}  // namespace mxn
