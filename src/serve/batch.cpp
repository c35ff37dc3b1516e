#include "serve/batch.h"

#include <algorithm>
#include <cstdio>

#include "core/error.h"
#include "serve/engine.h"

namespace mxn {

std::vector<std::vector<int32_t>> generate_batch(const GenerateOptions& o,
                                                 const std::vector<std::vector<int32_t>>& prompts,
                                                 int64_t slots) {
  if (o.checkpoint.empty() == o.model.empty())
    throw Error("generate needs one of --checkpoint (an mxn run) or --model (a model folder)");
  if (prompts.empty()) throw Error("no prompts to generate from");
  ModelSource src = load_model(o.checkpoint.empty() ? o.model : o.checkpoint, o.adapter);
  int64_t longest = 0;
  for (const auto& p : prompts) longest = std::max<int64_t>(longest, int64_t(p.size()));
  auto dev = open_device(o.device, int(o.threads));
  const int64_t capacity = std::min<int64_t>(src.cfg.max_pos, longest + o.max_tokens);
  EngineOptions eo;
  eo.slots = slots;
  eo.capacity = capacity;
  eo.weights = weight_dtype(o, src, *dev);
  Engine engine(src.cfg, src.weights, src.what, *dev, eo);
  std::vector<int64_t> ids;
  for (size_t i = 0; i < prompts.size(); ++i) {
    EngineRequest r;
    r.prompt = prompts[i];
    r.max_tokens = o.max_tokens;
    r.sampling = o.sampling;
    r.sampling.seed = o.sampling.seed + i;
    r.ignore_eos = o.ignore_eos;
    ids.push_back(engine.submit(std::move(r)));
  }
  std::vector<std::vector<int32_t>> out(prompts.size());
  int64_t peak = 0;
  while (!engine.idle()) {
    for (const EngineEvent& e : engine.step())
      if (e.token >= 0)
        out[size_t(std::find(ids.begin(), ids.end(), e.id) - ids.begin())].push_back(e.token);
    peak = std::max(peak, engine.kv().used());
  }
  if (dev->profiling()) std::fputs(dev->profile_report().c_str(), stderr);
  if (o.stats) {
    o.stats->prompt_tokens = engine.prompt_tokens();
    o.stats->reused_tokens = engine.reused_tokens();
    o.stats->kv_blocks_peak = peak;
    o.stats->kv_blocks = engine.kv().total();
    o.stats->kv_bytes_per_token = src.cfg.layers * src.cfg.kv_cache_width() * 4;
  }
  return out;
}

}  // namespace mxn
