/* The kernel interface every lora-native backend implements: a C struct of function pointers
 * (after ggml-backend), filled in by the CPU backend (native/cpu/) and by the CUDA backend
 * (cuda/, a separately built library the addon dlopen()s). The binding calls only through it. It
 * is plain C so that the boundary across dlopen is a C ABI, not a C++ vtable; it holds no N-API
 * and no CUDA types.
 *
 * Dimensions, named once and used everywhere:
 *   N  rows (batch x sequence)       C  in-features        OC  out-features       R  rank
 *   V  vocabulary (rows of an embedding table, classes of a cross-entropy)
 *   RoPE: Bt batch, T sequence, H heads, D head dim, laid out (Bt, T, H, D)
 *   attention: B batch, T queries, S keys (of Smax cached), H query heads, KVH kv heads, D head dim
 * Every pointer is device memory of the backend that receives it; shapes are row-major and
 * contiguous unless a stride says otherwise. Gradients are d-prefixed; accumulating outputs say
 * "+=". Every kernel returns a lora_status; only the binding turns one into a JS exception.
 *
 * Compatibility across dlopen: the addon accepts a library whose abi_version equals its own and
 * whose table is at least LORA_BACKEND_MIN_SIZE bytes. New kernels are appended at the end of the
 * struct: an older library's shorter table then reads as null entries, which supports() reports
 * as unsupported. Reordering, removing or changing an entry bumps LORA_BACKEND_ABI_VERSION. The
 * first five fields never move (the loader reads them before it trusts the rest). */
#ifndef LORA_NATIVE_BACKEND_H
#define LORA_NATIVE_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LORA_BACKEND_ABI_VERSION 5  /* 5: embedding reads a bf16/f16 table (table_dtype); 4: attention takes the fused kernel's full problem; rms_norm and its backward take Gemma's weight offset */

typedef enum lora_status {
  LORA_OK = 0,
  LORA_OUT_OF_MEMORY = 1,      /* allocation failed */
  LORA_INVALID_ARGUMENT = 2,   /* a size or pointer the caller should have checked */
  LORA_UNSUPPORTED = 3,        /* this backend does not implement the op (or not for this dtype) */
  LORA_DEVICE_ERROR = 4,       /* the device reported an error; last_error() has its text */
  LORA_UNUSABLE = 5,           /* a sticky device error earlier; the backend refuses all work */
} lora_status;

typedef enum lora_dtype { LORA_F32 = 0, LORA_BF16, LORA_F16, LORA_I32, LORA_DTYPE_COUNT } lora_dtype;

typedef enum lora_unary_op {
  LORA_UNARY_NEG = 0, LORA_UNARY_EXP, LORA_UNARY_LOG, LORA_UNARY_SQRT, LORA_UNARY_RSQRT,
  LORA_UNARY_ABS, LORA_UNARY_SQUARE, LORA_UNARY_RECIP, LORA_UNARY_RELU, LORA_UNARY_GELU_TANH,
  LORA_UNARY_GELU_ERF, LORA_UNARY_SILU, LORA_UNARY_TANH, LORA_UNARY_SIGMOID, LORA_UNARY_COUNT
} lora_unary_op;

typedef enum lora_binary_op {
  LORA_BINARY_ADD = 0, LORA_BINARY_SUB, LORA_BINARY_MUL, LORA_BINARY_DIV, LORA_BINARY_MAX,
  LORA_BINARY_MIN, LORA_BINARY_COUNT
} lora_binary_op;

typedef enum lora_reduce_op { LORA_REDUCE_SUM = 0, LORA_REDUCE_MAX, LORA_REDUCE_MIN, LORA_REDUCE_COUNT } lora_reduce_op;

/* One id per kernel entry, for supports(op, dtype) and for the names the addon exports. The
 * dtype of a query is the one the entry varies on (the weight of the LoRA kernels, B of gemm);
 * F32 for the others. */
