#pragma once
// What every backend would otherwise write again: the contract's rules for an op call (checked in
// one place, for supports_call and before run), the last error of a context, device scratch that
// grows once and is reused, and RoPE's frequency tables made once per distinct parameters.
// A backend's context derives from BackendBase. Plain C++17, usable from nvcc.
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "backend/op_shapes.h"

namespace mxn {

// The contract's shape and parameter rules of one call, the same on every chip; null when it
// holds. A backend adds its own rules (the dtypes it takes) in front of these.
inline const char* classifier_error(const mxn_op_call& k) {
  const ClassifierParams p = params_of<ClassifierParams>(k);
  const mxn_tensor &x = k.inputs[0], &w = k.inputs[1], &t = k.inputs[2];
  const int64_t C = last(x), N = C > 0 ? count(x) / C : 0, V = last(w) > 0 ? rows_of(w) : 0;
  const XentParams& s = p.vocab;
  if (k.n_inputs < 3 || last(w) != C || count(t) != N || p.grads < 0 || p.grads > 2 ||
      k.n_outputs < 1 + p.grads || (p.grads > 0 && count(k.outputs[1]) != N * C) ||
      (p.grads > 1 && count(k.outputs[2]) != V * C))
    return "classifier_ce: expected x (N, C), w (V, C), targets (N), out loss (1) and, with "
           "grads 1 or 2, dx (N, C) and dw (V, C)";
  if (s.part < 0 || s.part > 2 ||
      (s.part > 0 && (s.slots < 1 || s.slot < 0 || s.slot >= s.slots || s.vocab0 < 0)) ||
      (s.part == 1 && (p.grads != 0 || count(k.outputs[0]) != N * s.slots * 3)) ||
      (s.part == 2 && (k.n_inputs < 4 || count(k.inputs[3]) != N * s.slots * 3)))
    return "classifier_ce: a vocabulary slice's part 1 makes stats (N, slots, 3) and no gradients, "
           "part 2 takes them (0 <= slot < slots)";
  return nullptr;
}

// CROSS_ENTROPY(_BWD): logits (N, V) and targets (N); a vocabulary slice's stats (N, slots, 3).
inline const char* xent_error(const mxn_op_call& k) {
  const bool bwd = k.op == MXN_OP_CROSS_ENTROPY_BWD;
  const XentParams p = params_of<XentParams>(k);
  const int first = bwd ? 1 : 0;  // the logits
  if (k.n_inputs < first + 2 || k.n_outputs < 1)
    return "cross_entropy: expected logits and targets";
  const mxn_tensor& l = k.inputs[first];
  const int64_t V = last(l), N = V > 0 ? count(l) / V : 0;
  if (V < 1 || count(k.inputs[first + 1]) != N ||
      count(k.outputs[0]) != (bwd           ? N * V
                              : p.part == 1 ? N * p.slots * 3
                                            : 1))
    return "cross_entropy: expected logits (N, V), targets (N) and out loss (1), dlogits (N, V) or "
           "part 1's stats (N, slots, 3)";
  if (p.part < 0 || p.part > 2 ||
      (p.part > 0 && (p.slots < 1 || p.slot < 0 || p.slot >= p.slots || p.vocab0 < 0)))
    return "cross_entropy: part is 0, 1 or 2, with 0 <= slot < slots and vocab0 >= 0";
  if (p.part == 2 && (k.n_inputs < first + 3 || count(k.inputs[first + 2]) != N * p.slots * 3))
    return "cross_entropy: part 2 takes the stats (N, slots, 3) summed over the slots";
  return nullptr;
}

// RMSNORM(_BWD): x (rows of groups of count(w) columns), w, and rstd one per group.
inline const char* rmsnorm_error(const mxn_op_call& k) {
  const bool bwd = k.op == MXN_OP_RMSNORM_BWD;
  const mxn_tensor &x = k.inputs[bwd ? 1 : 0], &w = k.inputs[bwd ? 2 : 1];
  const int64_t D = count(w);
  if (k.n_inputs < (bwd ? 4 : 2) || k.n_outputs < 2 || D < 1 || last(x) % D != 0 ||
      count(bwd ? k.inputs[3] : k.outputs[1]) != count(x) / D || count(k.outputs[0]) != count(x) ||
      (bwd && count(k.outputs[1]) != D))
    return "rmsnorm: expected x (N, C), w (D) with D dividing C, y like x and rstd (N*C/D)";
  return nullptr;
}

// The routing kernels keep a token's experts in fixed-size arrays.
constexpr int64_t kMaxExperts = 1024, kMaxExpertsPerToken = 64;

inline const char* contract_error(const mxn_op_call& k) {
  if (k.op < 0 || k.op >= MXN_OP_COUNT) return "unknown op";
  if (k.n_inputs < 0 || k.n_inputs > MXN_MAX_OPERANDS || k.n_outputs < 0 ||
      k.n_outputs > MXN_MAX_OPERANDS)
    return "an op call has 0 to 12 inputs and outputs";
  switch (k.op) {
    case MXN_OP_MATMUL:
      return matmul_shape(k).error;
    case MXN_OP_ATTENTION:
      return attention_shape(k, false).error;
    case MXN_OP_ATTENTION_BWD: {
      const AttentionShape a = attention_shape(k, true);
      if (!a.error && a.P > 0 && k.n_outputs < 5) return "attention_bwd: dpk and dpv are missing";
      return a.error;
    }
    case MXN_OP_ROPE:
      return rope_error(k);
    case MXN_OP_SWIGLU:
      return swiglu_error(k, false);
    case MXN_OP_SWIGLU_BWD:
      return swiglu_error(k, true);
    case MXN_OP_SET_ROWS:
      return set_rows_shape(k).error;
    case MXN_OP_DROPOUT:
      return dropout_error(k);
    case MXN_OP_CLASSIFIER_CE:
      return classifier_error(k);
    case MXN_OP_CROSS_ENTROPY:
    case MXN_OP_CROSS_ENTROPY_BWD:
      return xent_error(k);
    case MXN_OP_CAST:
      return count(k.inputs[0]) != count(k.outputs[0]) ? "cast: sizes differ" : nullptr;
    case MXN_OP_RMSNORM:
    case MXN_OP_RMSNORM_BWD:
      return rmsnorm_error(k);
    case MXN_OP_MOE_ROUTE:
    case MXN_OP_MOE_ROUTE_BWD: {
      const MoeRouteShape s = moe_route_shape(k, k.op == MXN_OP_MOE_ROUTE_BWD);
      if (!s.error && (s.E > kMaxExperts || s.K > kMaxExpertsPerToken))
        return "moe_route: at most 1024 experts and 64 a token";
      return s.error;
    }
    case MXN_OP_MOE_PERMUTE:
    case MXN_OP_MOE_UNPERMUTE:
    case MXN_OP_MOE_UNPERMUTE_BWD:
      return moe_permute_shape(k).error;
    case MXN_OP_GROUPED_MATMUL:
      return grouped_matmul_shape(k).error;
    case MXN_OP_STRIDED_COPY:
      return strided_copy_error(k);
    default:
      return nullptr;
  }
}

// A backend's dtype rule: every operand (inputs, then outputs) is f32 or i32, or of a dtype that
// `takes(op, operand, dtype)` allows; else `msg`.
template <typename Takes>
const char* operand_dtypes(const mxn_op_call& k, Takes&& takes, const char* msg) {
  for (int i = 0; i < k.n_inputs + k.n_outputs; ++i) {
    const int32_t dt = i < k.n_inputs ? k.inputs[i].dtype : k.outputs[i - k.n_inputs].dtype;
    if (dt != MXN_DTYPE_F32 && dt != MXN_DTYPE_I32 && !takes(k.op, i, dt)) return msg;
  }
  return nullptr;
}

// A backend's context: the message of its last failure (what last_error returns).
struct BackendBase {
  std::string error;
  int32_t fail(int32_t status, const std::string& msg) {
    error = msg;
    return status;
  }
};

// The checks before a call runs, and supports_call's answer, in one: the struct's size, the
// backend's own rule (`own`: the dtypes it takes, null when they hold) and the contract's.
template <typename OwnRule>
int32_t check_call(BackendBase& b, const mxn_op_call* call, OwnRule&& own) {
  if (!call || call->struct_size < sizeof(mxn_op_call))
    return b.fail(MXN_STATUS_INVALID_ARGUMENT, "op call struct too small");
  if (const char* e = contract_error(*call)) return b.fail(MXN_STATUS_INVALID_ARGUMENT, e);
  if (const char* e = own(*call)) return b.fail(MXN_STATUS_UNSUPPORTED, e);
  return 0;
}
// supports_call's answer from check_call's: 1 when the call can run, else 0 (the reason in
// last_error).
template <typename OwnRule>
int32_t supports_call_with(BackendBase& b, const mxn_op_call* call, OwnRule&& own) {
  return check_call(b, call, own) == 0 ? 1 : 0;
}

// Device scratch that grows to the largest request and is then reused (so steps allocate
// nothing). `alloc(bytes)` returns a handle or null, `release(handle)` frees one.
template <typename Handle>
struct GrowingBuffer {
  Handle handle{};
  size_t bytes = 0;
  template <typename Alloc, typename Release>
  Handle get(size_t need, Alloc&& alloc, Release&& release) {
    if (need <= bytes && handle) return handle;
    if (handle) release(handle);
    handle = alloc(need);
    bytes = handle ? need : 0;
    return handle;
  }
};

// RoPE's frequencies for a call, as every backend computes them (RopeParams::inv_freq).
inline void rope_freqs(const RopeParams& r, std::vector<float>& out) {
  out.resize(size_t(r.rot / 2));
  for (size_t i = 0; i < out.size(); ++i) out[i] = r.inv_freq(int64_t(i));
}

// The device copies of those tables, one per distinct table, made on first use and kept: `upload`
// makes a device copy of a host table (null on failure).
template <typename Handle>
struct RopeTables {
  std::map<std::vector<float>, Handle> tables;
  std::vector<float> key;  // reused, so a call that finds its table allocates nothing
  template <typename Upload>
  Handle get(const mxn_op_call& k, Upload&& upload) {
    rope_freqs(params_of<RopeParams>(k), key);
    auto it = tables.find(key);
    if (it != tables.end()) return it->second;
    Handle h = upload(key);
    if (h) tables.emplace(key, h);
    return h;
  }
  template <typename Release>
  void clear(Release&& release) {
    for (auto& [t, h] : tables) release(h);
    tables.clear();
  }
};

}  // namespace mxn
