#include "graph/graph.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace mxn {

int Graph::param(const std::string& name, Shape shape, bool decay, DType dtype) {
  Value p{name, shape, dtype, ValueKind::param, decay};
  values.push_back(p);
  const int id = int(values.size()) - 1;
  values.push_back(Value{name + ".grad", shape, DType::f32, ValueKind::grad});
  values[size_t(id)].grad = id + 1;
  return id;
}

int Graph::frozen(const std::string& name, Shape shape, DType dtype) {
  values.push_back(Value{name, std::move(shape), dtype, ValueKind::frozen});
  return int(values.size()) - 1;
}

int Graph::input(const std::string& name, Shape shape, DType dtype) {
  values.push_back(Value{name, std::move(shape), dtype, ValueKind::input});
  return int(values.size()) - 1;
}

int Graph::activation(Shape shape, DType dtype) {
  values.push_back(Value{"", std::move(shape), dtype, ValueKind::activation});
  return int(values.size()) - 1;
}

int Graph::emit(mxn_op op, std::vector<int> in, std::vector<int> out) {
  nodes.push_back(Node{op, std::move(in), out, {}, {}});
  return out.empty() ? -1 : out[0];
}

int Graph::emit_like(const Node& like, mxn_op op, std::vector<int> in, std::vector<int> out) {
  nodes.push_back(Node{op, std::move(in), out, like.ip, like.fp});
  return out.empty() ? -1 : out[0];
}

std::vector<int> Graph::params() const {
  std::vector<int> out;
  for (size_t i = 0; i < values.size(); ++i)
    if (values[i].kind == ValueKind::param) out.push_back(int(i));
  return out;
}

std::vector<int> Graph::weights() const {
  std::vector<int> out;
  for (size_t i = 0; i < values.size(); ++i)
    if (values[i].kind == ValueKind::param || values[i].kind == ValueKind::frozen)
      out.push_back(int(i));
  return out;
}

int Graph::matmul(int a, int b, bool ta, bool tb, float alpha) {
  const Shape &sa = v(a).shape, &sb = v(b).shape;
  MXN_CHECK(sa.size() == sb.size() && (sa.size() == 2 || sa.size() == 3), "matmul ranks");
  const size_t r = sa.size();
  const int64_t M = ta ? sa[r - 1] : sa[r - 2], K = ta ? sa[r - 2] : sa[r - 1];
  const int64_t Kb = tb ? sb[r - 1] : sb[r - 2], N = tb ? sb[r - 2] : sb[r - 1];
  MXN_CHECK(K == Kb, "matmul inner dims " + shape_str(sa) + " x " + shape_str(sb));
  Shape s = r == 3 ? Shape{sa[0], M, N} : Shape{M, N};
  return emit(MXN_OP_MATMUL, {a, b}, {activation(s)},
              MatmulParams{ta, tb, false, int32_t(matmul_compute), alpha});
}

int Graph::linear(int x, int w, int bias, bool tb) {
  const int y = matmul(x, w, false, tb);
  if (bias < 0) return y;
  MXN_CHECK(v(y).shape.size() == 2 && v(y).shape[1] == v(bias).shape.back(), "linear bias width");
  nodes.back().in.push_back(bias);
  return y;
}

int Graph::add(int a, int b) {
  MXN_CHECK(v(a).shape == v(b).shape, "add shapes");
  return emit(MXN_OP_ADD, {a, b}, {activation(v(a).shape)});
}

int Graph::add_bias(int a, int bias) {
  MXN_CHECK(v(a).shape.back() == v(bias).shape.back(), "bias width");
  return emit(MXN_OP_ADD_BIAS, {a, bias}, {activation(v(a).shape)});
}

int Graph::scale(int a, float k) {
  return emit(MXN_OP_SCALE, {a}, {activation(v(a).shape)}, ScalarParams{k});
}

int Graph::cast(int x, DType dtype) {
  return emit(MXN_OP_CAST, {x}, {activation(v(x).shape, dtype)});
}