typedef enum lora_op {
  LORA_OP_CONVERT = 0, LORA_OP_LORA_FORWARD, LORA_OP_LORA_BACKWARD, LORA_OP_LORA_MERGE,
  LORA_OP_ADAMW_STEP, LORA_OP_SGD_STEP, LORA_OP_GEMM, LORA_OP_BINARY, LORA_OP_BINARY_SCALAR,
  LORA_OP_UNARY, LORA_OP_UNARY_BACKWARD, LORA_OP_AXPY, LORA_OP_REDUCE, LORA_OP_COPY_STRIDED,
  LORA_OP_SOFTMAX, LORA_OP_SOFTMAX_BACKWARD, LORA_OP_DROPOUT, LORA_OP_LAYER_NORM,
  LORA_OP_LAYER_NORM_BACKWARD, LORA_OP_RMS_NORM, LORA_OP_RMS_NORM_BACKWARD, LORA_OP_EMBEDDING,
  LORA_OP_EMBEDDING_BACKWARD, LORA_OP_CROSS_ENTROPY, LORA_OP_CROSS_ENTROPY_BACKWARD,
  LORA_OP_ATTENTION, LORA_OP_ATTENTION_BACKWARD, LORA_OP_ROPE, LORA_OP_ROPE_BACKWARD,
  LORA_OP_GATED_ACT, LORA_OP_GATED_ACT_BACKWARD, LORA_OP_GEMM_SHARED_A,
  LORA_OP_COUNT
} lora_op;

/* The names JavaScript uses for these ids (the addon exports them; test/binding.test.ts checks them
 * against lib/native.ts). Ops are named as their binding functions. */
static inline const char* lora_dtype_name(int32_t t) {
  static const char* const names[LORA_DTYPE_COUNT] = {"float32", "bfloat16", "float16", "int32"};
  return t >= 0 && t < LORA_DTYPE_COUNT ? names[t] : "";
}
static inline const char* lora_unary_name(int32_t op) {
  static const char* const names[LORA_UNARY_COUNT] = {
      "neg", "exp", "log", "sqrt", "rsqrt", "abs", "square", "recip", "relu", "geluTanh",
      "geluErf", "silu", "tanh", "sigmoid"};
  return op >= 0 && op < LORA_UNARY_COUNT ? names[op] : "";
}
static inline const char* lora_binary_name(int32_t op) {
  static const char* const names[LORA_BINARY_COUNT] = {"add", "sub", "mul", "div", "max", "min"};
  return op >= 0 && op < LORA_BINARY_COUNT ? names[op] : "";
}
static inline const char* lora_reduce_name(int32_t op) {
  static const char* const names[LORA_REDUCE_COUNT] = {"sum", "max", "min"};
  return op >= 0 && op < LORA_REDUCE_COUNT ? names[op] : "";
}
static inline const char* lora_op_name(int32_t op) {
  static const char* const names[LORA_OP_COUNT] = {
      "convert", "loraForward", "loraBackward", "loraMerge", "adamwStep", "sgdStep", "gemm",
      "binary", "binaryScalar", "unary", "unaryBackward", "axpy", "reduce", "copyStrided",
      "softmax", "softmaxBackward", "dropout", "layerNorm", "layerNormBackward", "rmsNorm",
      "rmsNormBackward", "embedding", "embeddingBackward", "crossEntropy", "crossEntropyBackward",
      "attention", "attentionBackward", "rope", "ropeBackward", "gatedAct", "gatedActBackward", "gemmSharedA"};
  return op >= 0 && op < LORA_OP_COUNT ? names[op] : "";
}

static inline size_t lora_dtype_size(lora_dtype t) { return t == LORA_BF16 || t == LORA_F16 ? 2 : 4; }

/* At most this many dimensions in a strided op (broadcasting, permute, slice, concat). */
#define LORA_MAX_DIMS 8

/* A strided view used by elementwise and copy ops: element (i0..i{ndim-1}) lives at
 * sum(ik * stride[k]) elements from the base pointer. A stride of 0 broadcasts. */
typedef struct lora_layout {
  int32_t ndim;
  int64_t shape[LORA_MAX_DIMS];
  int64_t stride[LORA_MAX_DIMS];
} lora_layout;

typedef struct lora_backend lora_backend;

