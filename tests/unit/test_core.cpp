// Exact values for dtypes, shapes and the chip contract's tensor view.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "backend/device.h"
#include "backend/reference.h"
#include "core/dtype.h"
#include "core/error.h"
#include "core/tensor.h"

using namespace mxn;

TEST(DType, Bf16RoundsToNearestEven) {
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(f32_to_bf16(-2.0f), 0xc000);
  // 1 + 2^-8 is exactly half way between bf16 1.0 and 1.0078125: ties go to even (1.0).
  EXPECT_EQ(f32_to_bf16(1.00390625f), 0x3f80);
  // 1 + 3*2^-8 is half way between 1.0078125 (odd) and 1.015625: ties go to even (up).
  EXPECT_EQ(f32_to_bf16(1.01171875f), 0x3f82);
  EXPECT_EQ(bf16_to_f32(0x4049), 3.140625f);
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(INFINITY)), INFINITY);
}

TEST(DType, F16Conversions) {
  EXPECT_EQ(f32_to_f16(1.0f), 0x3c00);
  EXPECT_EQ(f32_to_f16(-2.5f), 0xc100);
  EXPECT_EQ(f32_to_f16(65504.0f), 0x7bff);
  EXPECT_EQ(f32_to_f16(1e6f), 0x7c00);            // overflow to inf
  EXPECT_EQ(f32_to_f16(5.9604645e-08f), 0x0001);  // smallest subnormal
  EXPECT_EQ(f16_to_f32(0x0001), 5.9604645e-08f);
  EXPECT_EQ(f16_to_f32(0x3555), 0.33325195f);
  for (uint32_t h = 0; h < 0x7c00; h += 7) EXPECT_EQ(f32_to_f16(f16_to_f32(uint16_t(h))), h);
}

TEST(DType, Names) {
  EXPECT_EQ(dtype_from_name("bf16"), DType::bf16);
  EXPECT_EQ(dtype_size(DType::f16), 2u);
  EXPECT_THROW(dtype_from_name("f64"), Error);
}

TEST(Tensor, ShapesAndStrides) {
  Tensor t({2, 3, 4}, DType::f32);
  EXPECT_EQ(t.numel(), 24);
  EXPECT_EQ(t.nbytes(), 96u);
  EXPECT_EQ(t.strides, (std::vector<int64_t>{12, 4, 1}));
  EXPECT_EQ(shape_str(t.shape), "[2, 3, 4]");
  mxn_tensor a = t.to_abi();
  EXPECT_EQ(a.ndim, 3);
  EXPECT_EQ(a.shape[2], 4);
  t.strides = {1, 2, 6};
  EXPECT_FALSE(t.is_contiguous());
  EXPECT_THROW(t.to_abi(), Error);
}

TEST(Registry, UnknownDeviceNamesTheOnesThatExist) {
  try {
    open_device("cuda:3");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("unknown device 'cuda:3'"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("cpu:0"), std::string::npos);
  }
  EXPECT_THROW(open_device("cpu:1"), Error);
  EXPECT_THROW(open_device("cpu:x"), Error);
  EXPECT_EQ(open_device("cpu")->name(), "cpu:0");
}

TEST(Registry, OutOfMemoryNamesDeviceAndBytes) {
  auto dev = open_device("cpu");
  try {
    dev->alloc(uint64_t(1) << 50);
    FAIL() << "no error";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("cpu:0: out of memory"), std::string::npos) << m;
    EXPECT_NE(m.find(std::to_string(uint64_t(1) << 50)), std::string::npos) << m;
    EXPECT_NE(m.find("bytes free"), std::string::npos) << m;
  }
}

