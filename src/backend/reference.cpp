#include "backend/reference.h"

#include <algorithm>
#include <cmath>

#include "backend/common.h"
#include "core/dtype.h"
#include "core/error.h"

namespace mxn::opcase {
namespace {

using Vec = std::vector<double>;

double round_bf16(double x) { return bf16_to_f32(f32_to_bf16(float(x))); }
double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
constexpr double kGeluK = 0.7978845608028654;  // sqrt(2 / pi)
double gelu(double x) { return 0.5 * x * (1.0 + std::tanh(kGeluK * (x + 0.044715 * x * x * x))); }
double gelu_grad(double x) {
  const double t = std::tanh(kGeluK * (x + 0.044715 * x * x * x));
  return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * kGeluK * (1.0 + 3.0 * 0.044715 * x * x);
}

// The call's shapes and parameters (no buffers), for op_shapes.h's readers.
mxn_op_call shapes_of(const Case& c) {
  mxn_op_call k{};
  k.struct_size = sizeof k;
  k.op = c.op;
  k.n_inputs = int32_t(c.in.size());
  k.n_outputs = int32_t(c.out.size());
  auto put = [](mxn_tensor& t, const Operand& o) {
    t.dtype = int32_t(o.dtype);
    t.ndim = int32_t(o.shape.size());
    for (size_t i = 0; i < o.shape.size(); ++i) t.shape[i] = o.shape[i];
  };
  for (size_t i = 0; i < c.in.size(); ++i) put(k.inputs[i], c.in[i]);
  for (size_t i = 0; i < c.out.size(); ++i) put(k.outputs[i], c.out[i]);
  std::copy(c.ip.begin(), c.ip.end(), k.ip);
  std::copy(c.fp.begin(), c.fp.end(), k.fp);
  return k;
}

std::vector<int32_t> ints(const Vec& v) { return std::vector<int32_t>(v.begin(), v.end()); }

void matmul(const mxn_op_call& k, const Values& in, Values& out) {
  const MatmulShape m = matmul_shape(k);
  MXN_CHECK(!m.error, m.error ? m.error : "");
  Vec A = in[0], B = in[1];
  if (m.bf16)
    for (Vec* v : {&A, &B}) std::transform(v->begin(), v->end(), v->begin(), round_bf16);
  Vec& C = out[0];
  for (int64_t b = 0; b < m.batch; ++b)
    for (int64_t i = 0; i < m.M; ++i)
      for (int64_t j = 0; j < m.N; ++j) {
        double s = 0;
        for (int64_t l = 0; l < m.K; ++l)
          s += A[size_t(b * m.sa + (m.ta ? l * m.M + i : i * m.K + l))] *
               B[size_t(b * m.sb + (m.tb ? j * m.K + l : l * m.N + j))];
        double& c = C[size_t(b * m.sc + i * m.N + j)];
        c = m.alpha * s + (m.accumulate ? c : 0.0) + (k.n_inputs > 2 ? in[2][size_t(j)] : 0.0);
      }
}

// The keys query (b, t) sees, as rows of k and v (the prefix keys come first, separately).
std::vector<int64_t> keys_of(const AttentionShape& a, const int32_t* extra, int64_t b, int64_t t) {
  std::vector<int64_t> rows;
  if (a.mask == MXN_MASK_PAGED) {
    for (int64_t j = 0; j < a.paged_n(extra, b, t); ++j)
      rows.push_back(a.paged_row(extra, b, t, j));
    return rows;
  }
  const int64_t lo = a.first(extra, b, t);
  const int64_t hi =
      a.mask == MXN_MASK_CACHED ? a.range_end(extra, b, t) : a.visible(t, a.prefix_of(extra, b));
  for (int64_t j = lo; j < hi; ++j) rows.push_back(j);
  return rows;
}

void attention(const mxn_op_call& k, const Values& in, Values& out, bool backward) {
  const AttentionShape a = attention_shape(k, backward);
  MXN_CHECK(!a.error, a.error ? a.error : "");
  const int o = backward ? 1 : 0;
  const Vec &q = in[size_t(o)], &kk = in[size_t(o + 1)], &v = in[size_t(o + 2)];
  const std::vector<int32_t> extra =
      a.has_prefix ? ints(in[size_t(a.extra)]) : std::vector<int32_t>{};
  const Vec* pk = a.P > 0 ? &in[size_t(a.pkv)] : nullptr;
  const Vec* pv = a.P > 0 ? &in[size_t(a.pkv + 1)] : nullptr;
  const int64_t hd = a.hd, ldp = a.G * hd;
  auto key = [&](int64_t b, int64_t g, int64_t j, bool value) -> const double* {
    if (j < a.P) return (value ? pv : pk)->data() + j * ldp + g * hd;
    return value ? v.data() + a.v(b, j - a.P, g) : kk.data() + a.k(b, j - a.P, g);
  };
  if (backward) {  // dk, dv (and dpk, dpv) are overwritten over every row of their windows
    for (int64_t b = 0; b < a.B; ++b)
      for (int64_t j = 0; j < a.kv_rows; ++j)
        for (int64_t g = 0; g < a.G; ++g)
          for (int64_t c = 0; c < hd; ++c) {
            out[1][size_t(a.k(b, j, g) + c)] = 0;
            out[2][size_t(a.v(b, j, g) + c)] = 0;
          }
    if (a.P > 0)
      std::fill(out[3].begin(), out[3].end(), 0.0), std::fill(out[4].begin(), out[4].end(), 0.0);
  }
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t t = 0; t < a.T; ++t) {
      std::vector<int64_t> js;
      for (int64_t p = 0; p < a.P; ++p) js.push_back(p);
      for (int64_t r : keys_of(a, extra.empty() ? nullptr : extra.data(), b, t))
        js.push_back(a.P + r);
      for (int64_t h = 0; h < a.H; ++h) {
        const int64_t g = h / a.group();
        const double* qr = q.data() + a.q(b, t, h);
        Vec s(js.size());
        double mx = -INFINITY;
        for (size_t i = 0; i < js.size(); ++i) {
          const double* kr = key(b, g, js[i], false);
          double d = 0;
          for (int64_t c = 0; c < hd; ++c) d += qr[c] * kr[c];
          s[i] = a.scale * d;
          mx = std::max(mx, s[i]);
        }
        if (!backward) {
          double sum = 0;
          for (double& x : s) sum += (x = std::exp(x - mx));
          double* y = out[0].data() + a.y(b, t, h);
          for (int64_t c = 0; c < hd; ++c) y[c] = 0;
          for (size_t i = 0; i < js.size(); ++i)
            for (int64_t c = 0; c < hd; ++c) y[c] += s[i] / sum * key(b, g, js[i], true)[c];
          if (k.n_outputs > 1) out[1][size_t(a.lse(b, t, h))] = mx + std::log(sum);
          continue;
        }
        // The flash backward from the given y and lse: P = exp(s - lse), D = <dy, y>,
        // dS = P (dP - D), dq = scale dS K, dk += scale dS q, dv += P dy.
        const double* dy = in[0].data() + a.y(b, t, h);
        const double* yr = in[4].data() + a.y(b, t, h);
        const double lse = in[5][size_t(a.lse(b, t, h))];
        double D = 0;
        for (int64_t c = 0; c < hd; ++c) D += dy[c] * yr[c];
        double* dq = out[0].data() + a.q(b, t, h);
        for (int64_t c = 0; c < hd; ++c) dq[c] = 0;
        for (size_t i = 0; i < js.size(); ++i) {
          const double P = std::exp(s[i] - lse);
          const double* vr = key(b, g, js[i], true);
          double dP = 0;
          for (int64_t c = 0; c < hd; ++c) dP += dy[c] * vr[c];
          const double dS = P * (dP - D) * a.scale;
          const double* kr = key(b, g, js[i], false);
          const int64_t j = js[i];
          double* dk =
              j < a.P ? out[3].data() + j * ldp + g * hd : out[1].data() + a.k(b, j - a.P, g);
          double* dv =
              j < a.P ? out[4].data() + j * ldp + g * hd : out[2].data() + a.v(b, j - a.P, g);
          for (int64_t c = 0; c < hd; ++c) {
            dq[c] += dS * kr[c];
            dk[c] += dS * qr[c];
            dv[c] += P * dy[c];
          }
        }
      }
    }
}

void norm_bwd(const mxn_op_call& k, const Values& in, Values& out, bool layernorm) {
  const int64_t C = count(k.inputs[2]), N = count(k.inputs[0]) / C;  // rows: groups of count(w)
  const Vec &dy = in[0], &x = in[1], &w = in[2], &st = in[3];
  std::fill(out[1].begin(), out[1].end(), 0.0);
  if (layernorm) std::fill(out[2].begin(), out[2].end(), 0.0);
  for (int64_t r = 0; r < N; ++r) {
    const double mean = layernorm ? st[size_t(2 * r)] : 0.0;
    const double rstd = layernorm ? st[size_t(2 * r + 1)] : st[size_t(r)];
    double a = 0, b = 0;  // sum dxhat, sum dxhat xhat
    for (int64_t c = 0; c < C; ++c) {
      const size_t i = size_t(r * C + c);
      const double xh = (x[i] - mean) * rstd, g = dy[i] * w[size_t(c)];
      a += g;
      b += g * xh;
      out[1][size_t(c)] += dy[i] * xh;
      if (layernorm) out[2][size_t(c)] += dy[i];
    }
    for (int64_t c = 0; c < C; ++c) {
      const size_t i = size_t(r * C + c);
      const double xh = (x[i] - mean) * rstd, g = dy[i] * w[size_t(c)];
      out[0][i] = layernorm ? rstd * (g - a / double(C) - xh * b / double(C))
                            : rstd * (g - xh * b / double(C));
    }
  }
}

// Mean cross-entropy of `logits` (N, V) rows against targets (< 0 ignored); with `dlogits`, its
// gradient times `scale`.
double cross_entropy(const Vec& logits, const Vec& tgt, int64_t N, int64_t V, Vec* dlogits,
                     double scale) {
  int64_t n = 0;
  for (int64_t r = 0; r < N; ++r) n += tgt[size_t(r)] >= 0;
  double loss = 0;
  for (int64_t r = 0; r < N; ++r) {
    const double* l = logits.data() + r * V;
    const double mx = *std::max_element(l, l + V);
    double sum = 0;
    for (int64_t c = 0; c < V; ++c) sum += std::exp(l[c] - mx);
    const int64_t t = int64_t(tgt[size_t(r)]);
    if (t >= 0) loss += mx + std::log(sum) - l[t];
    if (!dlogits) continue;
    for (int64_t c = 0; c < V; ++c)
      (*dlogits)[size_t(r * V + c)] =
          t < 0 ? 0.0
                : scale * (std::exp(l[c] - mx) / sum - (c == t)) / double(std::max<int64_t>(n, 1));
  }
  return n > 0 ? loss / double(n) : 0.0;
}

// A vocabulary slice's cross-entropy (XentParams) of logits (N, V): part 1 writes `stats`; part 2
// returns the loss from the summed `stats` and, with `dl`, the slice's dlogits times `scale`.
double slice_xent(const XentParams& p, const Vec& l, const Vec& tgt, int64_t N, int64_t V,
                  Vec& stats, Vec* dl, double scale) {
  int64_t n = 0;
  for (int64_t r = 0; r < N; ++r) n += tgt[size_t(r)] >= 0;
  double loss = 0;
  for (int64_t r = 0; r < N; ++r) {
    const double* row = l.data() + r * V;
    const int64_t t = int64_t(tgt[size_t(r)]) - p.vocab0;
    double* st = stats.data() + r * p.slots * 3;
    if (p.part == 1) {
      const double mx = *std::max_element(row, row + V);
      double s = 0;
      for (int64_t v = 0; v < V; ++v) s += std::exp(row[v] - mx);
      std::fill(st, st + p.slots * 3, 0.0);
      st[3 * p.slot] = mx, st[3 * p.slot + 1] = s,
             st[3 * p.slot + 2] = t >= 0 && t < V ? row[t] : 0;
      continue;
    }
    double M, S, target;
    xent_combine(st, p.slots, &M, &S, &target);
    if (tgt[size_t(r)] >= 0) loss += std::log(S) + M - target;
    for (int64_t v = 0; dl && v < V; ++v)
      (*dl)[size_t(r * V + v)] = tgt[size_t(r)] < 0
                                     ? 0.0
                                     : scale * (std::exp(row[v] - M) / S - double(v == t)) /
                                           double(std::max<int64_t>(n, 1));
  }
  return n > 0 ? loss / double(n) : 0.0;
}

// CROSS_ENTROPY(_BWD) over a vocabulary slice: part 1's stats, part 2's loss, the slice's dlogits.
bool xent_slice(const mxn_op_call& k, const Values& in, Values& out) {
  const XentParams p = params_of<XentParams>(k);
  const bool bwd = k.op == MXN_OP_CROSS_ENTROPY_BWD;
  const mxn_tensor& lt = k.inputs[bwd ? 1 : 0];
  Vec stats = p.part == 1 ? Vec(out[0].size()) : in[bwd ? 3 : 2];
  const double loss = slice_xent(p, in[bwd ? 1 : 0], in[bwd ? 2 : 1], rows_of(lt), last(lt), stats,
                                 bwd ? &out[0] : nullptr, bwd ? in[0][0] : 1.0);
  if (p.part == 1)
    out[0] = stats;
  else if (!bwd)
    out[0][0] = loss;
  return true;
}

void classifier(const mxn_op_call& k, const Values& in, Values& out) {
  const ClassifierParams p = params_of<ClassifierParams>(k);
  const int64_t C = last(k.inputs[0]), N = rows_of(k.inputs[0]), V = rows_of(k.inputs[1]);
  Vec x = in[0], w = in[1];
  if (p.compute == MXN_DTYPE_BF16)
    for (Vec* t : {&x, &w}) std::transform(t->begin(), t->end(), t->begin(), round_bf16);
  Vec logits(size_t(N * V)), dl(size_t(N * V));
  for (int64_t r = 0; r < N; ++r)
    for (int64_t v = 0; v < V; ++v) {
      double s = 0;
      for (int64_t c = 0; c < C; ++c) s += x[size_t(r * C + c)] * w[size_t(v * C + c)];
      logits[size_t(r * V + v)] = s;
    }
  if (p.vocab.part == 1) {  // a vocabulary slice's stats only
    slice_xent(p.vocab, logits, in[2], N, V, out[0], nullptr, 1.0);
    return;
  }
  if (p.vocab.part == 2) {
    Vec stats = in[3];
    out[0][0] = slice_xent(p.vocab, logits, in[2], N, V, stats, &dl, p.scale());
  } else {
    out[0][0] = cross_entropy(logits, in[2], N, V, &dl, p.scale());
  }
  if (p.grads > 0)
    for (int64_t r = 0; r < N; ++r)
      for (int64_t c = 0; c < C; ++c) {
        double s = 0;
        for (int64_t v = 0; v < V; ++v) s += dl[size_t(r * V + v)] * w[size_t(v * C + c)];
        out[1][size_t(r * C + c)] = s;
      }
  if (p.grads > 1)
    for (int64_t v = 0; v < V; ++v)
      for (int64_t c = 0; c < C; ++c) {
        double s = 0;
        for (int64_t r = 0; r < N; ++r) s += dl[size_t(r * V + v)] * x[size_t(r * C + c)];
        double& o = out[2][size_t(v * C + c)];
        o = (p.direct ? o : 0.0) + s;
      }
}

void rope(const mxn_op_call& k, const Values& in, Values& out) {
  const RopeParams r = params_of<RopeParams>(k);
  const int64_t W = last(k.inputs[0]), N = rows_of(k.inputs[0]), half = r.rot / 2;
  out[0] = in[0];
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < r.heads; ++h)
      for (int64_t i = 0; i < half; ++i) {
        // The angle as Hugging Face makes it (positions times frequencies in float32).
        const double ang = double(float(in[1][size_t(n)]) * r.inv_freq(i));
        const double c = std::cos(ang), s = (r.backward ? -1.0 : 1.0) * std::sin(ang);
        const int64_t base = n * W + r.col0 + h * r.head_dim;
        const size_t i1 = size_t(base + (r.interleaved ? 2 * i : i));
        const size_t i2 = size_t(base + (r.interleaved ? 2 * i + 1 : i + half));
        out[0][i1] = in[0][i1] * c - in[0][i2] * s;
        out[0][i2] = in[0][i2] * c + in[0][i1] * s;
      }
}

