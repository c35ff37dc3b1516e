#pragma once
// Forward-only use of a model: validation loss over a data file, and generation with a KV cache.
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "backend/device.h"
#include "data/chat.h"
#include "data/tokenizer.h"
#include "infer/generate.h"
#include "io/safetensors.h"

namespace mxn {

// A model from wherever it lives: a Hugging Face folder, a GGUF file, or an mxn checkpoint or run
// folder. Weights are f32 by Hugging Face name.
struct ModelSource {
  DecoderConfig cfg;
  TensorMap weights;          // f32; a GGUF's bf16 tensors stay bf16 (decoder_from_gguf)
  std::string what;           // "model folder 'x'", for messages
  std::string tokenizer_dir;  // a folder with the model's tokenizer files, or empty (byte-level)
  // The tokenizer the model file itself carries (a GGUF's tokenizer.ggml.*) and its chat
  // template (tokenizer.chat_template), used where there is no tokenizer_dir.
  std::shared_ptr<Tokenizer> tokenizer;
  std::string chat_template;
  std::string tokenizer_error;  // why the file's tokenizer could not be read (the model still can)
  bool stored_16bit = false;    // the source keeps its weights in 16 bits (or 8, 4: GGUF)
};
// With `adapter` (a PEFT LoRA folder or an mxn LoRA run), its update is merged into the weights;
// an mxn LoRA run's own checkpoint loads as its base with its adapter merged.
ModelSource load_model(const std::string& path, const std::string& adapter = "");

// The model's tokenizer: its folder's files, else the one its file carries (a GGUF's), else
// nullptr (a byte-level run, or a file whose tokenizer mxn cannot read: tokenizer_error).
std::shared_ptr<Tokenizer> model_tokenizer(const ModelSource& src);
// Its chat format, from the folder's tokenizer_config.json or the file's chat template; an Error
// when it has none mxn knows (a base model).
ChatFormat model_chat_format(const ModelSource& src, const Tokenizer& tok);

// Wall-clock seconds of each phase: reading and placing the weights, the prompt's prefill, and
// the one-token steps (each a forward pass reading the KV cache) with their sampling.
struct GenerateStats {
  double load_s = 0, prompt_s = 0, decode_s = 0;
  int64_t prompt_tokens = 0, decode_tokens = 0;
  // generate_batch: prompt tokens read from shared prefix blocks; the most KV blocks in use
  int64_t reused_tokens = 0, kv_blocks_peak = 0, kv_blocks = 0;
  int64_t kv_bytes_per_token = 0;  // over the layers (MLA: each token's latent and RoPE key)
};

struct GenerateOptions {
  std::string checkpoint;  // an mxn checkpoint or run folder (byte-level text) ...
  std::string model;       // ... or a Hugging Face model folder or GGUF file
  std::string adapter;     // a LoRA adapter merged into the model's weights at load
  std::string prompt;
  std::vector<int32_t> prompt_ids;  // instead of `prompt`: token ids
  bool chat = false;                // `prompt` is a user message in the model's chat format
  std::string system;               // with `chat`: a system message
  int64_t max_tokens = 200;
  SamplingOptions sampling;
  std::vector<std::string> stop;  // generation ends before the first of these in the text
  bool ignore_eos = false;        // go on past the model's end-of-sequence tokens
  std::string device = "cpu";
  int64_t threads = 0;
  // How the weights are kept: f32, bf16 (2-D weights in bf16, arithmetic in f32: half the bytes
  // read per token; the CPU backend), or auto: bf16 on the CPU when the source stores 16-bit
  // weights.
  std::string weights = "auto";
  GenerateStats* stats = nullptr;  // filled when given
};

// How generation keeps the weights (o.weights): bf16 on request, or for a 16-bit source on the
// CPU (bf16 weights are a CPU backend feature so far); f32 otherwise. Error for another value.
DType weight_dtype(const GenerateOptions& o, const ModelSource& src, const Device& dev);

// Mean next-token loss over the validation split of `data` (a shard, or a text file's last 10%)
// for any model load_model() reads, in windows of `ctx` tokens (0: the model's context, at most
// 1024).
double eval_model(const std::string& model, const std::string& data, const std::string& device,
                  int64_t threads, int64_t batch = 8, int64_t ctx = 0);

// Perplexity of a model with a tokenizer (a model folder's, a GGUF's own) on a text file, as
// llama.cpp's llama-perplexity computes it: the whole text tokenized, cut into chunks of `ctx`
// tokens (0: the model's context, at most 1024), each chunk's second half scored.
struct Perplexity {
  double ppl = 0, nll = 0;  // exp(mean NLL), the mean NLL
  int64_t tokens = 0, chunks = 0, ctx = 0, scored = 0;
};
Perplexity text_perplexity(const std::string& model, const std::string& text_path,
                           const std::string& device, int64_t threads, int64_t batch = 8,
                           int64_t ctx = 0);

// GLM blank infilling with a checkpoint trained with --objective glm: each "[MASK]" (or
// "[gMASK]") in `text` is filled, left to right, by generating after [sop] until [eop] (at most
// `max_tokens` per blank; `sampling` as in generate). Returns the text with the blanks filled.
std::string infill(const std::string& checkpoint, const std::string& text, int64_t max_tokens,
                   const SamplingOptions& sampling, const std::string& device, int64_t threads);

// Calls `on_token` with each new token id and the text it completes (whole UTF-8 characters;
// empty while a character is incomplete, or when the model's tokenizer is not read here).
// Returns the number of tokens generated.
int64_t generate(const GenerateOptions& o,
                 const std::function<void(int32_t id, const std::string& text)>& on_token);

}  // namespace mxn
