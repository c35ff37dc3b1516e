#pragma once
// The finite-difference check every op's backward goes through (test_ops_grad.cpp, test_moe.cpp):
// the graph's gradients on the CPU backend against central differences of its loss. The objective
// is a bilinear form of the op's output, l = a^T out b, so no output element is weighted equally
// (sum(softmax) would hide a wrong gradient).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>

#include "backend/device.h"
#include "core/rng.h"
#include "graph/program.h"

namespace mxn::testing {

struct Case {
  std::function<int(Graph&)> build;  // returns a 2-D output, or a (1) loss
  int64_t int_range = 1;             // i32 inputs get values in [0, int_range)
};

inline void check(const std::string& what, const Case& c, double rtol = 2e-2, double atol = 2e-3) {
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

}  // namespace mxn::testing