void swiglu(const mxn_op_call& k, const Values& in, Values& out, bool backward) {
  const SwigluParams p = params_of<SwigluParams>(k);
  const int o = backward ? 1 : 0;
  const int64_t F = last(backward ? k.inputs[0] : k.outputs[0]);
  const int64_t N = rows_of(backward ? k.inputs[0] : k.outputs[0]);
  const int64_t lg = last(k.inputs[o]), lu = last(k.inputs[o + 1]);
  for (int64_t r = 0; r < N; ++r)
    for (int64_t c = 0; c < F; ++c) {
      const size_t gi = size_t(r * lg + p.gate_col + c), ui = size_t(r * lu + p.up_col + c);
      const double g = in[size_t(o)][gi], u = in[size_t(o + 1)][ui], s = sigmoid(g);
      if (!backward) {
        out[0][size_t(r * F + c)] = g * s * u;
        continue;
      }
      const double dy = in[0][size_t(r * F + c)];
      out[0][gi] = dy * u * s * (1.0 + g * (1.0 - s));
      out[1][ui] = dy * g * s;
    }
}

void set_rows(const mxn_op_call& k, const Values& in, Values& out) {
  const SetRowsShape r = set_rows_shape(k);
  MXN_CHECK(!r.error, r.error ? r.error : "");
  for (int64_t b = 0; b < r.B; ++b)
    for (int64_t t = 0; t < r.n; ++t) {
      const int64_t src = b * r.n + t;
      const int64_t dst = r.has_idx ? int64_t(in[1][size_t(src)]) : b * r.R + r.at + t;
      for (int64_t c = 0; c < r.W; ++c)
        out[0][size_t(dst * r.W + c)] = in[0][size_t(src * r.ld + r.col + c)];
    }
}

