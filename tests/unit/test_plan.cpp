// The layout planner and its simulator: a 1F1B step worked out by hand, the closed form of a
// uniform pipeline, the cost model's parameter count, the memory prediction as an upper bound
// of the arena mxn plans for the same step, the constraint named when nothing fits, and chips
// left out when they would slow the job (with the global batch from which they pay).
#include <gtest/gtest.h>

#include "core/error.h"
#include "graph/program.h"
#include "models/decoder.h"
#include "plan/experts.h"
#include "plan/planner.h"
#include "train/trainer.h"

using namespace mxn;

namespace {

NodeGroup group(const std::string& name, int64_t count, double tflops, double gib,
                double inter_gbs = 10) {
  NodeGroup g;
  g.chip = {name, tflops, gib, 100, "test"};
  g.count = count;
  g.per_node = std::min<int64_t>(8, count);
  g.intra_gbs = 100;
  g.inter_gbs = inter_gbs;
  g.mfu = 1;
  return g;
}

DecoderConfig llama(int64_t layers, int64_t hidden, int64_t vocab, int64_t ctx) {
  DecoderConfig c;
  c.arch = Arch::llama;
  c.layers = layers, c.hidden = hidden, c.heads = 4, c.kv_heads = 2, c.vocab_size = vocab;
  c.max_pos = ctx;
  c.tie_embeddings = false;
  return c;
}

}  // namespace

TEST(Simulate, OneFOneBByHand) {
  // 2 stages, 2 micro-batches, forward 1 s, backward 2 s, sends 0.5 s. Stage 2 runs F0 1.5-2.5,
  // B0 -4.5, F1 -5.5, B1 -7.5; stage 1 runs F0 0-1, F1 1-2, B0 5-7 (its gradient arrives at 5),
  // B1 8-10; then stage 1 reduces from 8 (its last backward's start) for 3 s and steps for 1 s.
  std::vector<StageCost> st(2);
  for (StageCost& s : st) s.fwd_s = 1, s.bwd_s = 2, s.send_s = 0.5, s.reduce_s = 3, s.optim_s = 1;
  const PipelineRun r = simulate_1f1b(st, 2, true);
  EXPECT_DOUBLE_EQ(r.last_backward_s, 10);
  EXPECT_DOUBLE_EQ(r.step_s, 12);  // stage 2: reduce 5.5-8.5, optimizer -9.5
  EXPECT_DOUBLE_EQ(r.busy_s[0], 6);
  EXPECT_DOUBLE_EQ(r.busy_s[1], 6);
  std::vector<std::pair<double, double>> b0;
  for (const Event& e : r.events)
    if (e.stage == 0 && e.kind == EventKind::backward) b0.push_back({e.start, e.end});
  ASSERT_EQ(b0.size(), 2u);
  EXPECT_DOUBLE_EQ(b0[0].first, 5);
  EXPECT_DOUBLE_EQ(b0[1].first, 8);
}

TEST(Simulate, InterleavedChunksReduceFromTheirLastBackward) {
  // Interleaved (2 chunks a stage), each chunk's gradients are final at its last backward, so a
  // stage's reduce starts with its second-to-last backward piece, not its last.
  std::vector<StageCost> st(2);
  for (StageCost& s : st)
    s.last = 2, s.fwd_s = 1, s.bwd_s = 2, s.send_s = 0.5, s.reduce_s = 3, s.optim_s = 1;
  const PipelineRun r = simulate_pipeline(st, 3, 2, true);
  for (int stage = 0; stage < 2; ++stage) {
    std::vector<double> b;
    double reduce = -1;
    for (const Event& e : r.events)
      if (e.stage == stage && e.kind == EventKind::backward)
        b.push_back(e.start);
      else if (e.stage == stage && e.kind == EventKind::reduce)
        reduce = e.start;
    ASSERT_EQ(b.size(), 6u);  // 3 micro-batches x 2 chunks
    EXPECT_DOUBLE_EQ(reduce, b[4]) << "stage " << stage;
  }
}

