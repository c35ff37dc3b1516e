#pragma once
// A model is a Graph: values (tensors with a shape and a role) and nodes (one op of the chip
// contract each). Builders infer shapes; autograd appends the backward nodes; the planner gives
// every activation an offset in one arena; the Program runs the nodes on a Device.
#include <array>
#include <string>
#include <vector>

#include "backend/op_params.h"
#include "core/tensor.h"
#include "mxn/backend_abi.h"

namespace mxn {

enum class ValueKind {
  param,       // trained weights, in one buffer (decayed ones first)
  frozen,      // weights that stay as loaded (a fine-tuned base): no gradient, no optimizer state
  grad,        // a param's accumulated gradient, same layout as params
  input,       // written by the host before each run (tokens, targets)
  activation,  // lives in the arena, planned by liveness
};

struct Value {
  std::string name;
  Shape shape;
  DType dtype = DType::f32;
  ValueKind kind = ValueKind::activation;
  bool decay = false;   // params: AdamW weight decay applies
  bool output = false;  // read by the host after a run: kept alive to the end of the graph
  int grad = -1;        // params: the grad value
  uint64_t offset = 0;  // bytes into its kind's buffer
};

// One op call of the graph. Its parameters are written and read by type (op_params.h):
// node.params<MatmulParams>(), node.set(MatmulParams{...}); ip and fp hold their encoding.
struct Node {
  mxn_op op;
  std::vector<int> in, out;
  std::array<int64_t, MXN_MAX_IP> ip{};
  std::array<float, 8> fp{};
  template <typename P>
  P params() const {
    return params_of<P>(*this);
  }
  template <typename P>
  void set(const P& p) {
    set_params(*this, p);
  }
};

// MOE_ROUTE's outputs: each token's K weights and experts, the slots' rows in expert order, the
// experts' row offsets, and (if asked for) the load-balancing loss.
struct MoeRoute {
  int w = -1, ids = -1, pos = -1, offsets = -1, aux = -1;
};

class Graph {
 public:
  // Matmuls (forward and backward) run with this compute type: f32, or bf16 mixed precision.
  DType matmul_compute = DType::f32;
  // Training: the outputs of LAYERNORM, RMSNORM, GELU and SWIGLU are not kept for the backward;
  // append_backward runs the op again just before the backward first reads its output (they
  // are cheap, their inputs are kept anyway, and the result is bit for bit the same). Saves the
  // norms' and the MLP activation's outputs of every layer, as llm.c's `recompute` and
  // torch.compile's rematerialisation do.
  bool recompute = false;

  // dtype bf16: stored weights for inference (MATMUL's B, EMBEDDING's table); no training.
  int param(const std::string& name, Shape shape, bool decay, DType dtype = DType::f32);
  // A weight that is read but never trained (bf16 allowed where the chip takes bf16 weights).
  int frozen(const std::string& name, Shape shape, DType dtype = DType::f32);
  int input(const std::string& name, Shape shape, DType dtype);
  int activation(Shape shape, DType dtype = DType::f32);
  // One node of an op without parameters, with typed ones, or with another node's (a backward
  // that takes its forward's parameters).
  int emit(mxn_op op, std::vector<int> in, std::vector<int> out);
  template <typename P>
  int emit(mxn_op op, std::vector<int> in, std::vector<int> out, const P& params) {
    emit(op, std::move(in), out);
    nodes.back().set(params);
    return out.empty() ? -1 : out[0];
  }
  int emit_like(const Node& like, mxn_op op, std::vector<int> in, std::vector<int> out);

