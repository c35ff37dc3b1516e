// Multi-head latent attention (DeepSeek-V2/V3) in the absorbed form, for training and decoding
// alike. Per token: a query of H heads of [nope (dn) | rope (dr)], a latent c (R, normed) and one
// RoPE key (dr). Head h's score against key token j is q_nope_h . (W_uk_h c_j) + q_rope_h .
// k_rope_j = [q_nope_h W_uk_h | q_rope_h] . [c_j | k_rope_j]: so the query's nope part goes through
// the head's key up-projection (a batched GEMM over heads) and attention runs with one kv head of
// R + dr over [c | k_rope] rows, which is also all the KV cache keeps. Its output per head, a
// mix of latents, goes through the head's value up-projection W_uv_h. The checkpoint's kv_b_proj
// (H x (dn + dv), R) is kept as k_b_proj (H, dn, R) and v_b_proj (H, dv, R).
#include "models/builder.h"

namespace mxn {
namespace {

// A copy of columns [col, col + w) of x's rows (row width ld) into a new (rows, w) value, or into
// columns [to_col, to_col + w) of `into`'s rows (width into_ld).
int window(Graph& g, int x, int64_t rows, int64_t ld, int64_t col, int64_t w, int into = -1,
           int64_t into_ld = 0, int64_t to_col = 0) {
  StridedCopyParams p;
  p.n[1] = rows, p.n[2] = w;
  p.in_stride[1] = ld, p.in_offset = col;
  p.out_stride[1] = into >= 0 ? into_ld : w, p.out_offset = into >= 0 ? to_col : 0;
  return g.strided_copy(x, p, {rows, w}, into);
}

// Per head h of x's rows (N, heads x hw, head h's w columns from `col`) to batches (heads, N, w),
// or back (to_heads = false: x (heads, N, w) into `into`'s rows of heads x into_hw at col).
int heads_to_batches(Graph& g, int x, int64_t N, int64_t heads, int64_t hw, int64_t col,
                     int64_t w) {
  StridedCopyParams p;
  p.n[0] = heads, p.n[1] = N, p.n[2] = w;
  p.in_stride[0] = hw, p.in_stride[1] = heads * hw, p.in_offset = col;
  p.out_stride[0] = N * w, p.out_stride[1] = w;
  return g.strided_copy(x, p, {heads, N, w});
}
int batches_to_heads(Graph& g, int x, int64_t N, int64_t heads, int64_t w, int into,
                     int64_t into_hw, int64_t col) {
  StridedCopyParams p;
  p.n[0] = heads, p.n[1] = N, p.n[2] = w;
  p.in_stride[0] = N * w, p.in_stride[1] = w;
  p.out_stride[0] = into_hw, p.out_stride[1] = heads * into_hw, p.out_offset = col;
  return g.strided_copy(x, p, {N, heads * into_hw}, into);
}

}  // namespace

int mla_attention(Builder& b, DecoderGraph& m, const std::string& p, int h, int64_t B,
                  AttentionParams at, int extra) {
  Graph& g = b.g;
  const DecoderConfig& c = b.c;
  const DecoderOptions& o = b.o;
  const int64_t C = c.hidden, H = c.heads, dn = c.qk_nope_dim, dr = c.qk_rope_dim;
  const int64_t R = c.kv_lora_rank, dv = c.v_head_dim, Q = dn + dr, L = R + dr, N = g.v_rows(h);
  const std::string a = p + "self_attn.";
  RopeParams rope = b.rope(0, 1);
  rope.head_dim = rope.rot = dr;
  // The query: [nope | rope] a head, its rope parts turned.
  int q;
  if (c.q_lora_rank > 0) {
    const int qa = b.linear(h, a + "q_a_proj", C, c.q_lora_rank, false);
    const int qn = g.rmsnorm(qa, b.w(a + "q_a_layernorm.weight", {c.q_lora_rank}, false), 1e-6f);
    q = b.linear(qn, a + "q_b_proj", c.q_lora_rank, H * Q, false);
  } else {
    q = b.linear(h, a + "q_proj", C, H * Q, false);
  }
  RopeParams qr = rope;
  qr.col0 = dn, qr.heads = H, qr.head_dim = Q;
  q = g.rope(q, m.positions, qr);
  // The key row [c | k_rope]: the latent normed, the RoPE key turned.
  int kva = b.linear(h, a + "kv_a_proj_with_mqa", C, L, false);
  RopeParams kr = rope;
  kr.col0 = R;
  kva = g.rope(kva, m.positions, kr);
  const int lat =
      g.rmsnorm(window(g, kva, N, L, 0, R), b.w(a + "kv_a_layernorm.weight", {R}, false), 1e-6f);
  int kv = window(g, lat, N, R, 0, R, g.activation({N, L}), L, 0);
  kv = window(g, kva, N, L, R, dr, kv, L, R);
  // The absorbed query [q_nope_h W_uk_h | q_rope_h] a head.
  const int k_b = b.w(a + "k_b_proj.weight", {H, dn, R}, true);
  const int qlat = g.matmul(heads_to_batches(g, q, N, H, Q, 0, dn), k_b);  // (H, N, R)
  int qq = batches_to_heads(g, qlat, N, H, R, g.activation({N, H * L}), L, 0);
  StridedCopyParams qrope;  // each head's rope part across
  qrope.n[0] = N, qrope.n[1] = H, qrope.n[2] = dr;
  qrope.in_stride[0] = H * Q, qrope.in_stride[1] = Q, qrope.in_offset = dn;
  qrope.out_stride[0] = H * L, qrope.out_stride[1] = L, qrope.out_offset = R;
  qq = g.strided_copy(q, qrope, {}, qq);
  // One kv head over the latent rows; the values are the rows too (their rope part rides along
  // and is dropped below). Training reads them as a separate copy so that the keys' and values'
  // gradients add up.
  at.heads = H, at.kv_heads = 1, at.head_dim = L;
  at.q_col = at.k_col = at.v_col = 0;
  at.scale = c.attn_scale > 0 ? c.attn_scale : 1.f / std::sqrt(float(Q));
  int k = kv, v = kv;
  const bool cached = o.serve_rows > 0 || o.kv_cache > 0;
  if (cached) cache_kv(b, m, p, B, k, v, at, L, true);
  if (o.kv_cache > 0 && o.serve_rows == 0) at.S = at.T;
  if (!cached) v = g.emit(MXN_OP_COPY, {kv}, {g.activation({N, L})});
  const int y = g.attention(qq, k, v, at, extra, !cached && o.with_loss);
  if (o.kv_cache > 0) m.cache_reads.push_back(g.nodes.size() - 1);
  // Each head's latent mix through its value up-projection, then o_proj.
  const int v_b = b.w(a + "v_b_proj.weight", {H, dv, R}, true);
  const int out = g.matmul(heads_to_batches(g, y, N, H, L, 0, R), v_b, false, true);  // (H, N, dv)
  const int o_rows = batches_to_heads(g, out, N, H, dv, -1, dv, 0);
  return b.linear(o_rows, a + "o_proj", H * dv, C, false);
}

}  // namespace mxn
