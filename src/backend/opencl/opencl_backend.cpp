// The OpenCL backend: CLBlast for GEMMs, our OpenCL C kernels (kernels_cl.h) for every other op.
// Runs on PoCL here and on any OpenCL 1.2+ device; a plugin (libmxn_backend_opencl.so).
// (cl_launch.h first: it sets the OpenCL version the headers declare)
#include "backend/opencl/cl_launch.h"
// clang-format off
#include <clblast_c.h>
// clang-format on

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <new>
#include <sstream>
#include <string>
#include <vector>

#include "backend/common.h"
#include "backend/opencl/kernels_cl.h"
#include "backend/opencl/kernels_llm_cl.h"
#include "backend/opencl/kernels_moe_cl.h"
#include "mxn/backend_abi.h"

namespace mxn::opencl {
namespace {

struct DeviceRef {
  cl_platform_id platform;
  cl_device_id device;
};

// Every OpenCL device of every platform; GPU_DEVICE_ORDINAL (as Slurm sets it, "0,2") keeps
// and orders a subset.
const std::vector<DeviceRef>& devices() {
  static const std::vector<DeviceRef> list = [] {
    std::vector<DeviceRef> all;
    cl_uint np = 0;
    if (clGetPlatformIDs(0, nullptr, &np) != CL_SUCCESS || np == 0) return all;
    std::vector<cl_platform_id> ps(np);
    clGetPlatformIDs(np, ps.data(), nullptr);
    for (cl_platform_id p : ps) {
      cl_uint nd = 0;
      if (clGetDeviceIDs(p, CL_DEVICE_TYPE_ALL, 0, nullptr, &nd) != CL_SUCCESS || nd == 0) continue;
      std::vector<cl_device_id> ds(nd);
      clGetDeviceIDs(p, CL_DEVICE_TYPE_ALL, nd, ds.data(), nullptr);
      for (cl_device_id d : ds) all.push_back({p, d});
    }
    const char* ord = std::getenv("GPU_DEVICE_ORDINAL");
    if (!ord || !*ord) return all;
    std::vector<DeviceRef> picked;
    std::stringstream ss(ord);
    std::string tok;
    while (std::getline(ss, tok, ','))
      if (!tok.empty() && tok.find_first_not_of("0123456789") == std::string::npos &&
          std::stoul(tok) < all.size())
        picked.push_back(all[std::stoul(tok)]);
    return picked;
  }();
  return list;
}

std::string info_str(cl_device_id d, cl_device_info what) {
  size_t n = 0;
  clGetDeviceInfo(d, what, 0, nullptr, &n);
  std::string s(n, '\0');
  clGetDeviceInfo(d, what, n, s.data(), nullptr);
  while (!s.empty() && s.back() == '\0') s.pop_back();
  return s;
}

// Compiled programs are cached on disk by source and device, so a second run does not recompile.
std::filesystem::path cache_path(cl_device_id d) {
  const char* home = std::getenv("XDG_CACHE_HOME");
  std::filesystem::path base =
      home && *home ? home
                    : std::string(std::getenv("HOME") ? std::getenv("HOME") : "/tmp") + "/.cache";
  const size_t h =
      std::hash<std::string>{}(std::string(kKernels) + kKernelsLlm + kKernelsMoe +
                               info_str(d, CL_DEVICE_NAME) + info_str(d, CL_DRIVER_VERSION));
  return base / "mxn" / "opencl" / (std::to_string(h) + ".bin");
}

int32_t build_program(Ctx* c) {
  cl_int err = CL_SUCCESS;
  const auto cache = cache_path(c->device);
  std::ifstream in(cache, std::ios::binary);
  if (in) {
    std::string bin((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const unsigned char* p = reinterpret_cast<const unsigned char*>(bin.data());
    size_t n = bin.size();
    cl_int st = CL_SUCCESS;
    c->program = clCreateProgramWithBinary(c->context, 1, &c->device, &n, &p, &st, &err);
    if (err == CL_SUCCESS && st == CL_SUCCESS &&
        clBuildProgram(c->program, 1, &c->device, "", nullptr, nullptr) == CL_SUCCESS)
      return 0;
    if (c->program) clReleaseProgram(c->program);
  }
  const char* src[] = {kKernels, kKernelsLlm, kKernelsMoe};
  c->program = clCreateProgramWithSource(c->context, 3, src, nullptr, &err);
  if (err != CL_SUCCESS) return fail(c, MXN_STATUS_INTERNAL, "clCreateProgramWithSource failed");
  if (clBuildProgram(c->program, 1, &c->device, "-cl-std=CL1.2", nullptr, nullptr) != CL_SUCCESS) {
    size_t n = 0;
    clGetProgramBuildInfo(c->program, c->device, CL_PROGRAM_BUILD_LOG, 0, nullptr, &n);
    std::string log(n, '\0');
    clGetProgramBuildInfo(c->program, c->device, CL_PROGRAM_BUILD_LOG, n, log.data(), nullptr);
    return fail(c, MXN_STATUS_INTERNAL, "OpenCL kernels failed to build: " + log);
  }
  size_t n = 0;
  clGetProgramInfo(c->program, CL_PROGRAM_BINARY_SIZES, sizeof(n), &n, nullptr);
  std::string bin(n, '\0');
  unsigned char* p = reinterpret_cast<unsigned char*>(bin.data());
  if (n &&
      clGetProgramInfo(c->program, CL_PROGRAM_BINARIES, sizeof(p), &p, nullptr) == CL_SUCCESS) {
    std::error_code ec;
    std::filesystem::create_directories(cache.parent_path(), ec);
    const auto tmp = cache.string() + ".tmp" + std::to_string(reinterpret_cast<uintptr_t>(c));
    std::ofstream(tmp, std::ios::binary).write(bin.data(), std::streamsize(n));
    std::filesystem::rename(tmp, cache, ec);  // atomic: a reader sees the old file or the new
  }
  return 0;
}

int32_t device_count() { return int32_t(devices().size()); }

int32_t device_props(int32_t dev, mxn_device_props* out) {
  if (dev < 0 || dev >= device_count() || !out) return MXN_STATUS_INVALID_ARGUMENT;
  cl_device_id d = devices()[size_t(dev)].device;
  std::snprintf(out->name, sizeof(out->name), "%s", info_str(d, CL_DEVICE_NAME).c_str());
  std::snprintf(out->vendor, sizeof(out->vendor), "%s", info_str(d, CL_DEVICE_VENDOR).c_str());
  cl_ulong mem = 0;
  cl_uint cu = 0, mhz = 0;
  clGetDeviceInfo(d, CL_DEVICE_GLOBAL_MEM_SIZE, sizeof(mem), &mem, nullptr);
  clGetDeviceInfo(d, CL_DEVICE_MAX_COMPUTE_UNITS, sizeof(cu), &cu, nullptr);
  clGetDeviceInfo(d, CL_DEVICE_MAX_CLOCK_FREQUENCY, sizeof(mhz), &mhz, nullptr);
  out->memory_bytes = mem;
  out->peak_gflops = double(cu) * mhz * 16 / 1000.0;  // nominal: 8-wide FMA per compute unit
  out->dtype_mask = (1u << MXN_DTYPE_F32) | (1u << MXN_DTYPE_BF16) | (1u << MXN_DTYPE_I32);
  std::snprintf(out->notes, sizeof(out->notes), "%s; %u compute units; GEMM by CLBlast",
                info_str(d, CL_DEVICE_VERSION).c_str(), cu);
  return 0;
}

int32_t init(int32_t dev, const mxn_backend_options*, void** out) {
  if (dev < 0 || dev >= device_count()) return MXN_STATUS_INVALID_ARGUMENT;
  auto* c = new (std::nothrow) Ctx;
  if (!c) return MXN_STATUS_OUT_OF_MEMORY;
  c->device = devices()[size_t(dev)].device;
  cl_int err = CL_SUCCESS;
  c->context = clCreateContext(nullptr, 1, &c->device, nullptr, nullptr, &err);
  if (err == CL_SUCCESS) c->queue = clCreateCommandQueue(c->context, c->device, 0, &err);
  cl_ulong mem = 0;
  clGetDeviceInfo(c->device, CL_DEVICE_GLOBAL_MEM_SIZE, sizeof(mem), &mem, nullptr);
  c->free_bytes = mem;
  if (err != CL_SUCCESS || build_program(c) != 0) {
    *out = c;  // so last_error can be read; shutdown frees it
    return err != CL_SUCCESS ? fail(c, MXN_STATUS_INTERNAL, "cannot create an OpenCL context")
                             : MXN_STATUS_INTERNAL;
  }
  *out = c;
  return 0;
}

void shutdown(void* ctx) {
  auto* c = static_cast<Ctx*>(ctx);
  for (auto& [n, k] : c->kernels) clReleaseKernel(k);
  if (c->scratch.handle) clReleaseMemObject(c->scratch.handle);
  c->rope_tables.clear(clReleaseMemObject);
  if (c->program) clReleaseProgram(c->program);
  if (c->queue) clReleaseCommandQueue(c->queue);
  if (c->context) clReleaseContext(c->context);
  delete c;
}

const char* last_error(void* ctx) { return static_cast<Ctx*>(ctx)->error.c_str(); }

int32_t buffer_alloc(void* ctx, uint64_t bytes, void** out) {
  auto* c = static_cast<Ctx*>(ctx);
  cl_int err = CL_SUCCESS;
  if (bytes > c->free_bytes)
    return fail(c, MXN_STATUS_OUT_OF_MEMORY,
                "the device has " + std::to_string(c->free_bytes) + " bytes free");
  cl_mem m = clCreateBuffer(c->context, CL_MEM_READ_WRITE, bytes ? bytes : 64, nullptr, &err);
  if (err != CL_SUCCESS)
    return fail(c, MXN_STATUS_OUT_OF_MEMORY,
                "clCreateBuffer failed (" + std::to_string(err) + "); the device has " +
                    std::to_string(c->free_bytes) + " bytes free");
  c->free_bytes -= bytes;
  *out = m;
  return 0;
}

void buffer_free(void* ctx, void* b) {
  auto* c = static_cast<Ctx*>(ctx);
  size_t n = 0;
  clGetMemObjectInfo(static_cast<cl_mem>(b), CL_MEM_SIZE, sizeof(n), &n, nullptr);
  c->free_bytes += n;
  clReleaseMemObject(static_cast<cl_mem>(b));
}

// OpenCL has no query for free memory: the device's total less what mxn holds.
int32_t memory_free(void* ctx, uint64_t* out) {
  *out = static_cast<Ctx*>(ctx)->free_bytes;
  return 0;
}

int32_t copy_to_device(void* ctx, void* dst, uint64_t off, const void* src, uint64_t bytes) {
  auto* c = static_cast<Ctx*>(ctx);
  if (!bytes) return 0;
  cl_int e = clEnqueueWriteBuffer(c->queue, static_cast<cl_mem>(dst), CL_TRUE, off, bytes, src, 0,
                                  nullptr, nullptr);
  return e == CL_SUCCESS
             ? 0
             : fail(c, MXN_STATUS_INTERNAL, "clEnqueueWriteBuffer: " + std::to_string(e));
}

int32_t copy_to_host(void* ctx, void* dst, const void* src, uint64_t off, uint64_t bytes) {
  auto* c = static_cast<Ctx*>(ctx);
  if (!bytes) return 0;
  cl_int e = clEnqueueReadBuffer(c->queue, static_cast<cl_mem>(const_cast<void*>(src)), CL_TRUE,
                                 off, bytes, dst, 0, nullptr, nullptr);
  return e == CL_SUCCESS
             ? 0
             : fail(c, MXN_STATUS_INTERNAL, "clEnqueueReadBuffer: " + std::to_string(e));
}

int32_t supports(void*, int32_t op, int32_t dtype) {
  if (op < 0 || op >= MXN_OP_COUNT) return 0;
  if (op == MXN_OP_CLASSIFIER_CE || op == MXN_OP_CLASSIFIER_CE_BWD) return 0;  // not yet: unfused
  if (dtype == MXN_DTYPE_F32) return 1;
  // bf16: matmul compute (operands rounded to bf16, f32 accumulation; f32 tensors), casts, and
  // GELU's x.
  return dtype == MXN_DTYPE_BF16 && (op == MXN_OP_MATMUL || op == MXN_OP_CAST ||
                                     op == MXN_OP_GELU || op == MXN_OP_GELU_BWD)
             ? 1
             : 0;
}

int32_t synchronize(void* ctx) {
  auto* c = static_cast<Ctx*>(ctx);
  cl_int e = clFinish(c->queue);
  return e == CL_SUCCESS ? 0 : fail(c, MXN_STATUS_INTERNAL, "clFinish: " + std::to_string(e));
}

// --- dispatch ---------------------------------------------------------------------------------
}  // namespace

Launch kernel(Ctx* c, const char* name) {
  auto it = c->kernels.find(name);
  if (it == c->kernels.end()) {
    cl_int e = CL_SUCCESS;
    cl_kernel k = clCreateKernel(c->program, name, &e);
    if (e != CL_SUCCESS || !k) {  // not cached: the launch reports it
      Launch none{c, nullptr};
      none.err = e != CL_SUCCESS ? e : CL_INVALID_KERNEL;
      none.missing = name;
      return none;
    }
    it = c->kernels.emplace(name, k).first;
  }
  return Launch{c, it->second};
}

cl_mem scratch(Ctx* c, size_t bytes) {
  return c->scratch.get(
      bytes,
      [&](size_t n) {
        cl_int e = CL_SUCCESS;
        cl_mem m = clCreateBuffer(c->context, CL_MEM_READ_WRITE, n, nullptr, &e);
        return e == CL_SUCCESS ? m : nullptr;
      },
      clReleaseMemObject);
}

namespace {

int32_t gemm(Ctx* c, bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, Mem A,
             int64_t lda, Mem B, int64_t ldb, float beta, Mem C, int64_t ldc) {
  CLBlastStatusCode st =
      CLBlastSgemm(CLBlastLayoutRowMajor, ta ? CLBlastTransposeYes : CLBlastTransposeNo,
                   tb ? CLBlastTransposeYes : CLBlastTransposeNo, size_t(M), size_t(N), size_t(K),
                   alpha, A.m, A.off, size_t(lda), B.m, B.off, size_t(ldb), beta, C.m, C.off,
                   size_t(ldc), &c->queue, nullptr);
  return st == CLBlastSuccess
             ? 0
             : fail(c, MXN_STATUS_INTERNAL, "CLBlastSgemm: status " + std::to_string(int(st)));
}

int32_t run_matmul(Ctx* c, const mxn_op_call& k) {
  const MatmulShape m = matmul_shape(k);  // check_call has seen its error
  Mem a = mem(k.inputs[0]), b = mem(k.inputs[1]);
  const Mem o = mem(k.outputs[0]);
  if (m.bf16) {
    // bf16 compute: the operands rounded to bf16 into scratch, then an f32 GEMM (CLBlast has no
    // bf16 GEMM). The numbers of a bf16 GEMM with f32 accumulation, as on the CPU.
    const int64_t na = count(k.inputs[0]), nb = count(k.inputs[1]);
    cl_mem s = scratch(c, size_t(na + nb) * 4);
    if (!s) return fail(c, MXN_STATUS_OUT_OF_MEMORY, "no device memory for bf16 operands");
    if (int32_t st = kernel(c, "round_bf16").arg(a).arg(Mem{s, 0}).go(na)) return st;
    if (int32_t st = kernel(c, "round_bf16").arg(b).arg(Mem{s, cl_ulong(na)}).go(nb)) return st;
    a = Mem{s, 0};
    b = Mem{s, cl_ulong(na)};
  }
  for (int64_t i = 0; i < m.batch; ++i)
    if (int32_t st = gemm(c, m.ta, m.tb, m.M, m.N, m.K, m.alpha, at(a, i * m.sa), m.lda(),
                          at(b, i * m.sb), m.ldb(), m.accumulate ? 1.f : 0.f, at(o, i * m.sc), m.N))
      return st;
  if (k.n_inputs > 2)  // ABI 5's bias: added in place after the GEMM
    return kernel(c, "add_bias").arg(o).arg(mem(k.inputs[2])).arg(o).u(m.N).go(m.M * m.N);
  return 0;
}

Launch& attention_args(Launch& l, const AttentionShape& a) {
  return l.u(a.B)
      .u(a.H)
      .u(a.G)
      .u(a.hd)
      .u(a.T)
      .u(a.S)
      .u(a.kv_rows)
      .u(a.q_pos0)
      .s(a.mask)
      .u(a.ldq)
      .u(a.ldk)
      .u(a.ldv)
      .u(a.q_col)
      .u(a.k_col)
      .u(a.v_col)
      .f(a.scale)
      .s(a.has_prefix)
      .u(a.P)
      .u(a.bs)
      .u(a.tw);
}

int32_t run_attention(Ctx* c, const mxn_op_call& k, bool backward) {
  const AttentionShape a = attention_shape(k, backward);
  const mxn_tensor* in = k.inputs;
  // Absent optional inputs are bound to q, never read.
  const Mem pre = a.has_prefix ? mem(in[a.extra]) : mem(in[0]);
  const Mem pk = a.P > 0 ? mem(in[a.pkv]) : mem(in[0]);
  const Mem pv = a.P > 0 ? mem(in[a.pkv + 1]) : mem(in[0]);
  if (!backward) {
    const bool want_lse = k.n_outputs > 1;
    Launch l = kernel(c, "attn_fwd");
    l.arg(mem(in[0])).arg(mem(in[1])).arg(mem(in[2])).arg(pk).arg(pv).arg(pre);
    l.arg(mem(k.outputs[0])).arg(want_lse ? mem(k.outputs[1]) : mem(k.outputs[0])).s(want_lse);
    return attention_args(l, a).go(a.B * a.T * a.H);
  }
  Launch l = kernel(c, "attn_bwd_dq");
  for (int i = 0; i < 6; ++i) l.arg(mem(in[i]));
  l.arg(pk).arg(pv).arg(pre).arg(mem(k.outputs[0]));
  if (int32_t st = attention_args(l, a).go(a.B * a.T * a.H)) return st;
  Launch l2 = kernel(c, "attn_bwd_dkv");
  for (int i = 0; i < 6; ++i) l2.arg(mem(in[i]));
  l2.arg(pre).arg(mem(k.outputs[1])).arg(mem(k.outputs[2]));
  if (int32_t st = attention_args(l2, a).go(a.B * a.kv_rows * a.G)) return st;
  if (a.P == 0) return 0;
  Launch l3 = kernel(c, "attn_bwd_dprefix");
  for (int i : {0, 1, 4, 5}) l3.arg(mem(in[i]));
  l3.arg(pk).arg(pv).arg(mem(k.outputs[3])).arg(mem(k.outputs[4]));
  return attention_args(l3, a).go(a.P * a.G);
}

// The table of RoPE frequencies for a call's parameters, kept on the device.
cl_mem rope_table(Ctx* c, const mxn_op_call& k) {
  return c->rope_tables.get(k, [&](std::vector<float>& inv) {
    cl_int e = CL_SUCCESS;
    cl_mem m = clCreateBuffer(c->context, CL_MEM_READ_ONLY | CL_MEM_COPY_HOST_PTR, inv.size() * 4,
                              inv.data(), &e);
    return e == CL_SUCCESS ? m : nullptr;
  });
}

Mem col(Mem m, int64_t c) { return {m.m, m.off + cl_ulong(c)}; }

// CROSS_ENTROPY: per-row losses, then their mean; or a vocabulary slice's stats (part 1), or the
// loss from the summed stats (part 2).
int32_t run_cross_entropy(Ctx* c, const mxn_op_call& k) {
  const mxn_tensor *in = k.inputs, *out = k.outputs;
  const XentParams p = params_of<XentParams>(k);
  const int64_t V = last(in[0]), rows = count(in[0]) / V;
  if (p.part == 1)
    return kernel(c, "xent_stats")
        .arg(mem(in[0]))
        .arg(mem(in[1]))
        .arg(mem(out[0]))
        .u(V)
        .u(p.vocab0)
        .u(p.slot)
        .u(p.slots)
        .go(rows);
  cl_mem s = scratch(c, size_t(rows) * 4);
  if (!s) return fail(c, MXN_STATUS_OUT_OF_MEMORY, "no device memory for cross-entropy scratch");
  const int32_t st =
      p.part == 2
          ? kernel(c, "xent_slice_rows").arg(mem(in[2])).arg(mem(in[1])).arg(s).u(p.slots).go(rows)
          : kernel(c, "xent_rows").arg(mem(in[0])).arg(mem(in[1])).arg(s).u(V).go(rows);
  if (st) return st;
  return kernel(c, "xent_mean").arg(s).arg(mem(in[1])).u(rows).arg(mem(out[0])).go(1);
}

int32_t run_llm_op(Ctx* c, const mxn_op_call& k) {
  const mxn_tensor* in = k.inputs;
  const mxn_tensor* out = k.outputs;
  const SwigluParams sw = params_of<SwigluParams>(k);
  switch (k.op) {
    case MXN_OP_RMSNORM:  // rows of count(w) columns (ABI 9: groups of a row)
      return kernel(c, "rmsnorm")
          .arg(mem(in[0]))
          .arg(mem(in[1]))
          .arg(mem(out[0]))
          .arg(mem(out[1]))
          .u(count(in[1]))
          .f(params_of<NormParams>(k).eps)
          .go(count(in[0]) / count(in[1]));
    case MXN_OP_RMSNORM_BWD:
      if (int32_t st = kernel(c, "rmsnorm_dx")
                           .arg(mem(in[0]))
                           .arg(mem(in[1]))
                           .arg(mem(in[2]))
                           .arg(mem(in[3]))
                           .arg(mem(out[0]))
                           .u(count(in[2]))
                           .go(count(in[1]) / count(in[2])))
        return st;
      return kernel(c, "rmsnorm_dw")
          .arg(mem(in[0]))
          .arg(mem(in[1]))
          .arg(mem(in[3]))
          .arg(mem(out[1]))
          .u(count(in[1]) / count(in[2]))
          .u(count(in[2]))
          .go(count(in[2]));
    case MXN_OP_ROPE: {
      const RopeParams r = params_of<RopeParams>(k);
      cl_mem table = rope_table(c, k);
      if (!table) return fail(c, MXN_STATUS_OUT_OF_MEMORY, "no device memory for RoPE's table");
      return kernel(c, "rope")
          .arg(mem(in[0]))
          .arg(mem(in[1]))
          .arg(mem(out[0]))
          .arg(table)
          .u(last(in[0]))
          .u(r.col0)
          .u(r.heads)
          .u(r.head_dim)
          .u(r.rot)
          .s(r.interleaved)
          .f(r.backward ? -1.f : 1.f)
          .go(rows_of(in[0]));
    }
    case MXN_OP_SILU:
      return kernel(c, "silu").arg(mem(in[0])).arg(mem(out[0])).go(count(out[0]));
    case MXN_OP_SILU_BWD:
      return kernel(c, "silu_bwd")
          .arg(mem(in[0]))
          .arg(mem(in[1]))
          .arg(mem(out[0]))
          .go(count(out[0]));
    case MXN_OP_SWIGLU:
      return kernel(c, "swiglu")
          .arg(col(mem(in[0]), sw.gate_col))
          .u(last(in[0]))
          .arg(col(mem(in[1]), sw.up_col))
          .u(last(in[1]))
          .arg(mem(out[0]))
          .u(last(out[0]))
          .go(count(out[0]));
    case MXN_OP_SWIGLU_BWD:
      return kernel(c, "swiglu_bwd")
          .arg(mem(in[0]))
          .arg(col(mem(in[1]), sw.gate_col))
          .u(last(in[1]))
          .arg(col(mem(in[2]), sw.up_col))
          .u(last(in[2]))
          .arg(col(mem(out[0]), sw.gate_col))
          .arg(col(mem(out[1]), sw.up_col))
          .u(last(in[0]))
          .go(count(in[0]));
    case MXN_OP_DROPOUT: {
      const DropoutParams d = params_of<DropoutParams>(k);
      return kernel(c, "dropout")
          .arg(mem(in[0]))
          .arg(mem(out[0]))
          .u(int64_t(d.seed))
          .u(int64_t(d.index))
          .f(d.p)
          .f(1.f / (1.f - d.p))
          .go(count(in[0]));
    }
    case MXN_OP_SET_ROWS: {
      const SetRowsShape r = set_rows_shape(k);
      return kernel(c, "set_rows")
          .arg(col(mem(in[0]), r.col))
          .arg(mem(out[0]))
          .arg(r.has_idx ? mem(in[1]) : mem(in[0]))
          .s(r.has_idx)
          .u(r.n)
          .u(r.R)
          .u(r.at)
          .u(r.W)
          .u(r.ld)
          .go(r.B * r.n * r.W);
    }
    default:
      return fail(c, MXN_STATUS_UNSUPPORTED, "unknown op " + std::to_string(k.op));
  }
}

// OpenCL's own rules, in front of the contract's (common.h): the ops and dtypes it takes.
const char* opencl_rule(const mxn_op_call& k) {
  if (k.op == MXN_OP_CLASSIFIER_CE || k.op == MXN_OP_CLASSIFIER_CE_BWD)
    return "the OpenCL backend has no fused classifier yet (mxn runs it unfused)";
  auto half_ok = [](int32_t op, int i, int32_t dt) {
    return dt == MXN_DTYPE_BF16 && (op == MXN_OP_CAST || (op == MXN_OP_GELU && i == 0) ||
                                    (op == MXN_OP_GELU_BWD && i == 1));
  };
  return operand_dtypes(
      k, half_ok,
      "the OpenCL backend takes bf16 tensors in cast and as GELU's x only; other ops take f32");
}

int32_t supports_call(void* ctx, const mxn_op_call* call) {
  return supports_call_with(*static_cast<Ctx*>(ctx), call, opencl_rule);
}

int32_t run(void* ctx, const mxn_op_call* call) {
  auto* c = static_cast<Ctx*>(ctx);
  if (int32_t st = check_call(*c, call, opencl_rule)) return st;
  const mxn_op_call& k = *call;
  const mxn_tensor* in = k.inputs;
  const mxn_tensor* out = k.outputs;
  const float scalar = params_of<ScalarParams>(k).value;  // SCALE's and FILL's
  if (k.op >= MXN_OP_MOE_ROUTE) return run_moe(c, k);
  switch (k.op) {
    case MXN_OP_MATMUL:
      return run_matmul(c, k);
    case MXN_OP_ADD:
      return kernel(c, "add").arg(mem(in[0])).arg(mem(in[1])).arg(mem(out[0])).go(count(out[0]));
    case MXN_OP_ADD_BIAS:
      return kernel(c, "add_bias")
          .arg(mem(in[0]))
          .arg(mem(in[1]))
          .arg(mem(out[0]))
          .u(last(in[0]))
          .go(count(in[0]));
    case MXN_OP_SUM_ROWS:
      return kernel(c, "sum_rows")
          .arg(mem(in[0]))
          .arg(mem(out[0]))
          .u(count(in[0]) / last(in[0]))
          .u(last(in[0]))
          .s(params_of<SumParams>(k).accumulate)
          .go(last(in[0]));
    case MXN_OP_SCALE:
      return kernel(c, "scale").arg(mem(in[0])).arg(mem(out[0])).f(scalar).go(count(out[0]));
    case MXN_OP_FILL:
      return kernel(c, "fill").arg(mem(out[0])).f(scalar).go(count(out[0]));
    case MXN_OP_CAST:
      if (in[0].dtype != out[0].dtype) {
        if (in[0].dtype == MXN_DTYPE_F32 && out[0].dtype == MXN_DTYPE_BF16)
          return kernel(c, "to_bf16").arg(mem(in[0])).arg(mem(out[0])).go(count(out[0]));
        if (in[0].dtype == MXN_DTYPE_BF16 && out[0].dtype == MXN_DTYPE_F32)
          return kernel(c, "from_bf16").arg(mem(in[0])).arg(mem(out[0])).go(count(out[0]));
        return fail(c, MXN_STATUS_UNSUPPORTED, "cast: only f32 <-> bf16");
      }
      [[fallthrough]];
    case MXN_OP_COPY:
      return kernel(c, "copy").arg(mem(in[0])).arg(mem(out[0])).go(count(out[0]));
    case MXN_OP_GELU:
      return kernel(c, in[0].dtype == MXN_DTYPE_BF16 ? "gelu_h" : "gelu")
          .arg(mem(in[0]))
          .arg(mem(out[0]))
          .go(count(out[0]));
    case MXN_OP_MUL:
      return kernel(c, "mul").arg(mem(in[0])).arg(mem(in[1])).arg(mem(out[0])).go(count(out[0]));
    case MXN_OP_TANH:
      return kernel(c, "tanh_fwd").arg(mem(in[0])).arg(mem(out[0])).go(count(out[0]));
    case MXN_OP_TANH_BWD:
      return kernel(c, "tanh_bwd")
          .arg(mem(in[0]))
          .arg(mem(in[1]))
          .arg(mem(out[0]))
          .go(count(out[0]));
    case MXN_OP_GELU_BWD:
      return kernel(c, in[1].dtype == MXN_DTYPE_BF16 ? "gelu_bwd_h" : "gelu_bwd")
          .arg(mem(in[0]))
          .arg(mem(in[1]))
          .arg(mem(out[0]))
          .go(count(out[0]));
    case MXN_OP_SOFTMAX:
      return kernel(c, "softmax")
          .arg(mem(in[0]))
          .arg(mem(out[0]))
          .u(last(in[0]))
          .s(0)
          .go(count(in[0]) / last(in[0]));
    case MXN_OP_SOFTMAX_BWD:
      return kernel(c, "softmax_bwd")
          .arg(mem(in[0]))
          .arg(mem(in[1]))
          .arg(mem(out[0]))
          .u(last(in[0]))
          .s(0)
          .f(1.f)
          .go(count(in[0]) / last(in[0]));
    case MXN_OP_LAYERNORM:
      return kernel(c, "layernorm")
          .arg(mem(in[0]))
          .arg(mem(in[1]))
          .arg(mem(in[2]))
          .arg(mem(out[0]))
          .arg(mem(out[1]))
          .u(last(in[0]))
          .f(params_of<NormParams>(k).eps)
          .go(count(in[0]) / last(in[0]));
    case MXN_OP_LAYERNORM_BWD: {
      const int64_t cols = last(in[0]), rows = count(in[0]) / cols;
      if (int32_t st = kernel(c, "layernorm_dx")
                           .arg(mem(in[0]))
                           .arg(mem(in[1]))
                           .arg(mem(in[2]))
                           .arg(mem(in[3]))
                           .arg(mem(out[0]))
                           .u(cols)
                           .go(rows))
        return st;
      return kernel(c, "layernorm_dwdb")
          .arg(mem(in[0]))
          .arg(mem(in[1]))
          .arg(mem(in[3]))
          .arg(mem(out[1]))
          .arg(mem(out[2]))
          .u(rows)
          .u(cols)
          .go(cols);
    }
    case MXN_OP_ATTENTION:
      return run_attention(c, k, false);
    case MXN_OP_ATTENTION_BWD:
      return run_attention(c, k, true);
    case MXN_OP_EMBEDDING:
      return kernel(c, "embedding")
          .arg(mem(in[0]))
          .arg(mem(in[1]))
          .arg(mem(out[0]))
          .u(last(in[1]))
          .u(params_of<EmbeddingParams>(k).first)
          .u(in[1].shape[0])
          .go(count(out[0]));
    case MXN_OP_EMBEDDING_BWD:
      return kernel(c, "embedding_bwd")
          .arg(mem(in[0]))
          .arg(mem(in[1]))
          .arg(mem(out[0]))
          .u(count(in[1]))
          .u(out[0].shape[0])
          .u(out[0].shape[1])
          .u(params_of<EmbeddingParams>(k).first)
          .go(out[0].shape[1]);
    case MXN_OP_CROSS_ENTROPY:
      return run_cross_entropy(c, k);
    case MXN_OP_CROSS_ENTROPY_BWD: {
      const XentParams p = params_of<XentParams>(k);
      const int64_t V = last(in[1]), rows = count(in[1]) / V;
      if (p.part == 2)
        return kernel(c, "xent_slice_bwd")
            .arg(mem(in[0]))
            .arg(mem(in[1]))
            .arg(mem(in[2]))
            .arg(mem(in[3]))
            .arg(mem(out[0]))
            .u(rows)
            .u(V)
            .u(p.vocab0)
            .u(p.slots)
            .go(rows);
      return kernel(c, "xent_bwd")
          .arg(mem(in[0]))
          .arg(mem(in[1]))
          .arg(mem(in[2]))
          .arg(mem(out[0]))
          .u(rows)
          .u(V)
          .go(rows);
    }
    case MXN_OP_ADAMW: {
      const AdamwParams a = params_of<AdamwParams>(k);
      return kernel(c, "adamw")
          .arg(mem(out[0]))
          .arg(mem(in[0]))
          .arg(mem(out[1]))
          .arg(mem(out[2]))
          .f(a.lr)
          .f(a.beta1)
          .f(a.beta2)
          .f(a.eps)
          .f(a.weight_decay)
          .f(a.gscale)
          .f(a.step_size())
          .f(a.bc2_sqrt())
          .go(count(out[0]));
    }
    case MXN_OP_SUM_SQUARES: {
      const int64_t n = count(in[0]), chunk = 4096, parts = (n + chunk - 1) / chunk;
      cl_mem s = scratch(c, size_t(std::max<int64_t>(parts, 1)) * 4);
      if (!s) return fail(c, MXN_STATUS_OUT_OF_MEMORY, "no device memory for reduction scratch");
      if (int32_t st = kernel(c, "sumsq_part").arg(mem(in[0])).u(n).u(chunk).arg(s).go(parts))
        return st;
      return kernel(c, "sumsq_total")
          .arg(s)
          .u(parts)
          .arg(mem(out[0]))
          .s(params_of<SumParams>(k).accumulate)
          .go(1);
    }
    default:
      return run_llm_op(c, k);
  }
}

const mxn_backend_api kApi = {
    sizeof(mxn_backend_api),
    MXN_ABI_VERSION,
    "opencl",
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
    nullptr,  // no options
    supports_call,
    nullptr,  // no device-direct messages: expert parallelism's exchange goes through the host
    nullptr,
};

}  // namespace
}  // namespace mxn::opencl

extern "C" __attribute__((visibility("default"))) const mxn_backend_api* mxn_backend_get_api(void) {
  return &mxn::opencl::kApi;
}
