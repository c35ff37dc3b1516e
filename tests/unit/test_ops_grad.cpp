// Every op's backward against central finite differences, through the graph and the CPU backend.
// The objective is a bilinear form of the op's output, l = a^T out b, so no output element is
// weighted equally (sum(softmax) would hide a wrong gradient).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>

#include "backend/device.h"
#include "core/rng.h"
#include "grad_check.h"
#include "graph/program.h"

using namespace mxn;
using mxn::testing::Case;
using mxn::testing::check;

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

TEST(Grad, LinearWithBias) {
  for (int tb = 0; tb < 2; ++tb)
    check("linear tb=" + std::to_string(tb),
          {[&](Graph& g) {
             const int x = g.param("x", {6, 5}, true);
             const int w = g.param("w", tb ? Shape{7, 5} : Shape{5, 7}, true);
             return g.linear(x, w, g.param("b", {7}, false), tb);
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
  check("tanh", {[](Graph& g) { return g.tanh(g.param("x", {6, 9}, true)); }, 1});
  check("mul", {[](Graph& g) {
                  return g.mul(g.param("x", {4, 6}, true), g.param("y", {4, 6}, true));
                },
                1});
  check("dropout", {[](Graph& g) { return g.dropout(g.param("x", {6, 9}, true), 0.3f, 2); }, 1});
}

TEST(Attention, KeyRangesServeABatchOfCaches) {
  // Mask 4: two slots of one KV-cache buffer (rows [0, 7) and [10, 15) of 20), one query each, in
  // one call; each output equals softmax(q k^T / sqrt(hd)) v over its own range, in double.
  auto dev = open_device("cpu");
  const int64_t H = 2, G = 1, hd = 8, S = 20, T = 2;
  Rng rng(5);
  std::vector<float> q(size_t(T * H * hd)), k(size_t(S * G * hd)), v(size_t(S * G * hd));
  for (auto* x : {&q, &k, &v})
    for (float& e : *x) e = float(rng.normal());
  const std::vector<int32_t> ranges{0, 7, 10, 15};
  auto buf = [&](uint64_t bytes) { return dev->alloc(bytes); };
  auto bq = buf(q.size() * 4), bk = buf(k.size() * 4), bv = buf(v.size() * 4), br = buf(16),
       by = buf(q.size() * 4);
  const Tensor tq({T, H * hd}, DType::f32, bq->handle()), tk({S, G * hd}, DType::f32, bk->handle()),
      tv({S, G * hd}, DType::f32, bv->handle()), tr({T, 2}, DType::i32, br->handle()),
      ty({T, H * hd}, DType::f32, by->handle());
  dev->upload(tq, q.data());
  dev->upload(tk, k.data());
  dev->upload(tv, v.data());
  dev->upload(tr, ranges.data());
  const float scale = 1.f / std::sqrt(float(hd));
  dev->run(make_op_call(MXN_OP_ATTENTION, {tq, tk, tv, tr}, {ty},
                        {H, G, hd, T, S, 4, 0, 0, 0, S, 0}, {scale}));
  std::vector<float> y(q.size());
  dev->download(y.data(), ty);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t lo = ranges[size_t(2 * t)], hi = ranges[size_t(2 * t + 1)];
      std::vector<double> p;
      double mx = -1e300, sum = 0;
      for (int64_t j = lo; j < hi; ++j) {
        double d = 0;
        for (int64_t c = 0; c < hd; ++c)
          d += double(q[size_t((t * H + h) * hd + c)]) * k[size_t(j * hd + c)];
        p.push_back(d * scale);
        mx = std::max(mx, p.back());
      }
      for (double& e : p) sum += e = std::exp(e - mx);
      for (int64_t c = 0; c < hd; ++c) {
        double want = 0;
        for (int64_t j = lo; j < hi; ++j) want += p[size_t(j - lo)] / sum * v[size_t(j * hd + c)];
        EXPECT_NEAR(y[size_t((t * H + h) * hd + c)], want, 1e-5) << "query " << t << " head " << h;
      }
    }
}

TEST(Attention, PagedKeysFollowTheBlockTable) {
  // Mask 5: a buffer of 6 blocks of 4 rows. Query 0 sees 10 keys in blocks 5, 1, 3 (the last one
  // half full); query 1 shares blocks 5 and 1 (a common prompt prefix) and sees 8; query 2 sees
  // 3 keys of block 2, its unused entries past the buffer never read; queries 3 and 4 have one
  // table (a prefill chunk: the CPU takes them as one group) and see 6 and 7 keys. Each output
  // equals softmax(q k^T / sqrt(hd)) v over its keys, gathered in double.
  auto dev = open_device("cpu");
  const int64_t H = 4, G = 2, hd = 8, bs = 4, S = 24, T = 5, tw = 4;
  Rng rng(6);
  std::vector<float> q(size_t(T * H * hd)), k(size_t(S * G * hd)), v(size_t(S * G * hd));
  for (auto* x : {&q, &k, &v})
    for (float& e : *x) e = float(rng.normal());
  const std::vector<int32_t> table{10, 5, 1, 3, 8, 5, 1, 0, 3, 2, 99, -7, 6, 4, 0, 2, 7, 4, 0, 2};
  auto buf = [&](uint64_t bytes) { return dev->alloc(bytes); };
  auto bq = buf(q.size() * 4), bk = buf(k.size() * 4), bv = buf(v.size() * 4),
       bt = buf(table.size() * 4), by = buf(q.size() * 4);
  const Tensor tq({T, H * hd}, DType::f32, bq->handle()), tk({S, G * hd}, DType::f32, bk->handle()),
      tv({S, G * hd}, DType::f32, bv->handle()), tt({T, tw}, DType::i32, bt->handle()),
      ty({T, H * hd}, DType::f32, by->handle());
  dev->upload(tq, q.data());
  dev->upload(tk, k.data());
  dev->upload(tv, v.data());
  dev->upload(tt, table.data());
  const float scale = 1.f / std::sqrt(float(hd));
  dev->run(make_op_call(MXN_OP_ATTENTION, {tq, tk, tv, tt}, {ty},
                        {H, G, hd, T, S, 5, 0, 0, 0, S, 0, 0, bs}, {scale}));
  std::vector<float> y(q.size());
  dev->download(y.data(), ty);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int64_t> rows;
    for (int64_t j = 0; j < table[size_t(t * tw)]; ++j)
      rows.push_back(table[size_t(t * tw + 1 + j / bs)] * bs + j % bs);
    for (int64_t h = 0; h < H; ++h) {
      const int64_t g = h / (H / G);
      std::vector<double> p;
      double mx = -1e300, sum = 0;
      for (int64_t r : rows) {
        double d = 0;
        for (int64_t c = 0; c < hd; ++c)
          d += double(q[size_t((t * H + h) * hd + c)]) * k[size_t((r * G + g) * hd + c)];
        p.push_back(d * scale);
        mx = std::max(mx, p.back());
      }
      for (double& e : p) sum += e = std::exp(e - mx);
      for (int64_t c = 0; c < hd; ++c) {
        double want = 0;
        for (size_t j = 0; j < rows.size(); ++j)
          want += p[j] / sum * v[size_t((rows[j] * G + g) * hd + c)];
        EXPECT_NEAR(y[size_t((t * H + h) * hd + c)], want, 1e-5) << "query " << t << " head " << h;
      }
    }
  }
}

TEST(Matmul, Bf16WeightsWithBf16ComputeRoundTheActivationsToo) {
  // Serving with --weights bf16: a many-row MATMUL against bf16 weights with compute bf16 rounds
  // A to bf16 and multiplies on the bf16 units (or, without them, in f32 on the rounded values):
  // either way the products of the rounded operands, summed in f32. One row keeps A in f32.
  auto dev = open_device("cpu");
  const int64_t M = 5, N = 7, K = 40;
  Rng rng(9);
  std::vector<float> a(size_t(M * K));
  std::vector<uint16_t> b(size_t(N * K));
  for (float& e : a) e = float(rng.normal());
  for (uint16_t& e : b) e = f32_to_bf16(float(rng.normal()));
  auto ba = dev->alloc(a.size() * 4), bb = dev->alloc(b.size() * 2), bc = dev->alloc(M * N * 4);
  const Tensor ta({M, K}, DType::f32, ba->handle()), tb({N, K}, DType::bf16, bb->handle()),
      tc({M, N}, DType::f32, bc->handle());
  dev->upload(ta, a.data());
  dev->upload(tb, b.data());
  for (int64_t rows : {M, int64_t(1)}) {
    const Tensor tar({rows, K}, DType::f32, ba->handle()), tcr({rows, N}, DType::f32, bc->handle());
    dev->run(make_op_call(MXN_OP_MATMUL, {tar, tb}, {tcr}, {0, 1, 0, MXN_DTYPE_BF16}, {1.f}));
    std::vector<float> c(size_t(rows * N));
    dev->download(c.data(), tcr);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < N; ++j) {
        double want = 0;
        for (int64_t k = 0; k < K; ++k) {
          const float x = a[size_t(i * K + k)];
          want += double(rows > 1 ? round_bf16(x) : x) * bf16_to_f32(b[size_t(j * K + k)]);
        }
        EXPECT_NEAR(c[size_t(i * N + j)], want, 1e-5 * (1 + std::fabs(want)))
            << rows << " rows, (" << i << ", " << j << ")";
      }
  }
}

