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

}  // namespace mxn
