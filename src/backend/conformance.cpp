#include "backend/conformance.h"

#include <algorithm>
#include <cmath>

#include "backend/op_case.h"
#include "core/error.h"
#include "core/rng.h"

namespace mxn {
namespace {

using namespace opcase;

std::vector<Case> cases_for(mxn_op op, DType dt) {
  std::vector<Case> c;
  const int64_t compute = dt == DType::bf16 ? MXN_DTYPE_BF16 : MXN_DTYPE_F32;
  switch (op) {
    case MXN_OP_MATMUL:
      for (auto [M, N, K] : {std::array<int64_t, 3>{7, 5, 3}, {64, 48, 32}, {33, 17, 65}})
        for (int ta = 0; ta < 2; ++ta)
          for (int tb = 0; tb < 2; ++tb)
            c.push_back({op,
                         {f(ta ? Shape{K, M} : Shape{M, K}), f(tb ? Shape{N, K} : Shape{K, N})},
                         {f({M, N})},
                         {ta, tb, (M + ta) % 2, compute},
                         {0.75f}});
      c.push_back({op, {f({3, 9, 5}), f({3, 5, 7})}, {f({3, 9, 7})}, {0, 0, 0, compute}, {1.f}});
      c.push_back({op, {f({2, 6, 9}), f({2, 11, 6})}, {f({2, 9, 11})}, {1, 1, 1, compute}, {1.f}});
      break;
    case MXN_OP_ADD:
      c.push_back({op, {f({3, 17}), f({3, 17})}, {f({3, 17})}});
      break;
    case MXN_OP_ADD_BIAS:
      c.push_back({op, {f({7, 13}), f({13})}, {f({7, 13})}});
      break;
    case MXN_OP_SUM_ROWS:
      c.push_back({op, {f({33, 17})}, {f({17})}, {0}});
      c.push_back({op, {f({4, 5})}, {f({5})}, {1}});
      break;
    case MXN_OP_SCALE:
      c.push_back({op, {f({1001})}, {f({1001})}, {}, {-0.3f}});
      break;
    case MXN_OP_GELU:
      c.push_back({op, {f({9, 111})}, {f({9, 111})}});
      break;
    case MXN_OP_GELU_BWD:
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
        c.push_back({op, {f({6, n}), f({n}), f({n})}, {f({6, n}), f({6, 2})}, {}, {1e-5f}});
      break;
    case MXN_OP_LAYERNORM_BWD:
      c.push_back(
          {op, {f({6, 13}), f({6, 13}), f({13}), pos({6, 2})}, {f({6, 13}), f({13}), f({13})}});
      break;
    case MXN_OP_ATTENTION:
      c.push_back({op, {f({10, 18})}, {f({10, 6}), f({2, 3, 5, 5})}, {3, 5}});
      c.push_back({op, {f({17, 24})}, {f({17, 8}), f({1, 2, 17, 17})}, {2, 17}});
      break;
    case MXN_OP_ATTENTION_BWD:
      c.push_back({op, {f({10, 6}), f({10, 18}), pos({2, 3, 5, 5})}, {f({10, 18})}, {3, 5}});
      c.push_back({op, {f({17, 8}), f({17, 24}), pos({1, 2, 17, 17})}, {f({17, 24})}, {2, 17}});
      break;
    case MXN_OP_EMBEDDING:
      c.push_back({op, {idx({11}, 7), f({7, 5})}, {f({11, 5})}});
      break;
    case MXN_OP_EMBEDDING_BWD:
      c.push_back({op, {f({11, 5}), idx({11}, 7)}, {f({7, 5})}});
      break;
    case MXN_OP_CROSS_ENTROPY:
      for (int64_t V : {3, 101}) c.push_back({op, {f({9, V}), tgt({9}, V)}, {f({1})}});
      break;
    case MXN_OP_CROSS_ENTROPY_BWD:
      c.push_back({op, {f({1}), f({9, 101}), tgt({9}, 101)}, {f({9, 101})}});
      break;
    case MXN_OP_ADAMW:
      c.push_back({op,
                   {f({513})},
                   {f({513}), f({513}), pos({513})},
                   {3},
                   {1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.5f}});
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
      c.push_back({op, {}, {f({129})}, {}, {2.5f}});
      break;
    case MXN_OP_SUM_SQUARES:
      c.push_back({op, {f({1000})}, {f({1})}, {0}});
      c.push_back({op, {f({77})}, {pos({1})}, {1}});
      break;
    default:
      break;
  }
  return c;
}

}  // namespace

double conformance_tolerance(DType dtype) { return dtype == DType::bf16 ? 1e-2 : 1e-5; }

std::vector<ConformanceRow> run_conformance(Device& dev, Device& ref, DType dtype,
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
    DType need = dtype;
    if (op != MXN_OP_CAST && op != MXN_OP_MATMUL) need = DType::f32;
    if (cases.empty() || (dtype == DType::bf16 && op != MXN_OP_MATMUL && op != MXN_OP_CAST) ||
        !dev.supports(mxn_op(op), need)) {
      row.status = "unsupported";
      rows.push_back(row);
      continue;
    }
    Rng rng(uint64_t(op) * 7919 + 1);
    for (const Case& c : cases) {
      std::vector<std::vector<uint8_t>> data;
      for (const auto* ops : {&c.in, &c.out})
        for (const Operand& o : *ops) data.push_back(make_data(o, rng));
      const auto got = BoundCase(dev, c, data).run().outputs();
      const auto want = BoundCase(ref, c, data).run().outputs();
      for (size_t i = 0; i < got.size(); ++i) {
        const auto g = to_double(got[i], c.out[i].dtype), w = to_double(want[i], c.out[i].dtype);
        double scale = 1, diff = 0;
        for (size_t j = 0; j < w.size(); ++j) {
          scale = std::max(scale, std::fabs(w[j]));
          diff = std::max(diff, std::isfinite(g[j]) ? std::fabs(g[j] - w[j]) : INFINITY);
        }
        row.max_err = std::max(row.max_err, diff / scale);
      }
      ++row.cases;
    }
    if (!(row.max_err <= conformance_tolerance(dtype))) row.status = "FAIL";
    rows.push_back(row);
  }
  return rows;
}

}  // namespace mxn
