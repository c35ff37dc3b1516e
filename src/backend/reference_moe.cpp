// The mixture-of-experts ops in double precision, from backend_abi.h's definitions (sorts where
// the kernels select, sums in the definition's order): what the conformance kit checks the CPU
// backend's MoE kernels against.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "backend/common.h"
#include "backend/reference.h"

namespace mxn::opcase {
namespace {

using Vec = std::vector<double>;

Vec scores(const double* logits, int64_t E, bool sigmoid) {
  Vec s(static_cast<size_t>(E));
  if (sigmoid) {
    for (int64_t e = 0; e < E; ++e) s[size_t(e)] = 1.0 / (1.0 + std::exp(-logits[e]));
    return s;
  }
  const double mx = *std::max_element(logits, logits + E);
  double sum = 0;
  for (int64_t e = 0; e < E; ++e) sum += s[size_t(e)] = std::exp(logits[e] - mx);
  for (double& v : s) v /= sum;
  return s;
}

// Indexes 0..n-1 by descending value, lower index first on ties.
std::vector<int64_t> ranked(const Vec& v) {
  std::vector<int64_t> order(v.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return v[size_t(a)] > v[size_t(b)]; });
  return order;
}

// One token's experts in descending selection score.
std::vector<int64_t> choose(const Vec& s, const double* bias, const MoeRouteShape& r) {
  const int64_t E = r.E, G = r.n_group, gs = E / G;
  Vec sel(s);
  if (bias)
    for (int64_t e = 0; e < E; ++e) sel[size_t(e)] += bias[e];
  Vec masked(sel);
  if (G > 1) {
    Vec group(static_cast<size_t>(G));
    for (int64_t g = 0; g < G; ++g) {
      Vec in(sel.begin() + g * gs, sel.begin() + (g + 1) * gs);
      std::sort(in.rbegin(), in.rend());
      group[size_t(g)] = bias && gs > 1 ? in[0] + in[1] : in[0];
    }
    const std::vector<int64_t> keep = ranked(group);
    for (size_t i = size_t(r.topk_group); i < keep.size(); ++i)
      for (int64_t e = keep[i] * gs; e < (keep[i] + 1) * gs; ++e) masked[size_t(e)] = -INFINITY;
  }
  std::vector<int64_t> order = ranked(masked);
  order.resize(size_t(r.K));
  return order;
}

void route(const mxn_op_call& k, const Values& in, Values& out, bool backward) {
  const MoeRouteShape r = moe_route_shape(k, backward);
  const MoeRouteParams p = params_of<MoeRouteParams>(k);
  const int64_t N = r.N, E = r.E, K = r.K;
  const Vec& logits = in[backward ? 1 : 0];
  std::vector<double> count(size_t(E), 0.0);
  std::vector<std::vector<int64_t>> ids(static_cast<size_t>(N));
  for (int64_t t = 0; t < N; ++t) {
    if (backward)
      for (int64_t j = 0; j < K; ++j) ids[size_t(t)].push_back(int64_t(in[2][size_t(t * K + j)]));
    else
      ids[size_t(t)] = choose(scores(&logits[size_t(t * E)], E, p.sigmoid),
                              r.bias >= 0 ? in[size_t(r.bias)].data() : nullptr, r);
    for (int64_t e : ids[size_t(t)]) count[size_t(e)] += 1;
  }
  Vec mean(size_t(E), 0.0);
  for (int64_t t = 0; t < N; ++t) {
    const Vec s = scores(&logits[size_t(t * E)], E, p.sigmoid);
    const std::vector<int64_t>& id = ids[size_t(t)];
    double sum = 0;
    for (int64_t e : id) sum += s[size_t(e)];
    if (!backward) {
      for (int64_t j = 0; j < K; ++j) {
        const double w = s[size_t(id[size_t(j)])] * (p.norm ? 1.0 / sum : 1.0) * p.scale;
        out[0][size_t(t * K + j)] = w;
        out[1][size_t(t * K + j)] = double(id[size_t(j)]);
      }
      for (int64_t e = 0; e < E; ++e) mean[size_t(e)] += s[size_t(e)] / double(N);
      continue;
    }
    // ds = d(w)/d(s) applied to dw, plus the aux loss's; then through the scores.
    Vec ds(size_t(E), 0.0);
    if (r.daux >= 0)
      for (int64_t e = 0; e < E; ++e)
        ds[size_t(e)] = in[3][0] * double(E) * count[size_t(e)] / (double(N) * double(N));
    for (int64_t j = 0; j < K; ++j)
      for (int64_t i = 0; i < K; ++i) {  // w_i = scale s_i / sum (norm) or scale s_i
        const double dwi = in[0][size_t(t * K + i)] * p.scale;
        const double si = s[size_t(id[size_t(i)])];
        const double d = p.norm ? ((i == j ? 1.0 / sum : 0.0) - si / (sum * sum)) : (i == j);
        ds[size_t(id[size_t(j)])] += dwi * d;
      }
    double dot = 0;
    for (int64_t e = 0; e < E; ++e) dot += ds[size_t(e)] * s[size_t(e)];
    for (int64_t e = 0; e < E; ++e) {
      const double se = s[size_t(e)];
      out[0][size_t(t * E + e)] =
          p.sigmoid ? ds[size_t(e)] * se * (1 - se) : se * (ds[size_t(e)] - dot);
    }
  }
  if (backward) return;
  // The stable sort of the slots by expert: slot order within an expert.
  std::vector<int64_t> slots(static_cast<size_t>(N * K));
  std::iota(slots.begin(), slots.end(), 0);
  std::stable_sort(slots.begin(), slots.end(),
                   [&](int64_t a, int64_t b) { return out[1][size_t(a)] < out[1][size_t(b)]; });
  for (size_t row = 0; row < slots.size(); ++row) out[2][size_t(slots[row])] = double(row);
  out[3][0] = 0;
  for (int64_t e = 0; e < E; ++e) out[3][size_t(e + 1)] = out[3][size_t(e)] + count[size_t(e)];
  if (r.aux) {
    double loss = 0;
    for (int64_t e = 0; e < E; ++e) loss += count[size_t(e)] / double(N) * mean[size_t(e)];
    out[4][0] = double(E) * loss;
  }
}

void permute(const mxn_op_call& k, const Values& in, Values& out) {
  const MoePermuteShape m = moe_permute_shape(k);
  const int64_t C = m.C, K = m.K;
  for (int64_t i = 0; i < m.N * K; ++i) {
    const int64_t t = i / K;
    const double w = m.weighted ? in[2][size_t(i)] : 1.0;
    if (k.op == MXN_OP_MOE_PERMUTE) {
      const int64_t row = int64_t(in[1][size_t(i)]);
      for (int64_t c = 0; c < C; ++c) out[0][size_t(row * C + c)] = in[0][size_t(t * C + c)] * w;
      continue;
    }
    if (k.op == MXN_OP_MOE_UNPERMUTE) {
      const int64_t row = int64_t(in[1][size_t(i)]);
      for (int64_t c = 0; c < C; ++c)
        out[0][size_t(t * C + c)] =
            (i % K ? out[0][size_t(t * C + c)] : 0.0) + in[0][size_t(row * C + c)] * w;
      continue;
    }
    const int64_t row = int64_t(in[2][size_t(i)]);  // UNPERMUTE_BWD: dw = <dy[t], yp[row]>
    double d = 0;
    for (int64_t c = 0; c < C; ++c) d += in[0][size_t(t * C + c)] * in[1][size_t(row * C + c)];
    out[0][size_t(i)] = d;
  }
}

void grouped(const mxn_op_call& k, const Values& in, Values& out) {
  const GroupedMatmulShape g = grouped_matmul_shape(k);
  const Vec &a = in[0], &b = in[1];
  std::vector<int32_t> off(in[2].begin(), in[2].end());
  Vec& o = out[0];
  const int64_t N = g.N, K = g.K;
  if (!g.weight_grad) std::fill(o.begin(), o.end(), 0.0);
  for (int64_t e = 0; e < g.E; ++e) {
    int64_t lo, hi;
    expert_rows(off.data(), e, g.M, &lo, &hi);
    if (g.weight_grad) {
      for (int64_t i = 0; i < N; ++i)
        for (int64_t j = 0; j < K; ++j) {
          double s = g.accumulate ? o[size_t((e * N + i) * K + j)] : 0.0;
          for (int64_t r = lo; r < hi; ++r) s += a[size_t(r * N + i)] * b[size_t(r * K + j)];
          o[size_t((e * N + i) * K + j)] = s;
        }
      continue;
    }
    for (int64_t r = lo; r < hi; ++r)
      for (int64_t j = 0; j < N; ++j) {
        double s = 0;
        for (int64_t l = 0; l < K; ++l)
          s += a[size_t(r * K + l)] * b[size_t(e * N * K + (g.tb ? j * K + l : l * N + j))];
        o[size_t(r * N + j)] = s;
      }
  }
}

}  // namespace

