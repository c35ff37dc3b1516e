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
  std::array<int64_t, 8> ip{};
  std::array<float, 8> fp{};
};

class Graph {
 public:
  // Matmuls (forward and backward) run with this compute type: f32, or bf16 mixed precision.
  DType matmul_compute = DType::f32;

  int param(const std::string& name, Shape shape, bool decay);
  int input(const std::string& name, Shape shape, DType dtype);
  int activation(Shape shape, DType dtype = DType::f32);
  int emit(mxn_op op, std::vector<int> in, std::vector<int> out, std::array<int64_t, 8> ip = {},
           std::array<float, 8> fp = {});

  // Builders: each appends one node and returns its (first) output.
  int matmul(int a, int b, bool ta = false, bool tb = false, float alpha = 1.f);
  int add(int a, int b);
  int add_bias(int a, int bias);
  int scale(int a, float k);
  int gelu(int x);
  int softmax(int x);
  int layernorm(int x, int w, int b, float eps = 1e-5f);
  int attention(int qkv, int64_t heads, int64_t T);  // qkv (B*T, 3C) -> (B*T, C)
  int embedding(int idx, int table);
  int cross_entropy(int logits, int targets);

  void mark_output(int id) { values[size_t(id)].output = true; }
  const Value& v(int id) const { return values[size_t(id)]; }
  std::vector<int> params() const;

  std::vector<Value> values;
  std::vector<Node> nodes;
};

// Appends the backward pass of every node so far (one rule per op, autograd.cpp) with d(loss)=1,
// and adds each param's gradient into its grad value. Returns the index of the first backward node.
size_t append_backward(Graph& g, int loss);

}  // namespace mxn
