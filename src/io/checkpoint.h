#pragma once
// Checkpoints: a folder holding model.safetensors (weights, Hugging Face names),
// optimizer.safetensors (AdamW moments) and trainer.json (step, configs, and each file's size and
// XXH3-64 checksum). A run folder keeps the last few as ckpt-NNNNNNNN/ and names the newest in
// `latest`. Each is written into a temp folder, flushed, then renamed into place, so a crash at any
// moment leaves the previous checkpoint loadable; a write that fails (a full disk) removes its temp
// folder and leaves the earlier ones as they were.
#include <condition_variable>
#include <functional>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
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

// Returns the new checkpoint's folder; an Error (naming the file and the system's reason) if any
// part cannot be written.
std::string save_checkpoint(const std::string& run_dir, int64_t step, const Checkpoint& ck,
                            int keep = 2);
// `path` is a checkpoint folder or a run folder (its newest complete checkpoint is used). Cheap:
// nothing is read but `latest`.
std::string resolve_checkpoint(const std::string& path);
// The run folder's newest complete checkpoint folder; "" when it has none (or does not exist).
std::string newest_checkpoint(const std::string& run_dir);
// Throws an Error naming the file of checkpoint folder `dir` whose size or checksum differs from
// what trainer.json recorded (checkpoints from before the checksums pass unchecked).
void verify_checkpoint(const std::string& dir);
// As resolve_checkpoint, and checked with verify_checkpoint. For a run folder, a damaged newest
// checkpoint is skipped for the one before it, and `warn` gets a line naming both; a named
// checkpoint folder that is damaged is an Error.
std::string find_good_checkpoint(const std::string& path,
                                 const std::function<void(const std::string&)>& warn);
// As find_good_checkpoint, and its folder and contents read in the same pass (each file read
// once, its checksum taken from the bytes that are parsed): what resuming needs.
std::pair<std::string, Checkpoint> load_good_checkpoint(
    const std::string& path, const std::function<void(const std::string&)>& warn);
Checkpoint load_checkpoint(const std::string& path, bool with_optimizer);
// Only its trainer.json (step, configs), checked for the keys every checkpoint has.
nlohmann::json load_trainer_json(const std::string& path);

// Writes checkpoints on a thread of its own, one at a time, so training goes on while the disk
// works. The Checkpoint handed to start() must stay untouched until wait() returns.
class CheckpointWriter {
 public:
  struct Result {
    int64_t step = -1;  // -1: nothing was written since the last wait()
    std::string dir;    // the new checkpoint's folder, or "" if the write failed
    std::string error;  // why it failed
  };
  CheckpointWriter();
  ~CheckpointWriter();  // finishes the write in flight
  CheckpointWriter(const CheckpointWriter&) = delete;
  CheckpointWriter& operator=(const CheckpointWriter&) = delete;
  void start(const std::string& run_dir, int64_t step, const Checkpoint* ck, int keep);
  Result wait();  // blocks until no write is in flight; the last one's outcome, once
  bool busy();

 private:
  void loop();
  std::mutex mu_;
  std::condition_variable cv_;
  bool quit_ = false, pending_ = false;
  std::string dir_;
  int64_t step_ = 0;
  int keep_ = 2;
  const Checkpoint* ck_ = nullptr;
  Result result_;
  std::thread thread_;
};

}  // namespace mxn
