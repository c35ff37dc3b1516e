// Uneven data parallelism without ranks: the split arithmetic, and Program variants (a smaller
// share of the batch run in the full-size Program's memory) against a Program built for it.
#include <gtest/gtest.h>

#include <cstdlib>

#include "backend/device.h"
#include "core/error.h"
#include "graph/program.h"
#include "models/decoder.h"
#include "parallel/balance.h"
#include "parallel/comm.h"
#include "train/expert_exchange.h"
#include "train/strategy.h"
#include "train/tensor_group.h"

namespace mxn {
namespace {

TEST(Balance, SplitFollowsSpeed) {
  // Equal costs give the even split, extra rows to the lowest ranks.
  EXPECT_EQ(split_rows(7, {1, 1}), (std::vector<int64_t>{4, 3}));
  EXPECT_EQ(split_rows(10, {1, 1, 1, 1}), (std::vector<int64_t>{3, 3, 2, 2}));
  // A device 3x slower per row takes a quarter; integer effects minimise the slowest rank.
  EXPECT_EQ(split_rows(8, {1.0 / 3, 1.0}), (std::vector<int64_t>{6, 2}));
  EXPECT_EQ(split_rows(16, {1.0, 7.0}), (std::vector<int64_t>{14, 2}));
  // Every rank keeps at least one row, however slow.
  EXPECT_EQ(split_rows(3, {1, 1000, 1000}), (std::vector<int64_t>{1, 1, 1}));
  EXPECT_DOUBLE_EQ(slowest_seconds({6, 2}, {0.5, 1.0}), 3.0);
  EXPECT_THROW(split_rows(1, {1, 1}), Error);
}

TEST(Balance, ParseSplit) {
  EXPECT_TRUE(parse_split("auto", 3).empty());
  EXPECT_EQ(parse_split("even", 2), (std::vector<double>{1, 1}));
  EXPECT_EQ(parse_split("4,1", 2), (std::vector<double>{0.25, 1}));
  for (const char* bad : {"4,x", "4,,1", "4,0", "-1,1", "1e99,1", ""}) {
    try {
      parse_split(bad, 2);
      ADD_FAILURE() << bad;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("positive number"), std::string::npos) << e.what();
    }
  }
  try {
    parse_split("1,2,3", 2);
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("gives 3 weights but the job has 2 ranks"),
              std::string::npos);
  }
}

TEST(ExpertPlacement, WholeExpertsByChipSpeed) {
  using V = std::vector<int64_t>;
  EXPECT_EQ(place_experts(6, {2, 1}, false), (V{4, 2}));        // 2:1 speed
  EXPECT_EQ(place_experts(8, {1, 1, 1}, false), (V{3, 3, 2}));  // ties: the lower ranks first
  EXPECT_EQ(place_experts(8, {1, 0, 1}, false), (V{4, 0, 4}));  // weight 0: none there
  // A chip 26x slower: with at least one each it takes 1 of 16 and is the slowest rank (1/(1/26)
  // = 26 units against 15); left without experts the step is 16 units on the fast one.
  EXPECT_EQ(place_experts(16, {1, 1.0 / 26}, false), (V{15, 1}));
  EXPECT_EQ(place_experts(16, {1, 1.0 / 26}, true), (V{16, 0}));
  // ... but one 3x slower keeps its share: 12 + 4 (12 units each) beats 16 + 0.
  EXPECT_EQ(place_experts(16, {1, 1.0 / 3}, true), (V{12, 4}));
  EXPECT_TRUE(expert_weights("auto", 2).empty());
  EXPECT_EQ(expert_weights("3,0", 2), (std::vector<double>{3, 0}));
  EXPECT_THROW(expert_weights("0,0", 2), Error);
  EXPECT_THROW(expert_weights("1,2,3", 2), Error);
  EXPECT_THROW(expert_weights("1,-1", 2), Error);
}