TEST(Gelu, Bf16InputIsItsValueWidened) {
  // GELU and GELU_BWD reading x in bf16 (bf16 training keeps the MLP's pre-activation so) give
  // exactly what the f32 kernels give on the same values widened, and GELU's derivative from
  // central differences of GELU itself.
  auto dev = open_device("cpu");
  ASSERT_TRUE(dev->supports(MXN_OP_GELU, DType::bf16) &&
              dev->supports(MXN_OP_GELU_BWD, DType::bf16));
  const int64_t n = 1000;
  Rng rng(4);
  std::vector<uint16_t> x16(static_cast<size_t>(n));
  std::vector<float> x(static_cast<size_t>(n)), dy(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    x16[size_t(i)] = f32_to_bf16(float(3 * rng.normal()));
    x[size_t(i)] = bf16_to_f32(x16[size_t(i)]);
    dy[size_t(i)] = float(rng.normal());
  }
  auto bh = dev->alloc(n * 2), bx = dev->alloc(n * 4), bd = dev->alloc(n * 4);
  auto b1 = dev->alloc(n * 4), b2 = dev->alloc(n * 4);
  const Tensor th({n}, DType::bf16, bh->handle()), tx({n}, DType::f32, bx->handle()),
      td({n}, DType::f32, bd->handle()), t1({n}, DType::f32, b1->handle()),
      t2({n}, DType::f32, b2->handle());
  dev->upload(th, x16.data());
  dev->upload(tx, x.data());
  dev->upload(td, dy.data());
  auto get = [&](const Tensor& t) {
    std::vector<float> v(static_cast<size_t>(n));
    dev->download(v.data(), t);
    return v;
  };
  for (mxn_op op : {MXN_OP_GELU, MXN_OP_GELU_BWD}) {
    auto ins = [&](const Tensor& xs) {
      return op == MXN_OP_GELU ? std::vector<Tensor>{xs} : std::vector<Tensor>{td, xs};
    };
    dev->run(make_op_call(op, ins(th), {t1}));
    dev->run(make_op_call(op, ins(tx), {t2}));
    const auto half = get(t1), full = get(t2);
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(half[size_t(i)], full[size_t(i)]) << op << " " << i;
  }
  const auto dx = get(t1);
  for (int64_t i = 0; i < n; i += 37) {
    const double v = x[size_t(i)], h = 1e-3;
    auto gelu = [](double u) {
      return 0.5 * u * (1 + std::tanh(std::sqrt(2 / M_PI) * (u + 0.044715 * u * u * u)));
    };
    EXPECT_NEAR(dx[size_t(i)], dy[size_t(i)] * (gelu(v + h) - gelu(v - h)) / (2 * h), 1e-4) << i;
  }
}

