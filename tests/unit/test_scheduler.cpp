// The serving engine's scheduler (src/serve/scheduler.h) alone: no model, no device. Each test
// builds a queue and a KV pool and checks the plans schedule() returns: admission under a full
// pool, the prefill budget, cancellation freeing blocks, prefix-block reuse, the oldest waiting
// request admitted first, and the queue limit.
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "core/error.h"
#include "serve/scheduler.h"

using mxn::EngineRequest;
using mxn::KvBlocks;
using mxn::SchedulePlan;
using mxn::Scheduler;
using mxn::SchedulerOptions;

namespace {
EngineRequest request(int32_t first, int64_t prompt, int64_t max_tokens) {
  EngineRequest r;
  for (int64_t i = 0; i < prompt; ++i) r.prompt.push_back(first + int32_t(i));
  r.max_tokens = max_tokens;
  return r;
}
// What the engine does after a pass, for requests that never end on their own: each decoding
// request's next token is 1.
void after_pass(Scheduler& s, const SchedulePlan& p) {
  s.ran(p);
  for (size_t i : p.decode) s.seq(i).next = 1;
  for (const auto& c : p.prefill)
    if (c.last) s.seq(c.slot).next = 1;
}
}  // namespace

TEST(Scheduler, AdmitsWhileTheFrontRequestsBlocksAreThereAndNoFurther) {
  KvBlocks kv(6, 4);  // 24 rows
  Scheduler s({4, 64, 256, 0}, kv);
  const int64_t a = s.submit(request(0, 8, 4));    // 3 blocks
  const int64_t b = s.submit(request(100, 8, 8));  // 4 blocks: not with a
  const int64_t c = s.submit(request(200, 2, 2));  // 1 block: fits, but must wait behind b
  SchedulePlan p = s.schedule();
  ASSERT_EQ(p.admitted.size(), 1u);
  EXPECT_EQ(s.seq(p.admitted[0]).id, a);
  EXPECT_EQ(kv.used(), 3);
  EXPECT_EQ(s.waiting(), 2);
  ASSERT_EQ(p.prefill.size(), 1u);
  EXPECT_EQ(p.prefill[0].rows, 8);
  EXPECT_TRUE(p.prefill[0].last);
  EXPECT_EQ(p.rows(), 8);
  EXPECT_EQ(p.logit_rows(), 1);
  after_pass(s, p);
  s.finish(p.admitted[0]);  // a ends: its 3 blocks come back, b and then c fit
  EXPECT_EQ(kv.used(), 0);
  p = s.schedule();
  ASSERT_EQ(p.admitted.size(), 2u);
  EXPECT_EQ(s.seq(p.admitted[0]).id, b);
  EXPECT_EQ(s.seq(p.admitted[1]).id, c);
  EXPECT_EQ(kv.used(), 5);
}

TEST(Scheduler, PrefillBudgetIsSharedOldestFirstAndDecodeRowsComeFirst) {
  KvBlocks kv(64, 4);
  Scheduler s({4, 64, 10, 0}, kv);  // 10 prompt rows a pass
  const int64_t a = s.submit(request(0, 3, 4));
  s.submit(request(100, 12, 4));
  s.submit(request(200, 6, 4));
  SchedulePlan p = s.schedule();
  ASSERT_EQ(p.prefill.size(), 2u);  // a whole (3), then 7 of the second's 12
  EXPECT_EQ(s.seq(p.prefill[0].slot).id, a);
  EXPECT_EQ(p.prefill[0].rows, 3);
  EXPECT_TRUE(p.prefill[0].last);
  EXPECT_EQ(p.prefill[1].from, 0);
  EXPECT_EQ(p.prefill[1].rows, 7);
  EXPECT_FALSE(p.prefill[1].last);
  EXPECT_EQ(p.rows(), 10);
  after_pass(s, p);
  p = s.schedule();  // a decodes (one row, first); 5 more of the second, then 5 of the third
  ASSERT_EQ(p.decode.size(), 1u);
  EXPECT_EQ(s.seq(p.decode[0]).id, a);
  EXPECT_EQ(s.seq(p.decode[0]).len, 3);
  ASSERT_EQ(p.prefill.size(), 2u);
  EXPECT_EQ(p.prefill[0].from, 7);
  EXPECT_EQ(p.prefill[0].rows, 5);
  EXPECT_TRUE(p.prefill[0].last);
  EXPECT_EQ(p.prefill[1].rows, 5);
  EXPECT_EQ(p.rows(), 11);
  EXPECT_EQ(p.logit_rows(), 2);
  after_pass(s, p);
  EXPECT_EQ(s.seq(p.decode[0]).len, 4);
}