// The ops that take rows: softmax, the norms' forwards, cross-entropy.
bool row_op(const mxn_op_call& k, const Values& in, Values& out) {
  // RMSNORM's rows are groups of count(w) columns (ABI 9)
  const int64_t C = k.op == MXN_OP_RMSNORM ? count(k.inputs[1]) : last(k.inputs[0]);
  const int64_t N = count(k.inputs[0]) / C;
  const double eps = params_of<NormParams>(k).eps;
  switch (k.op) {
    case MXN_OP_SOFTMAX:
      for (int64_t r = 0; r < N; ++r) {
        const double* x = in[0].data() + r * C;
        const double mx = *std::max_element(x, x + C);
        double sum = 0;
        for (int64_t c = 0; c < C; ++c) sum += std::exp(x[c] - mx);
        for (int64_t c = 0; c < C; ++c) out[0][size_t(r * C + c)] = std::exp(x[c] - mx) / sum;
      }
      return true;
    case MXN_OP_SOFTMAX_BWD:  // dx = y (dy - <dy, y>)
      for (int64_t r = 0; r < N; ++r) {
        double d = 0;
        for (int64_t c = 0; c < C; ++c) d += in[0][size_t(r * C + c)] * in[1][size_t(r * C + c)];
        for (int64_t c = 0; c < C; ++c)
          out[0][size_t(r * C + c)] = in[1][size_t(r * C + c)] * (in[0][size_t(r * C + c)] - d);
      }
      return true;
    case MXN_OP_LAYERNORM:
    case MXN_OP_RMSNORM: {
      const bool ln = k.op == MXN_OP_LAYERNORM;
      for (int64_t r = 0; r < N; ++r) {
        const double* x = in[0].data() + r * C;
        double mean = 0, var = 0;
        if (ln)
          for (int64_t c = 0; c < C; ++c) mean += x[c] / double(C);
        for (int64_t c = 0; c < C; ++c) var += (x[c] - mean) * (x[c] - mean) / double(C);
        const double rstd = 1.0 / std::sqrt(var + eps);
        for (int64_t c = 0; c < C; ++c)
          out[0][size_t(r * C + c)] =
              (x[c] - mean) * rstd * in[1][size_t(c)] + (ln ? in[2][size_t(c)] : 0.0);
        if (ln) out[1][size_t(2 * r)] = mean;
        out[1][size_t(ln ? 2 * r + 1 : r)] = rstd;
      }
      return true;
    }
    case MXN_OP_LAYERNORM_BWD:
    case MXN_OP_RMSNORM_BWD:
      norm_bwd(k, in, out, k.op == MXN_OP_LAYERNORM_BWD);
      return true;
    case MXN_OP_CROSS_ENTROPY:
      if (params_of<XentParams>(k).part > 0) return xent_slice(k, in, out);
      out[0][0] = cross_entropy(in[0], in[1], N, C, nullptr, 1.0);
      return true;
    case MXN_OP_CROSS_ENTROPY_BWD: {
      if (params_of<XentParams>(k).part > 0) return xent_slice(k, in, out);
      const int64_t V = last(k.inputs[1]);
      cross_entropy(in[1], in[2], rows_of(k.inputs[1]), V, &out[0], in[0][0]);
      return true;
    }
    default:
      return false;
  }
}

