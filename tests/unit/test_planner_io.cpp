// The arena planner never lets two live activations share bytes; safetensors round-trips exactly
// and names what is wrong with a damaged file.
#include <gtest/gtest.h>

#include <filesystem>

#include "core/error.h"
#include "core/fs.h"
#include "data/shard.h"
#include "graph/program.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "models/decoder.h"

using namespace mxn;

TEST(Planner, LiveActivationsNeverOverlap) {
  Graph g;
  DecoderConfig cfg;
  cfg.layers = 3, cfg.heads = 2, cfg.hidden = 32, cfg.vocab_size = 50, cfg.max_pos = 16;
  DecoderOptions o;
  o.with_loss = true;
  DecoderGraph m = build_decoder(g, cfg, 2, 16, o);
  append_backward(g, m.loss);
  const uint64_t arena = plan_arena(g);
  std::vector<int64_t> first(g.values.size(), -1), last(g.values.size(), -1);
  for (size_t i = 0; i < g.nodes.size(); ++i)
    for (const auto* ids : {&g.nodes[i].in, &g.nodes[i].out})
      for (int id : *ids) {
        if (first[size_t(id)] < 0) first[size_t(id)] = int64_t(i);
        last[size_t(id)] = int64_t(i);
      }
  uint64_t total = 0;
  std::vector<int> acts;
  for (size_t i = 0; i < g.values.size(); ++i)
    if (g.values[i].kind == ValueKind::activation && first[i] >= 0) {
      acts.push_back(int(i));
      total += uint64_t(numel(g.values[i].shape)) * 4;
      if (g.values[i].output) last[i] = int64_t(g.nodes.size());
    }
  for (size_t x = 0; x < acts.size(); ++x)
    for (size_t y = x + 1; y < acts.size(); ++y) {
      const Value &a = g.values[size_t(acts[x])], &b = g.values[size_t(acts[y])];
      const bool live_together = first[size_t(acts[x])] <= last[size_t(acts[y])] &&
                                 first[size_t(acts[y])] <= last[size_t(acts[x])];
      const bool share = a.offset < b.offset + uint64_t(numel(b.shape)) * 4 &&
                         b.offset < a.offset + uint64_t(numel(a.shape)) * 4;
      ASSERT_FALSE(live_together && share) << "values " << acts[x] << " and " << acts[y];
    }
  EXPECT_LT(arena, total);  // reuse happened
}

TEST(Safetensors, RoundTripExact) {
  TensorMap m;
  HostTensor a({2, 3}, DType::f32);
  for (int i = 0; i < 6; ++i) a.f32()[i] = float(i) * 0.1f - 0.2f;
  HostTensor b({4}, DType::i32);
  for (int i = 0; i < 4; ++i) b.i32()[i] = -i;
  m.emplace("a.weight", a);
  m.emplace("b", b);
  const std::string bytes = safetensors_serialize(m, {{"format", "pt"}});
  uint64_t n;
  std::memcpy(&n, bytes.data(), 8);
  EXPECT_EQ(n % 8, 0u);  // header padded to 8 bytes, as the format asks
  TensorMap r = safetensors_parse(bytes, "mem");
  ASSERT_EQ(r.size(), 2u);
  EXPECT_EQ(r.at("a.weight").shape, (Shape{2, 3}));
  EXPECT_EQ(r.at("a.weight").bytes, a.bytes);
  EXPECT_EQ(r.at("b").bytes, b.bytes);
}

TEST(Safetensors, DamageIsNamed) {
  TensorMap m;
  m.emplace("w", HostTensor({16}, DType::f32));
  const std::string good = safetensors_serialize(m);
  auto expect_error = [](const std::string& bytes, const std::string& needle) {
    try {
      safetensors_parse(bytes, "x.safetensors");
      FAIL() << "no error for " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_error(good.substr(0, good.size() - 4), "data offsets");
  expect_error(good.substr(0, 5), "shorter than");
  std::string huge = good;
  huge[7] = 0x7f;
  expect_error(huge, "exceeds the file");
  std::string garbled = good;
  garbled[9] = '!';
  expect_error(garbled, "not valid JSON");
}

TEST(Shard, PrepareAndOpen) {
  const auto dir = std::filesystem::temp_directory_path() / "mxn_shard_test";
  std::filesystem::create_directories(dir);
  const std::string txt = (dir / "a.txt").string(), bin = (dir / "a.bin").string();
  write_file_atomic(txt, "abcdefghij");
  prepare_shard(txt, bin, 0.2);
  TokenData d = TokenData::open(bin);
  EXPECT_EQ(d.n_train(), 8);
  EXPECT_EQ(d.n_val(), 2);
  EXPECT_EQ(d.train()[0], 'a');
  EXPECT_EQ(d.val()[1], 'j');
  TokenData t = TokenData::open(txt, 0.2);  // a text file splits the same way
  EXPECT_EQ(t.n_train(), 8);
  EXPECT_EQ(t.val()[0], 'i');
  std::string raw = read_file(bin, "x");
  write_file_atomic(bin, raw.substr(0, raw.size() - 2));
  EXPECT_THROW(TokenData::open(bin), Error);
  write_file_atomic(txt, "");
  EXPECT_THROW(TokenData::open(txt), Error);
  EXPECT_THROW(TokenData::open((dir / "missing").string()), Error);
  std::filesystem::remove_all(dir);
}

// A vocabulary past 65536 (an added token with id 70000) makes a 32-bit shard (version 2).
TEST(Shard, ThirtyTwoBitTokens) {
  const auto dir = std::filesystem::temp_directory_path() / "mxn_shard32_test";
  std::filesystem::create_directories(dir);
  write_file_atomic((dir / "tokenizer.json").string(), R"({
    "model": {"type": "BPE", "vocab": {"H": 0, "e": 1, "l": 2, "o": 3, "He": 4, "ll": 5,
                                       "llo": 6, "Hello": 7},
              "merges": ["H e", "l l", "ll o", "He llo"]},
    "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false},
    "added_tokens": [{"id": 70000, "content": "<|big|>", "special": true}]})");
  const std::string txt = (dir / "a.txt").string(), bin = (dir / "a.bin").string();
  write_file_atomic(txt, "Hello<|big|>HelloHello<|big|>Hello");
  prepare_shard(txt, bin, 0.34, dir.string());
  TokenData d = TokenData::open(bin);
  EXPECT_EQ(d.vocab(), 70001);
  ASSERT_EQ(d.n_train(), 4);
  ASSERT_EQ(d.n_val(), 2);
  EXPECT_EQ(d.train()[0], 7u);
  EXPECT_EQ(d.train()[1], 70000u);
  EXPECT_EQ(d.val()[0], 70000u);
  EXPECT_EQ(d.val()[1], 7u);
  EXPECT_EQ(std::filesystem::file_size(bin) % 4, 0u);
  std::filesystem::remove_all(dir);
}
