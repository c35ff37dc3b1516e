#pragma once
// The CPU reference kernels on raw row-major f32 arrays. Each is deterministic for a fixed
// thread count: work is split into fixed contiguous chunks and partial sums are combined in order.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "backend/op_shapes.h"
#include "core/dtype.h"

namespace mxn::cpu {

// A stored value as f32, for kernels templated on f32 or bf16 storage (bf16: the top half of an
// f32).
inline float widen(float v) { return v; }
inline float widen(uint16_t h) { return bf16_to_f32(h); }

// Per-context scratch; grows on the first step and is then reused, so steps allocate nothing.
struct Scratch {
  std::vector<float> a, b, c;
  std::vector<float> logits, rows;      // the fused classifier's block of logits, per-row losses
  std::vector<uint16_t> x16, w16, l16;  // ... and its operands in bf16, converted once a call
  std::vector<float> wide;              // attention's bf16 q, k, v widened for its f32 tiles
  std::vector<uint16_t> t16;            // ... or its bf16 tiles (probabilities, dY, dS)
  template <typename T>
  T* get(std::vector<T>& v, size_t n) {
    if (v.size() < n) v.resize(n);
    return v.data();
  }
};

enum class Compute { f32, bf16 };

// C[M,N] = alpha * op(A) op(B) (+ C when accumulate) (+ bias (N) on every row, 2-D only: in the
// bf16 GEMM itself, else after it), batched with element strides sa, sb, sc.
// Single GEMMs split their columns dynamically (the backend option "gemm_split"), for the process.
void set_gemm_split(bool on);
void matmul(Scratch& s, Compute compute, bool ta, bool tb, int64_t batch, int64_t M, int64_t N,
            int64_t K, float alpha, const float* A, int64_t sa, const float* B, int64_t sb,
            bool accumulate, float* C, int64_t sc, const float* bias = nullptr);
// Rows against their own N x K matrices (tb): y_r = alpha x_r B_r^T (+ y_r), r < R, in one
// parallel pass over all R * N outputs, each thread over its own run of them row after row: one
// linear stream a thread, which the prefetchers follow. Batch-1 decoding (R = 1) and a MoE
// layer's experts at one token each. On the 2-core EPYC, 1 GiB of bf16 experts (8 of 32 a layer)
// streamed at 19 GB/s four rows interleaved, 28 GB/s row after row a call, 38-45 GB/s in one pass
// per layer; bf16 weights are widened to multiply the f32 row (vdpbf16ps on x split into bf16
// halves reached 24 GB/s, and rounds x).
template <typename W>
void gemv_rows(int64_t R, int64_t N, int64_t K, float alpha, const float* const* x,
               const W* const* B, bool accumulate, float* const* y);
bool native_bf16();
// The native bf16 path's parts (only where native_bf16()), for a kernel that converts an operand
// once and reads it in several GEMMs: f32 -> bf16 with the CPU's instruction, and oneDNN's bf16
// matmul (row-major, f32 C, cached primitives).
void to_bf16(const float* src, uint16_t* dst, int64_t n);
void from_bf16(const uint16_t* src, float* dst, int64_t n);     // exact; any CPU
void to_bf16_here(const float* src, uint16_t* dst, int64_t n);  // on the calling thread only
void gemm_bf16(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const uint16_t* A,
               const uint16_t* B, bool accumulate, float* C);
// ... with row strides (single-threaded inside a parallel region, as sgemm)
void gemm_bf16(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const uint16_t* A,
               int64_t lda, const uint16_t* B, int64_t ldb, bool accumulate, float* C, int64_t ldc);

// CLASSIFIER_CE: the mean cross-entropy of softmax(x w^T) over rows whose target >= 0 and, with
// grads 1 or 2, dx (and dw) for d(loss) = dloss, `block` rows of logits at a time (0: about 128
// MB of them); with add_dw, dw is added into (a param's gradient) instead of overwritten.
// Returns the first out-of-range target's row, or -1. With vp.part 1 or 2, w is a vocabulary
// slice (XentParams): part 1 writes `stats` (no loss, no gradients); part 2 reads the group's
// summed stats and makes the whole softmax's loss and the slice's gradients.
int64_t classifier_ce(Scratch& s, Compute compute, int grads, int64_t block, const float* x,
                      const float* w, const int32_t* targets, float* loss, float* dx, float* dw,
                      int64_t N, int64_t C, int64_t V, float dloss = 1.f, bool add_dw = false,
                      const XentParams& vp = {}, float* stats = nullptr);
// The same with B stored in bf16 (inference weights): one row streams B (half the bytes), more
// rows widen B to f32 in scratch and take the path above. The arithmetic is f32 either way.
void matmul_bf16_weights(Scratch& s, Compute compute, bool ta, bool tb, int64_t batch, int64_t M,
                         int64_t N, int64_t K, float alpha, const float* A, int64_t sa,
                         const uint16_t* B, int64_t sb, bool accumulate, float* C, int64_t sc,
                         const float* bias = nullptr);

// Row-major single-precision GEMM through oneDNN (single-threaded inside a parallel region).
void sgemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
           int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// The general attention (attention.cpp); pk, pv (prefix keys and values, a.P rows), prefix (the
// optional i32 input), lse, dpk and dpv may be null.
void attention_fwd(Scratch& s, const AttentionShape& a, const float* q, const float* k,
                   const float* v, const float* pk, const float* pv, const int32_t* prefix,
                   float* y, float* lse);
void attention_bwd(Scratch& s, const AttentionShape& a, const float* dy, const float* q,
                   const float* k, const float* v, const float* y, const float* lse,
                   const float* pk, const float* pv, const int32_t* prefix, float* dq, float* dk,
                   float* dv, float* dpk, float* dpv);
// The same on bf16 q, k, v (training: masks 0-3, no prefix keys) with bf16 tiles: the scores'
// and the backward's GEMMs read bf16 operands (probabilities, dY and dS rounded to bf16, as
// torch's bf16 attention rounds them) and accumulate in f32. Only where native_bf16().
void attention_fwd_bf16(Scratch& s, const AttentionShape& a, const uint16_t* q, const uint16_t* k,
                        const uint16_t* v, const int32_t* prefix, float* y, float* lse);
void attention_bwd_bf16(Scratch& s, const AttentionShape& a, const float* dy, const uint16_t* q,
                        const uint16_t* k, const uint16_t* v, const float* y, const float* lse,
                        const int32_t* prefix, float* dq, float* dk, float* dv);

void add(const float* a, const float* b, float* out, int64_t n);
void add_bias(const float* a, const float* bias, float* out, int64_t rows, int64_t cols);
void sum_rows(Scratch& s, const float* a, float* out, int64_t rows, int64_t cols, bool accumulate);
void scale(const float* a, float* out, int64_t n, float k);
void fill(float* out, int64_t n, float v);
double sum_squares(const float* a, int64_t n);

// x may be bf16 (an activation kept at half size for the backward); the math is f32.
void gelu_fwd(const float* x, float* y, int64_t n);
void gelu_fwd(const uint16_t* x, float* y, int64_t n);
void gelu_bwd(const float* dy, const float* x, float* dx, int64_t n);
void gelu_bwd(const float* dy, const uint16_t* x, float* dx, int64_t n);
void softmax_fwd(const float* x, float* y, int64_t rows, int64_t cols);
void softmax_bwd(const float* dy, const float* y, float* dx, int64_t rows, int64_t cols);
void layernorm_fwd(const float* x, const float* w, const float* b, float* y, float* stats,
                   int64_t rows, int64_t cols, float eps);
void layernorm_bwd(Scratch& s, const float* dy, const float* x, const float* w, const float* stats,
                   float* dx, float* dw, float* db, int64_t rows, int64_t cols);
// Returns the first out-of-range index (none with p.partial: zero rows), or -1.
int64_t embedding_fwd_bf16(const int32_t* idx, const uint16_t* table, float* out, int64_t n,
                           int64_t V, int64_t C, const EmbeddingParams& p);
int64_t embedding_fwd(const int32_t* idx, const float* table, float* out, int64_t n, int64_t V,
                      int64_t C, const EmbeddingParams& p);
void embedding_bwd(const float* dy, const int32_t* idx, float* dtable, int64_t n, int64_t V,
                   int64_t C, const EmbeddingParams& p);
// Mean over rows whose target >= 0; returns the first out-of-range target (>= V) or -1.
int64_t cross_entropy_fwd(Scratch& s, const float* logits, const int32_t* targets, float* loss,
                          int64_t rows, int64_t V);
// dlogits; with `stats` (part 2 of XentParams) a vocabulary slice's, from the group's stats.
void cross_entropy_bwd(const float* dloss, const float* logits, const int32_t* targets,
                       float* dlogits, int64_t rows, int64_t V, const XentParams& p = {},
                       const float* stats = nullptr);
// The vocabulary split over a group (XentParams): a slice's stats (part 1), the loss from the
// summed stats (part 2).
void xent_stats(const float* logits, const int32_t* targets, float* stats, int64_t rows, int64_t V,
                const XentParams& p);
void xent_loss(const float* stats, const int32_t* targets, float* loss, int64_t rows,
               int64_t slots);
void rmsnorm_fwd(const float* x, const float* w, float* y, float* rstd, int64_t rows, int64_t cols,
                 float eps);
void rmsnorm_bwd(Scratch& s, const float* dy, const float* x, const float* w, const float* rstd,
                 float* dx, float* dw, int64_t rows, int64_t cols);
// ROPE over rows of `ld` floats; `inv_freq` has rot/2 entries (rope_inv_freq).
void rope(const float* x, const int32_t* pos, float* y, int64_t rows, int64_t ld, int64_t col0,
          int64_t heads, int64_t hd, int64_t rot, bool interleaved, bool inverse,
          const float* inv_freq);
void silu_fwd(const float* x, float* y, int64_t n);
void silu_bwd(const float* dy, const float* x, float* dx, int64_t n);
// gate and up: column windows (at gcol, ucol) of rows of lg and lu floats; out is (rows, F).
void swiglu_fwd(const float* gate, int64_t lg, int64_t gcol, const float* up, int64_t lu,
                int64_t ucol, float* out, int64_t rows, int64_t F);
void swiglu_bwd(const float* dy, const float* gate, int64_t lg, int64_t gcol, const float* up,
                int64_t lu, int64_t ucol, float* dgate, float* dup, int64_t rows, int64_t F);
// Mixture of experts (moe.cpp): op_shapes.h's shapes, backend_abi.h's semantics. aux and daux
// may be null.
void moe_route(Scratch& s, const MoeRouteShape& r, const MoeRouteParams& p, const float* logits,
               const float* bias, float* w, int32_t* ids, int32_t* pos, int32_t* offsets,
               float* aux);
void moe_route_bwd(Scratch& s, const MoeRouteShape& r, const MoeRouteParams& p, const float* dw,
                   const float* logits, const int32_t* ids, const float* daux, float* dlogits);
void moe_permute(const MoePermuteShape& m, const float* x, const int32_t* pos, const float* w,
                 float* xp);
void moe_unpermute(const MoePermuteShape& m, const float* yp, const int32_t* pos, const float* w,
                   float* y);
void moe_unpermute_bwd(const MoePermuteShape& m, const float* dy, const float* yp,
                       const int32_t* pos, float* dw);
void grouped_matmul(const GroupedMatmulShape& g, const float* a, const float* b,
                    const int32_t* offsets, float* out);
// ... with the experts' matrices stored in bf16 (inference weights): one row in f32 arithmetic;
// more rows f32 (each matrix widened) or, compute bf16, a bf16 GEMM with the rows rounded.
void grouped_matmul_bf16(Scratch& s, const GroupedMatmulShape& g, Compute compute, const float* a,
                         const uint16_t* b, const int32_t* offsets, float* out);
// STRIDED_COPY on 4-byte elements (f32 or i32).
void strided_copy(const StridedCopyParams& p, const float* in, float* out);
void adamw(float* p, const float* g, float* m, float* v, int64_t n, float lr, float b1, float b2,
           float eps, float wd, float gscale, float step_size, float bc2_sqrt);

}  // namespace mxn::cpu