// ABI 8: supports_call sees the whole call and states the rule run() enforces, once.
TEST(Registry, SupportsSeesTheWholeCallAndRunRefusesTheSame) {
  auto dev = open_device("cpu");
  auto a = dev->alloc(4 * 64), b = dev->alloc(4 * 64), o = dev->alloc(4 * 64);
  auto t = [](Buffer& buf, Shape s, DType d = DType::f32) { return Tensor(s, d, buf.handle()); };
  mxn_op_call ok =
      make_op_call(MXN_OP_MATMUL, {t(*a, {3, 4}), t(*b, {4, 5})}, {t(*o, {3, 5})}, MatmulParams{});
  std::string why;
  EXPECT_TRUE(dev->supports(ok, &why)) << why;
  // The same op and dtypes, but inner dimensions that disagree: refused, with the reason.
  mxn_op_call bad =
      make_op_call(MXN_OP_MATMUL, {t(*a, {3, 4}), t(*b, {5, 4})}, {t(*o, {3, 5})}, MatmulParams{});
  EXPECT_TRUE(dev->supports(MXN_OP_MATMUL, DType::f32));
  EXPECT_FALSE(dev->supports(bad, &why));
  EXPECT_EQ(why, "matmul: shapes do not agree");
  try {
    dev->run(bad);
    FAIL() << "ran";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("matmul: shapes do not agree"), std::string::npos);
  }
  // A dtype the CPU does not take for that operand, and serving's mask on bf16 q, k, v.
  mxn_op_call half = make_op_call(MXN_OP_ADD, {t(*a, {8}, DType::bf16), t(*b, {8})}, {t(*o, {8})});
  EXPECT_FALSE(dev->supports(half, &why));
  EXPECT_NE(why.find("takes f32 tensors"), std::string::npos) << why;
  AttentionParams ap;
  ap.heads = ap.kv_heads = 1;
  ap.head_dim = 4;
  ap.T = 2;
  ap.S = 4;
  ap.mask = MXN_MASK_CACHED;
  mxn_op_call att = make_op_call(MXN_OP_ATTENTION,
                                 {t(*a, {2, 4}, DType::bf16), t(*a, {4, 4}, DType::bf16),
                                  t(*a, {4, 4}, DType::bf16), t(*b, {2, 2}, DType::i32)},
                                 {t(*o, {2, 4})}, ap);
  EXPECT_FALSE(dev->supports(att, &why));
  EXPECT_NE(why.find("bf16 q, k, v are for training's masks"), std::string::npos) << why;
}

// Parameters go in by name and come back the same: the encoding is the op table's.
TEST(OpParams, EncodeAndDecodeAgreeWithTheAbiPositions) {
  mxn_op_call c{};
  AttentionParams a;
  a.heads = 8;
  a.kv_heads = 2;
  a.head_dim = 16;
  a.T = 3;
  a.S = 0;  // T
  a.mask = MXN_MASK_PAGED;
  a.block = 16;
  set_params(c, a);
  EXPECT_EQ(c.ip[0], 8);
  EXPECT_EQ(c.ip[4], 3);  // S resolved
  EXPECT_EQ(c.ip[5], MXN_MASK_PAGED);
  EXPECT_EQ(c.ip[9], 3);  // kv_rows resolved
  EXPECT_EQ(c.ip[12], 16);
  EXPECT_FLOAT_EQ(c.fp[0], 0.25f);  // 1/sqrt(16)
  with_params<AttentionParams>(c, [](AttentionParams& p) { p.q_pos0 = 5; });
  EXPECT_EQ(c.ip[10], 5);
  EXPECT_EQ(params_of<AttentionParams>(c).block, 16);
  RopeParams r;
  r.head_dim = 8;
  r.interleaved = true;
  r.backward = true;
  set_params(c, r);
  EXPECT_EQ(c.ip[3], 8);  // rot 0: the whole head
  EXPECT_EQ(c.ip[4], 1);
  EXPECT_EQ(c.ip[6], 1);
  AdamwParams w{3, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.5f};
  set_params(c, w);
  EXPECT_EQ(c.ip[0], 3);
  EXPECT_FLOAT_EQ(c.fp[5], 0.5f);
  EXPECT_FLOAT_EQ(params_of<AdamwParams>(c).step_size(), 1e-3f / (1.f - 0.9f * 0.9f * 0.9f));
}

