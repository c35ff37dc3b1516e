#pragma once
// Checkpoints: a folder holding model.safetensors (weights, Hugging Face names),
// optimizer.safetensors (AdamW moments) and trainer.json (step and configs). A run folder keeps the
// last few as ckpt-NNNNNNNN/ and names the newest in `latest`. Each is written into a temp folder,
// flushed, then renamed into place, so a crash at any moment leaves the previous checkpoint
// loadable.
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "io/safetensors.h"

namespace mxn {

struct Checkpoint {
  TensorMap weights;
  TensorMap optimizer;
  nlohmann::json trainer;
  // Further files of the folder, by name (a LoRA run's PEFT adapter files).
  std::vector<std::pair<std::string, std::string>> files;
  std::vector<std::pair<std::string, TensorMap>> tensors;
};

// Returns the new checkpoint's folder.
std::string save_checkpoint(const std::string& run_dir, int64_t step, const Checkpoint& ck,
                            int keep = 2);
// `path` is a checkpoint folder or a run folder (its newest checkpoint is used).
std::string resolve_checkpoint(const std::string& path);
Checkpoint load_checkpoint(const std::string& path, bool with_optimizer);

}  // namespace mxn