TEST(Attention, Bf16QkvIsTheF32GraphOnRoundedValues) {
  // bf16 training keeps a fused qkv in bf16 (a CAST after its matmul): the loss and the
  // gradient through ATTENTION, ATTENTION_BWD and the CAST are those of the f32 graph run on
  // the same values rounded to bf16: exactly where the CPU widens them for f32 tiles, within
  // bf16's rounding of the probabilities, dY and dS where it has bf16 tiles (AVX512-BF16, AMX).
  // Causal and segment masks, GPT-2's windows and grouped kv heads (LLaMA's); 70 rows, so a
  // block and a partial one.
  const int64_t B = 2, T = 70, H = 4, D = 16, C = H * D, N = B * T;
  Rng rng(12);
  std::vector<float> qkv(size_t(N * 3 * C)), rounded(qkv.size());
  for (size_t i = 0; i < qkv.size(); ++i) {
    qkv[i] = float(rng.normal());
    rounded[i] = round_bf16(qkv[i]);
  }
  std::vector<int32_t> targets(static_cast<size_t>(N)), segments(static_cast<size_t>(N));
  for (int64_t i = 0; i < N; ++i) {
    targets[size_t(i)] = int32_t(rng.next() % uint64_t(C));
    segments[size_t(i)] = int32_t(i % T / 23 * 23);  // rows packed in segments of 23
  }
  for (auto [mask, G] : {std::pair{1, H}, {3, H}, {1, H / 2}}) {
    const int64_t W = C + 2 * G * D;  // q, then k and v of the G kv heads
    auto run = [&](bool half, std::vector<float>& grad) {
      auto dev = open_device("cpu");
      Graph g;
      const int x = g.param("qkv", {N, W}, true);
      const int t = g.input("t", {N}, DType::i32);
      const int seg = mask == 3 ? g.input("seg", {N}, DType::i32) : -1;
      const int in = half ? g.cast(x, DType::bf16) : x;
      AttentionParams a;
      a.heads = H;
      a.kv_heads = G;
      a.head_dim = D;
      a.T = T;
      a.mask = mxn_attention_mask(mask);
      a.k_col = C;
      a.v_col = C + G * D;
      const int loss = g.cross_entropy(g.attention(in, in, in, a, seg), t);
      g.mark_output(loss);
      append_backward(g, loss);
      Program prog(std::move(g), *dev);
      dev->upload(prog.tensor(x), (half ? qkv : rounded).data());
      dev->upload(prog.tensor(t), targets.data());
      if (seg >= 0) dev->upload(prog.tensor(seg), segments.data());
      std::vector<float> zero(size_t(prog.grads_all().numel()), 0.f);
      dev->upload(prog.grads_all(), zero.data());
      prog.run(0, prog.graph().nodes.size());
      float l = 0;
      dev->download(&l, prog.tensor(loss));
      grad.assign(size_t(N * W), 0.f);
      dev->download(grad.data(), prog.tensor(prog.graph().v(x).grad));
      return l;
    };
    std::vector<float> g16, g32;
    const float l16 = run(true, g16), l32 = run(false, g32);
    EXPECT_NEAR(l16, l32, 2e-3 * std::fabs(l32)) << "mask " << mask << ", " << G << " kv heads";
    double top = 0, err = 0, e2 = 0, n2 = 0;
    for (size_t i = 0; i < g16.size(); ++i) {
      top = std::max(top, std::fabs(double(g32[i])));
      err = std::max(err, std::fabs(double(g16[i]) - g32[i]));
      e2 += (double(g16[i]) - g32[i]) * (double(g16[i]) - g32[i]);
      n2 += double(g32[i]) * g32[i];
    }
    EXPECT_GT(top, 0.0);
    // bf16 keeps 8 bits of each factor; measured 0.15-0.25% of the largest, and overall
    EXPECT_LE(err, 2e-2 * top) << "mask " << mask << ", " << G << " kv heads";
    EXPECT_LE(std::sqrt(e2 / n2), 1e-2) << "mask " << mask << ", " << G << " kv heads";
  }
}

