// The CUDA backend: cuBLASLt for GEMMs (f32, and bf16 operands with f32 accumulation), the
// kernels in kernels.cuh for every other op. A plugin (libmxn_backend_cuda.so), built wherever
// nvcc is; with no GPU or driver it loads and reports no devices.
#include <cublasLt.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <new>
#include <string>
#include <vector>

#include "backend/common.h"
#include "backend/cuda/kernels.cuh"
#include "backend/cuda/kernels_llm.cuh"
#include "backend/cuda/kernels_moe.cuh"
#ifdef MXN_HAVE_NCCL
#include "backend/cuda/nccl.cuh"
#endif
#include "mxn/backend_abi.h"

namespace mxn::cuda {
namespace {

struct Ctx : BackendBase {
  int device = 0;
  cudaStream_t stream = nullptr;
  cublasLtHandle_t lt = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 32u << 20;
  GrowingBuffer<float*> scratch;  // reductions, bf16 operands
  RopeTables<float*> rope_tables;
#ifdef MXN_HAVE_NCCL
  ncclComm_t comm = nullptr;
  cudaStream_t comm_stream = nullptr;  // collectives run here, beside the kernels
  cudaEvent_t compute_done = nullptr, comm_done = nullptr;
  ncclComm_t groups[MXN_COMM_GROUPS] = {};  // exchange's communicators (1 and up)
#endif
};

int32_t fail(Ctx* c, int32_t st, const std::string& msg) { return c->fail(st, msg); }

int32_t check(Ctx* c, cudaError_t e, const char* what) {
  return e == cudaSuccess
             ? 0
             : fail(c, MXN_STATUS_INTERNAL, std::string(what) + ": " + cudaGetErrorString(e));
}

int32_t device_count() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

int32_t device_props(int32_t dev, mxn_device_props* out) {
  cudaDeviceProp p{};
  if (!out || dev < 0 || dev >= device_count() || cudaGetDeviceProperties(&p, dev) != cudaSuccess)
    return MXN_STATUS_INVALID_ARGUMENT;
  std::snprintf(out->name, sizeof(out->name), "%s", p.name);
  std::snprintf(out->vendor, sizeof(out->vendor), "NVIDIA (sm_%d%d)", p.major, p.minor);
  out->memory_bytes = p.totalGlobalMem;
  out->peak_gflops = 0;  // not derivable from the properties alone; measured by `mxn bench ops`
  out->dtype_mask = (1u << MXN_DTYPE_F32) | (1u << MXN_DTYPE_BF16) | (1u << MXN_DTYPE_I32);
  std::snprintf(out->notes, sizeof(out->notes), "%d SMs; GEMM by cuBLASLt", p.multiProcessorCount);
  return 0;
}

int32_t init(int32_t dev, const mxn_backend_options*, void** out) {
  if (dev < 0 || dev >= device_count()) return MXN_STATUS_INVALID_ARGUMENT;
  auto* c = new (std::nothrow) Ctx;
  if (!c) return MXN_STATUS_OUT_OF_MEMORY;
  *out = c;
  c->device = dev;
  if (int32_t st = check(c, cudaSetDevice(dev), "cudaSetDevice")) return st;
  if (int32_t st = check(c, cudaStreamCreate(&c->stream), "cudaStreamCreate")) return st;
  if (cublasLtCreate(&c->lt) != CUBLAS_STATUS_SUCCESS)
    return fail(c, MXN_STATUS_INTERNAL, "cublasLtCreate failed");
  return check(c, cudaMalloc(&c->workspace, c->workspace_bytes), "cudaMalloc (cuBLASLt workspace)");
}

void shutdown(void* ctx) {
  auto* c = static_cast<Ctx*>(ctx);
#ifdef MXN_HAVE_NCCL
  if (c->comm) Nccl::get().comm_destroy(c->comm);
  for (ncclComm_t g : c->groups)
    if (g) Nccl::get().comm_destroy(g);
  if (c->comm_stream) cudaStreamDestroy(c->comm_stream);
  if (c->compute_done) cudaEventDestroy(c->compute_done);
  if (c->comm_done) cudaEventDestroy(c->comm_done);
#endif
  if (c->scratch.handle) cudaFree(c->scratch.handle);
  c->rope_tables.clear(cudaFree);
  if (c->workspace) cudaFree(c->workspace);
  if (c->lt) cublasLtDestroy(c->lt);
  if (c->stream) cudaStreamDestroy(c->stream);
  delete c;
}

const char* last_error(void* ctx) { return static_cast<Ctx*>(ctx)->error.c_str(); }

int32_t buffer_alloc(void* ctx, uint64_t bytes, void** out) {
  auto* c = static_cast<Ctx*>(ctx);
  cudaSetDevice(c->device);
  if (cudaMalloc(out, bytes ? bytes : 64) != cudaSuccess) {
    cudaGetLastError();
    size_t free_b = 0, total = 0;
    cudaMemGetInfo(&free_b, &total);
    return fail(c, MXN_STATUS_OUT_OF_MEMORY,
                "the device has " + std::to_string(free_b) + " bytes free");
  }
  return 0;
}

void buffer_free(void*, void* b) { cudaFree(b); }

int32_t memory_free(void* ctx, uint64_t* out) {
  auto* c = static_cast<Ctx*>(ctx);
  size_t free_b = 0, total = 0;
  if (int32_t st = check(c, cudaSetDevice(c->device), "cudaSetDevice")) return st;
  if (int32_t st = check(c, cudaMemGetInfo(&free_b, &total), "cudaMemGetInfo")) return st;
  *out = free_b;
  return 0;
}

int32_t copy_to_device(void* ctx, void* dst, uint64_t off, const void* src, uint64_t bytes) {
  auto* c = static_cast<Ctx*>(ctx);
  if (int32_t st = check(c,
                         cudaMemcpyAsync(static_cast<char*>(dst) + off, src, bytes,
                                         cudaMemcpyHostToDevice, c->stream),
                         "cudaMemcpyAsync"))
    return st;
  return check(c, cudaStreamSynchronize(c->stream), "cudaStreamSynchronize");  // src may go away
}

int32_t copy_to_host(void* ctx, void* dst, const void* src, uint64_t off, uint64_t bytes) {
  auto* c = static_cast<Ctx*>(ctx);
  if (int32_t st = check(c,
                         cudaMemcpyAsync(dst, static_cast<const char*>(src) + off, bytes,
                                         cudaMemcpyDeviceToHost, c->stream),
                         "cudaMemcpyAsync"))
    return st;
  return check(c, cudaStreamSynchronize(c->stream), "cudaStreamSynchronize");
}

int32_t supports(void*, int32_t op, int32_t dtype) {
  if (op < 0 || op >= MXN_OP_COUNT) return 0;
  if (op == MXN_OP_CLASSIFIER_CE || op == MXN_OP_CLASSIFIER_CE_BWD) return 0;  // not yet: unfused
  return dtype == MXN_DTYPE_F32 || (op == MXN_OP_MATMUL && dtype == MXN_DTYPE_BF16);
}

int32_t synchronize(void* ctx) {
  auto* c = static_cast<Ctx*>(ctx);
#ifdef MXN_HAVE_NCCL
  if (c->comm_stream)
    if (int32_t st =
            check(c, cudaStreamSynchronize(c->comm_stream), "cudaStreamSynchronize (collectives)"))
      return st;
#endif
  return check(c, cudaStreamSynchronize(c->stream), "cudaStreamSynchronize");
}

#ifdef MXN_HAVE_NCCL
// Collectives through NCCL on their own stream: an all-reduce waits for the kernels enqueued
// before it (an event), and comm_wait makes the kernel stream wait for the collectives.
int32_t nccl_check(Ctx* c, ncclResult_t r, const char* what) {
  return r == ncclSuccess
             ? 0
             : fail(c, MXN_STATUS_INTERNAL, std::string(what) + ": " + Nccl::get().error_string(r));
}

int32_t comm_id(void* ctx, uint8_t* id) {
  auto* c = static_cast<Ctx*>(ctx);
  const Nccl& n = Nccl::get();
  if (!n.ok) return fail(c, MXN_STATUS_UNSUPPORTED, "NCCL (libnccl.so.2) is not installed");
  if (!id) return 0;
  return nccl_check(c, n.get_unique_id(reinterpret_cast<ncclUniqueId*>(id)), "ncclGetUniqueId");
}

int32_t comm_init(void* ctx, const uint8_t* id, int32_t world, int32_t rank) {
  auto* c = static_cast<Ctx*>(ctx);
  const Nccl& n = Nccl::get();
  if (!n.ok) return fail(c, MXN_STATUS_UNSUPPORTED, "NCCL (libnccl.so.2) is not installed");
  if (int32_t st = check(c, cudaSetDevice(c->device), "cudaSetDevice")) return st;
  if (int32_t st = check(c, cudaStreamCreateWithFlags(&c->comm_stream, cudaStreamNonBlocking),
                         "cudaStreamCreate"))
    return st;
  if (int32_t st = check(c, cudaEventCreateWithFlags(&c->compute_done, cudaEventDisableTiming),
                         "cudaEventCreate"))
    return st;
  if (int32_t st = check(c, cudaEventCreateWithFlags(&c->comm_done, cudaEventDisableTiming),
                         "cudaEventCreate"))
    return st;
  ncclUniqueId uid;
  std::memcpy(&uid, id, sizeof(uid));
  return nccl_check(c, n.comm_init_rank(&c->comm, world, uid, rank), "ncclCommInitRank");
}

int32_t all_reduce_sum(void* ctx, void* buffer, uint64_t offset, uint64_t count) {
  auto* c = static_cast<Ctx*>(ctx);
  if (!c->comm) return fail(c, MXN_STATUS_INVALID_ARGUMENT, "all_reduce_sum before comm_init");
  if (int32_t st = check(c, cudaEventRecord(c->compute_done, c->stream), "cudaEventRecord"))
    return st;
  if (int32_t st =
          check(c, cudaStreamWaitEvent(c->comm_stream, c->compute_done, 0), "cudaStreamWaitEvent"))
    return st;
  float* p = reinterpret_cast<float*>(static_cast<char*>(buffer) + offset);
  return nccl_check(
      c, Nccl::get().all_reduce(p, p, count, ncclFloat, ncclSum, c->comm, c->comm_stream),
      "ncclAllReduce");
}

// A group's communicator for exchange; its messages go on the kernels' stream, so the kernels
// before them have written what they send and those after read what they receive.
int32_t comm_init_group(void* ctx, int32_t group, const uint8_t* id, int32_t world, int32_t rank) {
  auto* c = static_cast<Ctx*>(ctx);
  const Nccl& n = Nccl::get();
  if (!n.p2p)
    return fail(c, MXN_STATUS_UNSUPPORTED, "NCCL with ncclSend/ncclRecv is not installed");
  if (!id) return 0;
  if (group < 1 || group >= MXN_COMM_GROUPS || c->groups[group])
    return fail(c, MXN_STATUS_INVALID_ARGUMENT,
                "comm_init_group: group " + std::to_string(group) + " is taken or not 1 to " +
                    std::to_string(MXN_COMM_GROUPS - 1));
  if (int32_t st = check(c, cudaSetDevice(c->device), "cudaSetDevice")) return st;
  ncclUniqueId uid;
  std::memcpy(&uid, id, sizeof(uid));
  return nccl_check(c, n.comm_init_rank(&c->groups[group], world, uid, rank), "ncclCommInitRank");
}

int32_t exchange(void* ctx, int32_t group, const mxn_message* m, int32_t n) {
  auto* c = static_cast<Ctx*>(ctx);
  if (group < 1 || group >= MXN_COMM_GROUPS || !c->groups[group])
    return fail(c, MXN_STATUS_INVALID_ARGUMENT,
                "exchange: group " + std::to_string(group) + " has no comm_init_group");
  const Nccl& x = Nccl::get();
  if (int32_t st = nccl_check(c, x.group_start(), "ncclGroupStart")) return st;
  ncclResult_t r = ncclSuccess;
  for (int32_t i = 0; i < n && r == ncclSuccess; ++i) {
    char* p = static_cast<char*>(m[i].buffer) + m[i].offset;
    r = m[i].receive ? x.recv(p, m[i].bytes, ncclInt8, m[i].peer, c->groups[group], c->stream)
                     : x.send(p, m[i].bytes, ncclInt8, m[i].peer, c->groups[group], c->stream);
  }
  const ncclResult_t end = x.group_end();  // always closes the group it opened
  return nccl_check(c, r != ncclSuccess ? r : end,
                    r != ncclSuccess ? "ncclSend/ncclRecv" : "ncclGroupEnd");
}

int32_t comm_wait(void* ctx) {
  auto* c = static_cast<Ctx*>(ctx);
  if (!c->comm_stream) return 0;
  if (int32_t st = check(c, cudaEventRecord(c->comm_done, c->comm_stream), "cudaEventRecord"))
    return st;
  return check(c, cudaStreamWaitEvent(c->stream, c->comm_done, 0), "cudaStreamWaitEvent");
}
#endif

float* F(const mxn_tensor& t) {
  return reinterpret_cast<float*>(static_cast<char*>(t.buffer) + t.offset);
}
int32_t* I(const mxn_tensor& t) {
  return reinterpret_cast<int32_t*>(static_cast<char*>(t.buffer) + t.offset);
}
unsigned blocks(int64_t n) { return unsigned(std::min<int64_t>((n + 255) / 256, 65535)); }

float* scratch(Ctx* c, size_t floats) {
  return c->scratch.get(
      floats * 4,
      [](size_t bytes) {
        float* p = nullptr;
        return cudaMalloc(&p, bytes) == cudaSuccess ? p : nullptr;
      },
      cudaFree);
}

// Row-major C[M,N] = alpha op(A) op(B) + beta C, batched with element strides, as column-major
// C^T = op(B)^T op(A)^T, which is how cuBLASLt sees row-major memory.
int32_t gemm(Ctx* c, bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const void* A,
             int64_t lda, int64_t sa, const void* B, int64_t ldb, int64_t sb, float beta, float* C,
             int64_t ldc, int64_t sc, int64_t batch, bool bf16) {
  const cudaDataType_t in_t = bf16 ? CUDA_R_16BF : CUDA_R_32F;
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  cublasOperation_t opa = tb ? CUBLAS_OP_T : CUBLAS_OP_N, opb = ta ? CUBLAS_OP_T : CUBLAS_OP_N;
  cublasStatus_t st = cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F);
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof(opa));
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof(opb));
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatrixLayoutCreate(&la, in_t, tb ? K : N, tb ? N : K, ldb);
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatrixLayoutCreate(&lb, in_t, ta ? M : K, ta ? K : M, lda);
  if (st == CUBLAS_STATUS_SUCCESS) st = cublasLtMatrixLayoutCreate(&lc, CUDA_R_32F, N, M, ldc);
  if (batch > 1) {
    const int32_t n = int32_t(batch);
    for (auto [l, stride] : {std::pair{la, sb}, std::pair{lb, sa}, std::pair{lc, sc}}) {
      if (st == CUBLAS_STATUS_SUCCESS)
        st = cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &n, sizeof(n));
      if (st == CUBLAS_STATUS_SUCCESS)
        st = cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                                              &stride, sizeof(stride));
    }
  }
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmul(c->lt, desc, &alpha, B, la, A, lb, &beta, C, lc, C, lc, nullptr,
                        c->workspace, c->workspace_bytes, c->stream);
  if (lc) cublasLtMatrixLayoutDestroy(lc);
  if (lb) cublasLtMatrixLayoutDestroy(lb);
  if (la) cublasLtMatrixLayoutDestroy(la);
  if (desc) cublasLtMatmulDescDestroy(desc);
  return st == CUBLAS_STATUS_SUCCESS
             ? 0
             : fail(c, MXN_STATUS_INTERNAL, "cublasLtMatmul: status " + std::to_string(int(st)));
}

