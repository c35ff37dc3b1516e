#pragma once
// Everything `mxn train` takes, as one table of named fields: the same names serve as command-line
// flags (--lr), TOML keys (lr = 3e-4) and the trainer.json of a checkpoint.
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <variant>
#include <vector>

#include "models/decoder.h"

namespace mxn {

// The model: a fresh one of a family and size, or a Hugging Face folder to start from.
struct ModelFlags {
  std::string arch = "gpt2";  // decoder.h's Arch names
  std::string dir;            // a Hugging Face model folder: its config and weights
  int64_t n_layer = 4, n_head = 4, n_kv_head = 0, n_embd = 128, n_ctx = 128, vocab_size = 256;
  int64_t ffn = 0;  // MLP width (0: the family's rule)
  // A fresh mixture of experts (mixtral, qwen2_moe, qwen3_moe): experts per layer, top_k a
  // token, each expert's width (0: ffn's rule) and the shared expert's (qwen2_moe; 0: none).
  int64_t experts = 0, top_k = 2, moe_ffn = 0, shared_ffn = 0;
};

struct TrainConfig {
  ModelFlags model;
  // The resolved model (DecoderConfig's JSON): set from `model.dir`'s config.json, or from a
  // checkpoint; empty means "from the flags". Checkpoints keep it, so a run resumes without the
  // folder.
  nlohmann::json decoder;
  std::string data = "data/kjv.bin";
  std::string out = "runs/default";
  std::string device = "cpu";
  std::string devices;         // "cpu,opencl:0": one rank per device, one job
  std::string split = "auto";  // ranks' shares: auto | even | weights "3,1"
  double bucket_mb = 1.0;      // gradient all-reduce bucket size (as DDP's bucket_cap_mb)
  int64_t zero = -1;  // 1: AdamW's moments sharded over the ranks (ZeRO-1), by free memory; 0:
                      // never; -1: where the ranks' chips differ (replicas stay identical)
  // Pipeline parallelism: pp stages (ranks r = replica * pp + stage), each with the layer count
  // `stages` gives ("3,1"; "even": as equal as can be); micro sequences a micro-batch (0: a
  // replica's rows over 2 x pp micro-batches).
  int64_t pp = 1;
  std::string stages = "even";
  // Expert parallelism: groups of ep ranks split each MoE layer's experts (contiguous ranges,
  // by expert_split: auto (measured GEMM speed), even, or weights "3,1") and exchange tokens
  // all-to-all; rows are shared evenly.
  int64_t ep = 1;
  std::string expert_split = "auto";
  // Tensor parallelism: groups of tp ranks split every block by heads and MLP columns, shared by
  // tp_split (auto: measured GEMM speed, even, or weights "3,1"); data parallel across groups.
  int64_t tp = 1;
  std::string tp_split = "auto";
  int64_t sequence_parallel = 0;  // 1: with tp, the norms' rows split over the group (Megatron)
  int64_t micro = 0;
  // f32 | bf16 (bf16 matmuls, f32 master weights) | auto: bf16 where this rank's chip runs the
  // model's GEMMs faster with bf16 operands (Trainer::choose_dtype), the default
  std::string dtype = "auto";
  int64_t recompute = 1;  // 1: norms and MLP activations run again in the backward (Graph)
  // lm: next-token prediction; glm: GLM's blank infilling (data/glm.h), with a learned
  // block-position table and the prefix-bidirectional mask.
  std::string objective = "lm";
  double gmask = 0.0;  // with glm: share of rows in generation mode ([gMASK], one final span)
  // Supervised fine-tuning: a JSONL file of {"messages": [...]} rows, rendered in --model's chat
  // format, loss on the assistant tokens; the last 10% of rows are the validation set.
  std::string sft;
  int64_t pack = 0;  // with sft: 1 packs several conversations into a row, attention kept apart
  // What trains: full (every weight), lora (adapters on the target modules) or ptuning (P-Tuning
  // v2: prefix_len key/value rows per layer); with an adapter the base is frozen, stored in
  // base_dtype, with no gradients or optimizer state.
  std::string finetune = "full";
  int64_t prefix_len = 16;
  int64_t prefix_projection = 0;  // ptuning: hidden units of the prefix MLP (0: rows trained as is)
  int64_t lora_r = 8;
  double lora_alpha = 8, lora_dropout = 0;
  std::string lora_targets;        // comma-separated module names; empty: the family's q and v
  std::string base_dtype = "f32";  // the frozen base's storage: f32, or bf16 (CPU)
  std::string adapter;  // lora/ptuning: a PEFT folder to start from (its r, alpha, targets, P)
  LoraSpec lora_spec() const;  // r = 0 unless finetune is lora
  int64_t threads = 0;         // 0: every core
  int64_t steps = 1500;
  int64_t batch = 16;  // sequences per micro-batch (the global one, over all ranks)
  int64_t seq = 0;     // tokens per sequence; 0: the model's context
  int64_t accum = 1;   // micro-batches per step
  double lr = 2e-3, min_lr = 2e-4;
  int64_t warmup = 40;
  double weight_decay = 0.1, beta1 = 0.9, beta2 = 0.95, eps = 1e-8, clip = 1.0;
  int64_t seed = 1337;
  int64_t eval_every = 250, eval_batches = 8, ckpt_every = 500, log_every = 10;
  int64_t ckpt_keep = 2, ckpt_async = 1;
  // Surviving faults (src/parallel/launch.cpp): restarts of the job, and how long a rank may go
  // without a heartbeat before it counts as hung.
  int64_t max_restarts = 0;
  double hang_timeout = 300;
  // Mixture of experts: the load-balancing loss's weight (< 0: the model's own; 0.001 for a fresh
  // one), and DeepSeek-V3's aux-loss-free balancing: after each step every router's selection
  // bias moves by this much towards an even load (0: off).
  double router_aux_coef = -1, router_bias_update = 0;
  // Not a flag: the trainer sets it where the device has the fused head (CLASSIFIER_CE), unless
  // MXN_FUSED_HEAD=0 is in the environment.
  bool fused_head = false;
  // Not flags: with dtype bf16, where every rank's device takes the op's input in bf16 (unless
  // MXN_BF16_ACTS=0), the MLP's pre-activation and attention's q, k, v are kept in bf16 for the
  // backward (DecoderOptions::gelu_bf16, attn_bf16), as torch's autocast keeps them.
  bool gelu_bf16 = false, attn_bf16 = false;

  int64_t seq_len() const { return seq > 0 ? seq : model.n_ctx; }
  DecoderConfig decoder_config() const;
  DecoderConfig with_router_flags(DecoderConfig d) const;  // router_aux_coef, router_bias_update
  // Reads model.dir's config.json into `decoder` (once); a no-op without a folder.
  void resolve_model();
  void validate() const;  // Error naming the field and its allowed values
};

struct ConfigField {
  std::string name;
  std::variant<int64_t*, double*, std::string*> ptr;
  std::string help;
  bool model = false;  // part of the model's shape
};
std::vector<ConfigField> config_fields(TrainConfig& c);

// Sets fields from a TOML file; an unknown key or a value of the wrong type is an Error.
// Returns the keys it set.
std::vector<std::string> apply_toml(TrainConfig& c, const std::string& path);
nlohmann::json to_json(const TrainConfig& c);
void from_json(TrainConfig& c, const nlohmann::json& j);

}  // namespace mxn
