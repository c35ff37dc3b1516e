// Every op's backward against central finite differences, through the graph and the CPU backend.
// The objective is a bilinear form of the op's output, l = a^T out b, so no output element is
// weighted equally (sum(softmax) would hide a wrong gradient).
#include <gtest/gtest.h>

#include <cmath>
#include <functional>

#include "backend/device.h"
#include "core/rng.h"
#include "graph/program.h"

using namespace mxn;

namespace {

struct Case {
  std::function<int(Graph&)> build;  // returns a 2-D output, or a (1) loss
  int64_t int_range = 1;             // i32 inputs get values in [0, int_range)
};

void check(const std::string& what, const Case& c, double rtol = 2e-2, double atol = 2e-3) {
  auto dev = open_device("cpu");
  Graph g;
  int out = c.build(g);
  const Value ov = g.v(out);
  int loss = out;
  if (ov.shape.size() == 2) {
    const int a = g.input("a", {1, ov.shape[0]}, DType::f32);
    const int b = g.input("b", {ov.shape[1], 1}, DType::f32);
    loss = g.matmul(g.matmul(a, out), b);
  }
  g.mark_output(loss);
  const size_t n_forward_nodes = g.nodes.size();
  append_backward(g, loss);
  Program prog(std::move(g), *dev);
  Rng rng(7);
  for (size_t i = 0; i < prog.graph().values.size(); ++i) {
    const Value& v = prog.graph().v(int(i));
    if (v.kind == ValueKind::param || (v.kind == ValueKind::input && v.dtype == DType::f32)) {
      std::vector<float> x(size_t(numel(v.shape)));
      for (auto& e : x) e = float(rng.normal());
      dev->upload(prog.tensor(int(i)), x.data());
    } else if (v.kind == ValueKind::input) {
      std::vector<int32_t> x(size_t(numel(v.shape)));
      for (auto& e : x) e = int32_t(rng.next() % uint64_t(std::max<int64_t>(1, c.int_range)));
      dev->upload(prog.tensor(int(i)), x.data());
    }
  }
  const Tensor gall = prog.grads_all();
  std::vector<float> zero(size_t(gall.numel()), 0.f);
  dev->upload(gall, zero.data());
  prog.run(0, prog.graph().nodes.size());
  auto eval = [&] {
    prog.run(0, n_forward_nodes + (ov.shape.size() == 2 ? 2 : 0));
    float l;
    dev->download(&l, prog.tensor(loss));
    return double(l);
  };
  int checked = 0;
  for (int p : prog.graph().params()) {
    const Value& v = prog.graph().v(p);
    const int64_t n = numel(v.shape);
    std::vector<float> w(static_cast<size_t>(n)), gr(static_cast<size_t>(n));
    dev->download(w.data(), prog.tensor(p));
    dev->download(gr.data(), prog.tensor(v.grad));
    for (int k = 0; k < std::min<int64_t>(n, 24); ++k) {
      const size_t idx = size_t(rng.next() % uint64_t(n));
      const float orig = w[idx];
      const float eps = 1e-2f * std::max(1.f, std::fabs(orig));
      w[idx] = orig + eps;
      dev->upload(prog.tensor(p), w.data());
      const double lp = eval();
      w[idx] = orig - eps;
      dev->upload(prog.tensor(p), w.data());
      const double lm = eval();
      w[idx] = orig;
      dev->upload(prog.tensor(p), w.data());
      const double num = (lp - lm) / (2.0 * eps);
      EXPECT_NEAR(gr[idx], num, atol + rtol * std::max(std::fabs(num), double(std::fabs(gr[idx]))))
          << what << ": d/d " << v.name << "[" << idx << "]";
      ++checked;
    }
  }
  EXPECT_GT(checked, 0) << what;
}

}  // namespace

TEST(Grad, MatmulAllTransposes) {
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb)
      check("matmul ta=" + std::to_string(ta) + " tb=" + std::to_string(tb),
            {[&](Graph& g) {
               const int a = g.param("A", ta ? Shape{5, 3} : Shape{3, 5}, true);
               const int b = g.param("B", tb ? Shape{7, 5} : Shape{5, 7}, true);
               return g.matmul(a, b, ta, tb, 0.5f);
             },
             1});
}

TEST(Grad, MatmulBatched) {
  // Cross-entropy reads a (2, 3, 5) output as 6 rows of 5 logits: a scalar objective for 3-D.
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb)
      check("batched matmul ta=" + std::to_string(ta) + " tb=" + std::to_string(tb),
            {[&](Graph& g) {
               const int a = g.param("A", ta ? Shape{2, 4, 3} : Shape{2, 3, 4}, true);
               const int b = g.param("B", tb ? Shape{2, 5, 4} : Shape{2, 4, 5}, true);
               return g.cross_entropy(g.matmul(a, b, ta, tb), g.input("t", {6}, DType::i32));
             },
             5});
}

TEST(Grad, Elementwise) {
  check("add", {[](Graph& g) {
                  return g.add(g.param("x", {4, 6}, true), g.param("y", {4, 6}, true));
                },
                1});
  check("add_bias", {[](Graph& g) {
                       return g.add_bias(g.param("x", {5, 7}, true), g.param("b", {7}, false));
                     },
                     1});
  check("scale", {[](Graph& g) { return g.scale(g.param("x", {3, 5}, true), -1.5f); }, 1});
  check("gelu", {[](Graph& g) { return g.gelu(g.param("x", {6, 9}, true)); }, 1});
  check("softmax", {[](Graph& g) { return g.softmax(g.param("x", {4, 11}, true)); }, 1});
}

TEST(Grad, LayerNorm) {
  check("layernorm", {[](Graph& g) {
                        return g.layernorm(g.param("x", {5, 13}, true), g.param("w", {13}, false),
                                           g.param("b", {13}, false));
                      },
                      1});
}

TEST(Grad, Attention) {
  for (int64_t H : {1, 3})
    check("attention H=" + std::to_string(H),
          {[H](Graph& g) {
             const int64_t B = 2, T = 5, C = 6;
             return g.attention(g.param("qkv", {B * T, 3 * C}, true), H, T);
           },
           1});
}

TEST(Grad, Embedding) {
  check("embedding",
        {[](Graph& g) {
           return g.embedding(g.input("idx", {9}, DType::i32), g.param("table", {5, 7}, true));
         },
         5});
}

TEST(Grad, CrossEntropy) {
  check("cross_entropy",
        {[](Graph& g) {
           return g.cross_entropy(g.param("logits", {6, 9}, true), g.input("t", {6}, DType::i32));
         },
         9});
}