TEST(Simulate, UniformPipelineIsTheClosedForm) {
  // Without sends, 1F1B over p equal stages takes (m + p - 1) (f + b): the bubble is p - 1 slots.
  for (int64_t p : {1, 2, 3, 5})
    for (int64_t m : {1, 2, 4, 9}) {
      std::vector<StageCost> st(static_cast<size_t>(p));
      for (StageCost& s : st) s.fwd_s = 0.25, s.bwd_s = 0.5;
      const PipelineRun r = simulate_1f1b(st, m);
      EXPECT_DOUBLE_EQ(r.last_backward_s, double(m + p - 1) * 0.75) << p << " stages, " << m;
      EXPECT_DOUBLE_EQ(r.busy_s[size_t(p - 1)], double(m) * 0.75);
    }
}

TEST(LayoutPlan, CostModelCountsEveryParameter) {
  JobSpec job;
  for (DecoderConfig c : {DecoderConfig{}, llama(6, 96, 300, 64)}) {
    const ModelCost m = model_cost(c, job);
    EXPECT_EQ(m.total_params(), double(c.param_count()));
  }
  // A mixture of experts (a dense first layer, a shared expert, a router bias), and DeepSeek's
  // latent attention: every expert's weights count, top_k of them compute.
  DecoderConfig moe = llama(4, 96, 300, 64);
  moe.arch = Arch::glm4_moe, moe.experts = 8, moe.top_k = 2, moe.moe_ffn = 40, moe.shared_ffn = 40;
  moe.router_bias = true, moe.dense_layers = {0};
  DecoderConfig mla = moe;
  mla.arch = Arch::deepseek, mla.kv_lora_rank = 32, mla.qk_nope_dim = 16, mla.qk_rope_dim = 8;
  mla.v_head_dim = 16, mla.q_lora_rank = 24, mla.head_dim = 24;
  for (const DecoderConfig& c : {moe, mla}) {
    const ModelCost m = model_cost(c, job);
    EXPECT_NEAR(m.total_params(), double(c.param_count()), 1e-9 * double(c.param_count()));
  }
  const ModelCost dense = model_cost(llama(4, 96, 300, 64), job), sparse = model_cost(moe, job);
  // Per token, 3 of 4 layers run 2 experts and the shared one of width 40 plus the router,
  // instead of the dense SwiGLU of width 256 (LLaMA's rounding of 8/3 x 96).
  const double C = 96, mlp = 3 * C * 256, active = 3 * 3 * C * 40 + 8 * C;
  EXPECT_NEAR(sparse.layer_flops - dense.layer_flops, 2 * 3 * (active - mlp) / 4, 1e-6);
  job.dtype = "fp8";
  EXPECT_THROW(model_cost(DecoderConfig{}, job), Error);
}

TEST(LayoutPlan, MemoryIsAnUpperBoundOfTheArena) {
  // One chip, one stage: the prediction covers the arena mxn plans for the same rows plus the
  // 16 bytes a trained weight takes (weight, gradient, two moments).
  for (DecoderConfig c : {DecoderConfig{}, llama(3, 64, 200, 32)})
    for (int64_t rows : {1, 4, 16}) {
      JobSpec job;
      job.global_batch = rows;
      job.seq = c.max_pos;
      Cluster cl;
      cl.groups = {group("chip", 1, 1, 64)};
      PlanOptions opt;
      opt.micro_batch = rows;
      const PlanReport rep = plan_layouts(cl, model_cost(c, job), job, opt);
      Graph g;
      DecoderOptions o;
      o.with_loss = true;
      DecoderGraph dg = build_decoder(g, c, rows, job.seq, o);
      append_backward(g, dg.loss);
      const double real = double(plan_arena(g)) + 16.0 * double(c.param_count());
      EXPECT_GE(rep.best[0].peak_bytes[0], real) << arch_name(c.arch) << " rows " << rows;
      EXPECT_LE(rep.best[0].peak_bytes[0], 2.5 * real) << arch_name(c.arch) << " rows " << rows;
    }
}