// Element by element.
bool elementwise(const mxn_op_call& k, const Values& in, Values& out) {
  const double f = params_of<ScalarParams>(k).value;
  const bool acc = params_of<SumParams>(k).accumulate;
  Vec& y = out[0];
  switch (k.op) {
    case MXN_OP_ADD:
    case MXN_OP_MUL:
      for (size_t i = 0; i < y.size(); ++i)
        y[i] = k.op == MXN_OP_ADD ? in[0][i] + in[1][i] : in[0][i] * in[1][i];
      return true;
    case MXN_OP_ADD_BIAS:
      for (size_t i = 0; i < y.size(); ++i) y[i] = in[0][i] + in[1][i % in[1].size()];
      return true;
    case MXN_OP_SUM_ROWS:
      for (size_t c = 0; c < y.size(); ++c) {
        double s = acc ? y[c] : 0.0;
        for (size_t i = c; i < in[0].size(); i += y.size()) s += in[0][i];
        y[c] = s;
      }
      return true;
    case MXN_OP_SUM_SQUARES: {
      double s = acc ? y[0] : 0.0;
      for (double x : in[0]) s += x * x;
      y[0] = s;
      return true;
    }
    case MXN_OP_SCALE:
      for (size_t i = 0; i < y.size(); ++i) y[i] = in[0][i] * f;
      return true;
    case MXN_OP_FILL:
      std::fill(y.begin(), y.end(), f);
      return true;
    case MXN_OP_COPY:
      y = in[0];
      return true;
    case MXN_OP_CAST:  // to bf16: rounded to nearest even
      for (size_t i = 0; i < y.size(); ++i)
        y[i] = k.outputs[0].dtype == MXN_DTYPE_BF16 ? round_bf16(in[0][i]) : in[0][i];
      return true;
    case MXN_OP_GELU:
    case MXN_OP_SILU:
    case MXN_OP_TANH:
      for (size_t i = 0; i < y.size(); ++i) {
        const double x = in[0][i];
        y[i] = k.op == MXN_OP_GELU ? gelu(x) : k.op == MXN_OP_SILU ? x * sigmoid(x) : std::tanh(x);
      }
      return true;
    case MXN_OP_GELU_BWD:
    case MXN_OP_SILU_BWD:
    case MXN_OP_TANH_BWD:
      for (size_t i = 0; i < y.size(); ++i) {
        const double x = in[1][i], s = sigmoid(x);
        y[i] = in[0][i] * (k.op == MXN_OP_GELU_BWD   ? gelu_grad(x)
                           : k.op == MXN_OP_SILU_BWD ? s * (1.0 + x * (1.0 - s))
                                                     : 1.0 - x * x);
      }
      return true;
    case MXN_OP_DROPOUT: {
      const DropoutParams d = params_of<DropoutParams>(k);
      for (size_t i = 0; i < y.size(); ++i)
        y[i] = dropout_keep(d.seed, d.index + i, d.p) ? in[0][i] / (1.0 - double(d.p)) : 0.0;
      return true;
    }
    case MXN_OP_CLASSIFIER_CE_BWD:
      for (size_t o = 0; o < out.size(); ++o)
        for (size_t i = 0; i < out[o].size(); ++i) out[o][i] = in[0][0] * in[o + 1][i];
      return true;
    default:
      return false;
  }
}

}  // namespace