struct lora_backend {
  /* ---- header: these five never move --------------------------------------------------------- */
  uint32_t abi_version;  /* LORA_BACKEND_ABI_VERSION of the code that filled the table */
  uint32_t struct_size;  /* sizeof(lora_backend) there */
  const char* name;      /* "cpu", "cuda" */
  void* ctx;             /* the backend's own state */
  void (*destroy)(lora_backend* be);  /* frees ctx and the table */

  /* Text of the most recent DeviceError / Unusable status ("" if none). */
  const char* (*last_error)(lora_backend* be);
  /* True after a sticky device error: every call fails from then on (alloc returns NULL). */
  bool (*unusable)(lora_backend* be);
  /* Whether the entry for `op` computes with `dtype` (see lora_op). NULL: every non-NULL entry, F32
   * only. A NULL entry is never supported. */
  bool (*supports)(lora_backend* be, int32_t op, int32_t dtype);

  /* ---- memory ------------------------------------------------------------------------------- */
  /* alloc returns NULL on failure. Memory is not zeroed. free takes the size alloc was given
   * (the caching allocators bucket by size). */
  void* (*alloc)(lora_backend* be, size_t bytes);
  void (*free)(lora_backend* be, void* ptr, size_t bytes);
  lora_status (*upload)(lora_backend* be, void* dst, const void* host_src, size_t bytes);
  lora_status (*download)(lora_backend* be, void* host_dst, const void* src, size_t bytes);
  lora_status (*copy)(lora_backend* be, void* dst, const void* src, size_t bytes);
  lora_status (*fill)(lora_backend* be, float* out, float value, int64_t n);
  lora_status (*synchronize)(lora_backend* be);  /* optional */
  /* Bytes held by the caching allocator but not handed out (for memory()). */
  size_t (*cached_bytes)(lora_backend* be);
  void (*release_cached)(lora_backend* be);
  /* out = convert(in), between float32 and the storage dtypes (bf16/f16 weights). */
  lora_status (*convert)(lora_backend* be, void* out, lora_dtype out_dtype, const void* in,
                         lora_dtype in_dtype, int64_t n);

  /* ---- LoRA ----------------------------------------------------------------------------------- */
  /* Forward, with dropout p on the LoRA path only (x̃ = dropout(x) from the counter RNG, seed):
   *   h = x̃·Aᵀ;  y = x·Wᵀ + b + s·h·Bᵀ */
  lora_status (*lora_forward)(lora_backend* be,
                              float* y,         /* (N, OC) */
                              float* h,         /* (N, R), kept for the backward */
                              const float* x,   /* (N, C) */
                              const void* W,    /* (OC, C) in w_dtype (F32 or BF16) */
                              lora_dtype w_dtype,
                              const float* bias, /* (OC) or NULL */
                              const float* A,   /* (R, C) */
                              const float* B,   /* (OC, R) */
                              int64_t N, int64_t C, int64_t OC, int64_t R, float s,
                              float dropout_p, uint64_t seed);
  /* Backward, W and b frozen:
   *   dB += s·dyᵀ·h;  dh = s·dy·B;  dA += dhᵀ·x̃;  dx = dy·W + dropout'(dh·A)
   * dx, dA, dB may each be NULL when not needed. */
  lora_status (*lora_backward)(lora_backend* be,
                               float* dx,        /* (N, C) or NULL */
                               float* dA,        /* (R, C), += (or NULL) */
                               float* dB,        /* (OC, R), += (or NULL) */
                               const float* dy,  /* (N, OC) */
                               const float* x,   /* (N, C) */
                               const float* h,   /* (N, R) */
                               const void* W,    /* (OC, C) in w_dtype */
                               lora_dtype w_dtype,
                               const float* A,   /* (R, C) */
                               const float* B,   /* (OC, R) */
                               int64_t N, int64_t C, int64_t OC, int64_t R, float s,
                               float dropout_p, uint64_t seed);
  /* W += s·B·A (unmerge passes -s). Computed in fp32 and rounded once for BF16 weights. */
  lora_status (*lora_merge)(lora_backend* be,
                            void* W,         /* (OC, C) in w_dtype, += */
                            lora_dtype w_dtype,
                            const float* A,  /* (R, C) */
                            const float* B,  /* (OC, R) */
                            int64_t OC, int64_t C, int64_t R, float s);