TEST(LayoutPlan, UnevenChipsGetUnevenStages) {
  // One chip three times as fast as the other: a mixed pipeline gives it about three quarters
  // of the layers (less the LM head's share when it holds the last stage).
  Cluster cl;
  cl.groups = {group("fast", 1, 0.3, 64), group("slow", 1, 0.1, 32)};
  JobSpec job;
  job.global_batch = 8;
  job.seq = 128;
  PlanOptions opt;
  opt.top = 100;
  const PlanReport rep = plan_layouts(cl, model_cost(llama(16, 512, 512, 128), job), job, opt);
  bool seen = false;
  for (const LayoutPlan& p : rep.best) {
    if (p.family != "mixed") continue;
    seen = true;
    const std::vector<StageCost>& st = p.kinds[0].stages;
    ASSERT_EQ(st.size(), 2u);
    EXPECT_EQ(st[0].group, 0);  // the larger memory takes the first stage
    EXPECT_EQ(st[0].last - st[0].first, 12);
    EXPECT_EQ(st[1].last, 16);
    EXPECT_NEAR(st[0].fwd_s / st[1].fwd_s, 1.0, 0.35);
  }
  EXPECT_TRUE(seen);
}

TEST(LayoutPlan, NothingFitsNamesTheConstraint) {
  Cluster cl;
  cl.groups = {group("small", 2, 100, 1)};
  JobSpec job;
  job.global_batch = 8;
  job.seq = 4096;
  DecoderConfig c = llama(2, 4096, 64000, 4096);
  c.heads = 32, c.kv_heads = 8;
  try {
    plan_layouts(cl, model_cost(c, job), job);
    FAIL() << "a 1 GiB chip cannot hold a 4096-wide layer";
  } catch (const Error& e) {
    const std::string w = e.what();
    EXPECT_NE(w.find("no layout fits: small: layer 0 with the embeddings needs "),
              std::string::npos)
        << w;
    EXPECT_NE(w.find("at micro-batch 1 with recomputation as stage 1 of 2; small holds 0.9 GiB "
                     "(90% of its 1 GiB)"),
              std::string::npos)
        << w;
  }
}

TEST(LayoutPlan, AChipOnSharedCoresIsLeftOut) {
  // PoCL computes on the CPU's own cores: with both in use each runs at half speed, so the
  // CPU alone is faster at every batch.
  Cluster cl;
  cl.groups = {group("cpu:0", 1, 0.32, 23.5), group("opencl:0", 1, 0.02, 21.5)};
  cl.groups[1].shares_cores_with = 0;
  JobSpec job;
  const PlanReport rep = plan_layouts(cl, model_cost(DecoderConfig{}, job), job);
  EXPECT_EQ(rep.best[0].chips_used[0], 1);
  EXPECT_EQ(rep.best[0].chips_used[1], 0);
  ASSERT_EQ(rep.left_out.size(), 1u);
  EXPECT_EQ(rep.left_out[0].group, 1);
  EXPECT_EQ(rep.left_out[0].helps_from_batch, 0);
  EXPECT_GT(rep.left_out[0].step_with_s, 1.5 * rep.best[0].step_s);
  EXPECT_NE(rep.left_out[0].why.find("would not help at any global batch up to 16384"),
            std::string::npos)
      << rep.left_out[0].why;
}

TEST(LayoutPlan, ASlowChipHelpsFromTheBatchItNames) {
  // A chip a tenth as fast behind a slow link costs more in the all-reduce than it computes at
  // a small batch; the planner names the smallest global batch from which it pays, and there
  // it is used.
  Cluster cl;
  cl.groups = {group("fast", 1, 1, 32, 0.5), group("slow", 1, 0.1, 32, 0.5)};
  JobSpec job;
  job.global_batch = 4;
  job.seq = 64;
  const ModelCost m = model_cost(llama(4, 128, 256, 64), job);
  PlanOptions opt;
  opt.micro_batch = 1;
  const PlanReport rep = plan_layouts(cl, m, job, opt);
  ASSERT_EQ(rep.left_out.size(), 1u);
  const int64_t from = rep.left_out[0].helps_from_batch;
  ASSERT_GT(from, 4);
  job.global_batch = from;
  EXPECT_EQ(plan_layouts(cl, m, job, opt).best[0].chips_used[1], 1) << from;
  job.global_batch = from - 1;
  EXPECT_EQ(plan_layouts(cl, m, job, opt).best[0].chips_used[1], 0) << from - 1;
}