bool moe_reference(const mxn_op_call& k, const Values& in, Values& out) {
  switch (k.op) {
    case MXN_OP_MOE_ROUTE:
    case MXN_OP_MOE_ROUTE_BWD:
      route(k, in, out, k.op == MXN_OP_MOE_ROUTE_BWD);
      return true;
    case MXN_OP_MOE_PERMUTE:
    case MXN_OP_MOE_UNPERMUTE:
    case MXN_OP_MOE_UNPERMUTE_BWD:
      permute(k, in, out);
      return true;
    case MXN_OP_GROUPED_MATMUL:
      grouped(k, in, out);
      return true;
    case MXN_OP_STRIDED_COPY: {  // by its three nested loops
      const StridedCopyParams p = params_of<StridedCopyParams>(k);
      for (int64_t i = 0; i < p.n[0]; ++i)
        for (int64_t j = 0; j < p.n[1]; ++j)
          for (int64_t l = 0; l < p.n[2]; ++l)
            out[0][size_t(p.out_offset + i * p.out_stride[0] + j * p.out_stride[1] +
                          l * p.out_stride[2])] =
                in[0][size_t(p.in_offset + i * p.in_stride[0] + j * p.in_stride[1] +
                             l * p.in_stride[2])];
      return true;
    }
    default:
      return false;
  }
}

}  // namespace mxn::opcase