  /* ---- optimizers (one call over every parameter of an optimizer) ------------------------------ */
  /* PyTorch's AdamW: p -= lr·wd·p; m = b1·m + (1-b1)·g; v = b2·v + (1-b2)·g²;
   *   p -= lr·(m / (1-b1^step)) / (sqrt(v / (1-b2^step)) + eps) */
  lora_status (*adamw_step)(lora_backend* be, int32_t count, float* const* p, const float* const* g,
                            float* const* m, float* const* v, const int64_t* n, float lr,
                            float beta1, float beta2, float eps, float weight_decay, int64_t step);
  /* PyTorch's SGD: g += wd·p; buf = g at step 1, else momentum·buf + (1-dampening)·g;
   *   g = nesterov ? g + momentum·buf : buf (when momentum != 0); p -= lr·g. buf may be NULL
   *   (and its entries NULL) when momentum == 0. */
  lora_status (*sgd_step)(lora_backend* be, int32_t count, float* const* p, const float* const* g,
                          float* const* buf, const int64_t* n, float lr, float momentum,
                          float dampening, float weight_decay, bool nesterov, int64_t step);

  /* ---- general ops for autograd -------------------------------------------------------------- */
  /* C = alpha·op(A)·op(B) + beta·C for each of `batch` matrices; op(A) is (M, K), op(B) (K, Nn).
   * lda/ldb/ldc are row strides of the stored matrices; stride_* step between batch entries
   * (0 broadcasts one matrix over the batch). */
  lora_status (*gemm)(lora_backend* be, float* Cm, const float* Am, const float* Bm, int64_t M,
                      int64_t Nn, int64_t K, bool trans_a, bool trans_b, int64_t lda, int64_t ldb,
                      int64_t ldc, float alpha, float beta, int64_t batch, int64_t stride_a,
                      int64_t stride_b, int64_t stride_c);
  /* The same with B stored as bf16 bits (a frozen bf16 weight: y = x·Wᵀ, dx = dy·W read W in
   * place), A and C fp32, fp32 accumulation, A never rounded. supports(GEMM, BF16) is this entry. */
  lora_status (*gemm_bf16)(lora_backend* be, float* Cm, const float* Am, const uint16_t* Bm,
                           int64_t M, int64_t Nn, int64_t K, bool trans_a, bool trans_b,
                           int64_t lda, int64_t ldb, int64_t ldc, float alpha, float beta,
                           int64_t batch, int64_t stride_a, int64_t stride_b, int64_t stride_c);
  /* out (contiguous, a_layout->shape) = a op b, each read through its own strides (broadcasting). */
  lora_status (*binary)(lora_backend* be, lora_binary_op op, float* out, const float* a,
                        const float* b, const lora_layout* a_layout, const lora_layout* b_layout);
  /* out = a op scalar (or scalar op a when scalar_first), contiguous, n elements. */
  lora_status (*binary_scalar)(lora_backend* be, lora_binary_op op, float* out, const float* a,
                               float scalar, bool scalar_first, int64_t n);
  lora_status (*unary)(lora_backend* be, lora_unary_op op, float* out, const float* in, int64_t n);
  /* dx = dy · f'(x) (y = f(x) passed too, for ops whose derivative reads it; either may be NULL
   * when the derivative does not read it) */
  lora_status (*unary_backward)(lora_backend* be, lora_unary_op op, float* dx, const float* dy,
                                const float* x, const float* y, int64_t n);
  /* y += a·x */
  lora_status (*axpy)(lora_backend* be, float* y, const float* x, float a, int64_t n);
  /* Input viewed as (outer, dim, inner); out (outer, inner) = reduce over dim. */
  lora_status (*reduce)(lora_backend* be, lora_reduce_op op, float* out, const float* in,
                        int64_t outer, int64_t dim, int64_t inner);
  /* dst[dst_layout] = src[src_layout] for every index of src_layout->shape (the shapes match);
   * serves transpose, permute, slice, concat and their backwards. */
  lora_status (*copy_strided)(lora_backend* be, float* dst, const lora_layout* dst_layout,
                              const float* src, const lora_layout* src_layout);
  /* softmax (or log-softmax) over the last dim of a (rows, cols) matrix. */
  lora_status (*softmax)(lora_backend* be, float* out, const float* in, int64_t rows, int64_t cols,
                         bool log);
  /* softmax: dx = y ⊙ (dy - Σ dy⊙y);  log-softmax: dx = dy - exp(y)·Σ dy */
  lora_status (*softmax_backward)(lora_backend* be, float* dx, const float* dy, const float* y,
                                  int64_t rows, int64_t cols, bool log);
  /* out = x·mask/(1-p) with the mask from the counter RNG (native/backend/rng.h) at (seed, index).
   * The same call on dy is the backward. */
  lora_status (*dropout)(lora_backend* be, float* out, const float* in, int64_t n, float p,
                         uint64_t seed);

