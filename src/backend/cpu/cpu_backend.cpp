// The CPU reference backend's side of the chip contract: device properties, host buffers and
// the dispatch from an mxn_op_call to the kernels in kernels.h.
#include <dnnl.h>
#include <omp.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <new>
#include <string>

#include "backend/common.h"
#include "backend/cpu/kernels.h"
#include "core/dtype.h"
#include "mxn/backend_abi.h"

namespace mxn::cpu {
namespace {

struct Ctx : BackendBase {
  int threads = 1;
  Scratch scratch;
};

std::string cpu_model() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "CPU";
}

uint64_t mem_available() {
  std::ifstream f("/proc/meminfo");
  std::string key;
  uint64_t kb = 0;
  std::string unit;
  while (f >> key >> kb >> unit)
    if (key == "MemAvailable:") return kb * 1024;
  return uint64_t(sysconf(_SC_PHYS_PAGES)) * uint64_t(sysconf(_SC_PAGE_SIZE));
}

int32_t device_count() { return 1; }

int32_t device_props(int32_t dev, mxn_device_props* out) {
  if (dev != 0 || !out) return MXN_STATUS_INVALID_ARGUMENT;
  std::snprintf(out->name, sizeof(out->name), "%s", cpu_model().c_str());
  std::snprintf(out->vendor, sizeof(out->vendor), "cpu (oneDNN %d.%d)", dnnl_version()->major,
                dnnl_version()->minor);
  out->memory_bytes = uint64_t(sysconf(_SC_PHYS_PAGES)) * uint64_t(sysconf(_SC_PAGE_SIZE));
  // Nominal peak: cores x 2 FMA units x 8 f32 lanes (AVX2) x 2 flops x ~2.5 GHz.
  const int cores = omp_get_num_procs();
  const int lanes = dnnl_get_effective_cpu_isa() >= dnnl_cpu_isa_avx512_core ? 16 : 8;
  out->peak_gflops = cores * 2.0 * lanes * 2.0 * 2.5;
  out->dtype_mask = (1u << MXN_DTYPE_F32) | (1u << MXN_DTYPE_BF16) | (1u << MXN_DTYPE_F16) |
                    (1u << MXN_DTYPE_I32);
  std::snprintf(out->notes, sizeof(out->notes), "%d threads; bf16 matmul %s", omp_get_max_threads(),
                native_bf16() ? "native (AVX512-BF16/AMX)"
                              : "emulated: bf16-rounded operands, f32 GEMM (no AVX512-BF16/AMX)");
  return 0;
}

int32_t init(int32_t dev, const mxn_backend_options* opts, void** ctx) {
  if (dev != 0) return MXN_STATUS_INVALID_ARGUMENT;
  auto* c = new (std::nothrow) Ctx;
  if (!c) return MXN_STATUS_OUT_OF_MEMORY;
  c->threads = (opts && opts->threads > 0) ? opts->threads : omp_get_num_procs();
  omp_set_num_threads(c->threads);
  *ctx = c;
  return 0;
}

void shutdown(void* ctx) { delete static_cast<Ctx*>(ctx); }
const char* last_error(void* ctx) { return static_cast<Ctx*>(ctx)->error.c_str(); }

int32_t buffer_alloc(void* ctx, uint64_t bytes, void** out) {
  auto* c = static_cast<Ctx*>(ctx);
  void* p = nullptr;
  // Large buffers (weights, activations) on 2 MiB boundaries, marked for transparent huge pages:
  // streaming the weights once per token (decoding) then walks far fewer TLB entries.
  constexpr uint64_t kHuge = 2u << 20;
  const bool huge = bytes >= 4 * kHuge;
  if (bytes > mem_available() ||
      posix_memalign(&p, huge ? kHuge : 64,
                     huge ? (bytes + kHuge - 1) / kHuge * kHuge : (bytes ? bytes : 64)) != 0) {
    c->error = "the host has " + std::to_string(mem_available()) + " bytes free";
    return MXN_STATUS_OUT_OF_MEMORY;
  }
  if (huge) madvise(p, (bytes + kHuge - 1) / kHuge * kHuge, MADV_HUGEPAGE);
  *out = p;
  return 0;
}

void buffer_free(void*, void* buffer) { std::free(buffer); }

int32_t memory_free(void*, uint64_t* out) {
  *out = mem_available();
  return 0;
}

int32_t set_option(void*, const char* key, int64_t value) {
  if (std::string(key) != "gemm_split") return MXN_STATUS_UNSUPPORTED;
  set_gemm_split(value != 0);
  return 0;
}

int32_t copy_to_device(void*, void* dst, uint64_t off, const void* src, uint64_t bytes) {
  std::memcpy(static_cast<char*>(dst) + off, src, bytes);
  return 0;
}

int32_t copy_to_host(void*, void* dst, const void* src, uint64_t off, uint64_t bytes) {
  std::memcpy(dst, static_cast<const char*>(src) + off, bytes);
  return 0;
}

// The operands (inputs first, then outputs) other ops than CAST and COPY take in bf16: MATMUL's
// B and EMBEDDING's table (inference weights), and where training keeps a value at half size for
// the backward, GELU's x (the MLP's pre-activation) and attention's q, k, v (masks 0-3).
bool bf16_operand(int32_t op, int i) {
  switch (op) {
    case MXN_OP_MATMUL:
    case MXN_OP_EMBEDDING:
    case MXN_OP_GELU_BWD:
    case MXN_OP_GROUPED_MATMUL:  // the experts' matrices (forward form only: see cpu_rule)
      return i == 1;
    case MXN_OP_GELU:
      return i == 0;
    case MXN_OP_ATTENTION:
      return i < 3;
    case MXN_OP_ATTENTION_BWD:
      return i >= 1 && i < 4;
    default:
      return false;
  }
}

int32_t supports(void*, int32_t op, int32_t dtype) {
  if (op < 0 || op >= MXN_OP_COUNT) return 0;
  if (dtype == MXN_DTYPE_F32) return 1;
  if (dtype != MXN_DTYPE_BF16) return 0;
  // bf16 compute (MATMUL, CLASSIFIER_CE on f32 tensors), casts, and bf16 operands
  return op == MXN_OP_CAST || op == MXN_OP_COPY || op == MXN_OP_CLASSIFIER_CE ||
         bf16_operand(op, 1) || bf16_operand(op, 0);
}

template <typename T = float>
T* ptr(const mxn_tensor& t) {
  return reinterpret_cast<T*>(static_cast<char*>(t.buffer) + t.offset);
}

size_t elem_size(int32_t dt) { return dt == MXN_DTYPE_F32 || dt == MXN_DTYPE_I32 ? 4 : 2; }

int32_t bad(Ctx* c, const std::string& msg) { return c->fail(MXN_STATUS_INVALID_ARGUMENT, msg); }

int32_t run_matmul(Ctx* c, const mxn_op_call& k) {
  const MatmulShape m = matmul_shape(k);  // check_call has seen its error
  const float* bias = k.n_inputs > 2 ? ptr(k.inputs[2]) : nullptr;
  if (k.inputs[1].dtype == MXN_DTYPE_BF16) {  // bf16 weights (inference)
    matmul_bf16_weights(c->scratch, m.bf16 ? Compute::bf16 : Compute::f32, m.ta, m.tb, m.batch, m.M,
                        m.N, m.K, m.alpha, ptr(k.inputs[0]), m.sa, ptr<uint16_t>(k.inputs[1]), m.sb,
                        m.accumulate, ptr(k.outputs[0]), m.sc, bias);
    return 0;
  }
  matmul(c->scratch, m.bf16 ? Compute::bf16 : Compute::f32, m.ta, m.tb, m.batch, m.M, m.N, m.K,
         m.alpha, ptr(k.inputs[0]), m.sa, ptr(k.inputs[1]), m.sb, m.accumulate, ptr(k.outputs[0]),
         m.sc, bias);
  return 0;
}

int32_t run_cast(Ctx* c, const mxn_op_call& k) {
  const mxn_tensor &a = k.inputs[0], &o = k.outputs[0];
  const int64_t n = count(a);
  if (a.dtype == o.dtype) {
    std::memcpy(ptr<char>(o), ptr<char>(a), size_t(n) * elem_size(a.dtype));
    return 0;
  }
  // The pair bf16 training casts every layer, in vector loops (the general one below is not).
  if (a.dtype == MXN_DTYPE_F32 && o.dtype == MXN_DTYPE_BF16 && native_bf16()) {
    to_bf16(ptr(a), ptr<uint16_t>(o), n);
    return 0;
  }
  if (a.dtype == MXN_DTYPE_BF16 && o.dtype == MXN_DTYPE_F32) {
    from_bf16(ptr<uint16_t>(a), ptr(o), n);
    return 0;
  }
  auto to_f32 = [&](int64_t i) -> float {
    switch (a.dtype) {
      case MXN_DTYPE_F32:
        return ptr(a)[i];
      case MXN_DTYPE_BF16:
        return bf16_to_f32(ptr<uint16_t>(a)[i]);
      case MXN_DTYPE_F16:
        return f16_to_f32(ptr<uint16_t>(a)[i]);
      default:
        return float(ptr<int32_t>(a)[i]);
    }
  };
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float f = to_f32(i);
    switch (o.dtype) {
      case MXN_DTYPE_F32:
        ptr(o)[i] = f;
        break;
      case MXN_DTYPE_BF16:
        ptr<uint16_t>(o)[i] = f32_to_bf16(f);
        break;
      case MXN_DTYPE_F16:
        ptr<uint16_t>(o)[i] = f32_to_f16(f);
        break;
      default:
        ptr<int32_t>(o)[i] = int32_t(f);
        break;
    }
  }
  return 0;
}

