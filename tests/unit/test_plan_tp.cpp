// The planner's third dimension: tensor-parallel groups inside a node holding what one chip
// cannot, the interleaved schedule's bubble, and a published table the cost model must
// reproduce at a scale nobody runs here (Megatron-LM's SC21 Table 1, within 15% a row); and the
// cluster file mxn plan --save-cluster writes, read back the same.
#include <gtest/gtest.h>

#include <cstdio>

#include "core/error.h"
#include "models/decoder.h"
#include "plan/planner.h"

using namespace mxn;

namespace {

NodeGroup a100(int64_t count, double mfu) {
  NodeGroup g;
  g.chip = *find_chip("A100-SXM-80GB");
  g.count = count;
  g.per_node = std::min<int64_t>(8, count);
  g.intra_gbs = 300;  // NVLink 3: 600 GB/s both ways
  g.inter_gbs = 25;   // 8 HDR InfiniBand NICs a node of 8
  g.mfu = mfu;
  return g;
}

DecoderConfig gpt(int64_t layers, int64_t hidden, int64_t heads) {
  DecoderConfig c;
  c.arch = Arch::gpt2;
  c.layers = layers, c.hidden = hidden, c.heads = heads, c.kv_heads = heads;
  c.vocab_size = 51200, c.max_pos = 2048;
  return c;
}

}  // namespace

TEST(Simulate, InterleavingDividesTheBubble) {
  // p equal stages of 4 layers, m micro-batches: 1F1B takes (m + p - 1)(f + b); with v chunks a
  // stage the bubble is (p - 1)(f + b) / v.
  for (int64_t v : {1, 2, 4}) {
    std::vector<StageCost> st(4);
    for (size_t s = 0; s < st.size(); ++s)
      st[s].first = 4 * int64_t(s), st[s].last = 4 * int64_t(s) + 4, st[s].fwd_s = 1,
      st[s].bwd_s = 2;
    const PipelineRun r = simulate_pipeline(st, 8, v);
    EXPECT_DOUBLE_EQ(r.last_backward_s, 8 * 3.0 + 3 * 3.0 / double(v)) << v << " chunks";
  }
}

TEST(LayoutPlan, TensorParallelHoldsWhatOneChipCannot) {
  // A 2-layer model of width 4096 on 4 GiB chips: no stage of one chip holds a layer and the
  // embeddings; split four ways inside a node it fits, each chip holding a quarter of them.
  DecoderConfig c = gpt(2, 4096, 32);
  c.vocab_size = 128000;
  JobSpec job;
  job.global_batch = 8, job.seq = 2048, job.dtype = "bf16";
  const ModelCost m = model_cost(c, job);
  Cluster cl;
  cl.groups = {a100(8, 0.5)};
  cl.groups[0].chip.memory_gib = 4;
  const PlanReport rep = plan_layouts(cl, m, job);
  const StageCost& st = rep.best[0].kinds[0].stages[0];
  EXPECT_GE(st.tp, 2);
  EXPECT_LE(st.tp, 8);
  double held = 0;
  for (const StageCost& s : rep.best[0].kinds[0].stages) held += s.params * double(s.tp);
  EXPECT_NEAR(held, m.total_params(), 1e-6 * m.total_params());
  EXPECT_LE(rep.best[0].peak_bytes[0], 0.9 * 4 * double(1ull << 30));
  EXPECT_GT(st.tp_s, 0);
  // One chip a node: no group is searched across the slow link, and the error says why.
  cl.groups[0].per_node = 1;
  try {
    plan_layouts(cl, m, job);
    FAIL() << "a 4 GiB chip cannot hold the embeddings and a layer alone";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("with the embeddings needs"), std::string::npos)
        << e.what();
  }
}