  /* ---- normalisation, embedding, cross-entropy, attention ------------------------------------ */
  /* int32 ids/targets outside [0, V) (other than ignore_index) make a kernel return
   * LORA_INVALID_ARGUMENT before it writes anything. */

  /* y = (x - μ)·rstd·w + b over each row; μ, rstd = 1/sqrt(var + eps) kept for the backward. */
  lora_status (*layer_norm)(lora_backend* be,
                            float* y,           /* (N, C) */
                            float* mean,        /* (N) */
                            float* rstd,        /* (N) */
                            const float* x,     /* (N, C) */
                            const float* w,     /* (C) or NULL (ones) */
                            const float* bias,  /* (C) or NULL (zeros) */
                            int64_t N, int64_t C, float eps);
  /* x̂ = (x - μ)·rstd; g = dy⊙w;  dx = rstd·(g - mean(g) - x̂·mean(g⊙x̂));
   * dw += Σ_rows dy⊙x̂;  db += Σ_rows dy */
  lora_status (*layer_norm_backward)(lora_backend* be,
                                     float* dx,          /* (N, C) */
                                     float* dw,          /* (C), += (or NULL) */
                                     float* db,          /* (C), += (or NULL) */
                                     const float* dy,    /* (N, C) */
                                     const float* x,     /* (N, C) */
                                     const float* w,     /* (C) or NULL */
                                     const float* mean,  /* (N) */
                                     const float* rstd,  /* (N) */
                                     int64_t N, int64_t C);
  /* y = x·rstd·(offset + w), rstd = 1/sqrt(mean(x²) + eps) kept for the backward. offset is 0,
   * or 1 for Gemma's (1 + w) norms (the weight is read as stored, never rewritten). w NULL: y =
   * x·rstd (no scale; offset unused). */
  lora_status (*rms_norm)(lora_backend* be,
                          float* y,        /* (N, C) */
                          float* rstd,     /* (N) */
                          const float* x,  /* (N, C) */
                          const float* w,  /* (C) or NULL (no scale) */
                          int64_t N, int64_t C, float eps, float offset);
  /* x̂ = x·rstd; g = dy⊙(offset + w);  dx = rstd·(g - x̂·mean(g⊙x̂));  dw += Σ_rows dy⊙x̂ */
  lora_status (*rms_norm_backward)(lora_backend* be,
                                   float* dx,          /* (N, C) */
                                   float* dw,          /* (C), += (or NULL) */
                                   const float* dy,    /* (N, C) */
                                   const float* x,     /* (N, C) */
                                   const float* w,     /* (C) or NULL */
                                   const float* rstd,  /* (N) */
                                   int64_t N, int64_t C, float offset);
  /* out[n] = float(table[ids[n]]); supports(EMBEDDING, dtype) is whether table_dtype may be dtype */
  lora_status (*embedding)(lora_backend* be,
                           float* out,          /* (N, C) */
                           const void* table,   /* (V, C) in table_dtype (F32, BF16 or F16) */
                           lora_dtype table_dtype,
                           const int32_t* ids,  /* (N) */
                           int64_t N, int64_t V, int64_t C);
  /* dtable[ids[n]] += dout[n] */
  lora_status (*embedding_backward)(lora_backend* be,
                                    float* dtable,       /* (V, C), += */
                                    const float* dout,   /* (N, C) */
                                    const int32_t* ids,  /* (N) */
                                    int64_t N, int64_t V, int64_t C);
  /* Per-row cross-entropy with label smoothing ε toward the uniform distribution q:
   *   lse = log Σ exp(z);  q = (1-ε)·onehot(t) + ε/V;  loss = lse - Σ q⊙z  (0 where t == ignore;
   *   with ε = 0 only z[t] is read, so -inf logits elsewhere give a finite loss) */
  lora_status (*cross_entropy)(lora_backend* be,
                               float* loss,             /* (N) */
                               float* lse,              /* (N), kept for the backward */
                               const float* logits,     /* (N, V) */
                               const int32_t* targets,  /* (N) */
                               int64_t N, int64_t V, int32_t ignore_index, float smoothing);
  /* dlogits = dloss[n]·(softmax(z) - q)  (0 for ignored rows); dlogits may be logits (in place) */
  lora_status (*cross_entropy_backward)(lora_backend* be,
                                        float* dlogits,          /* (N, V) */
                                        const float* dloss,      /* (N) */
                                        const float* logits,     /* (N, V) */
                                        const float* lse,        /* (N) */
                                        const int32_t* targets,  /* (N) */
                                        int64_t N, int64_t V, int32_t ignore_index,
                                        float smoothing);
  /* Scaled dot-product attention, FlashAttention-2 style: never stores the (T, S) matrix.
   * B batch, T queries, S keys, H query heads, KVH key/value heads (H % KVH == 0; query head h
   * reads kv head h / (H/KVH), GQA/MQA without repeating k, v), D head dim. k, v (dk, dv) hold
   * Smax >= S positions per batch entry (a preallocated KV cache); the first S take part. Query i
   * sits at position p_i = S - T + i, and key j is visible to it iff
   *   (!causal || j <= p_i) && (window == 0 || j > p_i - window)   (transformers' sliding window)
   *   && (key_mask == NULL || key_mask[b][j] != 0)                  (padding, left or right)
   *   && (segment_ids == NULL || segment_ids[b][j] == segment_ids[b][p_i])  (packed sequences)
   *   s_ij = scale·q_i·k_j where visible, else -inf;  p_ij = softmax_j(s_ij);
   *   out_i = Σ_j p_ij·v_j;  lse_i = log Σ_j exp(s_ij)
   * A row with no visible key gets out_i = 0 and lse_i = +inf (the backward's exp(s - lse) is 0).
   * native/backend/attention.h gathers the sizes into one AttentionArgs and checks them
   * (LORA_INVALID_ARGUMENT unless T <= S <= Smax, H % KVH == 0, strides >= S, ...). */
  lora_status (*attention)(lora_backend* be,
                           float* out,                  /* (B, T, H, D) */
                           float* lse,                  /* (B, H, T) */
                           const float* q,              /* (B, T, H, D) */
                           const float* k,              /* (B, Smax, KVH, D) */
                           const float* v,              /* (B, Smax, KVH, D) */
                           const int32_t* key_mask,     /* (B, key_mask_stride) or NULL */
                           int64_t key_mask_stride,
                           const int32_t* segment_ids,  /* (B, segment_stride) or NULL */
                           int64_t segment_stride, int64_t B, int64_t T, int64_t S, int64_t Smax,
                           int64_t H, int64_t KVH, int64_t D, float scale, bool causal,
                           int64_t window);
  /* p_ij = exp(s_ij - lse_i) recomputed blockwise; δ_i = dout_i·out_i; dp_ij = dout_i·v_j;
   *   ds_ij = p_ij·(dp_ij - δ_i);  dq_i = scale·Σ_j ds_ij·k_j;
   *   dk_j = scale·Σ_i ds_ij·q_i, dv_j = Σ_i p_ij·dout_i, summed over the query heads of a kv head.
   * dk, dv are written (not accumulated) for keys 0..S-1 (0 where no query sees the key); their
   * positions S..Smax-1 are left untouched. */
  lora_status (*attention_backward)(lora_backend* be,
                                    float* dq,                   /* (B, T, H, D) */
                                    float* dk,                   /* (B, Smax, KVH, D) */
                                    float* dv,                   /* (B, Smax, KVH, D) */
                                    const float* dout,           /* (B, T, H, D) */
                                    const float* q,              /* (B, T, H, D) */
                                    const float* k,              /* (B, Smax, KVH, D) */
                                    const float* v,              /* (B, Smax, KVH, D) */
                                    const float* out,            /* (B, T, H, D) */
                                    const float* lse,            /* (B, H, T) */
                                    const int32_t* key_mask,     /* (B, key_mask_stride) or NULL */
                                    int64_t key_mask_stride,
                                    const int32_t* segment_ids,  /* (B, segment_stride) or NULL */
                                    int64_t segment_stride, int64_t B, int64_t T, int64_t S,
                                    int64_t Smax, int64_t H, int64_t KVH, int64_t D, float scale,
                                    bool causal, int64_t window);