int Graph::gelu(int x) { return emit(MXN_OP_GELU, {x}, {activation(v(x).shape)}); }

int Graph::softmax(int x) { return emit(MXN_OP_SOFTMAX, {x}, {activation(v(x).shape)}); }

int Graph::layernorm(int x, int w, int b, float eps) {
  const Shape s = v(x).shape;  // a copy: activation() may grow `values`
  const int stats = activation({numel(s) / s.back(), 2});
  return emit(MXN_OP_LAYERNORM, {x, w, b}, {activation(s), stats}, NormParams{eps});
}

int Graph::attention(int q, int k, int v, const AttentionParams& a, int prefix, bool with_lse,
                     int pk, int pv) {
  const int64_t rows = v_rows(q);
  MXN_CHECK(rows % a.T == 0 && (a.mask < MXN_MASK_PREFIX || prefix >= 0),
            "attention rows or prefix");
  MXN_CHECK(a.P == 0 || (pk >= 0 && pv >= 0), "attention prefix keys and values");
  std::vector<int> in{q, k, v};
  if (a.P > 0) in.insert(in.end(), {pk, pv});
  if (prefix >= 0) in.push_back(prefix);
  std::vector<int> out{activation({rows, a.heads * a.head_dim})};
  if (with_lse) out.push_back(activation({rows, a.heads}));
  return emit(MXN_OP_ATTENTION, in, out, a);
}

int Graph::tanh(int x) { return emit(MXN_OP_TANH, {x}, {activation(v(x).shape)}); }

int Graph::mul(int a, int b) {
  MXN_CHECK(v(a).shape == v(b).shape, "mul: shapes differ");
  return emit(MXN_OP_MUL, {a, b}, {activation(v(a).shape)});
}

int Graph::dropout(int x, float p, int64_t tag) {
  return emit(MXN_OP_DROPOUT, {x}, {activation(v(x).shape)}, DropoutParams{0, 0, tag, p});
}

int Graph::rmsnorm(int x, int w, float eps) {
  const Shape s = v(x).shape;
  const int rstd = activation({numel(s) / numel(v(w).shape)});  // one per group of len(w)
  return emit(MXN_OP_RMSNORM, {x, w}, {activation(s), rstd}, NormParams{eps});
}

int Graph::rope(int x, int pos, const RopeParams& r) {
  return emit(MXN_OP_ROPE, {x, pos}, {activation(v(x).shape)}, r);
}

int Graph::silu(int x) { return emit(MXN_OP_SILU, {x}, {activation(v(x).shape)}); }

int Graph::swiglu(int gate, int up, int64_t gcol, int64_t ucol, int64_t F) {
  return emit(MXN_OP_SWIGLU, {gate, up}, {activation({v_rows(gate), F})}, SwigluParams{gcol, ucol});
}

int Graph::set_rows(int src, int dst, int64_t at, int64_t R, int64_t col, int rows) {
  std::vector<int> in{src};
  if (rows >= 0) in.push_back(rows);
  return emit(MXN_OP_SET_ROWS, in, {dst}, SetRowsParams{at, R, col});
}

size_t Graph::cut_before(int v, int written, const char* what) const {
  size_t at = nodes.size();
  for (size_t i = 0; i < nodes.size() && at == nodes.size(); ++i)
    if (std::find(nodes[i].in.begin(), nodes[i].in.end(), v) != nodes[i].in.end()) at = i;
  for (size_t i = at; i < nodes.size(); ++i)
    for (int o : nodes[i].out) MXN_CHECK(written < 0 || o != written, what);
  return at;
}

int64_t Graph::v_rows(int id) const {
  const Shape& s = v(id).shape;
  return s.empty() ? 1 : numel(s) / s.back();
}

int Graph::embedding(int idx, int table, const EmbeddingParams& p) {
  return emit(MXN_OP_EMBEDDING, {idx, table},
              {activation({numel(v(idx).shape), v(table).shape[1]})}, p);
}

int Graph::cross_entropy(int logits, int targets) {
  return emit(MXN_OP_CROSS_ENTROPY, {logits, targets}, {activation({1})});
}

