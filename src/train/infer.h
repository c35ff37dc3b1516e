#pragma once
// Forward-only use of a checkpoint: validation loss over a data file, and text generation.
#include <string>

namespace mxn {

struct GenerateOptions {
  std::string prompt;
  int64_t max_tokens = 200;
  double temperature = 0.8;
  int64_t top_k = 40;
  int64_t seed = 1;
  std::string device = "cpu";
  int64_t threads = 0;
};

// Mean next-token loss over the validation split of `data` (a shard, or a text file's last 10%).
double eval_checkpoint(const std::string& checkpoint, const std::string& data,
                       const std::string& device, int64_t threads, int64_t batch = 8);
// Calls `emit` with each new piece of text as it is sampled.
template <typename F>
void generate(const std::string& checkpoint, const GenerateOptions& o, F&& emit);
void generate_text(const std::string& checkpoint, const GenerateOptions& o,
                   void (*emit)(const std::string&, void*), void* user);

template <typename F>
void generate(const std::string& checkpoint, const GenerateOptions& o, F&& emit) {
  generate_text(
      checkpoint, o, [](const std::string& s, void* u) { (*static_cast<F*>(u))(s); }, &emit);
}

}  // namespace mxn