  // Builders: each appends one node and returns its (first) output.
  int matmul(int a, int b, bool ta = false, bool tb = false, float alpha = 1.f);
  // x w (w^T with tb) + bias on every row: one MATMUL with the bias as its third input (ABI 5),
  // added in the GEMM where the chip can. bias -1: none.
  int linear(int x, int w, int bias, bool tb);
  int add(int a, int b);
  int add_bias(int a, int bias);
  int scale(int a, float k);
  int gelu(int x);
  // x in another dtype (the gradient flows back unchanged, in f32).
  int cast(int x, DType dtype);
  int tanh(int x);
  int mul(int a, int b);  // elementwise, same shapes
  int softmax(int x);
  int layernorm(int x, int w, int b, float eps = 1e-5f);
  // q, k, v (may be one fused tensor) -> (B*T, heads*head_dim); `prefix` an i32 value: (B)
  // prefix lengths for mask 2, (B*T) segment starts for mask 3; with_lse keeps the log-sum-exp the
  // backward needs (training). With a.P > 0, pk and pv are the prefix keys and values, (P,
  // kv_heads*head_dim).
  int attention(int q, int k, int v, const AttentionParams& a, int prefix = -1,
                bool with_lse = true, int pk = -1, int pv = -1);
  int rmsnorm(int x, int w, float eps);
  int rope(int x, int pos, const RopeParams& r);
  int silu(int x);
  // silu(gate[:, gcol + c]) * up[:, ucol + c] for c < F; gate and up may be one fused tensor.
  int swiglu(int gate, int up, int64_t gcol, int64_t ucol, int64_t F);
  // Writes columns [col, col + dst's width) of src's rows into `dst` (rows [at, at + n) of each
  // sequence of R rows, or with `rows` (an i32 value) src row i into dst row rows[i]); returns
  // dst.
  int set_rows(int src, int dst, int64_t at, int64_t R, int64_t col = 0, int rows = -1);
  // Rows of `table` by index; with p.partial the table is rows [p.first, p.first + V) of a
  // vocabulary split over a tensor-parallel group, and other ids give zero rows.
  int embedding(int idx, int table, const EmbeddingParams& p = {});
  // Inverted dropout with probability p; `tag` tells the node's mask stream apart (the runner
  // sets the seed and index offset of every DROPOUT call per run, see backend_abi.h).
  int dropout(int x, float p, int64_t tag);
  int cross_entropy(int logits, int targets);
  // Cross-entropy over a vocabulary split among a group (XentParams, Megatron-LM's vocab-parallel
  // loss): this slice's stats (part 1), to be summed over the group in place, then the mean loss
  // from the summed stats (part 2), whose gradient is this slice's dlogits.
  int xent_stats(int logits, int targets, const XentParams& p);
  int cross_entropy(int logits, int targets, int stats, const XentParams& p);
  // cross_entropy(matmul(x, w, false, true), targets) without the (N, V) logits: one op that
  // runs block by block (`block` rows, 0: the backend's choice). Backward passes make it
  // compute the gradients in the same pass (append_backward gives it the outputs).
  int classifier_ce(int x, int w, int targets, int64_t block = 0);
  // The same over a vocabulary slice (w: this rank's rows; XentParams): part 1's stats, to be
  // summed over the group in place, then part 2's loss from them.
  int classifier_stats(int x, int w, int targets, const XentParams& p);
  int classifier_ce(int x, int w, int targets, int stats, const XentParams& p);

  // Mixture of experts (backend_abi.h, ABI 9): routing (bias -1: none; aux: the Switch loss as
  // well), tokens into expert order (K slots a token, weighted by w unless -1) and back, and the
  // GEMM of each expert's rows with its matrix of b (experts, N, K) (tb) or (experts, K, N).
  MoeRoute moe_route(int logits, int bias, const MoeRouteParams& p, bool aux = false);
  int moe_permute(int x, int pos, int w = -1);
  int moe_unpermute(int yp, int pos, int64_t tokens, int w = -1);
  int grouped_matmul(int a, int b, int offsets, bool tb = true);

  // STRIDED_COPY of x's elements into a new value of `shape`, or (into >= 0) into the positions
  // `p` names of an existing value, whose other elements keep theirs (a concatenation by parts).
  int strided_copy(int x, const StridedCopyParams& p, Shape shape, int into = -1);

  void mark_output(int id) { values[size_t(id)].output = true; }
  const Value& v(int id) const { return values[size_t(id)]; }
  int64_t v_rows(int id) const;  // elements / last dim
  // Where a value crosses to other ranks (a cut point): before the first node that reads `v`
  // (nodes.size() if none). Error (`what`) if `written` (-1: none) is written at or after it.
  size_t cut_before(int v, int written, const char* what) const;
  std::vector<int> params() const;   // trained weights
  std::vector<int> weights() const;  // every stored weight: params and frozen ones

  std::vector<Value> values;
  std::vector<Node> nodes;
  // Activations a runner reads or writes between nodes (a cut's exchange: sequence parallelism),
  // each with the node it happens before: the arena keeps them live there.
  std::vector<std::pair<int, size_t>> runner_uses;
};

// Appends the backward pass of every node so far (one rule per op, autograd.cpp) with d(loss)=1,
// and adds each param's gradient into its grad value (with g.recompute, after recomputing what
// the backward needs of norm and MLP activation outputs). Backward nodes whose results reach no
// param's gradient (a frozen weight's, say) are left out. Returns the index of the first backward
// node.
// A pipeline stage before the last seeds the backward with `seed` (an input holding d(loss)/d(loss
// value), the next stage's gradient) instead of 1, and with `wrt` >= 0 (its input activation,
// an input value) also keeps that value's gradient as a graph output, returned in *wrt_grad.
size_t append_backward(Graph& g, int loss, int seed = -1, int wrt = -1, int* wrt_grad = nullptr);
// The same with cut points, where a graph's values cross to another rank and back (expert
// parallelism's exchange): each `seeds` pair (value, input) takes the value's gradient from that
// input (filled from outside before the first backward node reads it); each of `wrts` (an
// input) keeps its gradient as a graph output, returned in `wrt_grads` (same order; -1 when
// nothing reaches it). Each of `sums` (an activation) has its gradient's value returned in
// `sum_grads` (-1: none), not kept beyond its last reader: tensor parallelism sums it over the
// group in place, after the node that writes it and before the first that reads it.
struct BackwardCuts {
  std::vector<std::pair<int, int>> seeds;
  std::vector<int> wrts;
  std::vector<int> wrt_grads;
  std::vector<int> sums;
  std::vector<int> sum_grads;
};
size_t append_backward(Graph& g, int loss, BackwardCuts& cuts);

}  // namespace mxn
