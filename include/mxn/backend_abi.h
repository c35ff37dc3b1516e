/* The chip contract: the C ABI every mxn backend implements.
 *
 * A backend is a table of plain C functions returned by one entry point,
 * `mxn_backend_get_api`. Every struct passed across the boundary starts with its own size so
 * the ABI can grow at the end without breaking plugins built against an older header (as PJRT
 * does). Functions return 0 on success; on failure a non-zero MXN_STATUS_* and the message
 * is read with `last_error` (valid until the next call on the same context).
 */
#ifndef MXN_BACKEND_ABI_H
#define MXN_BACKEND_ABI_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The ABI's versions: 2: the general attention, RMSNorm, RoPE, SiLU, SwiGLU, SET_ROWS;
 * 3: attention masks over packed rows (mask 3) and shared prefix keys (P-Tuning v2); 12 operands
 *    and 16 integer parameters a call;
 * 4: serving's attention masks: key ranges (4), paged keys (5); MUL;
 * 5: the fused classifier and cross-entropy (CLASSIFIER_CE);
 * 6: CLASSIFIER_CE's gradients for a given d(loss), dw added into the param's gradient (ip[3]);
 *    GELU's x may be bf16;
 * 7: the attention masks named (mxn_attention_mask, the same numbers); set_option. A plugin built
 *    against ABI 6 (its table ends before set_option) still loads.
 * 8: supports_call, which sees the whole call (operands and parameters). Plugins of ABI 6 and 7
 *    still load; for them mxn asks supports() of each operand's dtype.
 * 9: mixture-of-experts: MOE_ROUTE(_BWD), MOE_PERMUTE, MOE_UNPERMUTE(_BWD), GROUPED_MATMUL; RMSNORM
 *    over groups of columns (a weight narrower than x's rows: Qwen3's per-head q and k norms);
 *    STRIDED_COPY (heads to batches and back, column windows: multi-head latent attention); yarn
 *    RoPE scaling (ROPE's ip[5] = 3).
 *    Plugins of ABI 6 to 8 still load; mxn does not give them the new ops.
 * 10: communicators for groups of ranks and their grouped sends and receives (comm_init_group,
 *    exchange): expert parallelism's all-to-all device to device.
 * 11: the vocabulary split over a tensor-parallel group: EMBEDDING(_BWD) of a table's rows
 *    [ip[0], ip[0] + V) with ip[1] = 1 (other ids: zero rows, no gradient); CROSS_ENTROPY(_BWD)
 *    over a slice of the logits' columns (ip[0] = part 1 or 2, ip[1] = first column, ip[2] = slot,
 *    ip[3] = slots). Plugins of ABI 6 to 10 still load; mxn does not give them these forms. */
#define MXN_ABI_VERSION 11
#define MXN_ABI_OLDEST 6 /* the oldest ABI whose plugins this header's mxn loads */
#define MXN_MAX_DIMS 4
#define MXN_MAX_OPERANDS 12
#define MXN_MAX_IP 16
#define MXN_COMM_ID_BYTES 128 /* NCCL's unique id size */
#define MXN_COMM_GROUPS 8     /* communicators a device holds (exchange's groups) */

typedef enum mxn_status {
  MXN_STATUS_OK = 0,
  MXN_STATUS_INVALID_ARGUMENT = 1,
  MXN_STATUS_UNSUPPORTED = 2,
  MXN_STATUS_OUT_OF_MEMORY = 3,
  MXN_STATUS_INTERNAL = 4,
} mxn_status;

typedef enum mxn_dtype {
  MXN_DTYPE_F32 = 0,
  MXN_DTYPE_BF16 = 1,
  MXN_DTYPE_F16 = 2,
  MXN_DTYPE_I32 = 3,
  MXN_DTYPE_COUNT
} mxn_dtype;

/* The fixed op set. Forward and backward are separate kernels; matmul's backward is matmul.
 * Operand order and parameters of each op are documented in docs/backends.md; mxn's
 * src/backend/op_params.h reads and writes the parameters by name. */
