#pragma once
// A run's record: metrics.jsonl (one JSON object a line) and loss.svg drawn from it.
#include <nlohmann/json.hpp>
#include <string>

namespace mxn {

void append_metrics(const std::string& run_dir, const nlohmann::json& row);
// Drops rows after `step` (a run resumed from an earlier checkpoint redoes those steps).
void truncate_metrics(const std::string& run_dir, int64_t step);
// Reads metrics.jsonl and writes loss.svg (train loss and validation loss by step) atomically.
void write_loss_svg(const std::string& run_dir);

// The step an earlier run in `run_dir` reached: its newest checkpoint's (ckpt-N), else its last
// metrics row's; -1 when the folder holds no run (no checkpoint folder, no metrics.jsonl).
int64_t run_found(const std::string& run_dir);
// Removes what a run writes into `run_dir` (ckpt-* folders, latest, metrics.jsonl, loss.svg) and
// nothing else, so a run folder pointed at a folder of other files loses none of them.
void clear_run(const std::string& run_dir);

}  // namespace mxn
