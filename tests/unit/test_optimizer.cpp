// The optimizer alone (src/train/optimizer.h), on the CPU device: AdamW's update against a
// double-precision one written here (bias corrections, decoupled weight decay on the decayed
// group only, clipping by the global norm), the warmup + cosine schedule, and the moments'
// round trip through a checkpoint's tensors.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "backend/device.h"
#include "core/error.h"
#include "core/rng.h"
#include "graph/program.h"
#include "train/optimizer.h"

using namespace mxn;

namespace {
struct Model {  // two params, one decayed (a weight), one not (a bias)
  std::unique_ptr<Device> dev = open_device("cpu");
  std::unique_ptr<Program> prog;
  Model() {
    Graph g;
    const int w = g.param("w", {3, 5}, true), b = g.param("b", {7}, false);
    g.mark_output(g.add(w, w));
    g.mark_output(g.add(b, b));
    prog = std::make_unique<Program>(std::move(g), *dev);
  }
  std::vector<float> get(const Tensor& t) {
    std::vector<float> out(static_cast<size_t>(t.numel()));
    dev->download(out.data(), t);
    return out;
  }
  void set(const Tensor& t, const std::vector<float>& v) { dev->upload(t, v.data()); }
};

std::vector<float> random(int64_t n, uint64_t seed, float scale) {
  Rng r(seed);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = float((2 * r.uniform() - 1) * scale);
  return v;
}
}  // namespace

TEST(Optimizer, AdamWMatchesDoublePrecisionWithClippingAndDecayGroups) {
  Model m;
  OptimizerOptions o;
  o.lr = 1e-2, o.min_lr = 1e-3, o.warmup = 2, o.steps = 10, o.clip = 0.5, o.weight_decay = 0.1;
  Optimizer opt(*m.prog, *m.dev, o, nullptr, {});
  opt.zero();
  const Tensor pd = m.prog->params_flat(true), pn = m.prog->params_flat(false);
  const Tensor gd = m.prog->grads_flat(true), gn = m.prog->grads_flat(false);
  std::vector<double> p[2], mo[2], vo[2];
  const std::vector<float> p0 = random(15, 1, 1.f), p1 = random(7, 2, 1.f);
  m.set(pd, p0);
  m.set(pn, p1);
  p[0].assign(p0.begin(), p0.end());
  p[1].assign(p1.begin(), p1.end());
  for (int k = 0; k < 2; ++k) mo[k].assign(p[k].size(), 0.0), vo[k].assign(p[k].size(), 0.0);
  for (int64_t s = 1; s <= 4; ++s) {
    const std::vector<float> g[2] = {random(15, 10 + s, 2.f), random(7, 20 + s, 2.f)};
    m.set(gd, g[0]);
    m.set(gn, g[1]);
    double sumsq = 0;
    for (const auto& gk : g)
      for (float x : gk) sumsq += double(x) * x;
    const float norm = opt.step(s, float(sumsq));
    EXPECT_NEAR(norm, std::sqrt(sumsq), 1e-5 * std::sqrt(sumsq));
    const double gs = std::sqrt(sumsq) > o.clip ? o.clip / std::sqrt(sumsq) : 1.0;
    const double lr = opt.lr_at(s);
    const double bc1 = 1 - std::pow(o.beta1, double(s)), bc2 = 1 - std::pow(o.beta2, double(s));
    for (int k = 0; k < 2; ++k) {
      const double wd = k == 0 ? o.weight_decay : 0.0;
      for (size_t i = 0; i < p[k].size(); ++i) {
        const double gi = g[k][i] * gs;
        mo[k][i] = o.beta1 * mo[k][i] + (1 - o.beta1) * gi;
        vo[k][i] = o.beta2 * vo[k][i] + (1 - o.beta2) * gi * gi;
        p[k][i] = p[k][i] * (1 - lr * wd) -
                  lr / bc1 * mo[k][i] / (std::sqrt(vo[k][i]) / std::sqrt(bc2) + o.eps);
      }
      const std::vector<float> got = m.get(k == 0 ? pd : pn);
      for (size_t i = 0; i < got.size(); ++i)
        ASSERT_NEAR(got[i], p[k][i], 2e-6 * (1 + std::fabs(p[k][i])))
            << "step " << s << " group " << k << " element " << i;
    }
  }
}

TEST(Optimizer, WarmupThenCosineToTheFloor) {
  Model m;
  OptimizerOptions o;
  o.lr = 1.0, o.min_lr = 0.1, o.warmup = 4, o.steps = 14;
  Optimizer opt(*m.prog, *m.dev, o, nullptr, {});
  EXPECT_DOUBLE_EQ(opt.lr_at(1), 0.25);
  EXPECT_DOUBLE_EQ(opt.lr_at(4), 1.0);
  EXPECT_NEAR(opt.lr_at(9), 0.1 + 0.45 * (1 + std::cos(M_PI * 0.5)), 1e-12);  // halfway
  EXPECT_NEAR(opt.lr_at(14), 0.1, 1e-12);
  EXPECT_NEAR(opt.lr_at(100), 0.1, 1e-12);  // past the end: the floor
}

TEST(Optimizer, MomentsRoundTripThroughACheckpointsTensors) {
  Model a, b;
  OptimizerOptions o;
  Optimizer oa(*a.prog, *a.dev, o, nullptr, {}), ob(*b.prog, *b.dev, o, nullptr, {});
  oa.zero();
  const std::vector<float> p0 = random(15, 3, 1.f), p1 = random(7, 4, 1.f);
  for (Model* x : {&a, &b}) {
    x->set(x->prog->params_flat(true), p0);
    x->set(x->prog->params_flat(false), p1);
  }
  auto grads = [](Model& x, uint64_t s) {
    x.set(x.prog->grads_flat(true), random(15, 30 + s, 1.f));
    x.set(x.prog->grads_flat(false), random(7, 40 + s, 1.f));
  };
  for (int64_t s = 1; s <= 3; ++s) grads(a, uint64_t(s)), oa.step(s, 0.25f);
  TensorMap saved;
  ASSERT_TRUE(oa.save(saved, 0));
  EXPECT_EQ(saved.size(), 4u);  // m.w, v.w, m.b, v.b
  ob.load(saved);
  b.set(b.prog->params_flat(true), a.get(a.prog->params_flat(true)));
  b.set(b.prog->params_flat(false), a.get(a.prog->params_flat(false)));
  grads(a, 4), grads(b, 4);
  oa.step(4, 0.25f), ob.step(4, 0.25f);
  EXPECT_EQ(a.get(a.prog->params_all()), b.get(b.prog->params_all()));  // bit for bit
  saved.erase("v.b");
  EXPECT_THROW(ob.load(saved), Error);
}