/* The op table keeps its comments laid out by hand. */
/* clang-format off */
typedef enum mxn_op {
  MXN_OP_MATMUL = 0,        /* C = alpha*op(A)op(B) (+C): ip[0]=transA ip[1]=transB ip[2]=accumulate
                               ip[3]=compute dtype (f32|bf16); fp[0]=alpha; 2-D or batched 3-D */
  MXN_OP_ADD,               /* out = a + b, same shape */
  MXN_OP_ADD_BIAS,          /* out[r, c] = a[r, c] + bias[c] */
  MXN_OP_SUM_ROWS,          /* out[c] = sum_r a[r, c] (+ out[c] when ip[0]) */
  MXN_OP_SCALE,             /* out = a * fp[0] */
  MXN_OP_GELU,              /* tanh approximation (GPT-2's gelu_new) */
  MXN_OP_GELU_BWD,          /* in: dy, x; out: dx */
  MXN_OP_SOFTMAX,           /* over the last dim */
  MXN_OP_SOFTMAX_BWD,       /* in: dy, y; out: dx */
  MXN_OP_LAYERNORM,         /* in: x, w, b; out: y, stats (N,2) = (mean, rstd); fp[0]=eps */
  MXN_OP_LAYERNORM_BWD,     /* in: dy, x, w, stats; out: dx, dw, db (dw, db overwritten) */
  MXN_OP_ATTENTION,         /* softmax(scale q k^T + mask) v, flash-style (no T x S scores kept).
                               in: q, k, v, [pk, pv], [prefix (B) i32]; out: y (B*T, H*hd),
                               [lse (B*T, H)].
                               q, k, v are column windows of row-major matrices: head h of q is
                               columns q_col + h*hd of q's rows (ld = q's last dim), and kv head
                               h / (H/G) likewise in k and v; they may be one tensor (fused qkv).
                               ip: 0=H 1=G (kv heads) 2=hd 3=T (queries per sequence) 4=S (keys
                               per sequence) 5=mask (an mxn_attention_mask, below) 6=q_col
                               7=k_col 8=v_col 9=kv_rows
                               (rows per sequence in k and v, >= S: a KV cache's capacity)
                               10=q_pos0 (key index of the first query: S - T when decoding)
                               11=P (prefix keys: pk and pv (P, G*hd), shared by every sequence,
                               seen by every query before its own keys: P-Tuning v2);
                               12=bs (the paged mask's block size); fp[0]=scale. Query i sees
                               key j when j <= q_pos0 + i (causal). */
  MXN_OP_ATTENTION_BWD,     /* in: dy, q, k, v, y, lse, [pk, pv], [prefix]; out: dq, dk, dv,
                               [dpk, dpv] (overwritten; dq, dk, dv the same column windows as q,
                               k, v, possibly one tensor; dpk, dpv summed over the sequences);
                               ip, fp as the forward */
  MXN_OP_EMBEDDING,         /* in: idx (N) i32, table (V,C); out: (N,C). ABI 11: ip[1] = 1: the
                               table is rows [ip[0], ip[0] + V) of a larger one; an id outside
                               them gives a zero row */
  MXN_OP_EMBEDDING_BWD,     /* in: dy (N,C), idx; out: dtable (V,C), overwritten; ip as the
                               forward (ids outside the rows add nothing) */
  MXN_OP_CROSS_ENTROPY,     /* in: logits (N,V), targets (N) i32 (<0 ignored); out: mean loss (1).
                               ABI 11, the logits columns [ip[1], ip[1] + V) of a vocabulary split
                               over ip[3] slots, this one ip[2]: ip[0] = 1: out stats (N, slots, 3)
                               = each row's (max, sum of exp(l - max), the target's logit or 0 when
                               outside) in its slot, zeros in the others; ip[0] = 2: in logits,
                               targets, stats summed over the slots; out the mean loss (1) */
  MXN_OP_CROSS_ENTROPY_BWD, /* in: dloss (1), logits, targets, [stats (ip[0] = 2)]; out: dlogits;
                               ip as the forward */
  MXN_OP_ADAMW,             /* in: grad; out (in place): param, m, v; fp: lr,b1,b2,eps,wd,gscale;
                               ip[0]=step (1-based) */
  MXN_OP_CAST,              /* out = a converted to out's dtype */
  MXN_OP_COPY,              /* out = a */
  MXN_OP_FILL,              /* out = fp[0] */
  MXN_OP_SUM_SQUARES,       /* out (1) = sum a^2 (+ out when ip[0]) */
  /* --- added in ABI 2 ----------------------------------------------------------------------- */
  MXN_OP_RMSNORM,           /* in: x, w; out: y = x * rstd * w, rstd (rows); fp[0]=eps. ABI 9: w
                               may be narrower than x's rows (count(w) divides last(x)): each group
                               of count(w) columns is a row of its own, rstd (count(x)/count(w)) */
  MXN_OP_RMSNORM_BWD,       /* in: dy, x, w, rstd; out: dx, dw (dw overwritten; groups as forward) */
  MXN_OP_ROPE,              /* in: x (N, W), pos (N) i32; out: y (N, W), may be x. Rotates the
                               first ip[3] dims of each of ip[1] heads of ip[2] dims that start
                               at column ip[0] (col0 + (heads-1)*hd + rot <= W: 2-D RoPE turns
                               each head's second half from col0 = rot); other columns are
                               copied. ip[4]=layout (0: pairs
                               (i, i + rot/2) as LLaMA stores it, 1: interleaved pairs (2i, 2i+1)
                               as GLM), ip[5]=scaling (0 none, 1 linear, 2 llama3, ABI 9: 3 yarn),
                               ip[6]=1: rotate backwards (the gradient). fp: 0=theta 1=factor
                               2=low_freq_factor 3=high_freq_factor 4=original_max_position
                               5=beta_fast 6=beta_slow (yarn) */
  MXN_OP_SILU,              /* out = a * sigmoid(a) */
  MXN_OP_SILU_BWD,          /* in: dy, x; out: dx */
  MXN_OP_SWIGLU,            /* in: gate, up; out (N, F) = silu(gate[:, ip[0]+c]) * up[:, ip[1]+c];
                               gate and up may be one tensor ([gate | up] fused) */
  MXN_OP_SWIGLU_BWD,        /* in: dy, gate, up; out: dgate, dup (the same column windows) */
  MXN_OP_SET_ROWS,          /* in: src (B*n, >= ip[2] + W), [idx (B*n) i32]; out: dst (B*R, W):
                               rows [ip[0], ip[0]+n) of each of the B sequences of ip[1] = R rows
                               get columns [ip[2], ip[2]+W) of src's rows (a KV-cache append);
                               with idx (ABI 3) src row i goes to dst row idx[i] instead */
  MXN_OP_DROPOUT,           /* out (may be a) = a * keep / (1 - fp[0]) (ABI 3): element i is kept
                               when u >= fp[0], u = (mix64(ip[0] + mix64(ip[1] + i)) >> 40) / 2^24
                               (splitmix64's mix, as src/core/rng.h): the same mask on every chip
                               for (seed ip[0], index ip[1] + i). Its gradient is itself. */
  MXN_OP_TANH,              /* out = tanh(a) (ABI 3: P-Tuning v2's prefix MLP) */
  MXN_OP_TANH_BWD,          /* in: dy, y (the forward's output); out: dx = dy * (1 - y^2) */
  /* --- added in ABI 4 ----------------------------------------------------------------------- */
  MXN_OP_MUL,               /* out = a * b elementwise, same shapes (serving many LoRA adapters in
                               one batch: each row's mask over the stacked adapters' ranks) */
  /* --- added in ABI 5 ----------------------------------------------------------------------- */
  MXN_OP_CLASSIFIER_CE,     /* in: x (N,C), w (V,C), targets (N) i32 (<0 ignored); out: loss (1),
                               [dx (N,C)], [dw (V,C)]: the mean cross-entropy of softmax(x w^T)
                               and, with ip[0] = 1 (dx) or 2 (dx and dw), its gradients for
                               d(loss) = 1, computed block of rows by block of rows so that no
                               (N,V) logits exist. ip[1]=compute dtype (as MATMUL's ip[3]);
                               ip[2]=rows a block (0: the backend's choice); ABI 6: ip[3] = 1
                               makes the gradients for d(loss) = fp[0] and adds dw into its
                               output (a param's gradient) instead of overwriting it */
  MXN_OP_CLASSIFIER_CE_BWD, /* in: dloss (1), dx1, [dw1]; out: dx, [dw] = dloss * each (may be in
                               place) */
  /* --- added in ABI 9: mixture of experts (dropless: every token reaches its K experts) ------- */
  MXN_OP_MOE_ROUTE,         /* in: logits (N,E), [bias (E)]; out: w (N,K), ids (N,K) i32, pos (N*K)
                               i32, offsets (E+1) i32, [aux (1)]. Scores s = softmax(logits) over
                               the E experts (ip[1]=0) or sigmoid(logits) (ip[1]=1); the experts of
                               a token are the K largest of s + bias (the bias picks, it does not
                               weigh: DeepSeek-V3's aux-loss-free balancing), in descending order,
                               lower index first on ties; with ip[3]=n_group > 1 only among the
                               ip[4]=topk_group groups of E/n_group experts whose selection score
                               is largest (a group's score: the sum of its 2 largest with a bias,
                               else its largest). w = s at the chosen experts, divided by their sum
                               when ip[2]=1 (norm_topk_prob), times fp[0] (routed_scaling_factor).
                               pos and offsets sort the N*K (token, k) slots into expert order,
                               stably: slot t*K+k goes to row pos[t*K+k]; expert e's rows are
                               [offsets[e], offsets[e+1]). aux: the Switch / Mixtral load-balancing
                               loss E * sum_e (count_e / N) * mean_t s[t, e]. ip[0]=K */
  MXN_OP_MOE_ROUTE_BWD,     /* in: dw (N,K), logits, ids, [daux (1)]; out: dlogits (N,E)
                               (overwritten); ip, fp as the forward */
  MXN_OP_MOE_PERMUTE,       /* in: x (N,C), pos (N*K) i32, [w (N*K)]; out: xp (N*K, C):
                               xp[pos[s]] = x[s / K] (* w[s]). pos is a permutation */
  MXN_OP_MOE_UNPERMUTE,     /* in: yp (N*K, C), pos, [w]; out: y (N,C) = sum_k yp[pos[t*K+k]]
                               (* w[t*K+k]): the weighted scatter back, summed in k order */
  MXN_OP_MOE_UNPERMUTE_BWD, /* in: dy (N,C), yp (N*K, C), pos; out: dw (N*K) =
                               <dy[s / K], yp[pos[s]]> */
  MXN_OP_GROUPED_MATMUL,    /* one GEMM per expert over its rows, in one call. in: a, b, offsets
                               (E+1) i32 (offsets[0] = 0, offsets[E] = rows; clamped). ip[1]=0:
                               a (M, K) rows, b (E, N, K) with ip[0]=tb=1 or (E, K, N) with tb=0;
                               out (M, N): rows r of expert e get a[r] op(b[e]). ip[1]=1 (a weight's
                               gradient): a (M, P), b (M, Q); out (E, P, Q): out[e] = a_e^T b_e
                               over expert e's rows (added into out with ip[2]=1; 0 for an expert
                               without rows otherwise) */
  MXN_OP_STRIDED_COPY,      /* for i < n0, j < n1, k < n2 (ip[0..2]):
                               out[ip[10] + i*ip[7] + j*ip[8] + k*ip[9]] =
                               in[ip[6] + i*ip[3] + j*ip[4] + k*ip[5]] (element strides and
                               offsets; every position within its tensor). Out's other elements
                               are left as they are: two calls fill two windows of one output */
  MXN_OP_COUNT
} mxn_op;
/* clang-format on */