TEST(Dropout, MaskIsItsProbabilityAndAFunctionOfSeedAndIndex) {
  // 10^5 ones at p = 0.3: about 70% kept, each kept one exactly 1/0.7; the same (seed, index)
  // gives the same mask whatever the tensor it sits in (a row's mask does not depend on its pass).
  auto dev = open_device("cpu");
  const int64_t n = 100000;
  auto run = [&](int64_t count, int64_t seed, int64_t first) {
    std::vector<float> ones(size_t(count), 1.f);
    std::vector<float> out(static_cast<size_t>(count));
    auto bx = dev->alloc(uint64_t(count) * 4), by = dev->alloc(uint64_t(count) * 4);
    const Tensor x({count}, DType::f32, bx->handle()), y({count}, DType::f32, by->handle());
    dev->upload(x, ones.data());
    dev->run(make_op_call(MXN_OP_DROPOUT, {x}, {y}, {seed, first}, {0.3f}));
    dev->download(out.data(), y);
    return out;
  };
  const std::vector<float> all = run(n, 77, 0), tail = run(1000, 77, n - 1000);
  int64_t kept = 0;
  for (float v : all) {
    if (v != 0.f) {
      EXPECT_FLOAT_EQ(v, 1.f / 0.7f);
    }
    kept += v != 0.f;
  }
  EXPECT_NEAR(double(kept) / double(n), 0.7, 0.005);
  for (int64_t i = 0; i < 1000; ++i) ASSERT_EQ(tail[size_t(i)], all[size_t(n - 1000 + i)]);
  EXPECT_NE(run(1000, 78, 0), std::vector<float>(all.begin(), all.begin() + 1000));
}

