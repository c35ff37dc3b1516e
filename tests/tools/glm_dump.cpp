// Writes GLM blank-infilling samples as JSON lines, for tests/glm_objective_test.py: the text is
// the ids 100, 101, ...; specials cls=1 mask=2 gmask=3 sop=4 eop=5.
// usage: glm_dump CTX ROWS SEED GMASK_SHARE
#include <cstdio>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <vector>

#include "data/glm.h"

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: glm_dump CTX ROWS SEED GMASK_SHARE\n");
    return 2;
  }
  const int64_t ctx = std::atoll(argv[1]), rows = std::atoll(argv[2]);
  const uint64_t seed = std::strtoull(argv[3], nullptr, 10);
  mxn::GlmOptions o;
  o.gmask_share = std::atof(argv[4]);
  const mxn::GlmTokens t{1, 2, 3, 4, 5};
  std::vector<int32_t> text(static_cast<size_t>(ctx));
  for (int64_t i = 0; i < ctx; ++i) text[size_t(i)] = int32_t(100 + i);
  for (int64_t r = 0; r < rows; ++r) {
    const mxn::GlmSample s = mxn::glm_sample(text.data(), ctx, t, o, seed, uint64_t(r));
    const nlohmann::json j = {{"tokens", s.tokens},     {"targets", s.targets},
                              {"pos", s.pos},           {"block_pos", s.block_pos},
                              {"sep", s.sep},           {"masked", s.masked},
                              {"text_len", s.text_len}, {"generation", s.generation}};
    std::printf("%s\n", j.dump().c_str());
  }
  return 0;
}