  /* ---- rotary position embedding (transformers' rotate_half convention) ---------------------- */
  /* Rotates the first R (= rotary dim, even, <= D) features of every head by the angle of the
   * token's position; features R..D-1 pass through. Pairs are (i, i + R/2), not interleaved:
   *   θ_i = pos[bt, t]·inv_freq[i] (in fp32), c = a·cos θ_i, s = a·sin θ_i   (i < R/2)
   *   y_i = x_i·c - x_{i+R/2}·s;   y_{i+R/2} = x_{i+R/2}·c + x_i·s;   y_j = x_j (j >= R)
   * a is transformers' attention_scaling (1 for plain RoPE). y may be x (in place). The layout is
   * the one attention takes, (Bt, T, H, D) as a (Bt, T, H·D) projection reshapes to; transformers
   * applies the same rotation to (B, H, T, D) after its transpose. Positions are per token, so
   * left-padded batches and cached decoding (positions T0..T0+T-1) need nothing more. */
  lora_status (*rope)(lora_backend* be,
                      float* y,                  /* (Bt, T, H, D) */
                      const float* x,            /* (Bt, T, H, D) */
                      const int32_t* positions,  /* (Bt, T) */
                      const float* inv_freq,     /* (R/2) */
                      int64_t Bt, int64_t T, int64_t H, int64_t D, int64_t R, float a);
  /* The rotation is orthogonal up to a, so the backward rotates by -θ:
   *   dx_i = dy_i·c + dy_{i+R/2}·s;   dx_{i+R/2} = dy_{i+R/2}·c - dy_i·s;   dx_j = dy_j (j >= R) */
  lora_status (*rope_backward)(lora_backend* be,
                               float* dx,                 /* (Bt, T, H, D) */
                               const float* dy,           /* (Bt, T, H, D) */
                               const int32_t* positions,  /* (Bt, T) */
                               const float* inv_freq,     /* (R/2) */
                               int64_t Bt, int64_t T, int64_t H, int64_t D, int64_t R, float a);