// Expert parallelism's messages, delivered in-process as NCCL's grouped send/receive would (each
// rank pair's messages matched in the order both list them): every row lands at its expert's rank
// expert-major and, within an expert, by sender (one chip's order), and the swapped messages bring
// each result back to the row it left. Uneven placement (an empty rank included), empty experts.
TEST(ExpertExchange, MessagesPlaceRowsAsOneChipWould) {
  const int64_t E = 7;
  for (const std::vector<int64_t>& bounds :
       {std::vector<int64_t>{0, 4, 7}, {0, 1, 1, 7}, {0, 2, 4, 6, 7}}) {
    const int64_t ep = int64_t(bounds.size()) - 1;
    std::vector<int64_t> counts(size_t(ep * E));
    for (size_t i = 0; i < counts.size(); ++i) counts[i] = int64_t((i * 7 + 3) % 5);  // 0 to 4
    counts[size_t(E - 1)] = 0;  // rank 0 routes nothing to the last expert
    // A row is (sender, expert, index within the sender's rows for that expert).
    using Row = std::array<int64_t, 3>;
    std::vector<std::vector<Row>> xp(static_cast<size_t>(ep)), xr(xp.size()), back(xp.size());
    std::vector<std::vector<RowMessage>> m(xp.size());
    for (int64_t r = 0; r < ep; ++r) {
      for (int64_t e = 0; e < E; ++e)
        for (int64_t i = 0; i < counts[size_t(r * E + e)]; ++i) xp[size_t(r)].push_back({r, e, i});
      expert_messages(counts.data(), bounds, r, m[size_t(r)]);
      int64_t rows = 0;
      for (int64_t e = bounds[size_t(r)]; e < bounds[size_t(r + 1)]; ++e)
        for (int64_t p = 0; p < ep; ++p) rows += counts[size_t(p * E + e)];
      xr[size_t(r)].assign(size_t(rows), Row{-1, -1, -1});
      back[size_t(r)].assign(xp[size_t(r)].size(), Row{-1, -1, -1});
    }
    // Deliver: for each (from, to) pair, from's sends to `to` meet to's receives from `from`.
    auto deliver = [&](bool swapped, const std::vector<std::vector<Row>>& src,
                       std::vector<std::vector<Row>>& dst) {
      for (int64_t a = 0; a < ep; ++a)
        for (int64_t b = 0; b < ep; ++b) {
          std::vector<RowMessage> sends, recvs;
          for (const RowMessage& x : m[size_t(a)])
            if (x.peer == b && x.receive == swapped) sends.push_back(x);
          for (const RowMessage& x : m[size_t(b)])
            if (x.peer == a && x.receive != swapped) recvs.push_back(x);
          ASSERT_EQ(sends.size(), recvs.size());
          for (size_t k = 0; k < sends.size(); ++k) {
            ASSERT_EQ(sends[k].rows, recvs[k].rows);
            for (int64_t i = 0; i < sends[k].rows; ++i)
              dst[size_t(b)].at(size_t(recvs[k].row + i)) =
                  src[size_t(a)].at(size_t(sends[k].row + i));
          }
        }
    };
    deliver(false, xp, xr);
    for (int64_t r = 0; r < ep; ++r) {
      std::vector<Row> want;  // one chip's order: by expert, then sender, then index
      for (int64_t e = bounds[size_t(r)]; e < bounds[size_t(r + 1)]; ++e)
        for (int64_t p = 0; p < ep; ++p)
          for (int64_t i = 0; i < counts[size_t(p * E + e)]; ++i) want.push_back({p, e, i});
      EXPECT_EQ(xr[size_t(r)], want) << "rank " << r << " of " << ep;
    }
    deliver(true, xr, back);
    for (int64_t r = 0; r < ep; ++r) EXPECT_EQ(back[size_t(r)], xp[size_t(r)]);
  }
}

TEST(Balance, RebalanceOnlyForARealGain) {
  // Rank 1 became 3x slower: moving rows shortens the step from 4*3=12 to max(6, 2*3)=6.
  EXPECT_EQ(rebalance({4, 4}, {1, 3}, 0.03), (std::vector<int64_t>{6, 2}));
  // A 2% difference is noise: keep the split.
  EXPECT_EQ(rebalance({4, 4}, {1, 1.02}, 0.03), (std::vector<int64_t>{4, 4}));
}

