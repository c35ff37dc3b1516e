// Tensor parallelism's vocabulary split (ABI 11) against the whole ops, on the CPU backend: the
// embedding of each rank's rows summed over the ranks, and the vocab-parallel cross-entropy (each
// slice's stats summed, then the loss and the slice's dlogits), with uneven slices. The whole ops'
// backwards are checked against finite differences in test_ops_grad.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "backend/device.h"
#include "core/rng.h"
#include "graph/program.h"

using namespace mxn;

namespace {

std::vector<float> normal(int64_t n, Rng& rng, float scale = 1.f) {
  std::vector<float> x(static_cast<size_t>(n));
  for (float& v : x) v = scale * float(rng.normal());
  return x;
}

// Runs `g` forward and backward with `values` uploaded by name; returns the named values' (and
// "grad:NAME"'s gradients') contents.
std::map<std::string, std::vector<float>> run(Graph g, int loss,
                                              const std::map<std::string, std::vector<float>>& f32,
                                              const std::vector<int32_t>& ids,
                                              const std::vector<std::string>& want) {
  auto dev = open_device("cpu");
  g.mark_output(loss);
  append_backward(g, loss);
  Program prog(std::move(g), *dev);
  const Graph& pg = prog.graph();
  std::map<std::string, int> by_name;
  for (size_t i = 0; i < pg.values.size(); ++i)
    if (!pg.v(int(i)).name.empty()) by_name[pg.v(int(i)).name] = int(i);
  for (const auto& [name, x] : f32) dev->upload(prog.tensor(by_name.at(name)), x.data());
  dev->upload(prog.tensor(by_name.at("ids")), ids.data());
  std::vector<float> zero(size_t(prog.grads_all().numel()), 0.f);
  dev->upload(prog.grads_all(), zero.data());
  prog.run(0, pg.nodes.size());
  std::map<std::string, std::vector<float>> out;
  for (const std::string& w : want) {
    const bool grad = w.rfind("grad:", 0) == 0;
    const int id = grad ? pg.v(by_name.at(w.substr(5))).grad : (w == "loss" ? loss : -1);
    const Tensor t = prog.tensor(id);
    out[w].resize(size_t(t.numel()));
    dev->download(out[w].data(), t);
  }
  return out;
}

// Columns [c0, c0 + n) of a (rows, cols) matrix, or rows [r0, r0 + n) of a (rows, C) one.
std::vector<float> cols_of(const std::vector<float>& m, int64_t rows, int64_t cols, int64_t c0,
                           int64_t n) {
  std::vector<float> out;
  for (int64_t r = 0; r < rows; ++r)
    out.insert(out.end(), m.begin() + r * cols + c0, m.begin() + r * cols + c0 + n);
  return out;
}

double max_diff(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double d = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i)
    d = std::max(d, double(std::fabs(a[i] - b[i])));
  return d;
}

}  // namespace

TEST(VocabSplit, CrossEntropyOfSlicesIsTheWholeSoftmaxs) {
  // 13 rows (two ignored), 29 classes cut 11 + 18; logits spread wide so the slices' maxima
  // differ by far more than exp's range.
  const int64_t N = 13, V = 29, V0 = 11;
  Rng rng(3);
  std::vector<int32_t> t(static_cast<size_t>(N));
  for (auto& x : t) x = int32_t(rng.next() % uint64_t(V));
  t[2] = t[7] = -1;
  const std::vector<float> l = normal(N * V, rng, 30.f);
  Graph whole;
  const int ids = whole.input("ids", {N}, DType::i32);
  const int wl = whole.cross_entropy(whole.param("l", {N, V}, false), ids);
  const auto want = run(std::move(whole), wl, {{"l", l}}, t, {"loss", "grad:l"});

  Graph g;
  const int gi = g.input("ids", {N}, DType::i32);
  const int l0 = g.param("l0", {N, V0}, false), l1 = g.param("l1", {N, V - V0}, false);
  const int s0 = g.xent_stats(l0, gi, {1, 0, 0, 2}), s1 = g.xent_stats(l1, gi, {1, V0, 1, 2});
  const int stats = g.add(s0, s1);  // the group's sum
  const int loss0 = g.cross_entropy(l0, gi, stats, {2, 0, 0, 2});
  const int loss1 = g.cross_entropy(l1, gi, stats, {2, V0, 1, 2});
  // Each rank's loss is the whole one; its gradient reaches that rank's slice only.
  const int both = g.add(loss0, loss1);
  const auto got = run(std::move(g), both,
                       {{"l0", cols_of(l, N, V, 0, V0)}, {"l1", cols_of(l, N, V, V0, V - V0)}}, t,
                       {"loss", "grad:l0", "grad:l1"});
  EXPECT_NEAR(got.at("loss")[0], 2 * want.at("loss")[0], 2e-5 * std::fabs(want.at("loss")[0]));
  EXPECT_LT(max_diff(got.at("grad:l0"), cols_of(want.at("grad:l"), N, V, 0, V0)), 1e-6);
  EXPECT_LT(max_diff(got.at("grad:l1"), cols_of(want.at("grad:l"), N, V, V0, V - V0)), 1e-6);
}