TEST(LayoutPlan, MegatronTable1WithinFifteenPercent) {
  // Narayanan et al., SC21, Table 1: GPT models on A100s with their TP, PP, GPU counts and
  // batches, and the teraFLOP/s a GPU achieved (the paper's count: 96 B s l h^2 (1 + s / 6h +
  // V / 16lh) a step). Priced as bench/megatron_table.sh does: bf16, no ZeRO, full
  // recomputation, unfused attention, even stages, a GEMM at 62% of the peak.
  struct Row {
    int64_t heads, hidden, layers, tp, pp, gpus, batch;
    double tflops;
  };
  const Row rows[] = {
      {24, 2304, 24, 1, 1, 32, 512, 137},        {32, 3072, 30, 2, 1, 64, 512, 138},
      {32, 4096, 36, 4, 1, 128, 512, 142},       {48, 6144, 40, 8, 1, 256, 1024, 135},
      {64, 8192, 48, 8, 2, 512, 1536, 138},      {80, 10240, 60, 8, 4, 1024, 1792, 140},
      {96, 12288, 80, 8, 8, 1536, 2304, 148},    {128, 16384, 96, 8, 16, 1920, 2160, 155},
      {128, 20480, 105, 8, 35, 2520, 2520, 163}, {160, 25600, 128, 8, 64, 3072, 3072, 163}};
  for (const Row& r : rows) {
    JobSpec job;
    job.global_batch = r.batch, job.seq = 2048, job.dtype = "bf16", job.zero1 = false;
    job.recompute_full = true, job.flash_attention = false;
    Cluster cl;
    cl.groups = {a100(r.gpus, 0.62)};
    PlanOptions opt;
    opt.tp = r.tp, opt.pp = r.pp, opt.even_stages = true, opt.top = 1;
    const PlanReport rep =
        plan_layouts(cl, model_cost(gpt(r.layers, r.hidden, r.heads), job), job, opt);
    const LayoutPlan& p = rep.best[0];
    ASSERT_EQ(p.kinds.size(), 1u);
    EXPECT_EQ(p.kinds[0].stages[0].tp, r.tp);
    EXPECT_EQ(int64_t(p.kinds[0].stages.size()), r.pp);
    const double h = double(r.hidden), l = double(r.layers), s = 2048, V = 51200;
    const double flops =
        96 * double(r.batch) * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h));
    const double predicted = flops / p.step_s / double(r.gpus) / 1e12;
    EXPECT_NEAR(predicted / r.tflops, 1.0, 0.15) << r.layers << " layers of " << r.hidden;
  }
}

TEST(Cluster, WrittenFileReadsBackTheSame) {
  // mxn plan --save-cluster: every figure written, read back equal (a chip of the table and one
  // of its own, a price, a measured rate, a measured link, shared cores, a quote in a source).
  Cluster c;
  c.groups = {a100(16, 0.55), a100(1, 1)};
  c.groups[0].price_per_hour = 1.3;
  c.groups[1].chip = {"opencl:0", 0.083, 21.5, 50, "measured \"here\": 0.9 s"};
  c.groups[1].measured = true;
  c.groups[1].latency_us = 0.46;
  c.groups[1].intra_gbs = c.groups[1].inter_gbs = 3.3;
  c.groups[1].shares_cores_with = 0;
  const std::string path = ::testing::TempDir() + "/cluster_round_trip.toml";
  {
    FILE* f = std::fopen(path.c_str(), "w");
    ASSERT_NE(f, nullptr);
    const std::string text = cluster_toml(c);
    std::fwrite(text.data(), 1, text.size(), f);
    std::fclose(f);
  }
  const Cluster back = load_cluster(path);
  ASSERT_EQ(back.groups.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    const NodeGroup &a = c.groups[i], &b = back.groups[i];
    EXPECT_EQ(a.chip.name, b.chip.name);
    EXPECT_EQ(a.count, b.count);
    EXPECT_EQ(a.per_node, b.per_node);
    EXPECT_NEAR(a.chip.bf16_tflops, b.chip.bf16_tflops, 1e-5 * a.chip.bf16_tflops);
    EXPECT_NEAR(a.chip.f32_tflops, b.chip.f32_tflops, 1e-5 * a.chip.f32_tflops);
    EXPECT_NEAR(a.chip.memory_gib, b.chip.memory_gib, 1e-5 * a.chip.memory_gib);
    EXPECT_NEAR(a.chip.hbm_gbs, b.chip.hbm_gbs, 1e-5 * a.chip.hbm_gbs);
    EXPECT_NEAR(a.mfu, b.mfu, 1e-5);
    EXPECT_EQ(a.measured, b.measured);
    EXPECT_NEAR(a.intra_gbs, b.intra_gbs, 1e-5 * a.intra_gbs);
    EXPECT_NEAR(a.inter_gbs, b.inter_gbs, 1e-5 * a.inter_gbs);
    EXPECT_NEAR(a.latency_us, b.latency_us, 1e-5 * a.latency_us);
    EXPECT_NEAR(a.price_per_hour, b.price_per_hour, 1e-6);
    EXPECT_EQ(a.shares_cores_with, b.shares_cores_with);
  }
  EXPECT_EQ(back.groups[1].chip.source, "measured \"here\": 0.9 s");
  std::remove(path.c_str());
  // Priced in f32, a chip's GEMMs run at its f32 peak (the A100's 19.5 TFLOPS, the share of it
  // reached kept); a chip with no f32 figure keeps its bf16 rate and is named.
  std::string unknown;
  const Cluster f32 = at_dtype(c, "f32", &unknown);
  EXPECT_DOUBLE_EQ(f32.groups[0].chip.bf16_tflops, 19.5);
  EXPECT_DOUBLE_EQ(f32.groups[0].mfu, c.groups[0].mfu);
  EXPECT_DOUBLE_EQ(f32.groups[1].chip.bf16_tflops, c.groups[1].chip.bf16_tflops);
  EXPECT_EQ(unknown, "opencl:0");
  EXPECT_DOUBLE_EQ(at_dtype(c, "bf16").groups[0].chip.bf16_tflops, 312);
}