__global__ void k_to_bf16(const float* a, uint16_t* y, int64_t n) {
  MXN_LOOP(i, n) {
    uint32_t u = __float_as_uint(a[i]);
    y[i] = (u & 0x7fffffffu) > 0x7f800000u ? uint16_t((u >> 16) | 0x40)
                                           : uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
}

int32_t run_matmul(Ctx* c, const mxn_op_call& k) {
  const mxn_tensor &a = k.inputs[0], &b = k.inputs[1], &o = k.outputs[0];
  const MatmulShape m = matmul_shape(k);  // check_call has seen its error
  const bool bf16 = m.bf16;
  const void *A = F(a), *B = F(b);
  if (bf16) {  // operands rounded to bf16 into scratch; f32 accumulation and output
    const int64_t na = count(a), nb = count(b);
    auto* s = reinterpret_cast<uint16_t*>(scratch(c, size_t(na + nb + 1) / 2 + 1));
    if (!s) return fail(c, MXN_STATUS_OUT_OF_MEMORY, "no device memory for bf16 operands");
    k_to_bf16<<<blocks(na), 256, 0, c->stream>>>(F(a), s, na);
    k_to_bf16<<<blocks(nb), 256, 0, c->stream>>>(F(b), s + na, nb);
    A = s;
    B = s + na;
  }
  if (int32_t st = gemm(c, m.ta, m.tb, m.M, m.N, m.K, m.alpha, A, m.lda(), m.sa, B, m.ldb(), m.sb,
                        m.accumulate ? 1.f : 0.f, F(o), m.N, m.sc, m.batch, bf16))
    return st;
  if (k.n_inputs > 2)  // ABI 5's bias: added in place after the GEMM
    k_add_bias<<<blocks(m.M * m.N), 256, 0, c->stream>>>(F(o), F(k.inputs[2]), F(o), m.M * m.N,
                                                         m.N);
  return 0;
}

int32_t run_attention(Ctx* c, const mxn_op_call& k, bool backward) {
  const AttentionShape as = attention_shape(k, backward);
  const Att a = att_of(as);
  const mxn_tensor* in = k.inputs;
  const int32_t* pre = as.has_prefix ? I(in[as.extra]) : nullptr;
  const float* pk = as.P > 0 ? F(in[as.pkv]) : nullptr;
  const float* pv = as.P > 0 ? F(in[as.pkv + 1]) : nullptr;
  if (!backward) {
    float* lse = k.n_outputs > 1 ? F(k.outputs[1]) : nullptr;
    k_attn_fwd<<<blocks(a.B * a.T * a.H), 256, 0, c->stream>>>(a, F(in[0]), F(in[1]), F(in[2]), pk,
                                                               pv, pre, F(k.outputs[0]), lse);
    return 0;
  }
  k_attn_bwd_dq<<<blocks(a.B * a.T * a.H), 256, 0, c->stream>>>(
      a, F(in[0]), F(in[1]), F(in[2]), F(in[3]), F(in[4]), F(in[5]), pk, pv, pre, F(k.outputs[0]));
  k_attn_bwd_dkv<<<blocks(a.B * a.kv_rows * a.G), 256, 0, c->stream>>>(
      a, F(in[0]), F(in[1]), F(in[2]), F(in[3]), F(in[4]), F(in[5]), pre, F(k.outputs[1]),
      F(k.outputs[2]));
  if (as.P > 0)
    k_attn_bwd_dprefix<<<blocks(a.P * a.G), 256, 0, c->stream>>>(
        a, F(in[0]), F(in[1]), F(in[4]), F(in[5]), pk, pv, F(k.outputs[3]), F(k.outputs[4]));
  return 0;
}

// RoPE's frequencies, computed on the host as every backend does, kept on the device by value.
float* rope_table(Ctx* c, const mxn_op_call& k) {
  return c->rope_tables.get(k, [](const std::vector<float>& inv) -> float* {
    float* d = nullptr;
    if (cudaMalloc(&d, inv.size() * 4) != cudaSuccess) return nullptr;
    if (cudaMemcpy(d, inv.data(), inv.size() * 4, cudaMemcpyHostToDevice) != cudaSuccess) {
      cudaFree(d);
      return nullptr;
    }
    return d;
  });
}

// The mixture-of-experts ops (kernels_moe.cuh); the routing's scores, flags and counts in scratch.
int32_t run_moe(Ctx* c, const mxn_op_call& k) {
  const mxn_tensor *in = k.inputs, *out = k.outputs;
  cudaStream_t s = c->stream;
  switch (k.op) {
    case MXN_OP_STRIDED_COPY: {
      const StridedCopyParams p = params_of<StridedCopyParams>(k);
      k_strided_copy<<<blocks(p.count()), 256, 0, s>>>(F(in[0]), F(out[0]), p);
      break;
    }
    case MXN_OP_MOE_ROUTE:
    case MXN_OP_MOE_ROUTE_BWD: {
      const bool bwd = k.op == MXN_OP_MOE_ROUTE_BWD;
      const MoeRouteShape r = moe_route_shape(k, bwd);
      const MoeRouteParams p = params_of<MoeRouteParams>(k);
      const int64_t N = r.N, E = r.E, n = N * r.K;
      // [scores (2 N E floats) | counts (E) | extra (E) | flags (N E bytes)]
      float* sc = scratch(c, size_t(2 * N * E + 2 * E + (N * E + 3) / 4));
      if (!sc) return fail(c, MXN_STATUS_OUT_OF_MEMORY, "moe_route: no device memory for scratch");
      auto* cnt = reinterpret_cast<int32_t*>(sc + 2 * N * E);
      float* extra = sc + 2 * N * E + E;
      auto* flags = reinterpret_cast<uint8_t*>(sc + 2 * N * E + 2 * E);
      if (bwd) {
        if (r.daux >= 0) {
          k_moe_count<<<blocks(E), 256, 0, s>>>(I(in[2]), n, E, cnt);
          k_moe_extra<<<blocks(E), 256, 0, s>>>(cnt, F(in[r.daux]), N, E, extra);
        }
        k_moe_route_bwd<<<blocks(N), 128, 0, s>>>(
            F(in[0]), F(in[1]), I(in[2]), r.daux >= 0 ? extra : nullptr, N, E, p, sc, F(out[0]));
        break;
      }
      k_moe_route<<<blocks(N), 128, 0, s>>>(F(in[0]), r.bias >= 0 ? F(in[r.bias]) : nullptr, N, E,
                                            p, sc, flags, F(out[0]), I(out[1]));
      k_moe_count<<<blocks(E), 256, 0, s>>>(I(out[1]), n, E, cnt);
      k_moe_offsets<<<1, 1, 0, s>>>(cnt, E, I(out[3]));
      k_moe_positions<<<blocks(E), 256, 0, s>>>(I(out[1]), n, E, I(out[3]), I(out[2]));
      if (r.aux) k_moe_aux<<<1, 1, 0, s>>>(sc, cnt, N, E, F(out[4]));
      break;
    }
    case MXN_OP_GROUPED_MATMUL: {
      const GroupedMatmulShape g = grouped_matmul_shape(k);
      if (g.weight_grad)
        k_grouped_mm_wgrad<<<blocks(g.E * g.N * g.K), 256, 0, s>>>(
            F(in[0]), F(in[1]), I(in[2]), F(out[0]), g.M, g.N, g.K, g.E, int(g.accumulate));
      else
        k_grouped_mm<<<blocks(g.M * g.N), 256, 0, s>>>(F(in[0]), F(in[1]), I(in[2]), F(out[0]), g.M,
                                                       g.N, g.K, g.E, int(g.tb));
      break;
    }
    default: {
      const MoePermuteShape m = moe_permute_shape(k);
      const float* w = m.weighted ? F(in[2]) : nullptr;
      if (k.op == MXN_OP_MOE_PERMUTE)
        k_moe_permute<<<blocks(m.N * m.K * m.C), 256, 0, s>>>(F(in[0]), I(in[1]), w, F(out[0]), m.N,
                                                              m.C, m.K);
      else if (k.op == MXN_OP_MOE_UNPERMUTE)
        k_moe_unpermute<<<blocks(m.N * m.C), 256, 0, s>>>(F(in[0]), I(in[1]), w, F(out[0]), m.N,
                                                          m.C, m.K);
      else
        k_moe_unpermute_bwd<<<blocks(m.N * m.K), 256, 0, s>>>(F(in[0]), F(in[1]), I(in[2]),
                                                              F(out[0]), m.N, m.C, m.K);
      break;
    }
  }
  return check(c, cudaGetLastError(), "moe kernel launch");
}

int32_t run_llm_op(Ctx* c, const mxn_op_call& k) {
  const mxn_tensor *in = k.inputs, *out = k.outputs;
  cudaStream_t s = c->stream;
  const SwigluParams sw = params_of<SwigluParams>(k);
  switch (k.op) {
    case MXN_OP_RMSNORM: {  // rows of count(w) columns (ABI 9: groups of a row)
      const int64_t cols = count(in[1]), rows = count(in[0]) / cols;
      k_rmsnorm<<<blocks(rows), 256, 0, s>>>(F(in[0]), F(in[1]), F(out[0]), F(out[1]), rows, cols,
                                             params_of<NormParams>(k).eps);
      break;
    }
    case MXN_OP_RMSNORM_BWD: {
      const int64_t cols = count(in[2]), rows = count(in[1]) / cols;
      k_rmsnorm_dx<<<blocks(rows), 256, 0, s>>>(F(in[0]), F(in[1]), F(in[2]), F(in[3]), F(out[0]),
                                                rows, cols);
      k_rmsnorm_dw<<<blocks(cols), 256, 0, s>>>(F(in[0]), F(in[1]), F(in[3]), F(out[1]), rows,
                                                cols);
      break;
    }
    case MXN_OP_ROPE: {
      const RopeParams r = params_of<RopeParams>(k);
      const float* table = rope_table(c, k);
      if (!table) return fail(c, MXN_STATUS_OUT_OF_MEMORY, "no device memory for RoPE's table");
      k_rope<<<blocks(rows_of(in[0])), 256, 0, s>>>(
          F(in[0]), I(in[1]), F(out[0]), table, rows_of(in[0]), last(in[0]), r.col0, r.heads,
          r.head_dim, r.rot, int(r.interleaved), r.backward ? -1.f : 1.f);
      break;
    }
    case MXN_OP_SILU:
      k_silu<<<blocks(count(out[0])), 256, 0, s>>>(F(in[0]), F(out[0]), count(out[0]));
      break;
    case MXN_OP_SILU_BWD:
      k_silu_bwd<<<blocks(count(out[0])), 256, 0, s>>>(F(in[0]), F(in[1]), F(out[0]),
                                                       count(out[0]));
      break;
    case MXN_OP_SWIGLU:
      k_swiglu<<<blocks(count(out[0])), 256, 0, s>>>(F(in[0]) + sw.gate_col, last(in[0]),
                                                     F(in[1]) + sw.up_col, last(in[1]), F(out[0]),
                                                     count(out[0]), last(out[0]));
      break;
    case MXN_OP_SWIGLU_BWD:
      k_swiglu_bwd<<<blocks(count(in[0])), 256, 0, s>>>(
          F(in[0]), F(in[1]) + sw.gate_col, last(in[1]), F(in[2]) + sw.up_col, last(in[2]),
          F(out[0]) + sw.gate_col, F(out[1]) + sw.up_col, count(in[0]), last(in[0]));
      break;
    case MXN_OP_DROPOUT: {
      const DropoutParams d = params_of<DropoutParams>(k);
      k_dropout<<<blocks(count(in[0])), 256, 0, s>>>(F(in[0]), F(out[0]), count(in[0]), d.seed,
                                                     d.index, d.p, 1.f / (1.f - d.p));
      break;
    }
    case MXN_OP_SET_ROWS: {
      const SetRowsShape r = set_rows_shape(k);
      k_set_rows<<<blocks(r.B * r.n * r.W), 256, 0, s>>>(
          F(in[0]) + r.col, F(out[0]), r.has_idx ? I(in[1]) : nullptr, r.B * r.n * r.W, r.n, r.R,
          r.at, r.W, r.ld);
      break;
    }
    default:
      return fail(c, MXN_STATUS_UNSUPPORTED, "unknown op " + std::to_string(k.op));
  }
  return check(c, cudaGetLastError(), "kernel launch");
}

// CUDA's own rules, in front of the contract's (common.h): the ops and dtypes it takes.
const char* cuda_rule(const mxn_op_call& k) {
  if (k.op == MXN_OP_CLASSIFIER_CE || k.op == MXN_OP_CLASSIFIER_CE_BWD)
    return "the CUDA backend has no fused classifier yet (mxn runs it unfused)";
  return operand_dtypes(
      k, [](int32_t, int, int32_t) { return false; },
      "the CUDA backend takes f32 tensors (bf16 as a matmul compute type)");
}

int32_t supports_call(void* ctx, const mxn_op_call* call) {
  return supports_call_with(*static_cast<Ctx*>(ctx), call, cuda_rule);
}

int32_t run(void* ctx, const mxn_op_call* call) {
  auto* c = static_cast<Ctx*>(ctx);
  if (int32_t st = check_call(*c, call, cuda_rule)) return st;
  const mxn_op_call& k = *call;
  const mxn_tensor *in = k.inputs, *out = k.outputs;
  const float scalar = params_of<ScalarParams>(k).value;  // SCALE's and FILL's
  cudaStream_t s = c->stream;
  const int64_t n0 = k.n_outputs ? count(out[0]) : 0;
  if (k.op >= MXN_OP_MOE_ROUTE) return run_moe(c, k);
  switch (k.op) {
    case MXN_OP_MATMUL:
      return run_matmul(c, k);
    case MXN_OP_ADD:
      k_add<<<blocks(n0), 256, 0, s>>>(F(in[0]), F(in[1]), F(out[0]), n0);
      break;
    case MXN_OP_ADD_BIAS:
      k_add_bias<<<blocks(n0), 256, 0, s>>>(F(in[0]), F(in[1]), F(out[0]), n0, last(in[0]));
      break;
    case MXN_OP_SUM_ROWS:
      k_sum_rows<<<blocks(last(in[0])), 256, 0, s>>>(F(in[0]), F(out[0]),
                                                     count(in[0]) / last(in[0]), last(in[0]),
                                                     int(params_of<SumParams>(k).accumulate));
      break;
    case MXN_OP_SCALE:
      k_scale<<<blocks(n0), 256, 0, s>>>(F(in[0]), F(out[0]), n0, scalar);
      break;
    case MXN_OP_FILL:
      k_fill<<<blocks(n0), 256, 0, s>>>(F(out[0]), n0, scalar);
      break;
    case MXN_OP_COPY:
    case MXN_OP_CAST:
      k_copy<<<blocks(n0), 256, 0, s>>>(F(in[0]), F(out[0]), n0);
      break;
    case MXN_OP_GELU:
      k_gelu<<<blocks(n0), 256, 0, s>>>(F(in[0]), F(out[0]), n0);
      break;
    case MXN_OP_GELU_BWD:
      k_gelu_bwd<<<blocks(n0), 256, 0, s>>>(F(in[0]), F(in[1]), F(out[0]), n0);
      break;
    case MXN_OP_TANH:
      k_tanh<<<blocks(n0), 256, 0, s>>>(F(in[0]), F(out[0]), n0);
      break;
    case MXN_OP_MUL:
      k_mul<<<blocks(n0), 256, 0, s>>>(F(in[0]), F(in[1]), F(out[0]), n0);
      break;
    case MXN_OP_TANH_BWD:
      k_tanh_bwd<<<blocks(n0), 256, 0, s>>>(F(in[0]), F(in[1]), F(out[0]), n0);
      break;
    case MXN_OP_SOFTMAX: {
      const int64_t cols = last(in[0]), rows = count(in[0]) / cols;
      k_softmax<<<blocks(rows), 256, 0, s>>>(F(in[0]), F(out[0]), rows, cols, 0);
      break;
    }
    case MXN_OP_SOFTMAX_BWD: {
      const int64_t cols = last(in[0]), rows = count(in[0]) / cols;
      k_softmax_bwd<<<blocks(rows), 256, 0, s>>>(F(in[0]), F(in[1]), F(out[0]), rows, cols, 0, 1.f);
      break;
    }
    case MXN_OP_LAYERNORM: {
      const int64_t cols = last(in[0]), rows = count(in[0]) / cols;
      k_layernorm<<<blocks(rows), 256, 0, s>>>(F(in[0]), F(in[1]), F(in[2]), F(out[0]), F(out[1]),
                                               rows, cols, params_of<NormParams>(k).eps);
      break;
    }
    case MXN_OP_LAYERNORM_BWD: {
      const int64_t cols = last(in[0]), rows = count(in[0]) / cols;
      k_layernorm_dx<<<blocks(rows), 256, 0, s>>>(F(in[0]), F(in[1]), F(in[2]), F(in[3]), F(out[0]),
                                                  rows, cols);
      k_layernorm_dwdb<<<blocks(cols), 256, 0, s>>>(F(in[0]), F(in[1]), F(in[3]), F(out[1]),
                                                    F(out[2]), rows, cols);
      break;
    }
    case MXN_OP_ATTENTION:
      return run_attention(c, k, false);
    case MXN_OP_ATTENTION_BWD:
      return run_attention(c, k, true);
    case MXN_OP_EMBEDDING:
      k_embedding<<<blocks(n0), 256, 0, s>>>(I(in[0]), F(in[1]), F(out[0]), n0, last(in[1]),
                                             params_of<EmbeddingParams>(k).first, in[1].shape[0]);
      break;
    case MXN_OP_EMBEDDING_BWD:
      k_embedding_bwd<<<blocks(out[0].shape[1]), 256, 0, s>>>(
          F(in[0]), I(in[1]), F(out[0]), count(in[1]), out[0].shape[0], out[0].shape[1],
          params_of<EmbeddingParams>(k).first);
      break;
    case MXN_OP_CROSS_ENTROPY: {
      const XentParams p = params_of<XentParams>(k);
      const int64_t V = last(in[0]), rows = count(in[0]) / V;
      if (p.part == 1) {
        k_xent_stats<<<blocks(rows), 256, 0, s>>>(F(in[0]), I(in[1]), F(out[0]), rows, V, p.vocab0,
                                                  p.slot, p.slots);
        break;
      }
      float* pr = scratch(c, size_t(rows));
      if (!pr)
        return fail(c, MXN_STATUS_OUT_OF_MEMORY, "no device memory for cross-entropy scratch");
      if (p.part == 2)
        k_xent_slice_rows<<<blocks(rows), 256, 0, s>>>(F(in[2]), I(in[1]), pr, rows, p.slots);
      else
        k_xent_rows<<<blocks(rows), 256, 0, s>>>(F(in[0]), I(in[1]), pr, rows, V);
      k_xent_mean<<<1, 1, 0, s>>>(pr, I(in[1]), rows, F(out[0]));
      break;
    }
    case MXN_OP_CROSS_ENTROPY_BWD: {
      const XentParams p = params_of<XentParams>(k);
      const int64_t V = last(in[1]), rows = count(in[1]) / V;
      k_xent_bwd<<<blocks(rows), 256, 0, s>>>(F(in[0]), F(in[1]), I(in[2]), F(out[0]), rows, V,
                                              p.part == 2 ? F(in[3]) : nullptr, p.vocab0, p.slots);
      break;
    }
    case MXN_OP_ADAMW: {
      const AdamwParams a = params_of<AdamwParams>(k);
      k_adamw<<<blocks(n0), 256, 0, s>>>(F(out[0]), F(in[0]), F(out[1]), F(out[2]), n0, a.lr,
                                         a.beta1, a.beta2, a.eps, a.weight_decay, a.gscale,
                                         a.step_size(), a.bc2_sqrt());
      break;
    }
    case MXN_OP_SUM_SQUARES: {
      const int64_t n = count(in[0]), chunk = 4096,
                    parts = std::max<int64_t>(1, (n + chunk - 1) / chunk);
      float* part = scratch(c, size_t(parts));
      if (!part) return fail(c, MXN_STATUS_OUT_OF_MEMORY, "no device memory for reduction scratch");
      k_sumsq_part<<<blocks(parts), 256, 0, s>>>(F(in[0]), n, chunk, part, parts);
      k_sumsq_total<<<1, 1, 0, s>>>(part, parts, F(out[0]),
                                    int(params_of<SumParams>(k).accumulate));
      break;
    }
    default:
      return run_llm_op(c, k);
  }
  return check(c, cudaGetLastError(), "kernel launch");
}

const mxn_backend_api kApi = {
    sizeof(mxn_backend_api),
    MXN_ABI_VERSION,
    "cuda",
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
#ifdef MXN_HAVE_NCCL
    comm_id,
    comm_init,
    all_reduce_sum,
    comm_wait,
#else
    nullptr,
    nullptr,
    nullptr,
    nullptr,  // built without nccl.h: ranks reduce through the host
#endif
    memory_free,
    nullptr,  // no options
    supports_call,
#ifdef MXN_HAVE_NCCL
    comm_init_group,
    exchange,
#else
    nullptr,
    nullptr,
#endif
};

}  // namespace
}  // namespace mxn::cuda

extern "C" __attribute__((visibility("default"))) const mxn_backend_api* mxn_backend_get_api(void) {
  return &mxn::cuda::kApi;
}