// Attention's q, k and v as f32: bf16 ones (training keeps them so for the backward) are widened
// into scratch, once per distinct tensor (a fused qkv is one), in the same layout.
void widen_qkv(Ctx* c, const mxn_tensor* t, const float* out[3]) {
  size_t need = 0;
  for (int i = 0; i < 3; ++i)
    if (t[i].dtype == MXN_DTYPE_BF16) need += size_t(count(t[i]));
  if (need == 0) {
    for (int i = 0; i < 3; ++i) out[i] = ptr(t[i]);
    return;
  }
  float* wide = c->scratch.get(c->scratch.wide, need);
  for (int i = 0; i < 3; ++i) {
    if (t[i].dtype != MXN_DTYPE_BF16) {
      out[i] = ptr(t[i]);
      continue;
    }
    int j = 0;
    while (j < i && !(t[j].buffer == t[i].buffer && t[j].offset == t[i].offset)) ++j;
    if (j < i) {
      out[i] = out[j];
      continue;
    }
    from_bf16(ptr<uint16_t>(t[i]), wide, count(t[i]));
    out[i] = wide;
    wide += count(t[i]);
  }
}

// Training's attention on bf16 q, k, v runs on bf16 tiles where the CPU has the instructions
// (MXN_ATTN_TILES=f32 widens them instead, for the f32 tiles of the general kernel).
bool bf16_tiles(const AttentionShape& a, const mxn_tensor* t) {
  static const bool wanted = [] {
    const char* e = std::getenv("MXN_ATTN_TILES");
    return !(e && std::string(e) == "f32");
  }();
  return wanted && native_bf16() && a.P == 0 && a.mask <= MXN_MASK_SEGMENTS &&
         t[0].dtype == MXN_DTYPE_BF16 && t[1].dtype == MXN_DTYPE_BF16 &&
         t[2].dtype == MXN_DTYPE_BF16;
}

