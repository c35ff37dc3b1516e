// Greedy tokens from llama.cpp on a GGUF, for comparing with `mxn generate --print-ids`:
//   llama_greedy MODEL.gguf N ID,ID,...   prints N greedy token ids after the prompt's, one a line.
// Built against the llama.cpp that bench/llamacpp.sh builds (bench/llama_greedy.sh compiles it).
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "llama.h"

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: llama_greedy MODEL.gguf N ID,ID,...\n");
    return 2;
  }
  std::vector<llama_token> ids;
  std::stringstream in(argv[3]);
  for (std::string t; std::getline(in, t, ',');) ids.push_back(llama_token(std::atoi(t.c_str())));
  const int n = std::atoi(argv[2]);
  llama_log_set([](ggml_log_level, const char*, void*) {}, nullptr);
  llama_backend_init();
  llama_model_params mp = llama_model_default_params();
  llama_model* model = llama_model_load_from_file(argv[1], mp);
  if (!model) {
    std::fprintf(stderr, "llama_greedy: cannot load %s\n", argv[1]);
    return 1;
  }
  llama_context_params cp = llama_context_default_params();
  cp.n_ctx = uint32_t(ids.size() + n + 8);
  cp.n_batch = cp.n_ctx;
  cp.n_threads = cp.n_threads_batch = 1;
  llama_context* ctx = llama_init_from_model(model, cp);
  const int vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
  llama_batch b = llama_batch_get_one(ids.data(), int32_t(ids.size()));
  for (int i = 0; i < n; ++i) {
    if (llama_decode(ctx, b) != 0) return 1;
    const float* logits = llama_get_logits_ith(ctx, -1);
    llama_token best = 0;
    for (llama_token t = 1; t < vocab; ++t)
      if (logits[t] > logits[best]) best = t;
    std::printf("%d\n", best);
    ids.push_back(best);
    b = llama_batch_get_one(&ids.back(), 1);
  }
  llama_free(ctx);
  llama_model_free(model);
  return 0;
}
