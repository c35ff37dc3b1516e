#include "io/train_config.h"

#include <toml++/toml.h>

#include "core/error.h"
#include "core/text.h"
#include "io/hf_folder.h"

namespace mxn {

std::vector<ConfigField> config_fields(TrainConfig& c) {
  return {
      {"model", &c.model.dir,
       "a Hugging Face model folder to start from (its config.json and safetensors weights)", true},
      {"arch", &c.model.arch,
       "family of a fresh model: gpt2, llama, qwen2, glm, chatglm, qwen3, or the mixtures of "
       "experts mixtral, qwen2_moe, qwen3_moe, glm4_moe",
       true},
      {"n_layer", &c.model.n_layer, "transformer blocks", true},
      {"n_head", &c.model.n_head, "attention heads (must divide n_embd)", true},
      {"n_kv_head", &c.model.n_kv_head, "key/value heads for GQA/MQA (0: n_head)", true},
      {"n_embd", &c.model.n_embd, "model width", true},
      {"ffn", &c.model.ffn, "MLP width (0: 4 x n_embd for GELU, ~8/3 x n_embd for SwiGLU)", true},
      {"n_ctx", &c.model.n_ctx, "context length (with --model: the training sequence length)",
       true},
      {"vocab_size", &c.model.vocab_size, "vocabulary size (256 for the byte tokenizer)", true},
      {"experts", &c.model.experts,
       "experts per MoE layer of a fresh mixtral, qwen2_moe or qwen3_moe model", true},
      {"top_k", &c.model.top_k, "experts a token (MoE)", true},
      {"moe_ffn", &c.model.moe_ffn, "each expert's MLP width (MoE; 0: the ffn rule)", true},
      {"shared_ffn", &c.model.shared_ffn,
       "the shared expert's width (qwen2_moe, glm4_moe; 0: none)", true},
      {"data", &c.data, "token shard from `mxn prepare`, or a text file"},
      {"out", &c.out, "run folder: checkpoints, metrics.jsonl, loss.svg"},
      {"device", &c.device, "device, e.g. cpu or cpu:0 (`mxn devices` lists them)"},
      {"devices", &c.devices,
       "several devices, one rank each: cpu,opencl:0, or all (started through mpirun)"},
      {"split", &c.split,
       "how ranks share a step's sequences: auto (by measured speed, corrected as it drifts), "
       "even, or one weight per rank (3,1)"},
      {"zero", &c.zero,
       "1: shard the optimizer state over the ranks (ZeRO-1), each share in proportion to its "
       "device's free memory, and gather the updated weights; 0: never; -1 (default): where the "
       "ranks' chips differ, so that their replicas stay bit-identical"},
      {"pp", &c.pp,
       "pipeline stages: the ranks form replicas of this many stages (rank = replica x pp + "
       "stage), 1F1B over micro-batches"},
      {"stages", &c.stages, "layers of each pipeline stage (3,1), or even"},
      {"ep", &c.ep,
       "expert parallelism: groups of this many ranks split every MoE layer's experts, tokens "
       "sent to their experts' ranks and back (all-to-all); the rows are shared evenly"},
      {"expert_split", &c.expert_split,
       "with --ep: how a group's ranks share the experts: auto (by each chip's measured GEMM "
       "speed), even, or one weight per rank (3,1)"},
      {"tp", &c.tp,
       "tensor parallelism: groups of this many ranks split every block (attention heads, MLP "
       "columns) and the embeddings and head (vocabulary rows), partial sums all-reduced; data "
       "parallel across the groups"},
      {"tp_split", &c.tp_split,
       "with --tp: how a group's ranks share the heads, columns and vocabulary rows: auto (by "
       "each chip's measured GEMM speed), even, or one weight per rank (3,1)"},
      {"sequence_parallel", &c.sequence_parallel,
       "with --tp: 1 splits the activations between the blocks (norms, residuals) along the "
       "sequence over each group (Megatron-LM's sequence parallelism): a reduce-scatter and an "
       "all-gather in place of each all-reduce, the norms' activations 1/tp the size"},
      {"micro", &c.micro,
       "sequences per pipeline micro-batch (0: a replica's share over 2 x pp micro-batches)"},
      {"bucket_mb", &c.bucket_mb,
       "MB of gradients per all-reduce bucket; buckets start as the backward reaches them"},
      {"dtype", &c.dtype,
       "auto (the default): bf16 mixed precision on the chips whose bf16 GEMM, timed at the "
       "model's shapes, is faster than f32's, f32 elsewhere; or f32, or bf16 (bf16 matmuls, "
       "f32 master weights) everywhere"},
      {"recompute", &c.recompute,
       "1: norm and MLP activation (GELU, SwiGLU) outputs are computed again in the backward "
       "instead of kept (less memory, the same numbers); 0: kept"},
      {"objective", &c.objective,
       "lm (next token), or glm (GLM's blank infilling: [MASK] spans, loss on the spans)", true},
      {"gmask", &c.gmask, "with --objective glm: share of rows with one [gMASK] span at the end"},
      {"sft", &c.sft,
       "supervised fine-tuning data: JSONL rows {\"messages\": [...]} in --model's chat format, "
       "loss on the assistant tokens"},
      {"pack", &c.pack,
       "with --sft: 1 packs short conversations into each row (no attention across them)", true},
      {"finetune", &c.finetune,
       "what trains: full, lora, or ptuning (P-Tuning v2 prefixes); adapters leave the --model "
       "base frozen",
       true},
      {"prefix_len", &c.prefix_len, "with ptuning: key/value prefix rows per layer", true},
      {"prefix_projection", &c.prefix_projection,
       "with ptuning: the rows come from an MLP with this many tanh units while training (0: "
       "trained as they are); only the rows are kept",
       true},
      {"lora_r", &c.lora_r, "LoRA rank", true},
      {"lora_alpha", &c.lora_alpha, "LoRA alpha (the update is scaled by alpha / r)", true},
      {"lora_dropout", &c.lora_dropout,
       "LoRA dropout on the adapters' input (PEFT's lora_dropout)"},
      {"lora_targets", &c.lora_targets,
       "LoRA target modules, comma-separated (q_proj,v_proj; empty: the family's q and v)", true},
      {"adapter", &c.adapter,
       "with lora or ptuning: an adapter to start from (PEFT folder or mxn run; its shape too)"},
      {"base_dtype", &c.base_dtype,
       "with lora or ptuning: the frozen base's storage, f32 or bf16 (CPU)"},
      {"threads", &c.threads, "CPU threads (0: all cores)"},
      {"steps", &c.steps, "optimizer steps in all"},
      {"batch", &c.batch, "sequences per micro-batch"},
      {"seq", &c.seq, "tokens per sequence (0: n_ctx)"},
      {"accum", &c.accum, "micro-batches per step (gradient accumulation)"},
      {"lr", &c.lr, "peak learning rate"},
      {"min_lr", &c.min_lr, "learning rate at the end of the cosine decay"},
      {"warmup", &c.warmup, "linear warmup steps"},
      {"weight_decay", &c.weight_decay, "AdamW weight decay (matrices and embeddings only)"},
      {"beta1", &c.beta1, "AdamW beta1"},
      {"beta2", &c.beta2, "AdamW beta2"},
      {"eps", &c.eps, "AdamW epsilon"},
      {"clip", &c.clip, "gradient clipping by global norm (0: off)"},
      {"seed", &c.seed, "seed for initialisation and data order"},
      {"eval_every", &c.eval_every, "steps between validation losses (0: only at the end)"},
      {"eval_batches", &c.eval_batches, "micro-batches per validation"},
      {"ckpt_every", &c.ckpt_every, "steps between checkpoints (0: only at the end)"},
      {"ckpt_keep", &c.ckpt_keep, "checkpoints kept in the run folder, the newest ones"},
      {"ckpt_async", &c.ckpt_async,
       "1: a checkpoint is copied to host memory and written while training goes on; 0: the "
       "step waits for the disk"},
      {"max_restarts", &c.max_restarts,
       "restarts from the last checkpoint when a rank dies or hangs (a device that fails twice "
       "without progress between is left out)"},
      {"hang_timeout", &c.hang_timeout,
       "seconds without a rank's heartbeat before the job is stopped as hung (0: never)"},
      {"log_every", &c.log_every, "steps between progress lines when not on a terminal"},
      {"router_aux_coef", &c.router_aux_coef,
       "MoE: the weight of the Switch load-balancing loss, averaged over MoE layers (< 0: the "
       "model's own; 0.001 for a fresh model)"},
      {"router_bias_update", &c.router_bias_update,
       "MoE: DeepSeek-V3's aux-loss-free balancing: after each step every router's selection "
       "bias moves this much towards an even load (0: off)"},
  };
}

DecoderConfig TrainConfig::decoder_config() const {
  if (!decoder.is_null() && !decoder.empty())
    return with_router_flags(DecoderConfig::from_json(decoder));
  DecoderConfig d;
  d.arch = arch_from_name(model.arch);
  if (d.arch == Arch::deepseek)  // its latent attention's ranks and router come from a folder
    throw Error(
        "--arch deepseek: a fresh DeepSeek is not made from flags; give --model a "
        "DeepSeek-V2/V3 folder (or --arch mixtral, qwen2_moe, qwen3_moe or glm4_moe)");
  d.vocab_size = model.vocab_size;
  d.hidden = model.n_embd;
  d.layers = model.n_layer;
  d.heads = model.n_head;
  d.kv_heads = model.n_kv_head;
  d.ffn = model.ffn;
  d.max_pos = model.n_ctx;
  d.tie_embeddings = d.gpt2();
  d.qkv_bias = d.arch == Arch::qwen2 || d.arch == Arch::glm || d.arch == Arch::chatglm ||
               d.arch == Arch::qwen2_moe;
  if (d.arch == Arch::glm || d.arch == Arch::chatglm) d.rope_fraction = 0.5f;
  const bool moe_arch = d.arch == Arch::mixtral || d.arch == Arch::qwen2_moe ||
                        d.arch == Arch::qwen3_moe || d.arch == Arch::glm4_moe;
  if (moe_arch != (model.experts > 0))
    throw Error(moe_arch ? "invalid config: arch " + model.arch + " needs experts >= 1"
                         : "invalid config: experts = " + std::to_string(model.experts) +
                               " needs arch mixtral, qwen2_moe, qwen3_moe or glm4_moe (not " +
                               model.arch + ")");
  if (moe_arch) {
    d.experts = model.experts;
    d.top_k = model.top_k;
    d.moe_ffn = model.moe_ffn > 0 ? model.moe_ffn : d.ffn_width();
    d.shared_ffn = d.arch == Arch::qwen2_moe || d.arch == Arch::glm4_moe ? model.shared_ffn : 0;
    d.shared_gate = d.arch == Arch::qwen2_moe;
    d.norm_topk = d.arch != Arch::qwen2_moe;  // transformers' defaults: Qwen2-MoE does not
    d.router_aux_coef = 0.001f;
    if (d.arch == Arch::glm4_moe) {  // sigmoid scores, a selection bias, half-rotated heads
      d.sigmoid_router = d.router_bias = true;
      d.rope_fraction = 0.5f;
    }
  }
  return with_router_flags(d);
}

DecoderConfig TrainConfig::with_router_flags(DecoderConfig d) const {
  if (d.experts == 0) return d;
  if (router_aux_coef >= 0) d.router_aux_coef = float(router_aux_coef);
  if (router_bias_update > 0) d.router_bias = true;
  return d;
}

LoraSpec TrainConfig::lora_spec() const {
  LoraSpec s;
  if (finetune != "lora") return s;
  s.r = lora_r;
  s.alpha = float(lora_alpha);
  s.dropout = float(lora_dropout);
  for (std::string t : mxn::split(lora_targets, ','))
    if (t.erase(0, t.find_first_not_of(" \t")); !t.empty())
      s.targets.push_back(t.substr(0, t.find_last_not_of(" \t") + 1));
  if (s.targets.empty()) s.targets = lora_default_targets(decoder_config().arch);
  return s;
}

void TrainConfig::resolve_model() {
  if (model.dir.empty() || (!decoder.is_null() && !decoder.empty())) return;
  const DecoderConfig d = load_hf_config(model.dir);
  decoder = d.to_json();
  model.arch = arch_name(d.arch);
  model.n_layer = d.layers;
  model.n_head = d.heads;
  model.n_kv_head = d.n_kv_heads();
  model.n_embd = d.hidden;
  model.vocab_size = d.vocab_size;
  model.ffn = d.ffn_width();
}

void TrainConfig::validate() const {
  const DecoderConfig d = decoder_config();
  d.validate();
  auto need = [](bool ok, const std::string& msg) {
    if (!ok) throw Error("invalid config: " + msg);
  };
  need(steps >= 1, "steps = " + std::to_string(steps) + ", expected >= 1");
  need(batch >= 1, "batch = " + std::to_string(batch) + ", expected >= 1");
  need(split == "auto" || split == "even" ||
           split.find_first_not_of("0123456789.,") == std::string::npos,
       "split = '" + split + "', expected auto, even, or weights such as 3,1");
  need(bucket_mb > 0 && bucket_mb <= 4096,
       "bucket_mb = " + std::to_string(bucket_mb) + ", expected > 0 and <= 4096");
  need(zero >= -1 && zero <= 1,
       "zero = " + std::to_string(zero) + ", expected 0, 1 or -1 (where the chips differ)");
  need(router_bias_update >= 0 && router_bias_update < 1,
       "router_bias_update = " + std::to_string(router_bias_update) + ", expected 0 <= rate < 1");
  need(router_aux_coef < 1e3,
       "router_aux_coef = " + std::to_string(router_aux_coef) + ", expected below 1000");
  need(pp >= 1, "pp = " + std::to_string(pp) + ", expected >= 1 (pipeline stages)");
  need(tp >= 1 && tp <= 1024, "tp = " + std::to_string(tp) + ", expected 1..1024 (ranks a group)");
  need(tp_split == "auto" || tp_split == "even" ||
           tp_split.find_first_not_of("0123456789.,") == std::string::npos,
       "tp_split = '" + tp_split + "', expected auto, even, or weights such as 3,1");
  need(ep >= 1 && ep <= 1024, "ep = " + std::to_string(ep) + ", expected 1..1024 (ranks a group)");
  need(expert_split == "auto" || expert_split == "even" ||
           expert_split.find_first_not_of("0123456789.,") == std::string::npos,
       "expert_split = '" + expert_split + "', expected auto, even, or weights such as 3,1");
  need(micro >= 0, "micro = " + std::to_string(micro) + ", expected >= 0 (0: chosen)");
  need(accum >= 1, "accum = " + std::to_string(accum) + ", expected >= 1");
  need(seq >= 0 && seq <= model.n_ctx, "seq = " + std::to_string(seq) + ", expected 0..n_ctx (" +
                                           std::to_string(model.n_ctx) + ")");
  need(model.n_ctx >= 1 && model.n_ctx <= d.max_pos,
       "n_ctx = " + std::to_string(model.n_ctx) + ", expected 1.." + std::to_string(d.max_pos) +
           " (the model's positions)");
  need(lr > 0 && lr < 10, "lr = " + std::to_string(lr) + ", expected in (0, 10)");
  need(min_lr >= 0 && min_lr <= lr, "min_lr = " + std::to_string(min_lr) + ", expected 0..lr");
  need(warmup >= 0, "warmup = " + std::to_string(warmup) + ", expected >= 0");
  need(weight_decay >= 0, "weight_decay must be >= 0");
  need(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1, "beta1 and beta2 must be in [0, 1)");
  need(eps > 0, "eps must be > 0");
  need(clip >= 0, "clip must be >= 0");
  need(dtype == "f32" || dtype == "bf16" || dtype == "auto",
       "dtype = '" + dtype + "', expected f32, bf16 or auto");
  need(objective == "lm" || objective == "glm",
       "objective = '" + objective + "', expected lm or glm");
  need(gmask >= 0 && gmask <= 1, "gmask = " + std::to_string(gmask) + ", expected 0..1");
  need(objective != "glm" || seq_len() >= 8, "the glm objective needs sequences of >= 8 tokens");
  need(objective != "glm" || d.gpt2() || d.rope_dims() % 4 == 0,
       "the glm objective's 2-D RoPE splits each head's " + std::to_string(d.rope_dims()) +
           " rotated dims in two even halves: they must be a multiple of 4");
  need(sft.empty() || (!model.dir.empty() && objective == "lm"),
       "--sft needs --model (a folder with a tokenizer and chat format) and --objective lm");
  need(pack == 0 || pack == 1, "pack = " + std::to_string(pack) + ", expected 0 or 1");
  need(pack == 0 || !sft.empty(), "--pack 1 packs --sft conversations; there is no --sft file");
  need(finetune == "full" || finetune == "lora" || finetune == "ptuning",
       "finetune = '" + finetune + "', expected full, lora or ptuning");
  if (finetune == "lora") {
    need(lora_r >= 1 && lora_r <= 65536,
         "lora_r = " + std::to_string(lora_r) + ", expected a rank >= 1");
    need(lora_alpha > 0, "lora_alpha = " + std::to_string(lora_alpha) + ", expected > 0");
    need(lora_dropout >= 0 && lora_dropout < 1,
         "lora_dropout = " + std::to_string(lora_dropout) + ", expected 0 <= p < 1");
  }
  if (finetune == "ptuning") {
    need(prefix_len >= 1 && prefix_len <= 65536,
         "prefix_len = " + std::to_string(prefix_len) + ", expected 1..65536");
    need(prefix_projection >= 0 && prefix_projection <= 65536,
         "prefix_projection = " + std::to_string(prefix_projection) + ", expected 0..65536");
  }
  if (finetune != "full") {
    need(!model.dir.empty(),
         "--finetune " + finetune + " needs --model (the folder whose weights it adapts)");
    need(objective == "lm", "--finetune " + finetune + " trains with --objective lm");
    need(base_dtype == "f32" || base_dtype == "bf16",
         "base_dtype = '" + base_dtype + "', expected f32 or bf16");
  }
  need(threads >= 0 && threads <= 4096,
       "threads = " + std::to_string(threads) + ", expected 0..4096");
  need(eval_every >= 0 && ckpt_every >= 0 && log_every >= 1 && eval_batches >= 1,
       "eval_every and ckpt_every must be >= 0, log_every and eval_batches >= 1");
  need(ckpt_keep >= 1 && ckpt_keep <= 1000,
       "ckpt_keep = " + std::to_string(ckpt_keep) + ", expected 1..1000");
  need(sequence_parallel == 0 || sequence_parallel == 1,
       "sequence_parallel = " + std::to_string(sequence_parallel) + ", expected 0 or 1");
  need(sequence_parallel == 0 || tp > 1,
       "sequence_parallel = 1 splits the rows of a tensor-parallel group: it needs tp 2 or more");
  need(recompute == 0 || recompute == 1,
       "recompute = " + std::to_string(recompute) + ", expected 0 or 1");
  need(ckpt_async == 0 || ckpt_async == 1,
       "ckpt_async = " + std::to_string(ckpt_async) + ", expected 0 or 1");
  need(max_restarts >= 0 && max_restarts <= 100000,
       "max_restarts = " + std::to_string(max_restarts) + ", expected 0..100000");
  need(hang_timeout == 0 || (hang_timeout >= 1 && hang_timeout <= 86400),
       "hang_timeout = " + std::to_string(hang_timeout) + ", expected 0 (off) or 1..86400 seconds");
}

std::vector<std::string> apply_toml(TrainConfig& c, const std::string& path) {
  toml::table tbl;
  try {
    tbl = toml::parse_file(path);
  } catch (const toml::parse_error& e) {
    throw Error("config file '" + path + "': " + std::string(e.description()) + " (line " +
                std::to_string(e.source().begin.line) + ")");
  }
  auto fields = config_fields(c);
  std::vector<std::string> set;
  for (auto& [key, node] : tbl) {
    const std::string k(key.str());
    auto f = std::find_if(fields.begin(), fields.end(),
                          [&](const ConfigField& x) { return x.name == k; });
    if (f == fields.end()) {
      std::string names;
      for (const auto& x : fields) names += (names.empty() ? "" : ", ") + x.name;
      throw Error("config file '" + path + "': unknown key '" + k + "' (known keys: " + names +
                  ")");
    }
    bool ok = true;
    std::visit(
        [&](auto* p) {
          using T = std::remove_pointer_t<decltype(p)>;
          if constexpr (std::is_same_v<T, std::string>) {
            if (auto v = node.value<std::string>())
              *p = *v;
            else
              ok = false;
          } else if constexpr (std::is_same_v<T, int64_t>) {
            if (node.is_integer())
              *p = *node.value<int64_t>();
            else
              ok = false;
          } else {
            if (auto v = node.value<double>())
              *p = *v;
            else
              ok = false;
          }
        },
        f->ptr);
    if (!ok) throw Error("config file '" + path + "': key '" + k + "' has the wrong type");
    set.push_back(k);
  }
  return set;
}

nlohmann::json to_json(const TrainConfig& c0) {
  TrainConfig c = c0;
  nlohmann::json j;
  for (auto& f : config_fields(c)) std::visit([&](auto* p) { j[f.name] = *p; }, f.ptr);
  if (!c.decoder.is_null() && !c.decoder.empty()) j["decoder"] = c.decoder;
  return j;
}

void from_json(TrainConfig& c, const nlohmann::json& j) {
  for (auto& f : config_fields(c))
    if (j.contains(f.name))
      std::visit([&](auto* p) { *p = j.at(f.name).get<std::remove_pointer_t<decltype(p)>>(); },
                 f.ptr);
  c.decoder = j.contains("decoder") ? j.at("decoder") : nlohmann::json();
}

}  // namespace mxn