int32_t run_cross_entropy(Ctx* c, const mxn_op_call& k) {
  const mxn_tensor *in = k.inputs, *out = k.outputs;
  const XentParams p = params_of<XentParams>(k);
  const int64_t V = last(in[0]), rows = count(in[0]) / V;
  if (p.part == 1) {
    xent_stats(ptr(in[0]), ptr<int32_t>(in[1]), ptr(out[0]), rows, V, p);
    return 0;
  }
  if (p.part == 2) {
    xent_loss(ptr(in[2]), ptr<int32_t>(in[1]), ptr(out[0]), rows, p.slots);
    return 0;
  }
  const int64_t badr =
      cross_entropy_fwd(c->scratch, ptr(in[0]), ptr<int32_t>(in[1]), ptr(out[0]), rows, V);
  if (badr >= 0)
    return bad(c, "cross_entropy: target " + std::to_string(ptr<int32_t>(in[1])[badr]) +
                      " is outside [0, " + std::to_string(V) + ")");
  return 0;
}

int32_t run_classifier_ce(Ctx* c, const mxn_op_call& k) {
  const mxn_tensor &x = k.inputs[0], &w = k.inputs[1], &t = k.inputs[2];
  const int64_t C = last(x), N = count(x) / C, V = count(w) / last(w);
  const ClassifierParams p = params_of<ClassifierParams>(k);
  const int grads = p.vocab.part == 1 ? 0 : p.grads;
  // a vocabulary slice's stats: part 1's output, part 2's fourth input
  float* stats = p.vocab.part == 1   ? ptr(k.outputs[0])
                 : p.vocab.part == 2 ? ptr(k.inputs[3])
                                     : nullptr;
  const int64_t badr = classifier_ce(
      c->scratch, p.compute == MXN_DTYPE_BF16 ? Compute::bf16 : Compute::f32, grads, p.block,
      ptr(x), ptr(w), ptr<int32_t>(t), ptr(k.outputs[0]), grads > 0 ? ptr(k.outputs[1]) : nullptr,
      grads > 1 ? ptr(k.outputs[2]) : nullptr, N, C, V, p.scale(), p.direct, p.vocab, stats);
  if (badr >= 0)
    return bad(c, "classifier_ce: target " + std::to_string(ptr<int32_t>(t)[badr]) +
                      " is outside [0, " + std::to_string(V) + ")");
  return 0;
}