  /* ---- gated activation (the GLU MLPs: SwiGLU with silu, GeGLU with geluTanh / geluErf) -------- */
  /* y = act(g)⊙u per element in one pass, act any lora_unary_op. g and u are read with row stride
   * ld (>= I): two (N, I) tensors with ld = I, or, with u NULL, the two halves of one (N, ld)
   * tensor whose rows are [gate (I) | up (I) | ...] (Phi-3's gate_up_proj output, ld >= 2I), read
   * in place. Other strides or a missing u with ld < 2I: LORA_INVALID_ARGUMENT. */
  lora_status (*gated_act)(lora_backend* be,
                           float* y,        /* (N, I) */
                           const float* g,  /* (N, ld): the gate in columns 0..I-1 */
                           const float* u,  /* (N, ld), or NULL: the up half is g's columns I..2I-1 */
                           int64_t N, int64_t I, int64_t ld, lora_unary_op act);
  /* a = act(g);  dg = dy⊙u⊙act'(g);  du = dy⊙a.  dg and du are laid out as g and u (du NULL
   * exactly when u is: the gradient of the up half goes to dg's columns I..2I-1). */
  lora_status (*gated_act_backward)(lora_backend* be,
                                    float* dg,        /* (N, ld) */
                                    float* du,        /* (N, ld) or NULL */
                                    const float* dy,  /* (N, I) */
                                    const float* g,   /* (N, ld) */
                                    const float* u,   /* (N, ld) or NULL */
                                    int64_t N, int64_t I, int64_t ld, lora_unary_op act);
  /* C[i] (M, N[i]) = A·B[i]ᵀ for the n products of one A (M, K) row-major (row stride lda), B[i]
   * (N[i], K) row-major, fp32 or bf16 bits (b_bf16), C[i] contiguous: the projections of one input
   * (q/k/v, gate/up) in one call, A packed once per thread (on decode's few rows, each B streamed
   * as gemm streams it alone, with the same results). NULL where a backend has none (then
   * one gemm per product). supports(GEMM_SHARED_A, F32 | BF16) is this entry, by B's dtype. */
  lora_status (*gemm_shared_a)(lora_backend* be, int32_t n, float* const* C, const float* A, int64_t lda,
                               const void* const* B, bool b_bf16, const int64_t* N, int64_t M, int64_t K);

