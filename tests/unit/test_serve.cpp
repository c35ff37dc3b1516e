// The serving engine's paged KV cache (src/serve/kv_blocks.h): references, prefix sharing and
// least-recently-used eviction, block by block; the router that spreads requests over replicas.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>

#include "serve/kv_blocks.h"
#include "serve/served_model.h"

using mxn::KvBlocks;

namespace {
std::vector<int32_t> seq(int32_t from, int32_t n) {
  std::vector<int32_t> v;
  for (int32_t i = 0; i < n; ++i) v.push_back(from + i);
  return v;
}
std::vector<int32_t> cat(std::vector<int32_t> a, const std::vector<int32_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}
}  // namespace

TEST(KvBlocks, SharedPrefixIsMatchedBlockByBlockAndOnlyExactly) {
  KvBlocks kv(8, 4);
  const std::vector<int32_t> a = seq(0, 10);  // blocks [0..3], [4..7], and 2 tokens
  std::vector<int32_t> ta;
  for (int i = 0; i < 3; ++i) ta.push_back(kv.take());
  EXPECT_EQ(kv.used(), 3);
  EXPECT_TRUE(kv.match(a, 2).empty());  // nothing published yet
  kv.publish(ta, 0, a);
  kv.publish(ta, 1, a);
  // The same first 8 tokens then something else: both blocks; a prompt differing in block 2's
  // first token: only block 0; the cap `most` holds.
  EXPECT_EQ(kv.match(cat(seq(0, 8), {99}), 2), (std::vector<int32_t>{ta[0], ta[1]}));
  EXPECT_EQ(kv.match(cat(seq(0, 4), seq(50, 4)), 2), (std::vector<int32_t>{ta[0]}));
  EXPECT_EQ(kv.match(a, 1), (std::vector<int32_t>{ta[0]}));
  EXPECT_TRUE(kv.match(seq(1, 8), 2).empty());
  // Those matches took references: block 0 has 4 holders, block 1 two.
  for (int32_t b : {ta[0], ta[0], ta[0], ta[1]}) kv.release(b);
  EXPECT_EQ(kv.used(), 3);
  for (int32_t b : ta) kv.release(b);
  // Published blocks stay cached after their last holder; the unpublished one is free.
  EXPECT_EQ(kv.used(), 0);
  EXPECT_EQ(kv.cached(), 2);
  EXPECT_EQ(kv.free(), 6);
  EXPECT_EQ(kv.match(a, 2, false).size(), 2u);
  EXPECT_EQ(kv.cached(), 2);  // a dry run takes nothing
}

TEST(KvBlocks, CachedBlocksAreEvictedLeastRecentlyUsedFirstAndNeverWhileHeld) {
  KvBlocks kv(3, 2);
  const std::vector<int32_t> p = seq(10, 2), q = seq(20, 2);
  std::vector<int32_t> tp{kv.take()}, tq{kv.take()};
  kv.publish(tp, 0, p);
  kv.publish(tq, 0, q);
  kv.release(tp[0]);  // p's block released first: the older
  kv.release(tq[0]);
  EXPECT_EQ(kv.cached(), 2);
  const int32_t f = kv.take();  // the free one before any cached one
  EXPECT_NE(f, tp[0]);
  EXPECT_NE(f, tq[0]);
  EXPECT_EQ(kv.match(q, 1).size(), 1u);  // q's block held again
  EXPECT_EQ(kv.take(), tp[0]);           // p's evicted: it was the only unheld cached one
  EXPECT_TRUE(kv.match(p, 1).empty());
  EXPECT_EQ(kv.take(), -1);  // all three held
  EXPECT_EQ(kv.used(), 3);
  EXPECT_EQ(kv.available(), 0);
}

TEST(Router, PicksTheLowestPredictedFinishAndSkipsFailedReplicas) {
  using mxn::pick_replica;
  using mxn::ReplicaLoad;
  // 100 tokens owed at 50 tokens/s (2 s + 0.4 s) against 30 owed at 20 tokens/s (1.5 s + 1 s).
  EXPECT_EQ(pick_replica({{true, 50, 100}, {true, 20, 30}}, 20), 0u);
  EXPECT_EQ(pick_replica({{true, 50, 100}, {true, 20, 20}}, 20), 1u);  // 2.4 s against 2.0 s
  EXPECT_EQ(pick_replica({{false, 50, 0}, {true, 20, 500}}, 20), 1u);
  EXPECT_EQ(pick_replica({{false, 50, 0}, {false, 20, 0}}, 20), SIZE_MAX);
  EXPECT_EQ(pick_replica({{true, 10, 0}, {true, 10, 0}}, 5), 0u);  // a tie: the first
}

TEST(Router, AFasterChipTakesAShareInProportionToItsSpeed) {
  // 400 requests of 16 tokens arrive 10 ms apart at chips of 300 and 100 tokens/s that work off
  // what they owe between arrivals: the fast one takes 3/4 of the requests, within 2 points.
  using mxn::ReplicaLoad;
  std::vector<ReplicaLoad> loads{{true, 300, 0}, {true, 100, 0}};
  int64_t taken[2] = {0, 0};
  for (int i = 0; i < 400; ++i) {
    const size_t r = mxn::pick_replica(loads, 16);
    loads[r].owed += 16;
    ++taken[r];
    for (auto& l : loads) l.owed = std::max<int64_t>(0, l.owed - int64_t(l.tokens_per_s * 0.01));
  }
  EXPECT_NEAR(double(taken[0]) / 400, 0.75, 0.02) << taken[0] << " and " << taken[1];
}