// An i32 operand's values within [0, n) (the indexes a scatter writes through).
bool indexes_in(const mxn_tensor& t, int64_t n) {
  const int32_t* v = ptr<int32_t>(t);
  for (int64_t i = 0, m = count(t); i < m; ++i)
    if (v[i] < 0 || v[i] >= n) return false;
  return true;
}

int32_t run_moe(Ctx* c, const mxn_op_call& k) {
  const mxn_tensor* in = k.inputs;
  const mxn_tensor* out = k.outputs;
  switch (k.op) {
    case MXN_OP_MOE_ROUTE: {
      const MoeRouteShape r = moe_route_shape(k, false);
      moe_route(c->scratch, r, params_of<MoeRouteParams>(k), ptr(in[0]),
                r.bias >= 0 ? ptr(in[r.bias]) : nullptr, ptr(out[0]), ptr<int32_t>(out[1]),
                ptr<int32_t>(out[2]), ptr<int32_t>(out[3]), r.aux ? ptr(out[4]) : nullptr);
      return 0;
    }
    case MXN_OP_MOE_ROUTE_BWD: {
      const MoeRouteShape r = moe_route_shape(k, true);
      if (!indexes_in(in[2], r.E)) return bad(c, "moe_route_bwd: an expert id is outside [0, E)");
      moe_route_bwd(c->scratch, r, params_of<MoeRouteParams>(k), ptr(in[0]), ptr(in[1]),
                    ptr<int32_t>(in[2]), r.daux >= 0 ? ptr(in[r.daux]) : nullptr, ptr(out[0]));
      return 0;
    }
    case MXN_OP_GROUPED_MATMUL:
      if (in[1].dtype == MXN_DTYPE_BF16)
        grouped_matmul_bf16(c->scratch, grouped_matmul_shape(k),
                            params_of<GroupedMatmulParams>(k).compute == MXN_DTYPE_BF16
                                ? Compute::bf16
                                : Compute::f32,
                            ptr(in[0]), ptr<uint16_t>(in[1]), ptr<int32_t>(in[2]), ptr(out[0]));
      else
        grouped_matmul(grouped_matmul_shape(k), ptr(in[0]), ptr(in[1]), ptr<int32_t>(in[2]),
                       ptr(out[0]));
      return 0;
    default:
      break;
  }
  const MoePermuteShape m = moe_permute_shape(k);
  const int p = k.op == MXN_OP_MOE_UNPERMUTE_BWD ? 2 : 1;
  if (!indexes_in(in[p], m.N * m.K))
    return bad(c, std::string(k.op == MXN_OP_MOE_PERMUTE ? "moe_permute" : "moe_unpermute") +
                      ": a slot's row is outside [0, N*K)");
  if (k.op == MXN_OP_MOE_PERMUTE)
    moe_permute(m, ptr(in[0]), ptr<int32_t>(in[1]), m.weighted ? ptr(in[2]) : nullptr, ptr(out[0]));
  else if (k.op == MXN_OP_MOE_UNPERMUTE)
    moe_unpermute(m, ptr(in[0]), ptr<int32_t>(in[1]), m.weighted ? ptr(in[2]) : nullptr,
                  ptr(out[0]));
  else
    moe_unpermute_bwd(m, ptr(in[0]), ptr(in[1]), ptr<int32_t>(in[2]), ptr(out[0]));
  return 0;
}

