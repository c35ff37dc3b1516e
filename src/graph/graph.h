#pragma once
// A model is a Graph: values (tensors with a shape and a role) and nodes (one op of the chip
// contract each). Builders infer shapes; autograd appends the backward nodes; the planner gives
// every activation an offset in one arena; the Program runs the nodes on a Device.
#include <array>
#include <string>
#include <vector>

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

struct Node {
  mxn_op op;
  std::vector<int> in, out;
  std::array<int64_t, MXN_MAX_IP> ip{};
  std::array<float, 8> fp{};
};

// The general attention's parameters (the ATTENTION op's ip, see backend_abi.h).
struct AttentionSpec {
  int64_t heads = 1, kv_heads = 1, head_dim = 1;
  int64_t T = 1;  // queries per sequence
  int64_t S = 0;  // keys per sequence (0: T)
  // Which keys each query sees (backend_abi.h's mxn_attention_mask): none, causal, prefix
  // (GLM's Part A, bidirectional), segments (packed rows), and serving's cached and paged keys.
  mxn_attention_mask mask = MXN_MASK_CAUSAL;
  int64_t q_col = 0, k_col = 0, v_col = 0;  // column windows, for fused projections
  int64_t kv_rows = 0;  // rows per sequence in k and v (0: S), e.g. a KV cache's capacity
  int64_t q_pos0 = 0;   // key index of the first query (S - T when decoding with a cache)
  float scale = 0.f;    // 0: 1/sqrt(head_dim)
  int64_t P = 0;        // shared prefix keys and values seen by every query (P-Tuning v2)
  int64_t block = 0;    // paged keys: the KV block size
};

// ROPE's parameters (the op's ip and fp).
struct RopeSpec {
  int64_t col0 = 0, heads = 1, head_dim = 1, rot = 0;  // rot 0: the whole head
  bool interleaved = false;                            // GLM's (2i, 2i+1) pairs
  int scaling = 0;                                     // 0 none, 1 linear, 2 llama3
  float theta = 10000.f, factor = 1.f, low_freq_factor = 1.f, high_freq_factor = 4.f,
        original_max_position = 8192.f;
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
  int emit(mxn_op op, std::vector<int> in, std::vector<int> out,
           std::array<int64_t, MXN_MAX_IP> ip = {}, std::array<float, 8> fp = {});

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
  int attention(int q, int k, int v, const AttentionSpec& a, int prefix = -1, bool with_lse = true,
                int pk = -1, int pv = -1);
  int rmsnorm(int x, int w, float eps);
  int rope(int x, int pos, const RopeSpec& r);
  int silu(int x);
  // silu(gate[:, gcol + c]) * up[:, ucol + c] for c < F; gate and up may be one fused tensor.
  int swiglu(int gate, int up, int64_t gcol, int64_t ucol, int64_t F);
  // Writes columns [col, col + dst's width) of src's rows into `dst` (rows [at, at + n) of each
  // sequence of R rows, or with `rows` (an i32 value) src row i into dst row rows[i]); returns
  // dst.
  int set_rows(int src, int dst, int64_t at, int64_t R, int64_t col = 0, int rows = -1);
  int embedding(int idx, int table);
  // Inverted dropout with probability p; `tag` tells the node's mask stream apart (the runner
  // sets the seed and index offset of every DROPOUT call per run, see backend_abi.h).
  int dropout(int x, float p, int64_t tag);
  int cross_entropy(int logits, int targets);
  // cross_entropy(matmul(x, w, false, true), targets) without the (N, V) logits: one op that
  // runs block by block (`block` rows, 0: the backend's choice). Backward passes make it
  // compute the gradients in the same pass (append_backward gives it the outputs).
  int classifier_ce(int x, int w, int targets, int64_t block = 0);

  void mark_output(int id) { values[size_t(id)].output = true; }
  const Value& v(int id) const { return values[size_t(id)]; }
  int64_t v_rows(int id) const;      // elements / last dim
  std::vector<int> params() const;   // trained weights
  std::vector<int> weights() const;  // every stored weight: params and frozen ones

  std::vector<Value> values;
  std::vector<Node> nodes;
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

}  // namespace mxn