/* ATTENTION's ip[5]: which keys each query sees. */
typedef enum mxn_attention_mask {
  MXN_MASK_NONE = 0,     /* every key */
  MXN_MASK_CAUSAL = 1,   /* keys up to its own position */
  MXN_MASK_PREFIX = 2,   /* causal, and the first prefix[b] keys seen by all (GLM's Part A); the
                            i32 input is (B) */
  MXN_MASK_SEGMENTS = 3, /* causal within segments (packed rows): the i32 input is (B*T), query t
                            of sequence b sees keys from min(seg[b*T+t], t) on */
  MXN_MASK_CACHED = 4,   /* forward only: each query's own key range, the i32 input (B*T, 2) =
                            [first, last) of its sequence's keys (a batch of KV caches seen as one
                            sequence) */
  MXN_MASK_PAGED = 5     /* forward only: paged keys, the i32 input (B*T, 1 + nb) = [n, block 0,
                            ..., block nb-1]: query i sees its request's keys 0..n-1, key j at row
                            block[j / bs] * bs + j % bs of k and v, bs = ip[12]; n is clamped to
                            [1, nb*bs] and blocks to [0, kv_rows / bs) */
} mxn_attention_mask;

/* A view of device memory: `buffer` is what buffer_alloc returned, `offset` is in bytes. */
typedef struct mxn_tensor {
  void* buffer;
  uint64_t offset;
  int32_t dtype;
  int32_t ndim;
  int64_t shape[MXN_MAX_DIMS]; /* contiguous, row-major */
} mxn_tensor;