int Graph::xent_stats(int logits, int targets, const XentParams& p) {
  MXN_CHECK(p.part == 1 && p.slots > 0, "xent_stats: part 1 of a split vocabulary");
  return emit(MXN_OP_CROSS_ENTROPY, {logits, targets}, {activation({v_rows(logits), p.slots, 3})},
              p);
}

int Graph::cross_entropy(int logits, int targets, int stats, const XentParams& p) {
  MXN_CHECK(p.part == 2 && p.slots > 0, "cross_entropy: part 2 of a split vocabulary");
  return emit(MXN_OP_CROSS_ENTROPY, {logits, targets, stats}, {activation({1})}, p);
}

int Graph::classifier_ce(int x, int w, int targets, int64_t block) {
  MXN_CHECK(v(x).shape.back() == v(w).shape.back(), "classifier_ce: x and w widths differ");
  return emit(MXN_OP_CLASSIFIER_CE, {x, w, targets}, {activation({1})},
              ClassifierParams{0, int32_t(matmul_compute), block, false, 1.f});
}

int Graph::classifier_stats(int x, int w, int targets, const XentParams& p) {
  MXN_CHECK(p.part == 1 && v(x).shape.back() == v(w).shape.back(), "classifier_stats: part 1");
  return emit(MXN_OP_CLASSIFIER_CE, {x, w, targets}, {activation({v_rows(x), p.slots, 3})},
              ClassifierParams{0, int32_t(matmul_compute), 0, false, 1.f, p});
}

int Graph::classifier_ce(int x, int w, int targets, int stats, const XentParams& p) {
  MXN_CHECK(p.part == 2 && v(x).shape.back() == v(w).shape.back(), "classifier_ce: part 2");
  return emit(MXN_OP_CLASSIFIER_CE, {x, w, targets, stats}, {activation({1})},
              ClassifierParams{0, int32_t(matmul_compute), 0, false, 1.f, p});
}

MoeRoute Graph::moe_route(int logits, int bias, const MoeRouteParams& p, bool aux) {
  const int64_t N = v_rows(logits), E = v(logits).shape.back(), K = p.k;
  MoeRoute r;
  r.w = activation({N, K});
  r.ids = activation({N, K}, DType::i32);
  r.pos = activation({N * K}, DType::i32);
  r.offsets = activation({E + 1}, DType::i32);
  std::vector<int> out{r.w, r.ids, r.pos, r.offsets};
  if (aux) out.push_back(r.aux = activation({1}));
  std::vector<int> in{logits};
  if (bias >= 0) in.push_back(bias);
  emit(MXN_OP_MOE_ROUTE, in, out, p);
  return r;
}

int Graph::moe_permute(int x, int pos, int w) {
  std::vector<int> in{x, pos};
  if (w >= 0) in.push_back(w);
  return emit(MXN_OP_MOE_PERMUTE, in, {activation({numel(v(pos).shape), v(x).shape.back()})});
}

int Graph::moe_unpermute(int yp, int pos, int64_t tokens, int w) {
  std::vector<int> in{yp, pos};
  if (w >= 0) in.push_back(w);
  return emit(MXN_OP_MOE_UNPERMUTE, in, {activation({tokens, v(yp).shape.back()})});
}

int Graph::grouped_matmul(int a, int b, int offsets, bool tb) {
  const Shape& bs = v(b).shape;
  MXN_CHECK(bs.size() == 3, "grouped_matmul: b is (experts, rows, cols)");
  return emit(MXN_OP_GROUPED_MATMUL, {a, b, offsets}, {activation({v_rows(a), tb ? bs[1] : bs[2]})},
              GroupedMatmulParams{tb, false, false, int32_t(matmul_compute)});
}

int Graph::strided_copy(int x, const StridedCopyParams& p, Shape shape, int into) {
  const int out = into >= 0 ? into : activation(std::move(shape), v(x).dtype);
  emit(MXN_OP_STRIDED_COPY, {x}, {out}, p);
  return out;
}

}  // namespace mxn