// The CPU's own rules, in front of the contract's (common.h): the dtypes each operand may have.
const char* cpu_rule(const mxn_op_call& k) {
  if (k.op == MXN_OP_CAST || k.op == MXN_OP_COPY) return nullptr;
  auto bf16_ok = [](int32_t op, int i, int32_t dt) {
    return dt == MXN_DTYPE_BF16 && bf16_operand(op, i);
  };
  if (const char* e = operand_dtypes(k, bf16_ok,
                                     "the CPU backend takes f32 tensors (bf16 only as weights, "
                                     "experts' matrices, GELU's x and attention's q, k, v)"))
    return e;
  if (k.op == MXN_OP_GROUPED_MATMUL && k.inputs[1].dtype == MXN_DTYPE_BF16 &&
      params_of<GroupedMatmulParams>(k).weight_grad)
    return "grouped_matmul: bf16 experts' matrices are inference weights (no weight gradient)";
  const int o = k.op == MXN_OP_ATTENTION_BWD ? 1 : 0;  // q, k, v follow dy
  const bool bf16_qkv =
      (k.op == MXN_OP_ATTENTION || k.op == MXN_OP_ATTENTION_BWD) &&
      (k.inputs[o].dtype == MXN_DTYPE_BF16 || k.inputs[o + 1].dtype == MXN_DTYPE_BF16 ||
       k.inputs[o + 2].dtype == MXN_DTYPE_BF16);
  if (bf16_qkv && params_of<AttentionParams>(k).mask > MXN_MASK_SEGMENTS)
    return "attention: bf16 q, k, v are for training's masks (none, causal, prefix, segments) only";
  return nullptr;
}

int32_t supports_call(void* ctx, const mxn_op_call* call) {
  return supports_call_with(*static_cast<Ctx*>(ctx), call, cpu_rule);
}

