// The mixture-of-experts ops' backwards against finite differences (grad_check.h), alone and as a
// whole MoE layer: the router's logits through the routing weights and the aux loss, the tokens
// through the permutation, the grouped GEMMs' operands; and the routing's choices by hand.
#include <gtest/gtest.h>

#include "backend/device.h"
#include "grad_check.h"
#include "graph/program.h"

using namespace mxn;
using mxn::testing::check;

namespace {

// x (N, C) through a SwiGLU expert MLP per token's K experts: router (E, C), gate and up
// (E, F, C), down (E, C, F) stacked; returns the weighted sum (N, C). `aux` receives the
// load-balancing loss's value when asked for.
int moe_layer(Graph& g, int x, int64_t E, int64_t F, const MoeRouteParams& p, int bias = -1,
              int* aux = nullptr) {
  const int64_t N = g.v_rows(x), C = g.v(x).shape.back();
  const int logits = g.matmul(x, g.param("router", {E, C}, true), false, true);
  const MoeRoute r = g.moe_route(logits, bias, p, aux != nullptr);
  if (aux) *aux = r.aux;
  const int xp = g.moe_permute(x, r.pos);
  const int gate = g.grouped_matmul(xp, g.param("gate", {E, F, C}, true), r.offsets);
  const int up = g.grouped_matmul(xp, g.param("up", {E, F, C}, true), r.offsets);
  const int h = g.swiglu(gate, up, 0, 0, F);
  const int y = g.grouped_matmul(h, g.param("down", {E, C, F}, true), r.offsets);
  return g.moe_unpermute(y, r.pos, N, r.w);
}

}  // namespace

// pos and offsets come from a routing of random logits (an input: no gradient).
TEST(Grad, MoePermutationsAndGroupedMatmul) {
  check("permute weighted, unpermute",
        {[](Graph& g) {
           const MoeRoute r = g.moe_route(g.input("logits", {5, 4}, DType::f32), -1, {2});
           const int xp =
               g.moe_permute(g.param("x", {5, 6}, true), r.pos, g.param("w", {5, 2}, true));
           return g.moe_unpermute(xp, r.pos, 5);
         },
         1});
  check("grouped_matmul tb and not",
        {[](Graph& g) {
           const MoeRoute r = g.moe_route(g.input("logits", {9, 3}, DType::f32), -1, {1});
           const int a = g.param("a", {9, 5}, true);
           const int y = g.grouped_matmul(a, g.param("b", {3, 4, 5}, true), r.offsets, true);
           return g.grouped_matmul(y, g.param("c", {3, 4, 6}, true), r.offsets, false);
         },
         1});
}

TEST(Grad, MoeLayerSoftmaxTop2WithAuxLoss) {
  // pos and offsets come from the routing; the only inputs are the objective's a and b.
  check("mixtral-style layer",
        {[](Graph& g) {
           int aux = -1;
           const int y = moe_layer(g, g.param("x", {7, 6}, true), 5, 4,
                                   MoeRouteParams{2, false, true}, -1, &aux);
           const int a = g.input("a", {1, 7}, DType::f32), b = g.input("b", {6, 1}, DType::f32);
           const int l = g.matmul(g.matmul(a, y), b);  // (1, 1)
           const int l1 = g.emit(MXN_OP_COPY, {l}, {g.activation({1})});
           return g.add(l1, g.scale(aux, 0.5f));
         },
         1});
}

TEST(Grad, MoeLayerSigmoidGroupedWithBias) {
  check(
      "deepseek-style layer",
      {[](Graph& g) {
         MoeRouteParams p{3, true, true, 4, 2, 1.5f};
         return moe_layer(g, g.param("x", {6, 5}, true), 8, 3, p, g.input("bias", {8}, DType::f32));
       },
       1});
  check("unnormalised top-3 of 6",
        {[](Graph& g) {
           return moe_layer(g, g.param("x", {9, 4}, true), 6, 5, MoeRouteParams{3});
         },
         1});
}

TEST(Grad, RmsNormPerHead) {
  check("rmsnorm over groups of 4",
        {[](Graph& g) {
           return g.rmsnorm(g.param("x", {5, 12}, true), g.param("w", {4}, false), 1e-6f);
         },
         1});
}