TEST(VocabSplit, EmbeddingOfRowSharesSumsToTheWholeTable) {
  const int64_t N = 17, V = 23, V0 = 9, C = 6;
  Rng rng(5);
  std::vector<int32_t> t(static_cast<size_t>(N));
  for (auto& x : t) x = int32_t(rng.next() % uint64_t(V));
  const std::vector<float> table = normal(V * C, rng), a = normal(N * C, rng);
  // loss = sum(a * embedding): its table gradient scatters a's rows.
  auto loss_of = [&](Graph& g, int e) {
    return g.matmul(
        g.matmul(g.input("ones", {1, N}, DType::f32), g.mul(e, g.input("a", {N, C}, DType::f32))),
        g.input("onesc", {C, 1}, DType::f32));
  };
  const std::vector<float> ones(size_t(N), 1.f), onesc(size_t(C), 1.f);
  Graph whole;
  const int wi = whole.input("ids", {N}, DType::i32);
  const int wl = loss_of(whole, whole.embedding(wi, whole.param("table", {V, C}, false)));
  const auto want =
      run(std::move(whole), wl, {{"table", table}, {"a", a}, {"ones", ones}, {"onesc", onesc}}, t,
          {"loss", "grad:table"});
  Graph g;
  const int gi = g.input("ids", {N}, DType::i32);
  const int e0 = g.embedding(gi, g.param("t0", {V0, C}, false), EmbeddingParams{0, true});
  const int e1 = g.embedding(gi, g.param("t1", {V - V0, C}, false), EmbeddingParams{V0, true});
  const int gl = loss_of(g, g.add(e0, e1));
  const auto got = run(std::move(g), gl,
                       {{"t0", std::vector<float>(table.begin(), table.begin() + V0 * C)},
                        {"t1", std::vector<float>(table.begin() + V0 * C, table.end())},
                        {"a", a},
                        {"ones", ones},
                        {"onesc", onesc}},
                       t, {"loss", "grad:t0", "grad:t1"});
  EXPECT_NEAR(got.at("loss")[0], want.at("loss")[0], 1e-5);
  const std::vector<float>& dw = want.at("grad:table");
  EXPECT_EQ(max_diff(got.at("grad:t0"), std::vector<float>(dw.begin(), dw.begin() + V0 * C)), 0.0);
  EXPECT_EQ(max_diff(got.at("grad:t1"), std::vector<float>(dw.begin() + V0 * C, dw.end())), 0.0);
}

TEST(VocabSplit, FusedHeadOfSlicesIsTheWholeFusedHead) {
  // The CPU's CLASSIFIER_CE over two vocabulary slices (12 + 25 rows, blocks of 4 rows): the
  // stats summed, each slice's loss the whole one, dx summed over the slices the whole dx, each
  // dw the whole dw's rows.
  const int64_t N = 10, C = 13, V = 37, V0 = 12;
  Rng rng(11);
  std::vector<int32_t> t(static_cast<size_t>(N));
  for (auto& x : t) x = int32_t(rng.next() % uint64_t(V));
  t[4] = -1;
  const std::vector<float> x = normal(N * C, rng), w = normal(V * C, rng, 2.f);
  Graph whole;
  const int ids = whole.input("ids", {N}, DType::i32);
  const int wl =
      whole.classifier_ce(whole.param("x", {N, C}, false), whole.param("w", {V, C}, false), ids, 4);
  const auto want =
      run(std::move(whole), wl, {{"x", x}, {"w", w}}, t, {"loss", "grad:x", "grad:w"});

  Graph g;
  const int gi = g.input("ids", {N}, DType::i32), gx = g.param("x", {N, C}, false);
  const int w0 = g.param("w0", {V0, C}, false), w1 = g.param("w1", {V - V0, C}, false);
  const int stats = g.add(g.classifier_stats(gx, w0, gi, {1, 0, 0, 2}),
                          g.classifier_stats(gx, w1, gi, {1, V0, 1, 2}));
  const int both = g.add(g.classifier_ce(gx, w0, gi, stats, {2, 0, 0, 2}),
                         g.classifier_ce(gx, w1, gi, stats, {2, V0, 1, 2}));
  const auto got = run(std::move(g), both,
                       {{"x", x},
                        {"w0", std::vector<float>(w.begin(), w.begin() + V0 * C)},
                        {"w1", std::vector<float>(w.begin() + V0 * C, w.end())}},
                       t, {"loss", "grad:x", "grad:w0", "grad:w1"});
  EXPECT_NEAR(got.at("loss")[0], 2 * want.at("loss")[0], 2e-5 * std::fabs(want.at("loss")[0]));
  EXPECT_LT(max_diff(got.at("grad:x"), want.at("grad:x")), 1e-6);
  const std::vector<float>& dw = want.at("grad:w");
  EXPECT_LT(max_diff(got.at("grad:w0"), std::vector<float>(dw.begin(), dw.begin() + V0 * C)), 1e-6);
  EXPECT_LT(max_diff(got.at("grad:w1"), std::vector<float>(dw.begin() + V0 * C, dw.end())), 1e-6);
}