TEST(Scheduler, CancellingFreesTheSlotAndBlocksForTheNextRequest) {
  KvBlocks kv(4, 4);
  Scheduler s({1, 64, 256, 0}, kv);
  const int64_t a = s.submit(request(0, 8, 8));  // all 4 blocks
  const int64_t b = s.submit(request(50, 4, 4));
  SchedulePlan p = s.schedule();
  after_pass(s, p);
  EXPECT_EQ(kv.used(), 4);
  s.cancel(a);
  EXPECT_EQ(kv.used(), 4);  // a running request leaves at the next schedule()
  p = s.schedule();
  EXPECT_EQ(p.cancelled, std::vector<int64_t>{a});
  ASSERT_EQ(p.admitted.size(), 1u);
  EXPECT_EQ(s.seq(0).id, b);
  EXPECT_EQ(kv.used(), 2);
  const int64_t c = s.submit(request(60, 4, 4));
  s.cancel(c);  // a waiting one leaves at once
  EXPECT_EQ(s.waiting(), 0);
  EXPECT_EQ(s.reset(), std::vector<int64_t>{b});
  EXPECT_EQ(kv.used(), 0);
  EXPECT_TRUE(s.idle());
}

TEST(Scheduler, PromptBlocksArePublishedAndReusedByTheSamePrefix) {
  KvBlocks kv(16, 4);
  Scheduler s({2, 64, 256, 0}, kv);
  s.submit(request(0, 10, 2));  // blocks [0..3], [4..7] published after its prefill
  SchedulePlan p = s.schedule();
  after_pass(s, p);
  EXPECT_EQ(s.seq(0).published, 2);
  EXPECT_EQ(s.reused_tokens(), 0);
  EngineRequest same = request(0, 10, 2);
  same.prompt[9] = 999;  // the same first 8 tokens, another last one
  s.submit(same);
  p = s.schedule();
  ASSERT_EQ(p.admitted.size(), 1u);
  const auto& b = s.seq(p.admitted[0]);
  EXPECT_EQ(b.blocks[0], s.seq(0).blocks[0]);
  EXPECT_EQ(b.blocks[1], s.seq(0).blocks[1]);
  EXPECT_EQ(s.reused_tokens(), 8);
  ASSERT_EQ(p.prefill.size(), 1u);  // only the last 2 prompt rows are computed
  EXPECT_EQ(p.prefill[0].from, 8);
  EXPECT_EQ(p.prefill[0].rows, 2);
  // A LoRA adapter's blocks are its own: the same prompt under adapter 1 shares nothing.
  EngineRequest lora = request(0, 10, 2);
  lora.adapter = 1;
  s.finish(0);
  s.submit(lora);
  p = s.schedule();
  ASSERT_EQ(p.prefill.size(), 2u);
  EXPECT_EQ(p.prefill[1].from, 0);
}

TEST(Scheduler, TheOldestWaitingRequestIsAdmittedFirst) {
  KvBlocks kv(64, 4);
  Scheduler s({2, 64, 256, 0}, kv);
  std::vector<int64_t> ids;
  for (int i = 0; i < 5; ++i) ids.push_back(s.submit(request(10 * i, 3, 2)));
  std::vector<int64_t> order;
  while (!s.idle()) {
    SchedulePlan p = s.schedule();
    for (size_t i : p.admitted) order.push_back(s.seq(i).id);
    after_pass(s, p);
    for (size_t i : p.decode)  // each request ends after its first decode row
      s.finish(i);
  }
  EXPECT_EQ(order, ids);
}

TEST(Scheduler, TheQueueLimitAndRequestsThatCanNeverFitAreRefused) {
  KvBlocks kv(4, 4);
  Scheduler s({1, 32, 256, 2}, kv);
  s.submit(request(0, 4, 4));
  s.submit(request(0, 4, 4));
  EXPECT_TRUE(s.full());
  EXPECT_THROW(s.submit(request(0, 4, 4)), mxn::QueueFull);
  s.schedule();  // one admitted: room in the queue again
  EXPECT_FALSE(s.full());
  EXPECT_THROW(s.check(request(0, 30, 3)), mxn::Error);          // over the capacity of 32
  EXPECT_THROW(s.check(request(0, 20, 1LL << 62)), mxn::Error);  // near 2^63: no overflow
  Scheduler t({1, 64, 256, 0}, kv);
  EXPECT_THROW(t.check(request(0, 16, 4)), mxn::Error);  // 5 blocks; the pool has 4
}