TEST(ProgramVariant, SmallerShareEqualsItsOwnProgram) {
  // A LLaMA-shaped Program (GQA) built for 4 rows, run as a 3-row variant, gives the loss and
  // gradients of a Program built for 3 rows (same weights, same tokens), to the last bit.
  DecoderConfig c;
  c.arch = Arch::llama;
  c.layers = 1, c.heads = 2, c.kv_heads = 1, c.hidden = 16, c.max_pos = 8, c.vocab_size = 32;
  const int64_t T = 8;
  auto dev = open_device("cpu", 1);
  auto build = [&](int64_t B, DecoderGraph* m) {
    Graph g;
    DecoderOptions o;
    o.with_loss = true;
    *m = build_decoder(g, c, B, T, o);
    append_backward(g, m->loss);
    return g;
  };
  DecoderGraph m4, m3;
  Program big(build(4, &m4), *dev), small(build(3, &m3), *dev);
  const int v = big.add_variant(build(3, &m3));
  std::vector<int32_t> tok(4 * T), pos(4 * T);
  for (size_t i = 0; i < tok.size(); ++i) {
    tok[i] = int32_t((i * 7 + 3) % 32);
    pos[i] = int32_t(i % size_t(T));
  }
  for (Program* p : {&big, &small}) {
    const int var = p == &big ? v : 0;
    for (int id : p->graph().params()) {
      std::vector<float> w(size_t(numel(p->graph().v(id).shape)));
      for (size_t i = 0; i < w.size(); ++i)
        w[i] = float((i * 37 + size_t(id)) % 101) / 500.f - 0.1f;
      dev->upload(p->tensor(id), w.data());
    }
    dev->upload(p->tensor(m3.tokens, var), tok.data());
    dev->upload(p->tensor(m3.targets, var), tok.data() + 1);
    dev->upload(p->tensor(m3.positions, var), pos.data());
    dev->run(make_op_call(MXN_OP_FILL, {}, {p->grads_all()}, ScalarParams{0.f}));
    p->run(0, p->graph().nodes.size(), var);
  }
  float l_big = 0, l_small = 0;
  dev->download(&l_big, big.tensor(m3.loss, v));
  dev->download(&l_small, small.tensor(m3.loss));
  EXPECT_EQ(l_big, l_small);
  std::vector<float> g_big(size_t(big.param_count())), g_small(g_big.size());
  dev->download(g_big.data(), big.grads_all());
  dev->download(g_small.data(), small.grads_all());
  EXPECT_EQ(g_big, g_small);
  EXPECT_GT(l_big, 0.f);
}

TEST(Ranks, IdentityFromEachLauncher) {
  // What OpenMPI, Slurm and torchrun-style launchers set; OpenMPI first, then Slurm, then RANK.
  struct Case {
    std::vector<std::pair<const char*, const char*>> env;
    int rank, world, local;
    const char* launcher;
  };
  const std::vector<Case> cases = {
      {{}, 0, 1, 0, "none"},
      {{{"WORLD_SIZE", "4"}, {"RANK", "3"}, {"LOCAL_RANK", "1"}}, 3, 4, 1, "env"},
      {{{"WORLD_SIZE", "4"}, {"SLURM_NTASKS", "8"}, {"SLURM_PROCID", "5"}, {"SLURM_LOCALID", "2"}},
       5,
       8,
       2,
       "slurm"},
      {{{"SLURM_NTASKS", "8"},
        {"OMPI_COMM_WORLD_SIZE", "2"},
        {"OMPI_COMM_WORLD_RANK", "1"},
        {"OMPI_COMM_WORLD_LOCAL_RANK", "1"}},
       1,
       2,
       1,
       "openmpi"},
  };
  const char* vars[] = {"OMPI_COMM_WORLD_SIZE",
                        "OMPI_COMM_WORLD_RANK",
                        "OMPI_COMM_WORLD_LOCAL_RANK",
                        "SLURM_NTASKS",
                        "SLURM_PROCID",
                        "SLURM_LOCALID",
                        "WORLD_SIZE",
                        "RANK",
                        "LOCAL_RANK"};
  auto set = [&](const Case& c) {
    for (const char* v : vars) unsetenv(v);
    for (auto [k, v] : c.env) setenv(k, v, 1);
  };
  for (const Case& c : cases) {
    set(c);
    const RankInfo r = rank_from_env();
    EXPECT_EQ(r.rank, c.rank) << c.launcher;
    EXPECT_EQ(r.world, c.world) << c.launcher;
    EXPECT_EQ(r.local_rank, c.local) << c.launcher;
    EXPECT_EQ(r.launcher, c.launcher);
  }
  set({{{"WORLD_SIZE", "4"}, {"RANK", "9"}}, 0, 0, 0, ""});  // outside the world: an error
  try {
    rank_from_env();
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("rank 9 of world size 4"), std::string::npos) << e.what();
  }
  set({{}, 0, 0, 0, ""});
}

}  // namespace
}  // namespace mxn

