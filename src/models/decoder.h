#pragma once
// One parametric decoder for every family: GPT-2, LLaMA (Llama 2/3, TinyLlama, Mistral-shaped),
// Qwen2, GLM as transformers' GlmForCausalLM and GLM as the ChatGLM2/3 and GLM-4 checkpoints
// store it. A family is a DecoderConfig (norm, positions, attention heads, MLP, biases, tying)
// plus the names its checkpoints give the weights; the graph is built from the config alone.
#include <array>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "graph/graph.h"

namespace mxn {

enum class Arch {
  gpt2,
  llama,
  qwen2,
  glm,
  chatglm,
  mixtral,
  qwen2_moe,
  qwen3,
  qwen3_moe,
  glm4_moe,
  deepseek
};
const char* arch_name(Arch a);
Arch arch_from_name(const std::string& name);  // one of arch_name's; Error otherwise

struct DecoderConfig {
  Arch arch = Arch::gpt2;
  int64_t vocab_size = 256, hidden = 128, layers = 4, heads = 4, kv_heads = 0, head_dim = 0;
  int64_t ffn = 0;        // MLP width (0: 4 x hidden for GELU, LLaMA's rounding for SwiGLU)
  int64_t max_pos = 128;  // context: learned positions' rows, or the longest sequence
  float norm_eps = 1e-5f;
  float rope_theta = 10000.f;
  float rope_fraction = 1.f;  // rotated share of each head (GLM: 0.5)
  int rope_scaling = 0;       // 0 none, 1 linear, 2 llama3, 3 yarn
  float rope_factor = 1.f, rope_low_freq = 1.f, rope_high_freq = 4.f, rope_orig_max_pos = 8192.f;
  float rope_beta_fast = 32.f, rope_beta_slow = 1.f;   // yarn
  float yarn_mscale = 0.f, yarn_mscale_all_dim = 0.f;  // kept for the config it came from
  bool tie_embeddings = true;
  bool qkv_bias = false, o_bias = false, mlp_bias = false;
  std::vector<int32_t> eos;  // end-of-sequence token ids (generation stops at one)
  // P-Tuning v2: per layer, prefix_len trained key and value rows (prefix_key/prefix_value,
  // (prefix_len, kv_heads*head_dim)) that every position attends to before its own keys; the
  // text's positions still start at 0.
  int64_t prefix_len = 0;
  // Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE, GLM-4.5): with experts > 0 the MLP of
  // every MoE layer is a router (a linear to `experts` logits; softmax, or sigmoid with
  // `sigmoid_router`; top_k within the best topk_group of n_group groups; renormalised with
  // norm_topk; times routed_scale) over SwiGLU experts of width moe_ffn, dropless; plus, with
  // shared_ffn > 0, a shared SwiGLU expert of that width, scaled by sigmoid(a linear of the
  // input) where shared_gate (Qwen2-MoE). A layer l is an MoE layer when (l + 1) % sparse_step
  // == 0 and l is not in dense_layers; the others keep the dense MLP of width ffn.
  // router_aux_coef > 0 adds that times the mean over MoE layers of the Switch load-balancing
  // loss to a training loss.
  int64_t experts = 0, top_k = 2, moe_ffn = 0, shared_ffn = 0, sparse_step = 1;
  bool norm_topk = true, sigmoid_router = false, shared_gate = false;
  int64_t n_group = 1, topk_group = 1;
  float routed_scale = 1.f;
  bool use_qk_norm = false;  // GLM-4.5's optional per-head q and k norms
  // Multi-head latent attention (DeepSeek-V2/V3), with kv_lora_rank > 0: q from a rank
  // q_lora_rank bottleneck (0: a plain q_proj), per head qk_nope_dim + qk_rope_dim wide; keys
  // and values from each token's normed latent (kv_lora_rank) and one shared RoPE key
  // (qk_rope_dim); values v_head_dim wide. Computed in the absorbed form: the query's non-RoPE
  // part times each head's key up-projection attends to the latent directly (one kv head), the
  // result times each head's value up-projection; the KV cache holds the latent and the RoPE key.
  int64_t q_lora_rank = 0, kv_lora_rank = 0, qk_nope_dim = 0, qk_rope_dim = 0, v_head_dim = 0;
  float attn_scale = 0.f;  // 0: 1/sqrt(query head dim); yarn's mscale^2 included where set
  // A selection bias per router (<block>gate.e_score_correction_bias, (E)): it picks experts but
  // does not weigh them; trained by no gradient, moved by the aux-loss-free balancing.
  bool router_bias = false;
  std::vector<int64_t> dense_layers;
  float router_aux_coef = 0.f;