typedef struct mxn_op_call {
  size_t struct_size;
  int32_t op;
  int32_t n_inputs;
  int32_t n_outputs;
  mxn_tensor inputs[MXN_MAX_OPERANDS];
  mxn_tensor outputs[MXN_MAX_OPERANDS];
  int64_t ip[MXN_MAX_IP];
  float fp[8];
} mxn_op_call;

/* One message of a grouped exchange (ABI 10): `bytes` from (send) or into (receive) the device
 * buffer at `offset`, to or from rank `peer` of the group's communicator. */
typedef struct mxn_message {
  void* buffer;
  uint64_t offset, bytes;
  int32_t peer;
  int32_t receive; /* 1: receive into the buffer, 0: send from it */
} mxn_message;

typedef struct mxn_device_props {
  size_t struct_size;
  char name[128];
  char vendor[64];
  uint64_t memory_bytes;
  double peak_gflops;  /* nominal f32, 0 when unknown */
  uint32_t dtype_mask; /* bit (1 << mxn_dtype) per dtype the kernels accept */
  char notes[256];     /* e.g. "bf16 matmul emulated in f32 (no AVX512-BF16/AMX)" */
} mxn_device_props;

typedef struct mxn_backend_options {
  size_t struct_size;
  int32_t threads; /* 0: the machine's choice */
} mxn_backend_options;