TEST(LayoutPlan, AGivenLayoutKeepsItsStagesAndSharesCores) {
  // Two pipeline stages on one CPU: each rank shares its cores with the other while that one
  // is busy, so each stage's forward takes up to twice what its layers take on the whole chip.
  Cluster cl;
  cl.groups = {group("cpu", 1, 1, 32)};
  cl.groups[0].measured = true;  // its rate covers every op: no separate memory-bound time
  JobSpec job;
  job.global_batch = 8;
  job.seq = 64;
  job.recompute_all = true;
  const ModelCost m = model_cost(llama(4, 256, 256, 64), job);
  const LayoutPlan two = price_layout(cl, m, job, {{{0, 3}, {0, 1}}}, 2);
  ASSERT_EQ(two.kinds.size(), 1u);
  const std::vector<StageCost>& st = two.kinds[0].stages;
  ASSERT_EQ(st.size(), 2u);
  EXPECT_EQ(st[0].last, 3);
  EXPECT_EQ(st[1].first, 3);
  EXPECT_TRUE(st[0].recompute && st[1].recompute);
  // 2 sequences of 64 tokens through 3 layers at 1 TFLOPS shared with the other rank for the
  // share of the step it is busy (the cores it leaves idle are this one's; ranks of one type are
  // counted at their mean busy share), plus 20 us a layer a pass: between the whole chip's time
  // and half of it.
  const double alone = 2.0 * 64 * 3 * m.layer_flops / 1e12;
  const PipelineRun run = simulate_pipeline(st, two.kinds[0].micro[0], 1);
  const double shared = 1 + (run.busy_s[0] + run.busy_s[1]) / 2 / two.step_s;
  EXPECT_GT(shared, 1.05);
  EXPECT_LT(shared, 1.95);
  EXPECT_NEAR(st[0].fwd_s, alone * shared + 3 * 20e-6, 0.02 * st[0].fwd_s);
  EXPECT_EQ(two.kinds[0].micro, std::vector<int64_t>{4});  // 8 sequences in micro-batches of 2
  try {
    price_layout(cl, m, job, {{{0, 3}, {0, 3}}}, 2);
    FAIL() << "6 layers of a 4-layer model";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "layout: a replica's stages hold 6 layers; the model has 4");
  }
}

TEST(LayoutPlan, StageMemoryIsAnUpperBoundOfTheStageArena) {
  // Each stage of a 3+1 pipeline as mxn train --pp runs it (every stage recomputed): the
  // prediction covers the arena planned for that stage's graph plus 16 bytes a weight.
  TrainConfig cfg;
  cfg.dtype = "f32";
  cfg.model.n_layer = 4, cfg.model.n_embd = 64, cfg.model.n_ctx = 32;
  const DecoderConfig d = cfg.decoder_config();
  JobSpec job;
  job.global_batch = 16;
  job.seq = 32;
  job.recompute_all = true;
  Cluster cl;
  cl.groups = {group("chip", 2, 1, 64)};
  for (int64_t micro : {1, 4}) {
    const LayoutPlan p = price_layout(cl, model_cost(d, job), job, {{{0, 3}, {0, 1}}}, micro);
    const std::vector<StageCost>& st = p.kinds[0].stages;
    for (size_t s = 0; s < st.size(); ++s) {
      DecoderGraph m;
      size_t nf = 0;
      Graph g = train_graph(cfg, micro, &m, &nf, st[s].first, st[s].last);
      double real = double(plan_arena(g));
      for (int w : g.params()) real += 16.0 * double(numel(g.v(w).shape));
      EXPECT_GE(st[s].mem_bytes, real) << "stage " << s << ", micro-batch " << micro;
      EXPECT_LE(st[s].mem_bytes, 4 * real) << "stage " << s << ", micro-batch " << micro;
    }
  }
}