TEST(Grad, LayerNorm) {
  check("layernorm", {[](Graph& g) {
                        return g.layernorm(g.param("x", {5, 13}, true), g.param("w", {13}, false),
                                           g.param("b", {13}, false));
                      },
                      1});
}

TEST(Grad, Attention) {
  // GPT-2's fused qkv (one tensor, three windows), then GQA and MQA with separate q, k, v, a head
  // dim of 5, no mask, the prefix mask with a prefix length per sequence, and segments (packed
  // rows: random starts, clamped to each query).
  for (int64_t H : {1, 3})
    check("attention fused qkv H=" + std::to_string(H),
          {[H](Graph& g) {
             const int64_t B = 2, T = 5, C = 6;
             const int qkv = g.param("qkv", {B * T, 3 * C}, true);
             AttentionParams a;
             a.heads = a.kv_heads = H;
             a.head_dim = C / H;
             a.T = T;
             a.k_col = C;
             a.v_col = 2 * C;
             return g.attention(qkv, qkv, qkv, a);
           },
           1});
  struct Shape4 {
    int64_t H, G, hd;
    int mask;
    int64_t P = 0;  // prefix keys and values (P-Tuning v2), trained as params here
  };
  for (Shape4 s : {Shape4{4, 2, 5, 1}, Shape4{3, 1, 4, 1}, Shape4{2, 2, 3, 0}, Shape4{4, 2, 4, 2},
                   Shape4{4, 2, 4, 3}, Shape4{4, 2, 4, 1, 3}, Shape4{3, 1, 5, 3, 2}})
    check("attention H=" + std::to_string(s.H) + " G=" + std::to_string(s.G) +
              " mask=" + std::to_string(s.mask) + " P=" + std::to_string(s.P),
          {[s](Graph& g) {
             const int64_t B = 2, T = 6;
             AttentionParams a;
             a.heads = s.H;
             a.kv_heads = s.G;
             a.head_dim = s.hd;
             a.T = T;
             a.mask = mxn_attention_mask(s.mask);
             a.P = s.P;
             const int q = g.param("q", {B * T, s.H * s.hd}, true);
             const int k = g.param("k", {B * T, s.G * s.hd}, true);
             const int v = g.param("v", {B * T, s.G * s.hd}, true);
             const int pre = s.mask == 2   ? g.input("prefix", {B}, DType::i32)
                             : s.mask == 3 ? g.input("segments", {B * T}, DType::i32)
                                           : -1;
             const int pk = s.P ? g.param("pk", {s.P, s.G * s.hd}, true) : -1;
             const int pv = s.P ? g.param("pv", {s.P, s.G * s.hd}, true) : -1;
             return g.attention(q, k, v, a, pre, true, pk, pv);
           },
           6});
}