int32_t run(void* ctx, const mxn_op_call* call) {
  auto* c = static_cast<Ctx*>(ctx);
  if (int32_t st = check_call(*c, call, cpu_rule)) return st;
  const mxn_op_call& k = *call;
  const mxn_tensor* in = k.inputs;
  const mxn_tensor* out = k.outputs;
  switch (k.op) {
    case MXN_OP_MATMUL:
      return run_matmul(c, k);
    case MXN_OP_ADD:
      add(ptr(in[0]), ptr(in[1]), ptr(out[0]), count(out[0]));
      return 0;
    case MXN_OP_ADD_BIAS:
      add_bias(ptr(in[0]), ptr(in[1]), ptr(out[0]), count(in[0]) / last(in[0]), last(in[0]));
      return 0;
    case MXN_OP_SUM_ROWS:
      sum_rows(c->scratch, ptr(in[0]), ptr(out[0]), count(in[0]) / last(in[0]), last(in[0]),
               params_of<SumParams>(k).accumulate);
      return 0;
    case MXN_OP_SCALE:
      scale(ptr(in[0]), ptr(out[0]), count(out[0]), params_of<ScalarParams>(k).value);
      return 0;
    case MXN_OP_FILL:
      fill(ptr(out[0]), count(out[0]), params_of<ScalarParams>(k).value);
      return 0;
    case MXN_OP_COPY:
      std::memcpy(ptr<char>(out[0]), ptr<char>(in[0]),
                  size_t(count(in[0])) * elem_size(in[0].dtype));
      return 0;
    case MXN_OP_CAST:
      return run_cast(c, k);
    case MXN_OP_SUM_SQUARES: {
      const double s = sum_squares(ptr(in[0]), count(in[0]));
      *ptr(out[0]) = float(s + (params_of<SumParams>(k).accumulate ? double(*ptr(out[0])) : 0.0));
      return 0;
    }
    case MXN_OP_GELU:
      if (in[0].dtype == MXN_DTYPE_BF16)
        gelu_fwd(ptr<uint16_t>(in[0]), ptr(out[0]), count(out[0]));
      else
        gelu_fwd(ptr(in[0]), ptr(out[0]), count(out[0]));
      return 0;
    case MXN_OP_TANH: {
      const float* x = ptr(in[0]);
      float* y = ptr(out[0]);
      for (int64_t i = 0, n = count(out[0]); i < n; ++i) y[i] = std::tanh(x[i]);
      return 0;
    }
    case MXN_OP_MUL: {
      const float *a = ptr(in[0]), *b = ptr(in[1]);
      float* y = ptr(out[0]);
      const int64_t n = count(out[0]);
#pragma omp parallel for simd if (n > 65536)
      for (int64_t i = 0; i < n; ++i) y[i] = a[i] * b[i];
      return 0;
    }
    case MXN_OP_TANH_BWD: {
      const float *dy = ptr(in[0]), *y = ptr(in[1]);
      float* dx = ptr(out[0]);
      for (int64_t i = 0, n = count(out[0]); i < n; ++i) dx[i] = dy[i] * (1.f - y[i] * y[i]);
      return 0;
    }
    case MXN_OP_GELU_BWD:
      if (in[1].dtype == MXN_DTYPE_BF16)
        gelu_bwd(ptr(in[0]), ptr<uint16_t>(in[1]), ptr(out[0]), count(out[0]));
      else
        gelu_bwd(ptr(in[0]), ptr(in[1]), ptr(out[0]), count(out[0]));
      return 0;
    case MXN_OP_SOFTMAX:
      softmax_fwd(ptr(in[0]), ptr(out[0]), count(in[0]) / last(in[0]), last(in[0]));
      return 0;
    case MXN_OP_SOFTMAX_BWD:
      softmax_bwd(ptr(in[0]), ptr(in[1]), ptr(out[0]), count(in[0]) / last(in[0]), last(in[0]));
      return 0;
    case MXN_OP_LAYERNORM:
      layernorm_fwd(ptr(in[0]), ptr(in[1]), ptr(in[2]), ptr(out[0]), ptr(out[1]),
                    count(in[0]) / last(in[0]), last(in[0]), params_of<NormParams>(k).eps);
      return 0;
    case MXN_OP_LAYERNORM_BWD:
      layernorm_bwd(c->scratch, ptr(in[0]), ptr(in[1]), ptr(in[2]), ptr(in[3]), ptr(out[0]),
                    ptr(out[1]), ptr(out[2]), count(in[0]) / last(in[0]), last(in[0]));
      return 0;
    case MXN_OP_ATTENTION: {
      const AttentionShape a = attention_shape(k, false);
      if (bf16_tiles(a, in)) {
        attention_fwd_bf16(c->scratch, a, ptr<uint16_t>(in[0]), ptr<uint16_t>(in[1]),
                           ptr<uint16_t>(in[2]), a.has_prefix ? ptr<int32_t>(in[a.extra]) : nullptr,
                           ptr(out[0]), k.n_outputs > 1 ? ptr(out[1]) : nullptr);
        return 0;
      }
      const float* qkv[3];
      widen_qkv(c, in, qkv);
      attention_fwd(c->scratch, a, qkv[0], qkv[1], qkv[2], a.P > 0 ? ptr(in[a.pkv]) : nullptr,
                    a.P > 0 ? ptr(in[a.pkv + 1]) : nullptr,
                    a.has_prefix ? ptr<int32_t>(in[a.extra]) : nullptr, ptr(out[0]),
                    k.n_outputs > 1 ? ptr(out[1]) : nullptr);
      return 0;
    }
    case MXN_OP_ATTENTION_BWD: {
      const AttentionShape a = attention_shape(k, true);
      if (bf16_tiles(a, in + 1)) {
        attention_bwd_bf16(c->scratch, a, ptr(in[0]), ptr<uint16_t>(in[1]), ptr<uint16_t>(in[2]),
                           ptr<uint16_t>(in[3]), ptr(in[4]), ptr(in[5]),
                           a.has_prefix ? ptr<int32_t>(in[a.extra]) : nullptr, ptr(out[0]),
                           ptr(out[1]), ptr(out[2]));
        return 0;
      }
      const float* qkv[3];
      widen_qkv(c, in + 1, qkv);
      attention_bwd(c->scratch, a, ptr(in[0]), qkv[0], qkv[1], qkv[2], ptr(in[4]), ptr(in[5]),
                    a.P > 0 ? ptr(in[a.pkv]) : nullptr, a.P > 0 ? ptr(in[a.pkv + 1]) : nullptr,
                    a.has_prefix ? ptr<int32_t>(in[a.extra]) : nullptr, ptr(out[0]), ptr(out[1]),
                    ptr(out[2]), a.P > 0 ? ptr(out[3]) : nullptr, a.P > 0 ? ptr(out[4]) : nullptr);
      return 0;
    }
    case MXN_OP_RMSNORM:  // rows of count(w) columns (ABI 9: groups of a row)
      rmsnorm_fwd(ptr(in[0]), ptr(in[1]), ptr(out[0]), ptr(out[1]), count(in[0]) / count(in[1]),
                  count(in[1]), params_of<NormParams>(k).eps);
      return 0;
    case MXN_OP_RMSNORM_BWD:
      rmsnorm_bwd(c->scratch, ptr(in[0]), ptr(in[1]), ptr(in[2]), ptr(in[3]), ptr(out[0]),
                  ptr(out[1]), count(in[1]) / count(in[2]), count(in[2]));
      return 0;
    case MXN_OP_MOE_ROUTE:
    case MXN_OP_MOE_ROUTE_BWD:
    case MXN_OP_MOE_PERMUTE:
    case MXN_OP_MOE_UNPERMUTE:
    case MXN_OP_MOE_UNPERMUTE_BWD:
    case MXN_OP_GROUPED_MATMUL:
      return run_moe(c, k);
    case MXN_OP_STRIDED_COPY:
      strided_copy(params_of<StridedCopyParams>(k), ptr(in[0]), ptr(out[0]));
      return 0;
    case MXN_OP_ROPE: {
      const RopeParams r = params_of<RopeParams>(k);
      float* inv = c->scratch.get(c->scratch.c, size_t(r.rot / 2));
      for (int64_t i = 0; i < r.rot / 2; ++i) inv[i] = r.inv_freq(i);
      rope(ptr(in[0]), ptr<int32_t>(in[1]), ptr(out[0]), rows_of(in[0]), last(in[0]), r.col0,
           r.heads, r.head_dim, r.rot, r.interleaved, r.backward, inv);
      return 0;
    }
    case MXN_OP_SILU:
      silu_fwd(ptr(in[0]), ptr(out[0]), count(out[0]));
      return 0;
    case MXN_OP_SILU_BWD:
      silu_bwd(ptr(in[0]), ptr(in[1]), ptr(out[0]), count(out[0]));
      return 0;
    case MXN_OP_SWIGLU: {
      const SwigluParams p = params_of<SwigluParams>(k);
      swiglu_fwd(ptr(in[0]), last(in[0]), p.gate_col, ptr(in[1]), last(in[1]), p.up_col,
                 ptr(out[0]), rows_of(out[0]), last(out[0]));
      return 0;
    }
    case MXN_OP_SWIGLU_BWD: {
      const SwigluParams p = params_of<SwigluParams>(k);
      swiglu_bwd(ptr(in[0]), ptr(in[1]), last(in[1]), p.gate_col, ptr(in[2]), last(in[2]), p.up_col,
                 ptr(out[0]), ptr(out[1]), rows_of(in[0]), last(in[0]));
      return 0;
    }
    case MXN_OP_SET_ROWS: {
      const SetRowsShape r = set_rows_shape(k);
      if (r.has_idx) {
        const int32_t* idx = ptr<int32_t>(in[1]);
        for (int64_t i = 0; i < r.n; ++i)
          if (idx[i] < 0 || idx[i] >= r.dst_rows)
            return bad(c, "set_rows: a row index is outside dst");
        for (int64_t i = 0; i < r.n; ++i)
          std::memcpy(ptr(out[0]) + int64_t(idx[i]) * r.W, ptr(in[0]) + i * r.ld + r.col,
                      size_t(r.W) * 4);
        return 0;
      }
      for (int64_t b = 0; b < r.B; ++b)
        for (int64_t t = 0; t < r.n; ++t)
          std::memcpy(ptr(out[0]) + (b * r.R + r.at + t) * r.W,
                      ptr(in[0]) + (b * r.n + t) * r.ld + r.col, size_t(r.W) * 4);
      return 0;
    }
    case MXN_OP_DROPOUT: {
      const DropoutParams d = params_of<DropoutParams>(k);
      const float p = d.p, scale = 1.f / (1.f - p);
      const float* x = ptr(in[0]);
      float* y = ptr(out[0]);
      const int64_t n = count(in[0]);
      const uint64_t seed = d.seed, first = d.index;
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < n; ++i)
        y[i] = dropout_keep(seed, first + uint64_t(i), p) ? x[i] * scale : 0.f;
      return 0;
    }
    case MXN_OP_EMBEDDING: {
      const int64_t V = in[1].shape[0], C = in[1].shape[1];
      const EmbeddingParams p = params_of<EmbeddingParams>(k);
      const int64_t badi =
          in[1].dtype == MXN_DTYPE_BF16
              ? embedding_fwd_bf16(ptr<int32_t>(in[0]), ptr<uint16_t>(in[1]), ptr(out[0]),
                                   count(in[0]), V, C, p)
              : embedding_fwd(ptr<int32_t>(in[0]), ptr(in[1]), ptr(out[0]), count(in[0]), V, C, p);
      if (badi >= 0)
        return bad(c, "embedding: token id " + std::to_string(ptr<int32_t>(in[0])[badi]) +
                          " at position " + std::to_string(badi) + " is outside [0, " +
                          std::to_string(V) + ")");
      return 0;
    }
    case MXN_OP_EMBEDDING_BWD:
      embedding_bwd(ptr(in[0]), ptr<int32_t>(in[1]), ptr(out[0]), count(in[1]), out[0].shape[0],
                    out[0].shape[1], params_of<EmbeddingParams>(k));
      return 0;
    case MXN_OP_CROSS_ENTROPY:
      return run_cross_entropy(c, k);
    case MXN_OP_CROSS_ENTROPY_BWD: {
      const XentParams p = params_of<XentParams>(k);
      const int64_t V = last(in[1]), rows = count(in[1]) / V;
      cross_entropy_bwd(ptr(in[0]), ptr(in[1]), ptr<int32_t>(in[2]), ptr(out[0]), rows, V, p,
                        p.part == 2 ? ptr(in[3]) : nullptr);
      return 0;
    }
    case MXN_OP_CLASSIFIER_CE:
      return run_classifier_ce(c, k);
    case MXN_OP_CLASSIFIER_CE_BWD: {
      const float d = *ptr(in[0]);
      for (int i = 0; i < k.n_outputs && i + 1 < k.n_inputs; ++i)
        scale(ptr(in[i + 1]), ptr(out[i]), count(out[i]), d);
      return 0;
    }
    case MXN_OP_ADAMW: {
      const AdamwParams a = params_of<AdamwParams>(k);
      adamw(ptr(out[0]), ptr(in[0]), ptr(out[1]), ptr(out[2]), count(out[0]), a.lr, a.beta1,
            a.beta2, a.eps, a.weight_decay, a.gscale, a.step_size(), a.bc2_sqrt());
      return 0;
    }
    default:
      return c->fail(MXN_STATUS_UNSUPPORTED, "unknown op " + std::to_string(k.op));
  }
}

int32_t synchronize(void*) { return 0; }  // kernels run to completion on the calling thread

const mxn_backend_api kApi = {
    sizeof(mxn_backend_api),
    MXN_ABI_VERSION,
    "cpu",
    device_count,
    device_props,
    init,
    shutdown,
    last_error,
    buffer_alloc,
    buffer_free,
    copy_to_device,
    copy_to_host,
    supports,
    run,
    synchronize,
    nullptr,  // no device-direct collectives: ranks on this backend reduce through the host
    nullptr,
    nullptr,
    nullptr,
    memory_free,
    set_option,
    supports_call,
    nullptr,  // no device-direct messages: expert parallelism's exchange goes through the host
    nullptr,
};

}  // namespace
}  // namespace mxn::cpu

extern "C" const mxn_backend_api* mxn_cpu_backend_get_api(void) { return &mxn::cpu::kApi; }
