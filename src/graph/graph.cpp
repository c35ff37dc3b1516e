#include "graph/graph.h"

#include "core/error.h"

namespace mxn {

int Graph::param(const std::string& name, Shape shape, bool decay) {
  Value p{name, shape, DType::f32, ValueKind::param, decay};
  values.push_back(p);
  const int id = int(values.size()) - 1;
  values.push_back(Value{name + ".grad", shape, DType::f32, ValueKind::grad});
  values[size_t(id)].grad = id + 1;
  return id;
}

int Graph::input(const std::string& name, Shape shape, DType dtype) {
  values.push_back(Value{name, std::move(shape), dtype, ValueKind::input});
  return int(values.size()) - 1;
}

int Graph::activation(Shape shape, DType dtype) {
  values.push_back(Value{"", std::move(shape), dtype, ValueKind::activation});
  return int(values.size()) - 1;
}

int Graph::emit(mxn_op op, std::vector<int> in, std::vector<int> out, std::array<int64_t, 8> ip,
                std::array<float, 8> fp) {
  nodes.push_back(Node{op, std::move(in), out, ip, fp});
  return out.empty() ? -1 : out[0];
}

std::vector<int> Graph::params() const {
  std::vector<int> out;
  for (size_t i = 0; i < values.size(); ++i)
    if (values[i].kind == ValueKind::param) out.push_back(int(i));
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
  return emit(MXN_OP_MATMUL, {a, b}, {activation(s)}, {ta, tb, 0, int64_t(matmul_compute)},
              {alpha});
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
  return emit(MXN_OP_SCALE, {a}, {activation(v(a).shape)}, {}, {k});
}

int Graph::gelu(int x) { return emit(MXN_OP_GELU, {x}, {activation(v(x).shape)}); }

int Graph::softmax(int x) { return emit(MXN_OP_SOFTMAX, {x}, {activation(v(x).shape)}); }

int Graph::layernorm(int x, int w, int b, float eps) {
  const Shape s = v(x).shape;  // a copy: activation() may grow `values`
  const int stats = activation({numel(s) / s.back(), 2});
  return emit(MXN_OP_LAYERNORM, {x, w, b}, {activation(s), stats}, {}, {eps});
}

int Graph::attention(int qkv, int64_t heads, int64_t T) {
  const Shape s = v(qkv).shape;  // (B*T, 3C); a copy, as activation() may grow `values`
  const int64_t B = s[0] / T, C = s[1] / 3;
  const int probs = activation({B, heads, T, T});
  return emit(MXN_OP_ATTENTION, {qkv}, {activation({s[0], C}), probs}, {heads, T});
}

int Graph::embedding(int idx, int table) {
  return emit(MXN_OP_EMBEDDING, {idx, table},
              {activation({numel(v(idx).shape), v(table).shape[1]})});
}

int Graph::cross_entropy(int logits, int targets) {
  return emit(MXN_OP_CROSS_ENTROPY, {logits, targets}, {activation({1})});
}

}  // namespace mxn
