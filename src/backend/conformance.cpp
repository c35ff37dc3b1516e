#include "backend/conformance.h"

#include <algorithm>
#include <cmath>

#include "backend/op_case.h"
#include "backend/reference.h"
#include "core/error.h"
#include "core/rng.h"

namespace mxn {
namespace {

using namespace opcase;

// Attention shapes: MHA, GQA, MQA; head dims 5, 8 and 64; causal, none, prefix, segments (packed
// rows, random starts that the kernels clamp to the query); per-query key ranges and paged keys
// (serving, forward only; random tables whose blocks the kernels clamp); shared prefix keys
// (P-Tuning v2);
// a fused qkv
// matrix read through column windows; a KV cache (2 new queries against 9 of 12 cached rows).
struct AttnCase {
  int64_t B, T, H, G, hd, S, kv_rows, q_pos0;
  int mask;
  bool fused;
  int64_t P = 0;   // shared prefix keys and values
  int64_t bs = 0;  // mask 5: block size (each query's table: n and 4 blocks)
};
std::vector<AttnCase> attention_cases() {
  return {{2, 5, 3, 3, 8, 5, 5, 0, 1, true},          {1, 17, 4, 2, 5, 17, 17, 0, 1, false},
          {2, 9, 4, 1, 8, 9, 9, 0, 2, false},         {2, 7, 2, 2, 64, 7, 7, 0, 0, false},
          {2, 2, 4, 2, 8, 9, 12, 7, 1, false},        {1, 70, 2, 1, 16, 70, 70, 0, 2, true},
          {2, 9, 4, 2, 8, 9, 9, 0, 3, false},         {1, 70, 2, 1, 16, 70, 70, 0, 3, true},
          {2, 7, 4, 2, 8, 7, 7, 0, 1, false, 5},      {2, 70, 2, 1, 16, 70, 70, 0, 3, true, 3},
          {1, 5, 4, 2, 8, 40, 40, 0, 4, false},       {1, 3, 2, 2, 16, 30, 30, 0, 4, false, 2},
          {1, 6, 4, 2, 8, 48, 48, 0, 5, false, 0, 8}, {1, 3, 2, 2, 16, 32, 32, 0, 5, true, 2, 4}};
}
// dt bf16: q, k and v stored in bf16 (training keeps them so for the backward).
Case attention_case(int op, const AttnCase& a, DType dt = DType::f32) {
  const int64_t Nq = a.B * a.T, Nk = a.B * a.kv_rows, qw = a.H * a.hd, kw = a.G * a.hd;
  AttentionParams p;
  p.heads = a.H, p.kv_heads = a.G, p.head_dim = a.hd, p.T = a.T, p.S = a.S;
  p.mask = mxn_attention_mask(a.mask);
  p.k_col = a.fused ? qw : 0, p.v_col = a.fused ? qw + kw : 0;
  p.kv_rows = a.kv_rows, p.q_pos0 = a.q_pos0, p.P = a.P, p.block = a.bs;  // scale: 1/sqrt(hd)
  // A fused case passes three separate tensors of the full fused width, so each window is
  // checked; the backward's outputs then cover only their own windows.
  const int64_t w = a.fused ? qw + 2 * kw : 0;
  const Shape qs{Nq, a.fused ? w : qw}, ks{Nk, a.fused ? w : kw};
  std::vector<Operand> in{f(qs), f(ks), f(ks)};
  for (Operand& o : in) o.dtype = dt;
  if (op == MXN_OP_ATTENTION_BWD) {
    in.insert(in.begin(), f({Nq, qw}));
    in.push_back(f({Nq, qw}));
    in.push_back(pos({Nq, a.H}));
  }
  if (a.P > 0) in.insert(in.end(), {f({a.P, kw}), f({a.P, kw})});
  if (a.mask == MXN_MASK_PREFIX) in.push_back(idx({a.B}, a.S + 1));
  if (a.mask == MXN_MASK_SEGMENTS) in.push_back(idx({a.B * a.T}, a.T));
  if (a.mask == MXN_MASK_CACHED) in.push_back(idx({a.B * a.T, 2}, a.S + 1));  // key ranges, clamped
  if (a.mask == MXN_MASK_PAGED)
    in.push_back(idx({a.T, 5}, 4 * a.bs + 1));  // n, then blocks (clamped)
  std::vector<Operand> out = op == MXN_OP_ATTENTION
                                 ? std::vector<Operand>{f({Nq, qw}), f({Nq, a.H})}
                                 : std::vector<Operand>{f(qs), f(ks), f(ks)};
  if (op == MXN_OP_ATTENTION_BWD && a.P > 0) out.insert(out.end(), {f({a.P, kw}), f({a.P, kw})});
  return with({mxn_op(op), in, out}, p);
}

// The mixture-of-experts ops: Mixtral's softmax top-2 (with the aux loss), Qwen2-MoE's top-4 of 60
// unnormalised, DeepSeek-V3's sigmoid with a selection bias and group-limited top-8 scaled by 2.5,
// a shared expert's sigmoid gate (one expert); permutations of 2 and 3 slots a token; grouped
// GEMMs over 5 experts, some without rows, in both layouts and as a weight's gradient.
std::vector<Case> moe_cases(mxn_op op) {
  std::vector<Case> c;
  const MoeRouteParams mixtral{2, false, true}, qwen2{4, false, false},
      deepseek{8, true, true, 8, 4, 2.5f}, gate{1, true, false};
  switch (op) {
    case MXN_OP_MOE_ROUTE:
      c.push_back(with(
          {op, {f({13, 8})}, {f({13, 2}), idx({13, 2}, 8), idx({26}, 26), idx({9}, 27), f({1})}},
          mixtral));
      c.push_back(with(
          {op, {f({9, 60})}, {f({9, 4}), idx({9, 4}, 60), idx({36}, 36), idx({61}, 37)}}, qwen2));
      c.push_back(with(
          {op, {f({7, 64}), f({64})}, {f({7, 8}), idx({7, 8}, 64), idx({56}, 56), idx({65}, 57)}},
          deepseek));
      c.push_back(
          with({op, {f({7, 1})}, {f({7, 1}), idx({7, 1}, 1), idx({7}, 7), idx({2}, 8)}}, gate));
      break;
    case MXN_OP_MOE_ROUTE_BWD:
      c.push_back(
          with({op, {f({13, 2}), f({13, 8}), idx({13, 2}, 8), f({1})}, {f({13, 8})}}, mixtral));
      c.push_back(with({op, {f({9, 4}), f({9, 60}), idx({9, 4}, 60)}, {f({9, 60})}}, qwen2));
      c.push_back(with({op, {f({7, 8}), f({7, 64}), idx({7, 8}, 64)}, {f({7, 64})}}, deepseek));
      break;
    case MXN_OP_MOE_PERMUTE:
      c.push_back({op, {f({11, 13}), distinct({22}, 22)}, {f({22, 13})}});
      c.push_back({op, {f({7, 5}), distinct({21}, 21), f({21})}, {f({21, 5})}});
      break;
    case MXN_OP_MOE_UNPERMUTE:
      c.push_back({op, {f({22, 13}), distinct({22}, 22), f({22})}, {f({11, 13})}});
      c.push_back({op, {f({21, 5}), distinct({21}, 21)}, {f({7, 5})}});
      break;
    case MXN_OP_MOE_UNPERMUTE_BWD:
      c.push_back({op, {f({11, 13}), f({22, 13}), distinct({22}, 22)}, {f({22})}});
      break;
    case MXN_OP_GROUPED_MATMUL:
      c.push_back(with({op, {f({29, 17}), f({5, 11, 17}), offsets(5, 29)}, {f({29, 11})}},
                       GroupedMatmulParams{true}));
      c.push_back(with({op, {f({29, 17}), f({5, 17, 11}), offsets(5, 29)}, {f({29, 11})}},
                       GroupedMatmulParams{false}));
      // Decoding: most experts get one row each (the CPU's one pass over them), K past 32.
      c.push_back(with({op, {f({6, 40}), f({7, 11, 40}), offsets(7, 6)}, {f({6, 11})}},
                       GroupedMatmulParams{true}));
      c.push_back(with({op, {f({29, 11}), f({29, 17}), offsets(5, 29)}, {f({5, 11, 17})}},
                       GroupedMatmulParams{true, true, false}));
      c.push_back(with({op, {f({70, 6}), f({70, 9}), offsets(3, 70)}, {f({3, 6, 9})}},
                       GroupedMatmulParams{true, true, true}));
      break;
    default:
      break;
  }
  return c;
}

std::vector<Case> cases_for(mxn_op op, DType dt) {
  std::vector<Case> c;
  const int32_t compute = dt == DType::bf16 ? MXN_DTYPE_BF16 : MXN_DTYPE_F32;
  switch (op) {
    case MXN_OP_MATMUL:
      // M = 1: decoding's GEMV (on the CPU, its own kernels; N past 3072 takes another path).
      for (auto [M, N, K] : {std::array<int64_t, 3>{7, 5, 3},
                             {64, 48, 32},
                             {33, 17, 65},
                             {1, 37, 65},
                             {1, 3101, 67}})
        for (int ta = 0; ta < 2; ++ta)
          for (int tb = 0; tb < 2; ++tb)
            c.push_back(
                with({op,
                      {f(ta ? Shape{K, M} : Shape{M, K}), f(tb ? Shape{N, K} : Shape{K, N})},
                      {f({M, N})}},
                     MatmulParams{ta != 0, tb != 0, (M + ta) % 2 != 0, compute, 0.75f}));
      c.push_back(with({op, {f({3, 9, 5}), f({3, 5, 7})}, {f({3, 9, 7})}},
                       MatmulParams{false, false, false, compute}));
      c.push_back(with({op, {f({2, 6, 9}), f({2, 11, 6})}, {f({2, 9, 11})}},
                       MatmulParams{true, true, true, compute}));
      for (int tb = 0; tb < 2; ++tb)  // ABI 5: a bias on every row (linear layers)
        c.push_back(
            with({op, {f({33, 65}), f(tb ? Shape{17, 65} : Shape{65, 17}), f({17})}, {f({33, 17})}},
                 MatmulParams{false, tb != 0, false, compute}));
      break;
    case MXN_OP_ADD:
      c.push_back({op, {f({3, 17}), f({3, 17})}, {f({3, 17})}});
      break;
    case MXN_OP_ADD_BIAS:
      c.push_back({op, {f({7, 13}), f({13})}, {f({7, 13})}});
      break;
    case MXN_OP_SUM_ROWS:
      c.push_back({op, {f({33, 17})}, {f({17})}});
      c.push_back(with({op, {f({4, 5})}, {f({5})}}, SumParams{true}));
      break;
    case MXN_OP_SCALE:
      c.push_back(with({op, {f({1001})}, {f({1001})}}, ScalarParams{-0.3f}));
      break;
    case MXN_OP_GELU:  // bf16: x stored in bf16 (bf16 training's kept pre-activation)
      c.push_back({op, {{{9, 111}, Gen::normal, 0, dt}}, {f({9, 111})}});
      break;
    case MXN_OP_GELU_BWD:
      c.push_back({op, {f({9, 111}), {{9, 111}, Gen::normal, 0, dt}}, {f({9, 111})}});
      break;
    case MXN_OP_TANH:
      c.push_back({op, {f({9, 111})}, {f({9, 111})}});
      break;
    case MXN_OP_MUL:
      c.push_back({op, {f({9, 111}), f({9, 111})}, {f({9, 111})}});
      break;
    case MXN_OP_TANH_BWD:
      c.push_back({op, {f({9, 111}), f({9, 111})}, {f({9, 111})}});
      break;
    case MXN_OP_SOFTMAX:
      for (int64_t n : {1, 7, 300}) c.push_back({op, {f({5, n})}, {f({5, n})}});
      break;
    case MXN_OP_SOFTMAX_BWD:
      c.push_back({op, {f({5, 37}), pos({5, 37})}, {f({5, 37})}});
      break;
    case MXN_OP_LAYERNORM:
      for (int64_t n : {13, 384})
        c.push_back(with({op, {f({6, n}), f({n}), f({n})}, {f({6, n}), f({6, 2})}}, NormParams{}));
      break;
    case MXN_OP_LAYERNORM_BWD:
      c.push_back(
          {op, {f({6, 13}), f({6, 13}), f({13}), pos({6, 2})}, {f({6, 13}), f({13}), f({13})}});
      break;
    case MXN_OP_ATTENTION:
    case MXN_OP_ATTENTION_BWD:
      for (const AttnCase& a : attention_cases())  // masks 4 and 5 (serving): no backward
        if (a.mask < MXN_MASK_CACHED || (op == MXN_OP_ATTENTION && dt == DType::f32))
          c.push_back(attention_case(op, a, dt));
      break;
    case MXN_OP_EMBEDDING:  // whole; rows 2..6 of a vocabulary of 11 (ABI 11)
      c.push_back({op, {idx({11}, 7), f({7, 5})}, {f({11, 5})}});
      c.push_back(with({op, {idx({11}, 11), f({5, 5})}, {f({11, 5})}}, EmbeddingParams{2, true}));
      break;
    case MXN_OP_EMBEDDING_BWD:
      c.push_back({op, {f({11, 5}), idx({11}, 7)}, {f({7, 5})}});
      c.push_back(with({op, {f({11, 5}), idx({11}, 11)}, {f({5, 5})}}, EmbeddingParams{2, true}));
      break;
    case MXN_OP_CROSS_ENTROPY:  // whole; columns 40..80 of 101 split in 3 slots: stats, loss
      for (int64_t V : {3, 101}) c.push_back({op, {f({9, V}), tgt({9}, V)}, {f({1})}});
      c.push_back(with({op, {f({9, 41}), tgt({9}, 101)}, {f({9, 3, 3})}}, XentParams{1, 40, 1, 3}));
      c.push_back(with({op, {f({9, 41}), tgt({9}, 101), pos({9, 3, 3})}, {f({1})}},
                       XentParams{2, 40, 1, 3}));
      break;
    case MXN_OP_CROSS_ENTROPY_BWD:
      c.push_back({op, {f({1}), f({9, 101}), tgt({9}, 101)}, {f({9, 101})}});
      c.push_back(with({op, {f({1}), f({9, 41}), tgt({9}, 101), pos({9, 3, 3})}, {f({9, 41})}},
                       XentParams{2, 40, 1, 3}));
      break;
    case MXN_OP_CLASSIFIER_CE:  // the loss alone, then with both gradients; blocks of 4 rows
      c.push_back(with({op, {f({10, 13}), f({37, 13}), tgt({10}, 37)}, {f({1})}},
                       ClassifierParams{0, MXN_DTYPE_F32, 4}));
      c.push_back(
          with({op, {f({10, 13}), f({37, 13}), tgt({10}, 37)}, {f({1}), f({10, 13}), f({37, 13})}},
               ClassifierParams{2, MXN_DTYPE_F32, 4}));
      // ABI 6: the gradients for d(loss) = 0.3, dw added into what its output holds
      c.push_back(
          with({op, {f({10, 13}), f({37, 13}), tgt({10}, 37)}, {f({1}), f({10, 13}), f({37, 13})}},
               ClassifierParams{2, MXN_DTYPE_F32, 4, true, 0.3f}));
      // ABI 11: rows 20..36 of a vocabulary of 37 in slot 1 of 2: the stats, then the loss and
      // gradients from summed stats
      c.push_back(with({op, {f({10, 13}), f({17, 13}), tgt({10}, 37)}, {f({10, 2, 3})}},
                       ClassifierParams{0, MXN_DTYPE_F32, 4, false, 1.f, {1, 20, 1, 2}}));
      c.push_back(with({op,
                        {f({10, 13}), f({17, 13}), tgt({10}, 37), pos({10, 2, 3})},
                        {f({1}), f({10, 13}), f({17, 13})}},
                       ClassifierParams{2, MXN_DTYPE_F32, 4, true, 0.3f, {2, 20, 1, 2}}));
      break;
    case MXN_OP_CLASSIFIER_CE_BWD:
      c.push_back({op, {f({1}), f({10, 13}), f({37, 13})}, {f({10, 13}), f({37, 13})}});
      break;
    case MXN_OP_ADAMW:
      c.push_back(with({op, {f({513})}, {f({513}), f({513}), pos({513})}},
                       AdamwParams{3, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.5f}));
      break;
    case MXN_OP_CAST:
      if (dt == DType::bf16) {
        c.push_back({op, {f({257})}, {{{257}, Gen::normal, 0, DType::bf16}}});
        c.push_back({op, {{{257}, Gen::normal, 0, DType::bf16}}, {f({257})}});
      } else {
        c.push_back({op, {f({257})}, {f({257})}});
      }
      break;
    case MXN_OP_COPY:
      c.push_back({op, {f({3, 7})}, {f({3, 7})}});
      break;
    case MXN_OP_FILL:
      c.push_back(with({op, {}, {f({129})}}, ScalarParams{2.5f}));
      break;
    case MXN_OP_SUM_SQUARES:
      c.push_back({op, {f({1000})}, {f({1})}});
      c.push_back(with({op, {f({77})}, {pos({1})}}, SumParams{true}));
      break;
    case MXN_OP_RMSNORM:
      for (int64_t n : {13, 384})
        c.push_back(with({op, {f({6, n}), f({n})}, {f({6, n}), f({6})}}, NormParams{}));
      // ABI 9: per-head norms (Qwen3's q and k): 4 groups of 9 columns a row
      c.push_back(with({op, {f({6, 36}), f({9})}, {f({6, 36}), f({24})}}, NormParams{1e-6f}));
      break;
    case MXN_OP_RMSNORM_BWD:
      c.push_back({op, {f({6, 13}), f({6, 13}), f({13}), pos({6})}, {f({6, 13}), f({13})}});
      c.push_back({op, {f({6, 36}), f({6, 36}), f({9}), pos({24})}, {f({6, 36}), f({9})}});
      break;
    case MXN_OP_MOE_ROUTE:
    case MXN_OP_MOE_ROUTE_BWD:
    case MXN_OP_MOE_PERMUTE:
    case MXN_OP_MOE_UNPERMUTE:
    case MXN_OP_MOE_UNPERMUTE_BWD:
    case MXN_OP_GROUPED_MATMUL:
      if (dt == DType::bf16) {  // bf16 experts' matrices (inference), one row and many
        const Operand b16{{5, 11, 17}, Gen::normal, 0, DType::bf16};
        for (int64_t M : {1, 4, 29})
          for (bool tb : {true, false})
            c.push_back(
                with({op,
                      {f({M, 17}), tb ? b16 : Operand{{5, 17, 11}, Gen::normal, 0, DType::bf16},
                       offsets(5, M)},
                      {f({M, 11})}},
                     GroupedMatmulParams{tb}));
        break;
      }
      return moe_cases(op);
    case MXN_OP_STRIDED_COPY: {
      // MLA's moves: heads of (N=5, H=3, D=4) rows to (H, N, D) batches; a column window (cols
      // 2..5 of 9) into the right half of wider rows, whose other half keeps its values; a
      // scattered index space (no contiguous rows).
      StridedCopyParams t, w, s;
      t.n[0] = 3, t.n[1] = 5, t.n[2] = 4, t.in_stride[0] = 4, t.in_stride[1] = 12;
      t.out_stride[0] = 20, t.out_stride[1] = 4;
      w.n[0] = 1, w.n[1] = 7, w.n[2] = 4, w.in_stride[1] = 9, w.in_offset = 2;
      w.out_stride[1] = 8, w.out_offset = 4;
      s.n[0] = 2, s.n[1] = 3, s.n[2] = 5, s.in_stride[0] = 1, s.in_stride[1] = 2,
      s.in_stride[2] = 6, s.out_stride[0] = 15, s.out_stride[1] = 5;
      c.push_back(with({op, {f({5, 12})}, {f({3, 5, 4})}}, t));
      c.push_back(with({op, {f({7, 9})}, {f({7, 8})}}, w));
      c.push_back(with({op, {f({30})}, {f({2, 15})}}, s));
      break;
    }
    case MXN_OP_ROPE:
      // LLaMA's half-split layout over whole heads; GLM's interleaved pairs on half of each head
      // of a fused qkv row (v's columns pass through); llama3 scaling; backwards; 2-D RoPE.
      c.push_back(with({op, {f({7, 24}), idx({7}, 50)}, {f({7, 24})}},
                       RopeParams{.heads = 3, .head_dim = 8, .rot = 8}));
      c.push_back(with(
          {op, {f({5, 30}), idx({5}, 50)}, {f({5, 30})}},
          RopeParams{.heads = 4, .head_dim = 6, .rot = 4, .interleaved = true, .theta = 500.f}));
      c.push_back(
          with({op, {f({6, 32}), idx({6}, 9000)}, {f({6, 32})}}, RopeParams{.col0 = 16,
                                                                            .heads = 1,
                                                                            .head_dim = 16,
                                                                            .rot = 16,
                                                                            .scaling = 2,
                                                                            .backward = true,
                                                                            .theta = 500000.f,
                                                                            .factor = 8.f}));
      c.push_back(
          with({op, {f({3, 12}), idx({3}, 20)}, {f({3, 12})}}, RopeParams{.col0 = 2,
                                                                          .heads = 2,
                                                                          .head_dim = 5,
                                                                          .rot = 2,
                                                                          .interleaved = true,
                                                                          .scaling = 1,
                                                                          .backward = true,
                                                                          .factor = 4.f}));
      // ABI 9: yarn (DeepSeek-V3's scaling: 40x, from 4096 positions), on 64-dim heads.
      c.push_back(with({op, {f({5, 128}), idx({5}, 60000)}, {f({5, 128})}},
                       RopeParams{.heads = 2,
                                  .head_dim = 64,
                                  .rot = 64,
                                  .interleaved = true,
                                  .scaling = 3,
                                  .factor = 40.f,
                                  .original_max_position = 4096.f}));
      // 2-D RoPE's second half: the last head's rotated dims end at the row's end.
      c.push_back(
          with({op, {f({4, 16}), idx({4}, 30)}, {f({4, 16})}},
               RopeParams{.col0 = 4, .heads = 2, .head_dim = 8, .rot = 4, .interleaved = true}));
      break;
    case MXN_OP_SILU:
      c.push_back({op, {f({9, 111})}, {f({9, 111})}});
      break;
    case MXN_OP_SILU_BWD:
      c.push_back({op, {f({9, 111}), f({9, 111})}, {f({9, 111})}});
      break;
    case MXN_OP_SWIGLU:
      c.push_back({op, {f({7, 11}), f({7, 11})}, {f({7, 11})}});
      c.push_back(with({op, {f({5, 26}), f({5, 26})}, {f({5, 13})}},
                       SwigluParams{0, 13}));  // fused [gate | up]
      break;
    case MXN_OP_SWIGLU_BWD:
      c.push_back({op, {f({7, 11}), f({7, 11}), f({7, 11})}, {f({7, 11}), f({7, 11})}});
      c.push_back(with({op, {f({5, 13}), f({5, 26}), f({5, 26})}, {f({5, 26}), f({5, 26})}},
                       SwigluParams{0, 13}));
      break;
    case MXN_OP_DROPOUT:  // the mask is a function of (seed, index): equal on every chip
      c.push_back(with({op, {f({7, 33})}, {f({7, 33})}}, DropoutParams{123456789, 1000, 0, 0.3f}));
      c.push_back(with({op, {f({4096})}, {f({4096})}}, DropoutParams{uint64_t(-42), 0, 0, 0.1f}));
      break;
    case MXN_OP_SET_ROWS:
      c.push_back(with({op, {f({2, 6})}, {f({2 * 5, 6})}}, SetRowsParams{3, 5, 0}));
      c.push_back(with({op, {f({3 * 4, 17})}, {f({3 * 9, 7})}},
                       SetRowsParams{0, 9, 10}));  // a window of fused kv
      c.push_back(with({op, {f({5, 17}), distinct({5}, 12)}, {f({12, 7})}},
                       SetRowsParams{0, 1, 3}));  // to rows idx
      break;
    default:
      break;
  }
  return c;
}

Values outputs_of(const std::vector<std::vector<uint8_t>>& bytes, const Case& c) {
  Values v;
  for (size_t i = 0; i < bytes.size(); ++i) v.push_back(to_double(bytes[i], c.out[i].dtype));
  return v;
}

// The case's outputs in double precision from the same inputs (and initial outputs) the device
// got; an output stored in bf16 is rounded as the device rounds it.
Values double_reference(const Case& c, const std::vector<std::vector<uint8_t>>& data) {
  Values in, out;
  for (size_t i = 0; i < c.in.size(); ++i) in.push_back(to_double(data[i], c.in[i].dtype));
  for (size_t i = 0; i < c.out.size(); ++i)
    out.push_back(to_double(data[c.in.size() + i], c.out[i].dtype));
  return reference_outputs(c, in, std::move(out));
}

}  // namespace

double conformance_tolerance(DType dtype) { return dtype == DType::bf16 ? 1e-2 : 1e-5; }

std::vector<ConformanceRow> run_conformance(Device& dev, Device* ref, DType dtype,
                                            const std::string& only_op) {
  if (!only_op.empty()) {
    bool known = false;
    std::string names;
    for (int op = 0; op < MXN_OP_COUNT; ++op) {
      known |= only_op == op_name(op);
      names += std::string(op ? ", " : "") + op_name(op);
    }
    if (!known) throw Error("unknown op '" + only_op + "' (ops: " + names + ")");
  }
  std::vector<ConformanceRow> rows;
  for (int op = 0; op < MXN_OP_COUNT; ++op) {
    if (!only_op.empty() && only_op != op_name(op)) continue;
    ConformanceRow row{op_name(op), dtype_name(dtype), "pass", 0, 0};
    const std::vector<Case> cases = cases_for(mxn_op(op), dtype);
    // A kernel is unsupported for a dtype if the device says so for any tensor dtype it needs.
    const bool takes_bf16 = op == MXN_OP_CAST || op == MXN_OP_MATMUL || op == MXN_OP_GELU ||
                            op == MXN_OP_GELU_BWD || op == MXN_OP_ATTENTION ||
                            op == MXN_OP_ATTENTION_BWD || op == MXN_OP_GROUPED_MATMUL;
    const DType need = takes_bf16 ? dtype : DType::f32;
    if (cases.empty() || (dtype == DType::bf16 && !takes_bf16) || !dev.supports(mxn_op(op), need)) {
      row.status = "unsupported";
      rows.push_back(row);
      continue;
    }
    Rng rng(uint64_t(op) * 7919 + 1);
    for (const Case& c : cases) {
      std::vector<std::vector<uint8_t>> data;
      for (const auto* ops : {&c.in, &c.out})
        for (const Operand& o : *ops) data.push_back(make_data(o, rng));
      BoundCase on_dev(dev, c, data);
      if (!dev.supports(on_dev.call())) {  // the device refuses this whole call (ABI 8)
        row.status = "unsupported";
        break;
      }
      const auto got = on_dev.run().outputs();
      const Values want =
          ref ? outputs_of(BoundCase(*ref, c, data).run().outputs(), c) : double_reference(c, data);
      for (size_t i = 0; i < got.size(); ++i) {
        const auto g = to_double(got[i], c.out[i].dtype);
        const std::vector<double>& w = want[i];
        double scale = 1, diff = 0;
        for (size_t j = 0; j < w.size(); ++j) {
          scale = std::max(scale, std::fabs(w[j]));
          diff = std::max(diff, std::isfinite(g[j]) ? std::fabs(g[j] - w[j]) : INFINITY);
        }
        row.max_err = std::max(row.max_err, diff / scale);
      }
      ++row.cases;
    }
    if (row.status == "pass" && !(row.max_err <= conformance_tolerance(dtype))) row.status = "FAIL";
    rows.push_back(row);
  }
  return rows;
}

}  // namespace mxn
