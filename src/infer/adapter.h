#pragma once
// Fine-tuning adapters as Hugging Face PEFT keeps them: a folder with adapter_config.json and
// adapter_model.safetensors. LoRA: tensors "base_model.model.<module>.lora_A.weight" (and B).
// P-Tuning v2 (PEFT's PREFIX_TUNING without a projection): one "prompt_embeddings" tensor
// (prefix_len, layers * 2 * kv_dim), each layer's keys then values, as PEFT turns it into
// past_key_values. mxn writes one into every checkpoint of an adapter run, reads PEFT's own, and
// applies one to a model's weights (generate --adapter; mxn merge for LoRA).
#include <string>

#include "io/safetensors.h"
#include "models/decoder.h"

namespace mxn {

struct Adapter {
  bool prefix = false;  // P-Tuning v2; else LoRA
  LoraSpec spec;        // LoRA
  double dropout = 0;
  int64_t prefix_len = 0, layers = 0, kv_dim = 0;  // P-Tuning v2
  std::string base;                                // base_model_name_or_path
  TensorMap tensors;  // by mxn's names (lora_a_name/..., prefix_key_name/...), f32
};

// adapter_config.json's text and the tensors under PEFT's names, for the model `c`.
std::string adapter_config_json(const Adapter& a, const DecoderConfig& c);
TensorMap adapter_peft_tensors(const Adapter& a);

// P-Tuning v2's rows from its reparameterisation MLP's tensors (kPrefixEncoder names), as the
// graph computes them: the rows are what an adapter keeps.
TensorMap project_prefix(const TensorMap& encoder, int64_t layers);

// `path`: a PEFT folder, or an mxn adapter run or checkpoint folder (each checkpoint is one).
// Errors name the file and what is wrong: another adapter type, a missing or malformed field,
// rank <= 0, a tensor without its pair.
Adapter load_adapter(const std::string& path);

// LoRA: W += (alpha / r) B A for every adapted module of `weights` (Hugging Face names, f32;
// GPT-2's Conv1D weights take the transpose). P-Tuning v2: the prefix tensors join `weights` and
// c.prefix_len is set. A module the model lacks, or a shape that does not fit, is an Error naming
// the tensor and both shapes.
void apply_adapter(DecoderConfig& c, TensorMap& weights, const Adapter& a,
                   const std::string& source);

}  // namespace mxn