  // Family traits, all from `arch`.
  bool gpt2() const { return arch == Arch::gpt2; }
  bool rms_norm() const { return !gpt2(); }
  bool swiglu() const { return !gpt2(); }
  bool fused_gate_up() const { return arch == Arch::glm || arch == Arch::chatglm; }
  bool qk_norm() const {  // per head
    return arch == Arch::qwen3 || arch == Arch::qwen3_moe ||
           (arch == Arch::glm4_moe && use_qk_norm);
  }
  bool moe_layer(int64_t l) const;
  bool mla() const { return kv_lora_rank > 0; }
  // Values a KV cache keeps per token and layer: keys and values, or MLA's latent and RoPE key.
  int64_t kv_cache_width() const {
    return mla() ? kv_lora_rank + qk_rope_dim : 2 * n_kv_heads() * hd();
  }
  bool fused_qkv() const { return gpt2() || arch == Arch::chatglm; }
  bool rope_interleaved() const {  // GLM's and DeepSeek's (2i, 2i+1) pairs
    return arch == Arch::glm || arch == Arch::chatglm || arch == Arch::deepseek;
  }

  int64_t n_kv_heads() const { return kv_heads > 0 ? kv_heads : heads; }
  int64_t hd() const { return head_dim > 0 ? head_dim : hidden / heads; }
  int64_t ffn_width() const;
  int64_t rope_dims() const;  // rotated dims per head (even)
  int64_t param_count() const;
  void validate() const;  // Error naming the bad field and what it must be