typedef struct mxn_backend_api {
  size_t struct_size;
  uint32_t abi_version;
  const char* name; /* static; e.g. "cpu" */

  int32_t (*device_count)(void);
  int32_t (*device_props)(int32_t device, mxn_device_props* out);

  /* *ctx lives until shutdown(ctx). */
  int32_t (*init)(int32_t device, const mxn_backend_options* opts, void** ctx);
  void (*shutdown)(void* ctx);
  const char* (*last_error)(void* ctx);

  /* *out lives until buffer_free. */
  int32_t (*buffer_alloc)(void* ctx, uint64_t bytes, void** out);
  void (*buffer_free)(void* ctx, void* buffer);
  int32_t (*copy_to_device)(void* ctx, void* dst, uint64_t dst_offset, const void* src,
                            uint64_t bytes);
  int32_t (*copy_to_host)(void* ctx, void* dst, const void* src, uint64_t src_offset,
                          uint64_t bytes);

  /* 1 when the kernel for `op` accepts tensors of `dtype`. */
  int32_t (*supports)(void* ctx, int32_t op, int32_t dtype);
  /* Enqueues one kernel on the device's queue. */
  int32_t (*run)(void* ctx, const mxn_op_call* call);
  /* The fence: returns when everything enqueued so far is done (collectives included). */
  int32_t (*synchronize)(void* ctx);

  /* --- optional: device-direct collectives (added after ABI 1's first table) ---------------
   * Among ranks whose devices all use this backend, e.g. NCCL among CUDA GPUs. A backend
   * without them sets these to NULL or returns a shorter table (struct_size ends before them);
   * mxn then reduces through host memory over MPI. mxn carries the id between ranks.
   *   comm_id(ctx, NULL): 0 if collectives can run here (the library is present), else a status.
   *   comm_id(ctx, id): rank 0 makes the job's id; every rank then calls comm_init with it
   *   (collective: it returns when every rank has joined).
   *   all_reduce_sum: enqueues an in-place sum over ranks of `count` f32 at buffer + offset; it
   *   may overlap kernels enqueued after it, until comm_wait, which makes everything enqueued
   *   afterwards wait for every collective so far. */
  int32_t (*comm_id)(void* ctx, uint8_t* id /* MXN_COMM_ID_BYTES */);
  int32_t (*comm_init)(void* ctx, const uint8_t* id, int32_t world, int32_t rank);
  int32_t (*all_reduce_sum)(void* ctx, void* buffer, uint64_t offset, uint64_t count);
  int32_t (*comm_wait)(void* ctx);

  /* Optional: bytes the device could still allocate now (NULL: mxn assumes memory_bytes). */
  int32_t (*memory_free)(void* ctx, uint64_t* out);

  /* Optional (ABI 7): a setting of this device by name; MXN_STATUS_UNSUPPORTED for a key the
   * backend does not know. The CPU backend's "gemm_split" (1: single GEMMs hand their columns out
   * in chunks that any thread takes, for when other work shares the cores, as under mxn serve;
   * 0: oneDNN's static split, the default). */
  int32_t (*set_option)(void* ctx, const char* key, int64_t value);

  /* Optional (ABI 8): 1 when run() would accept this call (its operands' dtypes and shapes and
   * its parameters), else 0 with the reason in last_error. The backend states each rule once, as
   * ggml's supports_op sees the whole node: run() refuses exactly the calls this refuses. */
  int32_t (*supports_call)(void* ctx, const mxn_op_call* call);

  /* Optional (ABI 10): device-direct messages within a group of ranks (NCCL's grouped
   * ncclSend/ncclRecv among CUDA GPUs): expert parallelism's all-to-all without the host.
   *   comm_init_group(ctx, group, id, world, rank): communicator `group` (1 to
   *   MXN_COMM_GROUPS - 1; 0 is comm_init's) over the ranks given the same id, made by the group's
   *   rank 0 with comm_id; collective over the group. With id NULL: 0 if messages can run here
   *   (the library has them), else a status.
   *   exchange(ctx, group, messages, n): enqueues the n messages as one group on the kernels'
   *   queue, after the kernels enqueued before it and before those after. Between two ranks the
   *   messages are matched in the order each lists them (equal sizes); a rank may send to itself.
   */
  int32_t (*comm_init_group)(void* ctx, int32_t group, const uint8_t* id, int32_t world,
                             int32_t rank);
  int32_t (*exchange)(void* ctx, int32_t group, const mxn_message* messages, int32_t n);
} mxn_backend_api;

/* The first table of ABI 1, which every backend must fill; the collectives follow it. */
#define MXN_BACKEND_API_CORE_SIZE offsetof(mxn_backend_api, comm_id)

/* The one symbol a backend plugin exports. */
typedef const mxn_backend_api* (*mxn_backend_get_api_fn)(void);

#ifdef __cplusplus
}
#endif
#endif
