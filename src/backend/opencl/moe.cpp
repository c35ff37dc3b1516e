// The OpenCL backend's ABI 9 ops (mixture of experts, STRIDED_COPY): kernels_moe_cl.h's kernels
// launched in order on the context's queue; the routing's scores, flags and counts live in its
// scratch.
#include "backend/opencl/cl_launch.h"

namespace mxn::opencl {
namespace {

Mem none(Mem like) { return {like.m, 0}; }  // an absent optional operand (never read)

// Scratch laid out as [scores: floats | counts: E ints | flags: bytes], in elements of 4 bytes.
struct RouteScratch {
  Mem scores, counts, flags;  // flags' offset is in bytes
};
bool route_scratch(Ctx* c, int64_t floats, int64_t E, int64_t flag_bytes, RouteScratch* s) {
  const int64_t words = floats + E + (flag_bytes + 3) / 4;
  cl_mem m = scratch(c, size_t(words) * 4);
  if (!m) return false;
  *s = {{m, 0}, {m, cl_ulong(floats)}, {m, cl_ulong(floats + E) * 4}};
  return true;
}

int32_t count_experts(Ctx* c, Mem ids, int64_t n, int64_t E, Mem counts) {
  return kernel(c, "moe_count").arg(ids).u(n).arg(counts).go(E);
}

int32_t route(Ctx* c, const mxn_op_call& k) {
  const MoeRouteShape r = moe_route_shape(k, false);
  const MoeRouteParams p = params_of<MoeRouteParams>(k);
  RouteScratch s;
  if (!route_scratch(c, r.N * r.E, r.E, r.N * r.E, &s))
    return fail(c, MXN_STATUS_OUT_OF_MEMORY, "moe_route: no device memory for its scratch");
  const Mem logits = mem(k.inputs[0]), ids = mem(k.outputs[1]), off = mem(k.outputs[3]);
  const Mem bias = r.bias >= 0 ? mem(k.inputs[r.bias]) : none(logits);
  if (int32_t st = kernel(c, "moe_route")
                       .arg(logits)
                       .arg(bias)
                       .s(r.bias >= 0)
                       .arg(s.scores)
                       .arg(s.flags)
                       .arg(mem(k.outputs[0]))
                       .arg(ids)
                       .u(r.E)
                       .u(r.K)
                       .s(p.sigmoid)
                       .s(p.norm)
                       .u(r.n_group)
                       .u(r.topk_group)
                       .f(p.scale)
                       .go(r.N))
    return st;
  const int64_t n = r.N * r.K;
  if (int32_t st = count_experts(c, ids, n, r.E, s.counts)) return st;
  if (int32_t st = kernel(c, "moe_offsets").arg(s.counts).u(r.E).arg(off).go(1)) return st;
  if (int32_t st = kernel(c, "moe_positions").arg(ids).u(n).arg(off).arg(mem(k.outputs[2])).go(r.E))
    return st;
  if (!r.aux) return 0;
  return kernel(c, "moe_aux")
      .arg(s.scores)
      .arg(s.counts)
      .u(r.N)
      .u(r.E)
      .arg(mem(k.outputs[4]))
      .go(1);
}

int32_t route_bwd(Ctx* c, const mxn_op_call& k) {
  const MoeRouteShape r = moe_route_shape(k, true);
  const MoeRouteParams p = params_of<MoeRouteParams>(k);
  RouteScratch s;
  if (!route_scratch(c, 2 * r.N * r.E, r.E, 0, &s))
    return fail(c, MXN_STATUS_OUT_OF_MEMORY, "moe_route_bwd: no device memory for its scratch");
  const Mem ids = mem(k.inputs[2]);
  if (r.daux >= 0)
    if (int32_t st = count_experts(c, ids, r.N * r.K, r.E, s.counts)) return st;
  const Mem dw = mem(k.inputs[0]);
  return kernel(c, "moe_route_bwd")
      .arg(dw)
      .arg(mem(k.inputs[1]))
      .arg(ids)
      .arg(s.counts)
      .arg(r.daux >= 0 ? mem(k.inputs[r.daux]) : none(dw))
      .s(r.daux >= 0)
      .arg(s.scores)
      .arg(mem(k.outputs[0]))
      .u(r.N)
      .u(r.E)
      .u(r.K)
      .s(p.sigmoid)
      .s(p.norm)
      .f(p.scale)
      .go(r.N);
}

int32_t permute(Ctx* c, const mxn_op_call& k) {
  const MoePermuteShape m = moe_permute_shape(k);
  const mxn_tensor* in = k.inputs;
  const Mem x = mem(in[0]), w = m.weighted ? mem(in[2]) : none(x);
  const int64_t NK = m.N * m.K;
  if (k.op != MXN_OP_MOE_UNPERMUTE_BWD) {  // the same operands: one work-item an element out
    const bool into_slots = k.op == MXN_OP_MOE_PERMUTE;
    return kernel(c, into_slots ? "moe_permute" : "moe_unpermute")
        .arg(x)
        .arg(mem(in[1]))
        .arg(w)
        .s(m.weighted)
        .arg(mem(k.outputs[0]))
        .u(m.C)
        .u(m.K)
        .u(NK)
        .go((into_slots ? NK : m.N) * m.C);
  }
  return kernel(c, "moe_unpermute_bwd")
      .arg(x)
      .arg(mem(in[1]))
      .arg(mem(in[2]))
      .arg(mem(k.outputs[0]))
      .u(m.C)
      .u(m.K)
      .u(NK)
      .go(NK);
}

int32_t grouped(Ctx* c, const mxn_op_call& k) {
  const GroupedMatmulShape g = grouped_matmul_shape(k);
  const Mem a = mem(k.inputs[0]), b = mem(k.inputs[1]), off = mem(k.inputs[2]);
  const Mem o = mem(k.outputs[0]);
  if (g.weight_grad)
    return kernel(c, "grouped_mm_wgrad")
        .arg(a)
        .arg(b)
        .arg(off)
        .arg(o)
        .u(g.M)
        .u(g.N)
        .u(g.K)
        .s(g.accumulate)
        .go(g.E * g.N * g.K);
  return kernel(c, "grouped_mm")
      .arg(a)
      .arg(b)
      .arg(off)
      .arg(o)
      .u(g.M)
      .u(g.N)
      .u(g.K)
      .u(g.E)
      .s(g.tb)
      .go(g.M * g.N);
}

int32_t strided_copy(Ctx* c, const mxn_op_call& k) {
  const StridedCopyParams p = params_of<StridedCopyParams>(k);
  return kernel(c, "strided_copy")
      .arg(mem(k.inputs[0]))
      .arg(mem(k.outputs[0]))
      .u(p.n[1])
      .u(p.n[2])
      .u(p.in_stride[0])
      .u(p.in_stride[1])
      .u(p.in_stride[2])
      .u(p.in_offset)
      .u(p.out_stride[0])
      .u(p.out_stride[1])
      .u(p.out_stride[2])
      .u(p.out_offset)
      .go(p.count());
}

}  // namespace

int32_t run_moe(Ctx* c, const mxn_op_call& k) {
  switch (k.op) {
    case MXN_OP_STRIDED_COPY:
      return strided_copy(c, k);
    case MXN_OP_MOE_ROUTE:
      return route(c, k);
    case MXN_OP_MOE_ROUTE_BWD:
      return route_bwd(c, k);
    case MXN_OP_GROUPED_MATMUL:
      return grouped(c, k);
    default:
      return permute(c, k);
  }
}

}  // namespace mxn::opencl