  nlohmann::json to_json() const;  // mxn's own form, kept in checkpoints
  static DecoderConfig from_json(const nlohmann::json& j);
};

// Reads a Hugging Face config.json (GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM,
// Qwen2ForCausalLM, GlmForCausalLM, ChatGLMModel / ChatGLMForConditionalGeneration). Errors name
// the file, the field and what was expected.
DecoderConfig decoder_config_from_hf(const nlohmann::json& j, const std::string& path);
nlohmann::json decoder_config_to_hf(const DecoderConfig& c);

// LoRA (Hu et al.): each targeted linear y = x W^T gains (alpha / r) x A^T B^T, with A (r, in)
// and B (out, r) trained and W frozen. Targets are module names as PEFT matches them: a linear
// whose name is the target or ends with "." + target (q_proj, self_attn.v_proj, c_attn).
struct LoraSpec {
  int64_t r = 0;  // 0: no LoRA
  float alpha = 8.f;
  float dropout = 0.f;  // on each adapter's input, as PEFT's lora_dropout
  std::vector<std::string> targets;
};
// The modules PEFT targets by default for a family (its q and v projections).
std::vector<std::string> lora_default_targets(Arch a);
// The adapter tensors of module `name` (e.g. model.layers.0.self_attn.q_proj) in mxn's graph; a
// PEFT file prefixes them with "base_model.model.".
std::string lora_a_name(const std::string& module);
std::string prefix_key_name(int64_t layer);    // "prefix.<layer>.key"
std::string prefix_value_name(int64_t layer);  // "prefix.<layer>.value"
// The prefix MLP's tensors (DecoderOptions::prefix_projection): "prefix_encoder.embedding",
// "prefix_encoder.dense.{weight,bias}", "prefix_encoder.<layer>.{key,value}.{weight,bias}".
extern const char* const kPrefixEncoder;
std::string lora_b_name(const std::string& module);

// Tensor parallelism (Megatron-LM): this rank's share of every block of a group of `ranks`. The
// q/k/v (or fused qkv) and gate/up (or fc) projections are split by output columns: query heads
// [head0, head0 + heads), kv heads [kv0, kv0 + kv) (whole GQA groups) and MLP columns [ffn0, ffn0
// + ffn); the output and down projections by input rows, their partial outputs summed over the
// group before their biases and the residual (DecoderGraph::tp_sums). The token embeddings and
// the head are split by vocabulary rows [vocab0, vocab0 + vocab): an id outside them embeds to a
// zero row before the group's sum, and the loss is Megatron-LM's vocab-parallel cross-entropy
// (each rank's logits slice's max, sum and target logit summed over the group), so no rank holds
// (tokens, vocab) logits. The norms and position tables are replicated. Shares may be uneven (a
// chip's speed).
// With `seq` (Megatron-LM's sequence parallelism) the residual stream, the norms and the biases
// added to it hold this rank's rows only (seq_rows): each sum of partial outputs becomes a
// reduce-scatter into the rows, and each norm output an all-gather into the whole rows the split
// projections read (DecoderGraph::seq_cuts).
struct TensorShard {
  int64_t ranks = 1;  // 1: the whole model
  int64_t rank = 0;   // this one's place in the group
  int64_t head0 = 0, heads = 0, kv0 = 0, kv = 0, ffn0 = 0, ffn = 0;
  int64_t vocab0 = 0, vocab = 0;
  bool seq = false;
  bool on() const { return ranks > 1; }
};
// Sequence parallelism's rows of a pass of N: rank r's first row and count (even, the first N %
// ranks ranks one more).
std::array<int64_t, 2> seq_rows(const TensorShard& s, int64_t N);
struct SeqCutPoints {
  size_t forward = 0, again = 0, backward = 0;  // before these nodes (again: gathers only)
};
// A param's share under a TensorShard: the pieces [from, from + n) of the whole tensor along
// `axis`, concatenated in order; no pieces: replicated (whole on every rank).
struct ShardPieces {
  int axis = 0;
  std::vector<std::array<int64_t, 2>> pieces;
  int64_t width() const {  // the share's extent along the axis
    int64_t w = 0;
    for (auto [from, n] : pieces) w += n;
    return w;
  }
};
ShardPieces shard_pieces(const std::string& name, const DecoderConfig& c, const TensorShard& s);
// A weight every rank of the group holds whole but whose gradient each computes only a part of,
// to be summed over the group: LoRA's A of a column-split linear and B of a row-split one, the
// P-Tuning MLP's shared layers, Qwen3's per-head q and k norms. (Every other whole weight gets its
// whole gradient on each rank.)
bool partial_gradient(const std::string& name, const DecoderConfig& c, const TensorShard& s);

struct DecoderOptions {
  bool with_loss = false;
  // Training's masks: causal; prefix (bidirectional over a per-sequence prefix input, GLM);
  // segments (packed rows: a per-token segment-start input, positions restarting per segment)
  mxn_attention_mask mask = MXN_MASK_CAUSAL;
  int64_t kv_cache = 0;        // > 0: keys and values go to caches of this many rows per sequence
  bool last_logits = false;    // logits for each sequence's last row only (generation)
  DType weights = DType::f32;  // bf16: 2-D weights stored in bf16, computed in f32 (inference)
  // GLM's second position row (a span's token index, 0 in Part A): for RoPE models 2-D RoPE
  // (half of each head's rotated dims by each position, as GLM-130B); for GPT-2's learned
  // positions a learned table, as the original GLM's block position embeddings.
  bool block_positions = false;
  // Serving (src/serve/engine.h): B = 1 and the KV caches are one buffer of this many rows that
  // many requests share; each of the T rows names its cache row and its key range (inputs
  // cache_rows and key_ranges), and `logit_rows` rows picked by last_rows get logits. With
  // serve_block > 0 the cache is paged: key_ranges is each row's block table (T, 1 +
  // serve_blocks) = [keys, blocks...] (ATTENTION mask 5); else its key range (T, 2) (mask 4).
  int64_t serve_rows = 0, logit_rows = 0, serve_block = 0, serve_blocks = 0;
  // Serving many LoRA adapters in one batch: every linear that lora.targets names gains
  // ((x A^T) * mask) B^T with inputs <module>.lora_A.weight (serve_lora, in) and lora_B
  // (out, serve_lora), the adapters' ranks stacked, and lora_mask (T, serve_lora): each row's
  // own adapter's columns hold its scale alpha / r, the others 0 (a base row: all 0).
  int64_t serve_lora = 0;
  bool freeze = false;  // the model's weights are frozen (fine-tuning trains adapters only)
  // P-Tuning v2's reparameterisation while training: the prefix rows come out of a small MLP,
  // tanh(E W1^T + b1) W2^T + b2, from a (prefix_len, hidden) embedding E through this many
  // units; 0: the rows are trained as they are. Only the rows are kept after training.
  int64_t prefix_projection = 0;
  LoraSpec lora;
  // A pipeline stage: layers [first_layer, last_layer) only (last_layer -1: to the end). A
  // stage after the first reads its input from "hidden_in" (B*T, hidden) instead of the
  // embeddings; one before the last ends at its residual stream (hidden_out), without the final
  // norm, the head or the loss.
  int64_t first_layer = 0, last_layer = -1;
  // with_loss: the head and the loss as one CLASSIFIER_CE (no logits value; where the device has
  // the op and nothing reads the logits).
  bool fused_head = false;
  // Training in bf16: GELU reads the MLP's pre-activation cast to bf16, so the value kept for its
  // backward (the widest activation of a GPT layer) is half the size, as under torch's autocast.
  bool gelu_bf16 = false;
  // ... and attention's q, k and v (training only: no KV cache, not serving).
  bool attn_bf16 = false;
  // Expert parallelism (training, expert_cut): this rank holds experts [expert_first,
  // expert_first + expert_count) of every MoE layer (possibly none: a chip too slow for one) and
  // the MoE blocks are cut where tokens cross ranks (DecoderGraph::expert_cuts); expert_rows: the
  // rows the local experts can take from all ranks in one pass.
  bool expert_cut = false;
  int64_t expert_first = 0, expert_count = 0, expert_rows = 0;
  TensorShard tp;  // tensor parallelism (training): this rank's share of the blocks
};

// One MoE layer cut for expert parallelism. Forward: this rank's permuted rows xp (N*K, C),
// sorted by global expert, leave for the experts' owners; the rows that arrive, grouped by local
// expert (xr, expert_rows x C, the groups at local_offsets), go through the local experts (yr);
// yr goes back to the rows' ranks, arriving as yp in xp's order, and is unpermuted. Backward: the
// same exchanges carry d(yp) -> d(yr) (seed) and d(xr) -> d(xp) (seed). Graph outputs: xp, yr,
// d_yp, d_xr; inputs: xr, local_offsets, yp, d_yr, d_xp. A rank without experts has no xr,
// local_offsets, yr, d_yr or d_xr (-1): its rows only leave and come back.
struct ExpertCut {
  int offsets = -1;  // the router's global (E + 1) offsets of xp
  int xp = -1, xr = -1, local_offsets = -1, yr = -1, yp = -1;
  int d_xp = -1, d_yr = -1, d_xr = -1, d_yp = -1;  // set by the training graph's backward
};

struct DecoderGraph {
  int tokens = -1, positions = -1, targets = -1;  // inputs, (B*T) i32
  int block_positions = -1;                       // input (B*T) i32, with block_positions
  int prefix = -1, last_rows = -1;  // inputs, (B) i32 (prefix: (B*T) segment starts for mask 3)
  int cache_rows = -1, key_ranges = -1;                  // serving: inputs (T) and (T, 2) i32
  int lora_mask = -1;                                    // serving LoRA adapters: its inputs
  std::vector<std::pair<std::string, int>> lora_inputs;  // stacked A and B, by name
  int logits = -1, loss = -1;
  int hidden_in = -1, hidden_out = -1;  // pipeline stages (DecoderOptions::first_layer)
  int aux_loss = -1;     // a stage before the last: its MoE layers' share of the loss (or -1)
  int embed_table = -1;  // the token embeddings (the head too when tied)
  // With a KV cache: the cache values and the nodes whose position parameters change per run.
  std::vector<int> caches;
  std::vector<size_t> cache_writes, cache_reads;  // SET_ROWS and ATTENTION nodes
  // Mixture of experts, per MoE layer: each token's experts (N, K) i32, the experts' row offsets
  // (E + 1, i32: the load) and, with router_aux_coef, the load-balancing loss.
  std::vector<int> router_ids, router_offsets, router_aux;
  std::vector<ExpertCut> expert_cuts;  // DecoderOptions::expert_cut, one per MoE layer
  // Tensor parallelism: the row-split projections' partial outputs, to be summed over the group
  // after the node that writes each and before the first that reads it (forward), and the norm
  // outputs feeding the column-split ones, whose gradients are partial the same way (backward:
  // the training graph's tp_grad_sums, in place as well).
  std::vector<int> tp_sums, tp_grad_of, tp_grad_sums;
  // Sequence parallelism (TensorShard::seq): `from` crosses the group into `to`, an input. A
  // gather: this rank's rows (a norm's output, kept to the end) into the whole rows; a scatter:
  // a partial output's whole rows summed over the group, this rank's rows into `to`. The
  // training graph's backward reads `again` (a gather's rows gathered again, from `again_from`,
  // the norm output recomputed) for `to`, and carries d(to) -> d(from) the other way (a
  // reduce-scatter or an all-gather).
  struct SeqCut {
    int from = -1, to = -1;
    bool gather = false;
    int again = -1, again_from = -1, d_to = -1, d_from = -1;
  };
  std::vector<SeqCut> seq_cuts;
};
// Where a training graph's sequence-parallel cut crosses the group: its rows forward, a gather's
// rows again for the backward (from again_from), and the gradient back (checked: the graph's
// order allows it).
SeqCutPoints seq_cut_points(const Graph& g, const DecoderGraph::SeqCut& c);

// The block-position table's name (with DecoderOptions::block_positions, learned positions).
extern const char* const kBlockPositions;
// A router's selection bias: <block>gate.<this> (DecoderConfig::router_bias).
extern const char* const kRouterBias;

DecoderGraph build_decoder(Graph& g, const DecoderConfig& c, int64_t B, int64_t T,
                           const DecoderOptions& o = {});
// With a KV cache: points the graph's op calls at position `pos0` (the cache holds pos0 rows,
// T new ones follow). `call` is Program::call.
template <typename CallFn>
void set_cache_position(const DecoderGraph& m, int64_t pos0, int64_t T, CallFn&& call) {
  for (size_t n : m.cache_writes)
    with_params<SetRowsParams>(call(n), [&](SetRowsParams& s) { s.at = pos0; });
  for (size_t n : m.cache_reads)
    with_params<AttentionParams>(call(n), [&](AttentionParams& a) {
      a.S = pos0 + T;   // keys seen
      a.q_pos0 = pos0;  // the first query's key index
    });
}

// Fresh weights: N(0, 0.02); the projections into the residual stream scaled by
// 1/sqrt(2 layers) (GPT-2's rule); norms' weights 1; biases 0. Deterministic in seed and name.
std::vector<float> decoder_init_param(const std::string& name, int64_t count,
                                      const DecoderConfig& c, uint64_t seed);

}  // namespace mxn