TEST(Grad, RMSNormRopeSwiGLU) {
  check("rmsnorm",
        {[](Graph& g) {
           return g.rmsnorm(g.param("x", {5, 13}, true), g.param("w", {13}, false), 1e-5f);
         },
         1});
  check("silu", {[](Graph& g) { return g.silu(g.param("x", {6, 9}, true)); }, 1});
  check("swiglu split",
        {[](Graph& g) {
           return g.swiglu(g.param("g", {4, 7}, true), g.param("u", {4, 7}, true), 0, 0, 7);
         },
         1});
  check("swiglu fused", {[](Graph& g) {
                           const int gu = g.param("gu", {4, 14}, true);
                           return g.swiglu(gu, gu, 0, 7, 7);
                         },
                         1});
  for (bool inter : {false, true})
    check(std::string("rope ") + (inter ? "interleaved, partial" : "half-split"),
          {[inter](Graph& g) {
             RopeParams r;
             r.col0 = 2;
             r.heads = 2;
             r.head_dim = 6;
             r.rot = inter ? 4 : 6;
             r.interleaved = inter;
             r.theta = 100.f;
             return g.rope(g.param("x", {5, 16}, true), g.input("pos", {5}, DType::i32), r);
           },
           40});
  check("rope 2-D (GLM's block positions turn each head's second half)",
        {[](Graph& g) {
           RopeParams r;
           r.heads = 2;
           r.head_dim = 8;
           r.rot = 4;
           r.interleaved = true;
           r.theta = 100.f;
           RopeParams r2 = r;
           r2.col0 = 4;  // the last head's rotated dims end at the row's end
           const int x = g.rope(g.param("x", {5, 16}, true), g.input("pos", {5}, DType::i32), r);
           return g.rope(x, g.input("block", {5}, DType::i32), r2);
         },
         40});
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

TEST(Grad, ClassifierCrossEntropy) {
  // Three blocks of 4 rows (the last one short); the loss is scaled so that d(loss) != 1 reaches
  // CLASSIFIER_CE_BWD.
  check("classifier_ce",
        {[](Graph& g) {
           const int x = g.param("x", {10, 13}, true), w = g.param("w", {37, 13}, true);
           return g.scale(g.classifier_ce(x, w, g.input("t", {10}, DType::i32), 4), 0.7f);
         },
         37});
}

namespace {

// Loss, d/dx and d/dw of the mean cross-entropy of x w^T, fused or as matmul + cross_entropy.
struct HeadResult {
  float loss = 0;
  std::vector<float> dx, dw;
};
HeadResult run_head(bool fused, DType compute, int64_t block, const std::vector<float>& x,
                    const std::vector<float>& w, const std::vector<int32_t>& t, int64_t C,
                    float dloss = 1.f) {
  auto dev = open_device("cpu");
  const int64_t N = int64_t(t.size()), V = int64_t(w.size()) / C;
  Graph g;
  g.matmul_compute = compute;
  const int xi = g.param("x", {N, C}, true), wi = g.param("w", {V, C}, true);
  const int ti = g.input("t", {N}, DType::i32);
  const int loss = fused ? g.classifier_ce(xi, wi, ti, block)
                         : g.cross_entropy(g.matmul(xi, wi, false, true), ti);
  g.mark_output(loss);
  const size_t seed = append_backward(g, loss);  // the FILL of d(loss)
  size_t head = SIZE_MAX;
  for (size_t i = 0; i < seed; ++i)
    if (g.nodes[i].op == MXN_OP_CLASSIFIER_CE && g.nodes[i].params<ClassifierParams>().direct)
      head = i;
  EXPECT_EQ(head == SIZE_MAX, !fused) << "a loss-seeded fused head takes d(loss) itself (ABI 6)";
  Program prog(std::move(g), *dev);
  // as the trainer weighs a pass: the seed and the head's copy
  set_params(prog.call(seed), ScalarParams{dloss});
  if (head != SIZE_MAX)
    with_params<ClassifierParams>(prog.call(head), [&](ClassifierParams& c) { c.dloss = dloss; });
  dev->upload(prog.tensor(xi), x.data());
  dev->upload(prog.tensor(wi), w.data());
  dev->upload(prog.tensor(ti), t.data());
  std::vector<float> zero(size_t(prog.grads_all().numel()), 0.f);
  dev->upload(prog.grads_all(), zero.data());
  prog.run(0, prog.graph().nodes.size());
  HeadResult r;
  r.dx.resize(x.size());
  r.dw.resize(w.size());
  dev->download(&r.loss, prog.tensor(loss));
  dev->download(r.dx.data(), prog.tensor(prog.graph().v(xi).grad));
  dev->download(r.dw.data(), prog.tensor(prog.graph().v(wi).grad));
  return r;
}

}  // namespace

TEST(ClassifierCE, EqualsMatmulThenCrossEntropyWithoutTheLogits) {
  // 150 rows (one ignored) over a vocabulary of 300, in blocks of 64 and in one block, f32 and
  // bf16, for d(loss) = 1 and 0.375: the loss and both gradients as the unfused graph computes
  // them.
  const int64_t N = 150, C = 24, V = 300;
  Rng rng(3);
  std::vector<float> x(size_t(N * C)), w(size_t(V * C));
  for (auto& e : x) e = float(rng.normal());
  for (auto& e : w) e = float(rng.normal() * 0.5);
  std::vector<int32_t> t(static_cast<size_t>(N));
  for (auto& e : t) e = int32_t(rng.next() % uint64_t(V));
  t[7] = -1;
  for (DType compute : {DType::f32, DType::bf16})
    for (float dloss : {1.f, 0.375f}) {
      const HeadResult ref = run_head(false, compute, 0, x, w, t, C, dloss);
      for (int64_t block : {int64_t(64), int64_t(0)}) {
        const HeadResult got = run_head(true, compute, block, x, w, t, C, dloss);
        const std::string what = std::string(compute == DType::bf16 ? "bf16" : "f32") + " block " +
                                 std::to_string(block) + " dloss " + std::to_string(dloss);
        EXPECT_NEAR(got.loss, ref.loss, 1e-6 * std::fabs(ref.loss)) << what;
        double worst = 0, scale = 0;
        for (auto [a, b] : {std::pair{&got.dx, &ref.dx}, std::pair{&got.dw, &ref.dw}})
          for (size_t i = 0; i < a->size(); ++i) {
            worst = std::max(worst, double(std::fabs((*a)[i] - (*b)[i])));
            scale = std::max(scale, double(std::fabs((*b)[i])));
          }
        EXPECT_LT(worst, 1e-5 * scale) << what << ": worst gradient difference " << worst;
        for (int64_t c = 0; c < C; ++c) EXPECT_EQ(got.dx[size_t(7 * C + c)], 0.f) << what;
      }
    }
}
