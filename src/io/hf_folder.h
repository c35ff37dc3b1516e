#pragma once
// A Hugging Face model folder: config.json plus weights in one model.safetensors or shards named
// by model.safetensors.index.json, in f32, f16 or bf16. Read into mxn's decoder, and written
// back so that transformers loads it with from_pretrained.
#include <string>

#include "graph/program.h"
#include "io/safetensors.h"
#include "models/decoder.h"

namespace mxn {

// Errors name the folder and what is missing or wrong in it.
DecoderConfig load_hf_config(const std::string& dir);
// A mixture of experts' stacked weight (<block>experts.<leaf>, (E, rows, cols)) is expert e's
// <block>experts.<e>.<leaf> in a checkpoint: read slice by slice, written back the same way.
bool stacked_experts(const std::string& name, const Shape& shape);
std::string expert_name(const std::string& stacked, int64_t e);
// The other way: one expert's name ("...experts.<e>.<rest>") gives its stack's name and e; any
// other name, false.
bool expert_of(const std::string& name, std::string& stacked, int64_t& e);

// Every tensor of the folder's safetensors, converted to f32.
TensorMap load_hf_weights(const std::string& dir);

// bf16 and f16 tensors widened to f32 (others as they are).
HostTensor widen_to_f32(HostTensor t);

// Copies `weights` (f32, or bf16 as a GGUF keeps them) into the Program's weights by name: all of
// them, or only the frozen ones (a base model under adapters) or only the trained ones (the
// adapters). A missing tensor or one of another shape is an Error naming it, its expected and its
// found shape.
enum class WeightSet { all, frozen, trained };
void upload_weights(Program& prog, const TensorMap& weights, const std::string& source,
                    WeightSet which = WeightSet::all);

// The same straight from a folder's safetensors, tensor by tensor from memory-mapped files: no
// host copy of the model (f32, bf16 or f16 in the files; converted to each value's type).
// Expert stacks of E' experts take the folder's experts [expert_first, expert_first + E')
// (expert parallelism: a rank's share).
void upload_hf_weights(Program& prog, const std::string& dir, WeightSet which = WeightSet::all,
                       int64_t expert_first = 0);

// The decoder's parameters out of `weights` (f32, Hugging Face names): a missing tensor or one of
// another shape is an Error naming it, its expected and its found shape; extra tensors (GPT-2's
// attention-mask buffers, a tied head) are dropped.
TensorMap decoder_weights(const DecoderConfig& c, TensorMap weights, const std::string& source);

// config.json, model.safetensors (f32, f16 or bf16) and, from `tokenizer_dir` when given, the
// tokenizer files, into `dir`; each file written atomically. transformers loads the folder with
// from_pretrained (the ChatGLM layout has no transformers class; its folder is mxn's and GGUF's).
void save_hf_folder(const std::string& dir, const DecoderConfig& c, const TensorMap& weights,
                    DType dtype = DType::f32, const std::string& tokenizer_dir = "");
// The tokenizer files a model folder may ship, as save_hf_folder copies them.
extern const char* const kTokenizerFiles[8];

}  // namespace mxn