namespace mxn {
namespace {

// Tensor parallelism's shares: whole kv heads with their query heads, MLP column blocks and
// vocabulary rows in proportion to speed, and every weight's pieces covering the whole tensor
// exactly once.
TEST(TensorParallel, SharesCoverEveryWeightOnce) {
  for (Arch arch : {Arch::gpt2, Arch::llama, Arch::chatglm, Arch::glm}) {
    DecoderConfig c;
    c.arch = arch;
    c.hidden = 96, c.heads = 8, c.kv_heads = arch == Arch::gpt2 ? 0 : 4, c.layers = 1;
    c.qkv_bias = c.mlp_bias = true;
    const std::vector<TensorShard> s = tensor_shards(c, {3.0, 1.0});
    ASSERT_EQ(s.size(), 2u);
    EXPECT_EQ(s[0].kv + s[1].kv, c.n_kv_heads());
    EXPECT_EQ(s[0].kv, 3 * s[1].kv);  // 3 : 1 by speed
    EXPECT_EQ(s[0].heads, s[0].kv * (c.heads / c.n_kv_heads()));
    EXPECT_EQ(s[0].ffn + s[1].ffn, c.ffn_width());
    EXPECT_EQ(s[1].ffn0, s[0].ffn);
    Graph g;
    build_decoder(g, c, 1, 4);
    int split = 0;
    for (int w : g.params()) {
      const Value& v = g.v(w);
      std::vector<float> whole(size_t(numel(v.shape))), back(whole.size(), -1.f);
      for (size_t i = 0; i < whole.size(); ++i) whole[i] = float(i);
      const ShardPieces p0 = shard_pieces(v.name, c, s[0]), p1 = shard_pieces(v.name, c, s[1]);
      ASSERT_EQ(p0.pieces.empty(), p1.pieces.empty()) << v.name;
      if (p0.pieces.empty()) continue;
      ++split;
      std::vector<float> share(whole.size());
      for (const ShardPieces* p : {&p0, &p1}) {  // each rank's share out and back
        move_pieces(*p, v.shape, whole.data(), share.data(), true);
        move_pieces(*p, v.shape, back.data(), share.data(), false);
      }
      EXPECT_EQ(back, whole) << v.name;
    }
    EXPECT_EQ(s[0].vocab + s[1].vocab, c.vocab_size);  // vocabulary rows by speed as well
    EXPECT_EQ(s[1].vocab0, s[0].vocab);
    EXPECT_NEAR(double(s[0].vocab) / double(c.vocab_size), 0.75, 0.01);
    // weights and biases of q, k, v (or qkv), gate and up (or fc, gate_up); o's and down's
    // weights; the token embeddings and (untied) the head
    const int want = (c.fused_qkv() ? 2 : 6) + 1 + (c.swiglu() && !c.fused_gate_up() ? 4 : 2) + 1 +
                     (c.tie_embeddings ? 1 : 2);
    EXPECT_EQ(split, want) << arch_name(arch);
  }
}

}  // namespace
}  // namespace mxn
