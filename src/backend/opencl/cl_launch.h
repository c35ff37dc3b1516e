#pragma once
// What the OpenCL backend's source files share: the context, a tensor as (buffer, element
// offset), and a kernel launch by name with its arguments in order.
#define CL_TARGET_OPENCL_VERSION 120
#include <CL/cl.h>

#include <map>
#include <string>

#include "backend/common.h"

namespace mxn::opencl {

struct Ctx : BackendBase {
  cl_context context = nullptr;
  cl_command_queue queue = nullptr;
  cl_device_id device = nullptr;
  cl_program program = nullptr;
  std::map<std::string, cl_kernel> kernels;
  GrowingBuffer<cl_mem> scratch;  // bf16 operands and partial sums
  uint64_t free_bytes = 0;
  RopeTables<cl_mem> rope_tables;
};

inline int32_t fail(Ctx* c, int32_t status, const std::string& msg) { return c->fail(status, msg); }

// --- dispatch ----------------------------------------------------------------------------------
struct Mem {
  cl_mem m;
  cl_ulong off;  // in elements
};
// A tensor as (buffer, offset in its own elements): 2 bytes for bf16, 4 for f32 and i32.
inline Mem mem(const mxn_tensor& t) {
  return {static_cast<cl_mem>(t.buffer), t.offset / (t.dtype == MXN_DTYPE_BF16 ? 2 : 4)};
}

struct Launch {
  Ctx* c;
  cl_kernel k;
  cl_uint i = 0;
  cl_int err = CL_SUCCESS;
  const char* missing = nullptr;  // a kernel clCreateKernel did not make (its name)
  Launch& arg(Mem m) {
    err |= clSetKernelArg(k, i++, sizeof(cl_mem), &m.m);
    err |= clSetKernelArg(k, i++, sizeof(cl_ulong), &m.off);
    return *this;
  }
  Launch& arg(cl_mem m) {
    err |= clSetKernelArg(k, i++, sizeof(cl_mem), &m);
    return *this;
  }
  Launch& u(int64_t v) {
    cl_ulong x = cl_ulong(v);
    err |= clSetKernelArg(k, i++, sizeof(x), &x);
    return *this;
  }
  Launch& s(int v) {
    cl_int x = v;
    err |= clSetKernelArg(k, i++, sizeof(x), &x);
    return *this;
  }
  Launch& f(float v) {
    err |= clSetKernelArg(k, i++, sizeof(v), &v);
    return *this;
  }
  int32_t go(int64_t n) {
    if (missing)
      return fail(c, MXN_STATUS_INTERNAL,
                  std::string("clCreateKernel(") + missing + "): " + std::to_string(err));
    if (err != CL_SUCCESS) return fail(c, MXN_STATUS_INTERNAL, "clSetKernelArg failed");
    if (n <= 0) return 0;
    size_t g = size_t(n);
    cl_int e = clEnqueueNDRangeKernel(c->queue, k, 1, nullptr, &g, nullptr, 0, nullptr, nullptr);
    return e == CL_SUCCESS
               ? 0
               : fail(c, MXN_STATUS_INTERNAL, "clEnqueueNDRangeKernel: " + std::to_string(e));
  }
};

// The kernel `name` of the program (created once, then cached), ready for its arguments.
Launch kernel(Ctx* c, const char* name);
// The context's scratch buffer, grown to at least `bytes` (null when the device is out of memory).
cl_mem scratch(Ctx* c, size_t bytes);
inline Mem at(Mem m, int64_t elems) { return {m.m, m.off + cl_ulong(elems)}; }

// The mixture-of-experts ops (moe.cpp).
int32_t run_moe(Ctx* c, const mxn_op_call& k);

}  // namespace mxn::opencl