Values reference_outputs(const Case& c, const Values& in, Values out) {
  const mxn_op_call k = shapes_of(c);
  if (elementwise(k, in, out) || row_op(k, in, out) || moe_reference(k, in, out)) return out;
  switch (c.op) {
    case MXN_OP_MATMUL:
      matmul(k, in, out);
      break;
    case MXN_OP_ATTENTION:
    case MXN_OP_ATTENTION_BWD:
      attention(k, in, out, c.op == MXN_OP_ATTENTION_BWD);
      break;
    case MXN_OP_ROPE:
      rope(k, in, out);
      break;
    case MXN_OP_SWIGLU:
    case MXN_OP_SWIGLU_BWD:
      swiglu(k, in, out, c.op == MXN_OP_SWIGLU_BWD);
      break;
    case MXN_OP_SET_ROWS:
      set_rows(k, in, out);
      break;
    case MXN_OP_CLASSIFIER_CE:
      classifier(k, in, out);
      break;
    case MXN_OP_EMBEDDING:
    case MXN_OP_EMBEDDING_BWD: {  // rows [first, first + V) of a table; others zero (partial)
      const bool bwd = k.op == MXN_OP_EMBEDDING_BWD;
      const EmbeddingParams p = params_of<EmbeddingParams>(k);
      const Vec &ids = in[bwd ? 1 : 0], &src = in[bwd ? 0 : 1];
      const int64_t C = last(bwd ? k.outputs[0] : k.inputs[1]);
      const int64_t V = rows_of(bwd ? k.outputs[0] : k.inputs[1]);
      std::fill(out[0].begin(), out[0].end(), 0.0);
      for (size_t r = 0; r < ids.size(); ++r) {
        const int64_t row = int64_t(ids[r]) - p.first;
        if (row < 0 || row >= V) continue;
        for (int64_t j = 0; j < C; ++j) {
          const size_t a = r * size_t(C) + size_t(j), b = size_t(row * C + j);
          if (bwd)
            out[0][b] += src[a];
          else
            out[0][a] = src[b];
        }
      }
      break;
    }
    case MXN_OP_ADAMW: {
      const AdamwParams a = params_of<AdamwParams>(k);
      const double b1 = a.beta1, b2 = a.beta2, t = double(a.step);
      const double step = a.lr / (1.0 - std::pow(b1, t)), bc2 = std::sqrt(1.0 - std::pow(b2, t));
      for (size_t i = 0; i < out[0].size(); ++i) {
        const double g = in[0][i] * a.gscale;
        double &p = out[0][i], &m = out[1][i], &v = out[2][i];
        m = b1 * m + (1.0 - b1) * g;
        v = b2 * v + (1.0 - b2) * g * g;
        p = p * (1.0 - double(a.lr) * a.weight_decay) - step * m / (std::sqrt(v) / bc2 + a.eps);
      }
      break;
    }
    default:
      throw Error(std::string("no double-precision reference for op ") + std::to_string(c.op));
  }
  return out;
}

}  // namespace mxn::opcase
