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
// Every tensor of the folder's safetensors, converted to f32.
TensorMap load_hf_weights(const std::string& dir);

// Copies `weights` into the Program's params by name. A missing tensor or one of another shape is
// an Error naming it, its expected and its found shape.
void upload_weights(Program& prog, const TensorMap& weights, const std::string& source);

// config.json and model.safetensors (the Program's params, f32) into `dir`, written atomically.
void save_hf_folder(const std::string& dir, const DecoderConfig& c, const TensorMap& weights);

}  // namespace mxn
