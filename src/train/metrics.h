#pragma once
// A run's record: metrics.jsonl (one JSON object a line) and loss.svg drawn from it.
#include <nlohmann/json.hpp>
#include <string>

namespace mxn {

void append_metrics(const std::string& run_dir, const nlohmann::json& row);
// Reads metrics.jsonl and writes loss.svg (train loss and validation loss by step) atomically.
void write_loss_svg(const std::string& run_dir);

}  // namespace mxn