// The double-precision reference the CPU backend is checked against, itself checked on values
// worked out by hand.
TEST(Reference, OpsGiveTheValuesWorkedOutByHand) {
  using namespace opcase;
  auto run = [](Case c, Values in, Values out) { return reference_outputs(c, in, std::move(out)); };
  Case sm{MXN_OP_SOFTMAX, {f({1, 2})}, {f({1, 2})}};
  Values y = run(sm, {{0.0, std::log(3.0)}}, {{0, 0}});
  EXPECT_NEAR(y[0][0], 0.25, 1e-15);
  EXPECT_NEAR(y[0][1], 0.75, 1e-15);
  Case mm{MXN_OP_MATMUL, {f({2, 2}), f({2, 2})}, {f({2, 2})}};
  set_params(mm, MatmulParams{false, false, true, MXN_DTYPE_F32, 0.5f});
  y = run(mm, {{1, 2, 3, 4}, {5, 6, 7, 8}}, {{1, 1, 1, 1}});
  EXPECT_EQ(y[0], (std::vector<double>{10.5, 12, 22.5, 26}));
  Case ln{MXN_OP_LAYERNORM, {f({1, 2}), f({2}), f({2})}, {f({1, 2}), f({1, 2})}};
  set_params(ln, NormParams{0.f});
  y = run(ln, {{1, 3}, {2, 2}, {1, 1}}, {{0, 0}, {0, 0}});
  EXPECT_EQ(y[0], (std::vector<double>{-1, 3}));
  EXPECT_EQ(y[1], (std::vector<double>{2, 1}));  // mean, rstd
  Case ce{MXN_OP_CROSS_ENTROPY, {f({2, 2}), tgt({2}, 2)}, {f({1})}};
  y = run(ce, {{0, 0, std::log(3.0), 0}, {0, -1}}, {{0}});
  EXPECT_NEAR(y[0][0], std::log(2.0), 1e-15);  // the ignored row counts for nothing
  // Causal attention, one head of one dim: query 1 sees scores (0, ln 3), so 1/4 and 3/4.
  Case at{MXN_OP_ATTENTION, {f({2, 1}), f({2, 1}), f({2, 1})}, {f({2, 1}), f({2, 1})}};
  AttentionParams ap;
  ap.T = 2;
  ap.scale = 1.f;
  set_params(at, ap);
  y = run(at, {{1, 1}, {0, std::log(3.0)}, {4, 8}}, {{0, 0}, {0, 0}});
  EXPECT_NEAR(y[0][0], 4, 1e-15);
  EXPECT_NEAR(y[0][1], 7, 1e-14);
  EXPECT_NEAR(y[1][1], std::log(4.0), 1e-15);
  Case ro{MXN_OP_ROPE, {f({1, 2}), idx({1}, 4)}, {f({1, 2})}};
  RopeParams rp;
  rp.head_dim = 2;
  rp.theta = 1.f;
  set_params(ro, rp);
  y = run(ro, {{1, 0}, {1}}, {{0, 0}});
  EXPECT_NEAR(y[0][0], std::cos(1.0), 1e-15);
  EXPECT_NEAR(y[0][1], std::sin(1.0), 1e-15);
  // AdamW's first step moves a weight by lr whatever the gradient's size (eps 0).
  Case aw{MXN_OP_ADAMW, {f({1})}, {f({1}), f({1}), f({1})}};
  set_params(aw, AdamwParams{1, 0.1f, 0.9f, 0.999f, 0.f, 0.f, 1.f});
  y = run(aw, {{3}}, {{1}, {0}, {0}});
  EXPECT_NEAR(y[0][0], 0.9, 1e-7);  // lr is a float: 0.1f
}

#include "backend/cpu/vmath.h"

TEST(CpuMath, ExpAndTanhMatchLibm) {
  double worst_exp = 0, worst_tanh = 0;
  for (float x = -87.f; x < 88.f; x += 0.0137f) {
    const double e = std::exp(double(x));
    worst_exp = std::max(worst_exp, std::fabs(cpu::vexp(x) - e) / e);
  }
  for (float x = -12.f; x < 12.f; x += 0.00071f) {
    const double t = std::tanh(double(x));
    worst_tanh = std::max(worst_tanh, std::fabs(cpu::vtanh(x) - t));
  }
  EXPECT_LT(worst_exp, 3e-7);   // about 2.5 ulp
  EXPECT_LT(worst_tanh, 3e-7);  // absolute: tanh is bounded
  EXPECT_EQ(cpu::vexp(-200.f) < 1e-37f, true);
  EXPECT_TRUE(std::isfinite(cpu::vexp(100.f)));
}
