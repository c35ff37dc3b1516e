// The serving engine's paged KV cache (src/serve/kv_blocks.h): references, prefix sharing and
// least-recently-used eviction, block by block.
#include <gtest/gtest.h>

#include "serve/kv_blocks.h"

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
