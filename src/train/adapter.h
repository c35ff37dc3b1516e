#pragma once
// Fine-tuning adapters as Hugging Face PEFT keeps them: a folder with adapter_config.json and
// adapter_model.safetensors (tensor names "base_model.model.<module>.lora_A.weight"). mxn writes
// one into every checkpoint of a LoRA run, reads PEFT's own, and folds one into a model's
// weights (generate --adapter, mxn merge).
#include <string>

#include "io/safetensors.h"
#include "models/decoder.h"

namespace mxn {

struct LoraAdapter {
  LoraSpec spec;
  double dropout = 0;
  std::string base;   // base_model_name_or_path
  TensorMap tensors;  // by mxn's names (lora_a_name/lora_b_name of each module), f32
};

// adapter_config.json's text and the tensors under PEFT's names.
std::string lora_config_json(const LoraAdapter& a, bool fan_in_fan_out);
TensorMap lora_peft_tensors(const TensorMap& mxn_named);

// `path`: a PEFT folder, or an mxn LoRA run or checkpoint folder (each checkpoint is one). Errors
// name the file and what is wrong: not LoRA, a missing or malformed field, rank <= 0, a tensor
// without its pair.
LoraAdapter load_lora_adapter(const std::string& path);

// W += (alpha / r) B A for every adapted module of `weights` (Hugging Face names, f32; GPT-2's
// Conv1D weights take the transpose). A module the model lacks, or a shape that does not fit,
// is an Error naming the tensor and both shapes.
void merge_lora(const DecoderConfig& c, TensorMap& weights, const LoraAdapter& a,
                const std::string& source);

}  // namespace mxn
