#pragma once
// mxn's decoder families as llama.cpp stores them in GGUF: its architecture names (gpt2, llama,
// qwen2, chatglm), its metadata keys, its tensor names and layouts (GPT-2's Conv1D weights
// transposed, LLaMA's q/k rows permuted for rotary on adjacent pairs, GLM's q/k/v fused), and the
// tokenizer as tokenizer.ggml.* keys. mxn's own config goes along as `mxn.config`, so a file mxn
// wrote converts back exactly; other files are read from the standard keys.
#include <memory>
#include <string>

#include "data/tokenizer.h"
#include "io/gguf.h"
#include "io/safetensors.h"
#include "models/decoder.h"

namespace mxn {

// `weights` by Hugging Face names, f32. 1-D tensors (norms, biases) stay f32; Q8_0 and Q4_0 fall
// back to f16 for rows not a multiple of 32, as llama.cpp's converter does. `tokenizer_dir` may be
// empty.
GgufFile decoder_to_gguf(const DecoderConfig& c, const TensorMap& weights, GgmlType type,
                         const std::string& tokenizer_dir, const std::string& name);
// The config and weights by Hugging Face names: bf16 tensors that need no rearranging (all but
// GPT-2's transposed ones, LLaMA's permuted q/k, GLM's fused qkv and MLA's k_b) stay bf16, the
// rest are f32. Errors name the file and the key or tensor.
DecoderConfig decoder_from_gguf(const GgufFile& f, TensorMap& weights, const std::string& path);

// The tokenizer the file carries (tokenizer.ggml.*), or nullptr when it has none; an Error names
// the file and the key that is malformed. `chat_template`: tokenizer.chat_template, or empty.
std::unique_ptr<Tokenizer> tokenizer_from_gguf(const GgufFile& f, const std::string& path,
                                               std::string* chat_template = nullptr);

}  // namespace mxn
