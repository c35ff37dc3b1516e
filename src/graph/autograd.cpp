// Autograd: one backward rule per op, all in this file. A rule gets the forward node and the
// gradient of its first output and returns (input position, gradient value) pairs.
#include <algorithm>
#include <map>
#include <utility>

#include "core/error.h"
#include "graph/graph.h"

namespace mxn {
namespace {

using Grads = std::vector<std::pair<size_t, int>>;

Grads matmul_rule(Graph& g, const Node& n, int gy) {
  const int a = n.in[0], b = n.in[1];
  const MatmulParams m = n.params<MatmulParams>();
  const bool ta = m.ta, tb = m.tb;
  const float al = m.alpha;
  if (n.in.size() > 2) {  // linear: the bias's gradient sums over rows, the rest as without it
    Node plain = n;
    plain.in.resize(2);
    Grads r = matmul_rule(g, plain, gy);
    r.push_back({2, g.emit(MXN_OP_SUM_ROWS, {gy}, {g.activation(g.v(n.in[2]).shape)})});
    return r;
  }
  if (!ta && !tb)
    return {{0, g.matmul(gy, b, false, true, al)}, {1, g.matmul(a, gy, true, false, al)}};
  if (!ta && tb)
    return {{0, g.matmul(gy, b, false, false, al)}, {1, g.matmul(gy, a, true, false, al)}};
  if (ta && !tb)
    return {{0, g.matmul(b, gy, false, true, al)}, {1, g.matmul(a, gy, false, false, al)}};
  return {{0, g.matmul(b, gy, true, true, al)}, {1, g.matmul(gy, a, true, true, al)}};
}

// A backward op whose outputs are the gradients of the forward's first `k` inputs, some of which
// may be the same value (column windows of one fused tensor): such inputs share one output.
// The backward op takes the forward's parameters.
Grads distinct_grads(Graph& g, mxn_op op, std::vector<int> in, const Node& n, size_t k) {
  std::vector<int> out;
  Grads grads;
  for (size_t i = 0; i < k; ++i) {
    size_t j = 0;
    while (j < i && n.in[j] != n.in[i]) ++j;
    if (j < i) {
      out.push_back(out[j]);
      continue;
    }
    out.push_back(g.activation(g.v(n.in[i]).shape));
    grads.push_back({i, out.back()});
  }
  g.emit_like(n, op, std::move(in), out);
  return grads;
}

// Mixture of experts: the routing's weights back to the router's logits (with d(aux) when the
// node's load-balancing loss has a gradient), the permutations into each other, and the grouped
// GEMM's operands as grouped GEMMs.
Grads moe_rule(Graph& g, const Node& n, int gy, int gaux) {
  auto act = [&](int like) { return g.activation(g.v(like).shape); };
  switch (n.op) {
    case MXN_OP_MOE_ROUTE: {
      std::vector<int> in{gy, n.in[0], n.out[1]};
      if (gaux >= 0) in.push_back(gaux);
      const int dl = act(n.in[0]);
      g.emit_like(n, MXN_OP_MOE_ROUTE_BWD, in, {dl});
      return {{0, dl}};
    }
    case MXN_OP_MOE_PERMUTE: {  // xp[pos[s]] = w[s] x[s/K]
      const int64_t N = g.v_rows(n.in[0]);
      Grads r{{0, g.moe_unpermute(gy, n.in[1], N, n.in.size() > 2 ? n.in[2] : -1)}};
      if (n.in.size() > 2)
        r.push_back({2, g.emit(MXN_OP_MOE_UNPERMUTE_BWD, {n.in[0], gy, n.in[1]}, {act(n.in[2])})});
      return r;
    }
    case MXN_OP_MOE_UNPERMUTE: {  // y[t] = sum_k w[s] yp[pos[s]]
      Grads r{{0, g.moe_permute(gy, n.in[1], n.in.size() > 2 ? n.in[2] : -1)}};
      if (n.in.size() > 2)
        r.push_back({2, g.emit(MXN_OP_MOE_UNPERMUTE_BWD, {gy, n.in[0], n.in[1]}, {act(n.in[2])})});
      return r;
    }
    case MXN_OP_GROUPED_MATMUL: {
      const GroupedMatmulParams p = n.params<GroupedMatmulParams>();
      MXN_CHECK(!p.weight_grad, "no backward rule for a grouped weight gradient");
      const int a = n.in[0], b = n.in[1], off = n.in[2];
      const int da = g.grouped_matmul(gy, b, off, !p.tb);
      const int db = act(b);  // tb: db[e] = gy_e^T a_e; else a_e^T gy_e
      g.emit(MXN_OP_GROUPED_MATMUL, {p.tb ? gy : a, p.tb ? a : gy, off}, {db},
             GroupedMatmulParams{true, true, false});
      return {{0, da}, {1, db}};
    }
    default:
      MXN_CHECK(false, "no backward rule for op " + std::to_string(n.op));
  }
  return {};
}

Grads rule(Graph& g, const Node& n, int gy, int gaux) {
  auto act = [&](int like) { return g.activation(g.v(like).shape); };
  if (n.op >= MXN_OP_MOE_ROUTE && n.op <= MXN_OP_GROUPED_MATMUL) return moe_rule(g, n, gy, gaux);
  switch (n.op) {
    case MXN_OP_MATMUL:
      return matmul_rule(g, n, gy);
    case MXN_OP_ADD:
      return {{0, gy}, {1, gy}};
    case MXN_OP_ADD_BIAS:
      return {{0, gy}, {1, g.emit(MXN_OP_SUM_ROWS, {gy}, {act(n.in[1])})}};
    case MXN_OP_SCALE:
      return {{0, g.scale(gy, n.params<ScalarParams>().value)}};
    case MXN_OP_CAST:  // gradients are f32 whatever the values' dtype
      return {{0, gy}};
    case MXN_OP_COPY:  // a copy may have another shape of the same size: copied back into it
      return {{0, g.emit(MXN_OP_COPY, {gy}, {act(n.in[0])})}};
    case MXN_OP_STRIDED_COPY: {  // the positions read get the gradient of those written; 0 else
      const int dx = g.emit(MXN_OP_FILL, {}, {act(n.in[0])}, ScalarParams{0.f});
      return {{0, g.strided_copy(gy, n.params<StridedCopyParams>().reversed(), {}, dx)}};
    }
    case MXN_OP_GELU:
      return {{0, g.emit(MXN_OP_GELU_BWD, {gy, n.in[0]}, {act(n.in[0])})}};
    case MXN_OP_SOFTMAX:
      return {{0, g.emit(MXN_OP_SOFTMAX_BWD, {gy, n.out[0]}, {act(n.in[0])})}};
    case MXN_OP_LAYERNORM: {
      const int dx = act(n.in[0]), dw = act(n.in[1]), db = act(n.in[2]);
      g.emit(MXN_OP_LAYERNORM_BWD, {gy, n.in[0], n.in[1], n.out[1]}, {dx, dw, db});
      return {{0, dx}, {1, dw}, {2, db}};
    }
    case MXN_OP_ATTENTION: {
      // q, k and v may be one fused tensor: one gradient value per distinct input, which the
      // kernel fills window by window. Prefix keys and values (P > 0) have theirs too.
      std::vector<int> in{gy, n.in[0], n.in[1], n.in[2], n.out[0], n.out[1]};
      in.insert(in.end(), n.in.begin() + 3, n.in.end());
      return distinct_grads(g, MXN_OP_ATTENTION_BWD, in, n,
                            n.params<AttentionParams>().P > 0 ? 5 : 3);
    }
    case MXN_OP_RMSNORM: {
      const int dx = act(n.in[0]), dw = act(n.in[1]);
      g.emit(MXN_OP_RMSNORM_BWD, {gy, n.in[0], n.in[1], n.out[1]}, {dx, dw});
      return {{0, dx}, {1, dw}};
    }
    case MXN_OP_ROPE: {
      RopeParams r = n.params<RopeParams>();
      r.backward = true;  // the rotation's transpose is the rotation backwards
      return {{0, g.emit(MXN_OP_ROPE, {gy, n.in[1]}, {act(n.in[0])}, r)}};
    }
    case MXN_OP_SILU:
      return {{0, g.emit(MXN_OP_SILU_BWD, {gy, n.in[0]}, {act(n.in[0])})}};
    case MXN_OP_MUL:  // da = dy b, db = dy a
      return {{0, g.emit(MXN_OP_MUL, {gy, n.in[1]}, {act(n.in[0])})},
              {1, g.emit(MXN_OP_MUL, {gy, n.in[0]}, {act(n.in[1])})}};
    case MXN_OP_TANH:  // from the output: dx = dy (1 - y^2)
      return {{0, g.emit(MXN_OP_TANH_BWD, {gy, n.out[0]}, {act(n.in[0])})}};
    case MXN_OP_DROPOUT:  // the same mask (same seed, index and tag) on the gradient
      return {{0, g.emit_like(n, MXN_OP_DROPOUT, {gy}, {act(n.in[0])})}};
    case MXN_OP_SWIGLU:
      return distinct_grads(g, MXN_OP_SWIGLU_BWD, {gy, n.in[0], n.in[1]}, n, 2);
    case MXN_OP_EMBEDDING:
      return {{1, g.emit_like(n, MXN_OP_EMBEDDING_BWD, {gy, n.in[0]}, {act(n.in[1])})}};
    case MXN_OP_CROSS_ENTROPY: {
      // A split vocabulary's loss (part 2) is the whole softmax's: its gradient is this slice's
      // dlogits, the stats (part 1) treated as constants.
      const XentParams p = n.params<XentParams>();
      MXN_CHECK(p.part != 1, "a split vocabulary's stats have no gradient");
      std::vector<int> in{gy, n.in[0], n.in[1]};
      if (p.part == 2) in.push_back(n.in[2]);
      return {{0, g.emit_like(n, MXN_OP_CROSS_ENTROPY_BWD, in, {act(n.in[0])})}};
    }
    case MXN_OP_CLASSIFIER_CE: {
      // direct: the forward made dx for the seed's d(loss) and added dw into the param's grad.
      if (n.params<ClassifierParams>().direct) return {{0, n.out[1]}};
      // Else it computed them for d(loss) = 1: scale by gy.
      std::vector<int> in{gy}, out;
      Grads grads;
      for (size_t i = 1; i < n.out.size(); ++i) {
        in.push_back(n.out[i]);
        out.push_back(act(n.out[i]));
        grads.push_back({i - 1, out.back()});
      }
      g.emit(MXN_OP_CLASSIFIER_CE_BWD, in, out);
      return grads;
    }
    default:
      MXN_CHECK(false, "no backward rule for op " + std::to_string(n.op));
  }
  return {};
}

// g.recompute: each LAYERNORM, RMSNORM, GELU or SWIGLU output that the backward reads (the next
// matmul's dW operand) is made again by a copy of its node put just before the first backward
// node reading it, and those nodes read the copy. The forward value then dies with its last
// forward use. (Their inputs are kept anyway: the ops' own backwards read them.)
void recompute_cheap(Graph& g, size_t n_forward) {
  std::vector<std::pair<size_t, Node>> copies;  // (insert before node, the copy)
  for (size_t i = 0; i < n_forward; ++i) {
    const Node& f = g.nodes[i];
    if (f.op != MXN_OP_LAYERNORM && f.op != MXN_OP_GELU && f.op != MXN_OP_RMSNORM &&
        f.op != MXN_OP_SWIGLU)
      continue;
    const int y = f.out[0];
    if (g.v(y).output) continue;
    size_t at = g.nodes.size();
    for (size_t j = n_forward; j < g.nodes.size() && at == g.nodes.size(); ++j)
      for (int x : g.nodes[j].in)
        if (x == y) at = j;
    if (at == g.nodes.size()) continue;
    Node copy = f;
    for (int& o : copy.out) o = g.activation(g.v(o).shape, g.v(o).dtype);
    for (size_t j = at; j < g.nodes.size(); ++j)
      for (int& x : g.nodes[j].in)
        if (x == y) x = copy.out[0];
    copies.push_back({at, std::move(copy)});
  }
  // Insert from the back so earlier positions stay valid (several copies may share a position).
  std::stable_sort(copies.begin(), copies.end(),
                   [](const auto& a, const auto& b) { return a.first > b.first; });
  for (auto& [at, n] : copies) g.nodes.insert(g.nodes.begin() + int64_t(at), std::move(n));
}

// A param's whole gradient `gv` made by this rule's dW MATMUL (or its bias's SUM_ROWS) that
// nothing else reads: that node accumulates into the grad itself (`accumulate`), as torch adds
// into .grad, instead of writing an activation for an ADD to read. Returns whether it did.
bool accumulate_into(Graph& g, size_t rule_begin, int gv, int gb) {
  if (g.v(gv).kind != ValueKind::activation || g.v(gv).dtype != g.v(gb).dtype) return false;
  Node* maker = nullptr;
  for (size_t j = rule_begin; j < g.nodes.size(); ++j) {
    Node& n = g.nodes[j];
    if (std::find(n.in.begin(), n.in.end(), gv) != n.in.end()) return false;
    if (n.out.size() == 1 && n.out[0] == gv) maker = &n;
  }
  if (!maker) return false;
  if (maker->op == MXN_OP_MATMUL && maker->in.size() == 2 &&
      !maker->params<MatmulParams>().accumulate) {
    with_params<MatmulParams>(*maker, [](MatmulParams& m) { m.accumulate = true; });
  } else if (maker->op == MXN_OP_SUM_ROWS && !maker->params<SumParams>().accumulate) {
    maker->set(SumParams{true});
  } else if (maker->op == MXN_OP_GROUPED_MATMUL &&
             maker->params<GroupedMatmulParams>().weight_grad &&
             !maker->params<GroupedMatmulParams>().accumulate) {
    maker->set(GroupedMatmulParams{true, true, true});
  } else {
    return false;
  }
  maker->out[0] = gb;
  return true;
}

}  // namespace

size_t append_backward(Graph& g, int loss, int seed, int wrt, int* wrt_grad) {
  BackwardCuts cuts;
  if (wrt >= 0) cuts.wrts.push_back(wrt);
  if (seed >= 0) cuts.seeds.push_back({loss, seed});
  const size_t n = append_backward(g, seed >= 0 ? -1 : loss, cuts);
  if (wrt >= 0) {
    MXN_CHECK(cuts.wrt_grads[0] >= 0, "the stage's input has no gradient");
    if (wrt_grad) *wrt_grad = cuts.wrt_grads[0];
  }
  return n;
}

size_t append_backward(Graph& g, int loss, BackwardCuts& cuts) {
  const size_t n_forward = g.nodes.size();
  std::map<int, int> grad;  // value -> its gradient so far
  if (loss >= 0)
    grad[loss] = g.emit(MXN_OP_FILL, {}, {g.activation(g.v(loss).shape)}, ScalarParams{1.f});
  for (auto [value, input] : cuts.seeds) grad[value] = input;  // from beyond a cut
  auto is_wrt = [&](int x) {
    return std::find(cuts.wrts.begin(), cuts.wrts.end(), x) != cuts.wrts.end();
  };
  // A param's gradient is complete once the backward of its first forward use has run; it is
  // added into the param's grad buffer right then (so micro-batches accumulate, and a later
  // communicator can start reducing that layer while the rest of backward runs).
  std::map<size_t, std::vector<int>> done_at;
  for (int p : g.params())
    for (size_t i = 0; i < n_forward; ++i)
      if (std::find(g.nodes[i].in.begin(), g.nodes[i].in.end(), p) != g.nodes[i].in.end()) {
        done_at[i].push_back(p);
        break;
      }
  for (size_t i = n_forward; i-- > 0;) {
    auto it = grad.find(g.nodes[i].out[0]);
    if (it != grad.end() && g.nodes[i].op == MXN_OP_CLASSIFIER_CE) {
      // The fused head computes its gradients in its forward pass: dx, and dw when w is trained.
      // Seeded by the loss's FILL it makes them for that d(loss) (dloss, which the runner sets
      // with the FILL's value) and adds dw straight into the param's grad (ABI 6): no (V, C)
      // value lives through the backward, no CLASSIFIER_CE_BWD.
      Node& f = g.nodes[i];
      const bool dw = g.v(f.in[1]).kind == ValueKind::param;
      const int x = f.in[0], w = f.in[1];
      const bool direct = loss >= 0 && f.out[0] == loss;  // seeded by the loss's FILL
      with_params<ClassifierParams>(f, [&](ClassifierParams& c) {
        c.grads = dw ? 2 : 1;
        c.direct = direct;
        c.dloss = 1.f;
      });
      const int dx1 = g.activation(g.v(x).shape);
      g.nodes[i].out.push_back(dx1);
      if (dw) g.nodes[i].out.push_back(direct ? g.v(w).grad : g.activation(g.v(w).shape));
    }
    const Node n = g.nodes[i];  // copy: rules append to g.nodes
    const size_t rule_begin = g.nodes.size();
    // MOE_ROUTE's load-balancing loss (its fifth output) may have a gradient of its own.
    const bool aux = n.op == MXN_OP_MOE_ROUTE && n.out.size() > 4 && grad.count(n.out[4]);
    const int gaux = aux ? grad[n.out[4]] : -1;
    if (it != grad.end()) {
      for (auto [pos, gv] : rule(g, n, it->second, gaux)) {
        const int x = n.in[pos];
        const ValueKind k = g.v(x).kind;
        if (k != ValueKind::param && k != ValueKind::activation && !is_wrt(x)) continue;
        auto [slot, fresh] = grad.emplace(x, gv);
        if (!fresh) slot->second = g.add(slot->second, gv);
      }
    }
    for (int p : done_at[i]) {
      auto gp = grad.find(p);
      if (gp == grad.end()) continue;
      const int gb = g.v(p).grad;
      if (!accumulate_into(g, rule_begin, gp->second, gb))
        g.emit(MXN_OP_ADD, {gb, gp->second}, {gb});
    }
  }
  cuts.wrt_grads.clear();
  for (int w : cuts.wrts) {
    auto it = grad.find(w);
    if (it != grad.end()) g.mark_output(it->second);
    cuts.wrt_grads.push_back(it == grad.end() ? -1 : it->second);
  }
  cuts.sum_grads.clear();
  for (int v : cuts.sums) {
    auto it = grad.find(v);
    cuts.sum_grads.push_back(it == grad.end() ? -1 : it->second);
  }
  // Rules emit every input's gradient; keep only the backward nodes whose results are used: a
  // write into a grad (or any non-activation), a graph output, or an input of a node kept after.
  std::vector<char> used(g.values.size(), 0);
  std::vector<char> keep(g.nodes.size(), 1);
  for (size_t i = g.nodes.size(); i-- > n_forward;) {
    const Node& n = g.nodes[i];
    bool live = false;
    for (int o : n.out) {
      const Value& v = g.v(o);
      live = live || used[size_t(o)] || v.output || v.kind != ValueKind::activation;
    }
    keep[i] = live;
    if (live)
      for (int x : n.in) used[size_t(x)] = 1;
  }
  size_t w = n_forward;
  for (size_t i = n_forward; i < g.nodes.size(); ++i)
    if (keep[i]) {
      if (w != i) g.nodes[w] = std::move(g.nodes[i]);
      ++w;
    }
  g.nodes.resize(w);
  if (g.recompute) recompute_cheap(g, n_forward);
  return n_forward;
}

}  // namespace mxn