// Expert parallelism on paper: experts and tokens in proportion to speed, rounded by hand.
TEST(ExpertParallel, PlacesExpertsBySpeedAndRefusesWhatDoesNotDivide) {
  Cluster cl;
  NodeGroup fast, slow;
  fast.chip = {"fast", 300, 80, 2000, ""}, fast.count = 3, fast.per_node = 4;
  slow.chip = {"slow", 100, 80, 2000, ""}, slow.count = 1, slow.per_node = 4;
  fast.intra_gbs = slow.intra_gbs = 100, fast.inter_gbs = slow.inter_gbs = 10;
  cl.groups = {fast, slow};
  DecoderConfig c = llama(4, 96, 300, 64);
  c.arch = Arch::qwen3_moe, c.experts = 8, c.top_k = 2, c.moe_ffn = 40;
  JobSpec job;
  const EpEstimate e = price_expert_parallel(cl, c, job, 4);
  ASSERT_EQ(e.groups, 1);
  // Speeds 3:1, a group of 3 fast and 1 slow: 8 experts x 3/10 = 2.4 for a fast chip, 0.8 for the
  // slow one, placed as the runtime places them (place_experts): 3, 2, 2 and 1, each chip's
  // experts done in the same time (3/3 = 1/1).
  EXPECT_EQ(e.shares[0].experts_each, 2);
  EXPECT_EQ(e.shares[0].experts_extra, 1);
  EXPECT_EQ(e.shares[1].experts_each, 1);
  EXPECT_EQ(e.shares[1].experts_extra, 0);
  EXPECT_DOUBLE_EQ(e.shares[0].tokens_share, 0.3);
  EXPECT_DOUBLE_EQ(e.shares[1].tokens_share, 0.1);
  EXPECT_GT(e.a2a_s, 0);
  EXPECT_NEAR(e.step_s, e.compute_s + e.a2a_s + e.reduce_s, 1e-12);
  // Two pipeline stages of 2 chips, EP groups of 2 in each: a chip's compute and all-to-all as
  // without stages, half the weights (the state shards over fewer replicas), and the 1F1B bubble
  // over 16 / 2 / 2 = 4
  // micro-batches of 2 sequences.
  job.global_batch = 16;
  const EpEstimate one = price_expert_parallel(cl, c, job, 4);
  cl.groups[0].count = 2, cl.groups[1].count = 2;  // (each stage's group takes one of a type)
  const EpEstimate flat = price_expert_parallel(cl, c, job, 2);
  const EpEstimate two = price_expert_parallel(cl, c, job, 2, 2, 2);
  EXPECT_EQ(two.groups, 1);
  EXPECT_EQ(two.micro_batches, 4);
  EXPECT_NEAR(two.compute_s, flat.compute_s, 1e-12 * flat.compute_s);
  EXPECT_NEAR(two.bubble_s, (two.compute_s + two.a2a_s) / 4, 1e-12);
  EXPECT_GT(two.p2p_s, 0);
  EXPECT_LT(two.shares[0].mem_gib, 0.7 * flat.shares[0].mem_gib);
  EXPECT_NEAR(two.step_s, two.compute_s + two.a2a_s + two.bubble_s + two.p2p_s + two.reduce_s,
              1e-12);
  EXPECT_THROW(price_expert_parallel(cl, c, job, 2, 3), Error);  // 4 chips in 3 stages
  EXPECT_GT(one.step_s, 0);
  cl.groups[0].count = 3, cl.groups[1].count = 1;
  EXPECT_THROW(price_expert_parallel(cl, c, job, 3), Error);  // 4 chips in groups of 3
  EXPECT_THROW(price_expert_parallel(cl, llama(4, 96, 300, 64), job, 4), Error);  // no experts
}