// The routing's choices and weights for numbers worked out by hand.
TEST(MoeRoute, ChoosesWithinTheBestGroupsByBiasAndWeighsByScore) {
  auto dev = open_device("cpu");
  Graph g;
  const int logits = g.input("logits", {1, 8}, DType::f32);
  const int bias = g.input("bias", {8}, DType::f32);
  const MoeRoute r = g.moe_route(logits, bias, MoeRouteParams{2, true, true, 4, 2, 2.f});
  for (int v : {r.w, r.ids, r.pos, r.offsets}) g.mark_output(v);
  Program prog(std::move(g), *dev);
  // sigmoid(0) = 0.5 for every expert, so the bias alone decides. Groups of 2, scored by the sum
  // of their two selection scores: {0,1} 1.35 + 0 = 1.35, {2,3} 0.6 + 0.5 = 1.1, {4,5} 1.4 + 0.5
  // = 1.9, {6,7} 1.3 + 0.5 = 1.8. The best two groups are {4,5} and {6,7}, so the experts are 4
  // and 6, although expert 0 (1.35) would beat 6 (1.3) without the groups.
  const float lg[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const float b[8] = {0.85f, -0.5f, 0.1f, 0.f, 0.9f, 0.f, 0.8f, 0.f};
  dev->upload(prog.tensor(logits), lg);
  dev->upload(prog.tensor(bias), b);
  prog.run(0, prog.graph().nodes.size());
  int32_t ids[2], pos[2], off[9];
  float w[2];
  dev->download(ids, prog.tensor(r.ids));
  dev->download(pos, prog.tensor(r.pos));
  dev->download(off, prog.tensor(r.offsets));
  dev->download(w, prog.tensor(r.w));
  EXPECT_EQ(ids[0], 4);
  EXPECT_EQ(ids[1], 6);
  // weights: the scores (0.5 each, not the biased ones) renormalised, times 2
  EXPECT_FLOAT_EQ(w[0], 1.f);
  EXPECT_FLOAT_EQ(w[1], 1.f);
  EXPECT_EQ(pos[0], 0);
  EXPECT_EQ(pos[1], 1);
  const int32_t want_off[9] = {0, 0, 0, 0, 0, 1, 1, 2, 2};
  for (int e = 0; e < 9; ++e) EXPECT_EQ(off[e], want_off[e]) << "offset " << e;
}

// STRIDED_COPY's backward: heads of (N, H, D) rows to (H, N, D) batches and two column windows
// concatenated into one value, through a batched matmul as MLA's absorbed query uses them.
TEST(Grad, StridedCopyTransposeAndConcat) {
  check("strided copies (transpose, window, concat)",
        {[](Graph& g) {
           const int64_t N = 4, H = 3, D = 5, R = 2;
           const int q = g.param("q", {N, H * (D + R)}, true);  // per head [nope (D) | rope (R)]
           StridedCopyParams t;                                 // q's nope windows as (H, N, D)
           t.n[0] = H, t.n[1] = N, t.n[2] = D;
           t.in_stride[0] = D + R, t.in_stride[1] = H * (D + R);
           t.out_stride[0] = N * D, t.out_stride[1] = D;
           const int qt = g.strided_copy(q, t, {H, N, D});
           const int lat = g.matmul(qt, g.param("w", {H, D, D}, true));  // (H, N, D)
           StridedCopyParams back = t;  // into [lat_h | rope_h] per head: first the latent parts
           back.in_stride[0] = N * D, back.in_stride[1] = D;
           back.out_stride[0] = D + R, back.out_stride[1] = H * (D + R);
           const int out = g.strided_copy(lat, back, {N, H * (D + R)});
           StridedCopyParams rope;  // then q's rope windows, copied across
           rope.n[0] = N, rope.n[1] = H, rope.n[2] = R;
           rope.in_stride[0] = rope.out_stride[0] = H * (D + R);
           rope.in_stride[1] = rope.out_stride[1] = D + R;
           rope.in_offset = rope.out_offset = D;
           return g.strided_copy(q, rope, {}, out);
         },
         1});
}

// Cut points (expert parallelism's exchange, one rank here): a value leaves the graph as an
// output and comes back as an input; its gradient leaves as a wrt output and comes back as a
// seed. Run in pieces with the copies made between them, every weight's gradient equals the
// graph without the cut.
TEST(Autograd, CutPointsCarryValuesAndGradientsAcross) {
  auto dev = open_device("cpu");
  auto build = [](Graph& g, bool cut, BackwardCuts* cuts, int* h_out, int* h_in) {
    const int x = g.input("x", {5, 6}, DType::f32);
    const int h = g.silu(g.matmul(x, g.param("w1", {7, 6}, true), false, true));
    int after = h;
    if (cut) {
      g.mark_output(h);
      after = g.input("h_in", {5, 7}, DType::f32);
      cuts->seeds.push_back({h, g.input("dh_in", {5, 7}, DType::f32)});
      cuts->wrts.push_back(after);
      *h_out = h, *h_in = after;
    }
    const int y = g.matmul(after, g.param("w2", {3, 7}, true), false, true);
    const int loss = g.cross_entropy(y, g.input("t", {5}, DType::i32));
    g.mark_output(loss);
    return loss;
  };
  std::vector<float> x(30), w1(42), w2(21);
  Rng rng(3);
  for (auto* v : {&x, &w1, &w2})
    for (float& e : *v) e = float(rng.normal());
  const int32_t t[5] = {0, 2, 1, 1, 0};
  std::vector<std::vector<float>> grads[2];
  for (int cut = 0; cut < 2; ++cut) {
    Graph g;
    BackwardCuts cuts;
    int h_out = -1, h_in = -1;
    const int loss = build(g, cut, &cuts, &h_out, &h_in);
    const size_t nf = append_backward(g, loss, cuts);
    Program prog(std::move(g), *dev);
    const Graph& pg = prog.graph();
    auto value = [&](const char* name) {
      for (size_t i = 0; i < pg.values.size(); ++i)
        if (pg.values[i].name == name) return int(i);
      return -1;
    };
    dev->upload(prog.tensor(value("x")), x.data());
    dev->upload(prog.tensor(value("w1")), w1.data());
    dev->upload(prog.tensor(value("w2")), w2.data());
    dev->upload(prog.tensor(value("t")), t);
    std::vector<float> zero(size_t(prog.grads_all().numel()), 0.f), buf(35);
    dev->upload(prog.grads_all(), zero.data());
    if (!cut) {
      prog.run(0, pg.nodes.size());
    } else {  // the pieces: up to h, across; the rest of the forward and the backward to d(h_in)
      auto first_reading = [&](int v, size_t from) {
        for (size_t i = from; i < pg.nodes.size(); ++i)
          for (int in : pg.nodes[i].in)
            if (in == v) return i;
        return pg.nodes.size();
      };
      auto last_writing = [&](int v) {
        size_t at = 0;
        for (size_t i = 0; i < pg.nodes.size(); ++i)
          for (int o : pg.nodes[i].out)
            if (o == v) at = i + 1;
        return at;
      };
      const size_t a = first_reading(h_in, 0);
      ASSERT_EQ(last_writing(h_out), a) << "h is made just before the cut";
      prog.run(0, a);
      dev->download(buf.data(), prog.tensor(h_out));
      dev->upload(prog.tensor(h_in), buf.data());
      const size_t b = last_writing(cuts.wrt_grads[0]);
      ASSERT_GE(b, nf);
      ASSERT_LE(b, first_reading(cuts.seeds[0].second, nf)) << "d(h_in) before the seed is read";
      prog.run(a, b);
      dev->download(buf.data(), prog.tensor(cuts.wrt_grads[0]));
      dev->upload(prog.tensor(cuts.seeds[0].second), buf.data());
      prog.run(b, pg.nodes.size());
    }
    for (const char* w : {"w1", "w2"}) {
      std::vector<float> gr(numel(pg.v(value(w)).shape));
      dev->download(gr.data(), prog.tensor(pg.v(value(w)).grad));
      grads[cut].push_back(gr);
    }
  }
  for (size_t i = 0; i < 2; ++i)
    for (size_t j = 0; j < grads[0][i].size(); ++j)
      EXPECT_NEAR(grads[1][i][j], grads[0][i][j], 1e-6f) << (i ? "w2" : "w1") << "[" << j << "]";
}