  /* gemm_bf16 where the caller allows a bf16 dot product (linear() with matmulPrecision 'bf16'):
   * A may be rounded to bf16 (8 significant bits) for the product, accumulation stays fp32, so
   * each output is within 2^-8·Σ|a·b| of the exact sum. NULL where the backend has no such
   * product: the binding then calls gemm_bf16 (fp32 products). Same arguments as gemm_bf16. */
  lora_status (*gemm_bf16_dot)(lora_backend* be, float* Cm, const float* Am, const uint16_t* Bm,
                               int64_t M, int64_t Nn, int64_t K, bool trans_a, bool trans_b,
                               int64_t lda, int64_t ldb, int64_t ldc, float alpha, float beta,
                               int64_t batch, int64_t stride_a, int64_t stride_b, int64_t stride_c);

  /* gemm_shared_a for bf16 B where the caller allows a bf16 dot product (projections with
   * matmulPrecision 'bf16'): A may be rounded to bf16 for the products, as gemm_bf16_dot does, and
   * each result is gemm_bf16_dot's for that product. NULL where the backend has none: the binding
   * then calls gemm_shared_a (fp32 products). */
  lora_status (*gemm_shared_a_bf16_dot)(lora_backend* be, int32_t n, float* const* C, const float* A,
                                        int64_t lda, const uint16_t* const* B, const int64_t* N,
                                        int64_t M, int64_t K);
};

/* A library's table must reach at least the end of the memory entries to be used at all. */
#define LORA_BACKEND_MIN_SIZE offsetof(lora_backend, lora_forward)

/* The CUDA library's two exports (cuda/backend.cu): the interface version it was built against,
 * read before anything else, and the constructor (NULL with the reason in err on failure). */
typedef uint32_t (*lora_cuda_backend_abi_fn)(void);
typedef lora_backend* (*lora_cuda_backend_init_fn)(char* err, size_t err_len);

/* Human-readable name of a status, for error messages. */
static inline const char* lora_status_name(lora_status s) {
  switch (s) {
    case LORA_OK: return "ok";
    case LORA_OUT_OF_MEMORY: return "out of memory";
    case LORA_INVALID_ARGUMENT: return "invalid argument";
    case LORA_UNSUPPORTED: return "not supported by this backend";
    case LORA_DEVICE_ERROR: return "device error";
    case LORA_UNUSABLE: return "backend unusable after an earlier device error";
  }
  return "unknown status";
}

#ifdef __cplusplus
}  /* extern "C" */
#endif

#endif /* LORA_NATIVE_BACKEND_H */
