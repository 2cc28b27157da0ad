// The kernel interface every lora-native backend implements: the CPU backend in native/cpu and the
// CUDA backend in cuda/. The binding only ever calls through this class, so a backend plugs in
// without the binding changing. It holds no N-API types and no CUDA types.
//
// Dimensions, named once and used everywhere:
//   N  rows (batch x sequence)       C  in-features        OC  out-features       R  rank
// Every pointer is device memory of the backend that receives it; shapes are row-major and
// contiguous unless a stride says otherwise. Gradients are d-prefixed; accumulating outputs say
// "+=". Every method returns a Status; only the binding turns a Status into a JS exception.
#pragma once

#include <cstddef>
#include <cstdint>

namespace lora {

// The version of this interface. liblora_cuda.so is a separate library built against this file, and
// the addon refuses one built against another version (a different vtable would call the wrong
// methods). Bump it with every change to this file's code; test/build.test.ts keeps a digest of
// the file (comments and blank space aside) for each version and fails when they drift apart.
constexpr int32_t kBackendAbiVersion = 3;

enum class Status : int32_t {
  Ok = 0,
  OutOfMemory = 1,      // allocation failed
  InvalidArgument = 2,  // a size or pointer the caller should have checked
  Unsupported = 3,      // this backend does not implement the op (or not for this dtype)
  DeviceError = 4,      // the device reported an error; last_error() has its text
  Unusable = 5,         // a sticky device error earlier; the backend refuses all work
};

enum class DType : int32_t { F32 = 0, BF16 = 1, F16 = 2, I32 = 3 };

inline size_t dtype_size(DType t) { return t == DType::BF16 || t == DType::F16 ? 2 : 4; }

enum class UnaryOp : int32_t {
  Neg = 0, Exp, Log, Sqrt, Rsqrt, Abs, Square, Recip,
  Relu, GeluTanh, GeluErf, Silu, Tanh, Sigmoid,
};

enum class BinaryOp : int32_t { Add = 0, Sub, Mul, Div, Max, Min };

enum class ReduceOp : int32_t { Sum = 0, Max, Min };

// At most this many dimensions in a strided op (broadcasting, permute, slice, concat).
constexpr int kMaxDims = 8;

// A strided view used by elementwise and copy ops: element (i0..i{nd-1}) lives at
// sum(ik * stride[k]) elements from the base pointer. A stride of 0 broadcasts.
struct Layout {
  int32_t ndim;
  int64_t shape[kMaxDims];
  int64_t stride[kMaxDims];
};

// One attention call's sizes and masks. B batch, T queries, S keys, H query heads, KVH key/value
// heads (H % KVH == 0: GQA/MQA without repeating k, v), D head dim. Query i sits at absolute
// position p_i = S - T + i (T new tokens after S - T cached ones), and key j is visible to it iff
//   (!causal || j <= p_i) && (window == 0 || j > p_i - window)    (transformers' sliding window)
//   && (key_mask == nullptr || key_mask[b][j] != 0)               (padding, left or right)
//   && (segment_ids == nullptr || segment_ids[b][j] == segment_ids[b][p_i])   (packed sequences)
// k, v (and dk, dv) may be the first S positions of a preallocated cache (B, Smax, KVH, D): their
// batch entries are kv_batch_stride elements apart. The masks are int32 device memory.
struct AttentionArgs {
  int64_t B = 0, T = 0, S = 0, H = 0, KVH = 0, D = 0;
  int64_t kv_batch_stride = 0;           // S·KVH·D when contiguous
  const int32_t* key_mask = nullptr;     // (B, key_mask_stride), 1 attend / 0 padding, or nullptr
  int64_t key_mask_stride = 0;
  const int32_t* segment_ids = nullptr;  // (B, segment_stride), or nullptr
  int64_t segment_stride = 0;
  int64_t window = 0;                    // 0: no sliding window
  float scale = 1.0f;
  bool causal = true;
};

// True when the sizes describe a problem both backends accept: nothing negative, H a multiple
// of KVH, the queries the last T of the S positions (T <= S), positions within int32, strides
// long enough. Backends return InvalidArgument otherwise.
inline bool attention_args_valid(const AttentionArgs& a) {
  if (a.B < 0 || a.T < 0 || a.S < 0 || a.H < 0 || a.KVH < 0 || a.D < 0 || a.window < 0) return false;
  if (a.H > 0 && (a.KVH <= 0 || a.H % a.KVH != 0)) return false;
  if (a.T > a.S || a.S > 0x7fffffff) return false;
  if (a.B > 1 && a.kv_batch_stride < a.S * a.KVH * a.D) return false;
  if (a.key_mask && a.B > 1 && a.key_mask_stride < a.S) return false;
  if (a.segment_ids && a.B > 1 && a.segment_stride < a.S) return false;
  return true;
}

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;
  // Text of the most recent DeviceError / Unusable status ("" if none).
  virtual const char* last_error() const { return ""; }
  // True after a sticky device error: every call fails from then on (alloc returns nullptr).
  virtual bool unusable() const { return false; }

  // ---- memory ------------------------------------------------------------------------------
  // alloc returns nullptr on failure. Memory is not zeroed. free takes the size alloc was given
  // (the caching allocators bucket by size).
  virtual void* alloc(size_t bytes) = 0;
  virtual void free(void* ptr, size_t bytes) = 0;
  virtual Status upload(void* dst, const void* host_src, size_t bytes) = 0;
  virtual Status download(void* host_dst, const void* src, size_t bytes) = 0;
  virtual Status copy(void* dst, const void* src, size_t bytes) = 0;
  virtual Status fill(float* out, float value, int64_t n) = 0;
  virtual Status synchronize() { return Status::Ok; }
  // Bytes held by the caching allocator but not handed out (for memory()).
  virtual size_t cached_bytes() const { return 0; }
  virtual void release_cached() {}
  // Conversions between float32 and storage dtypes (bf16/f16 weights): out = convert(in).
  virtual Status convert(void* out, DType out_dtype, const void* in, DType in_dtype, int64_t n) {
    (void)out; (void)out_dtype; (void)in; (void)in_dtype; (void)n;
    return Status::Unsupported;
  }

  // ---- LoRA kernels ------------------------------------------------------------------------
  // Forward, with dropout p on the LoRA path only (x̃ = dropout(x) from the counter RNG, seed):
  //   h = x̃·Aᵀ;  y = x·Wᵀ + b + s·h·Bᵀ
  virtual Status lora_forward(float* y,         // (N, OC)
                              float* h,         // (N, R), kept for the backward
                              const float* x,   // (N, C)
                              const void* W,    // (OC, C) in w_dtype (F32 or BF16)
                              DType w_dtype,
                              const float* b,   // (OC) or nullptr
                              const float* A,   // (R, C)
                              const float* B,   // (OC, R)
                              int64_t N, int64_t C, int64_t OC, int64_t R, float s,
                              float dropout_p, uint64_t seed) = 0;

  // Backward, W and b frozen:
  //   dB += s·dyᵀ·h;  dh = s·dy·B;  dA += dhᵀ·x̃;  dx = dy·W + dropout'(dh·A)
  // dx, dA, dB may each be nullptr when not needed.
  virtual Status lora_backward(float* dx,        // (N, C) or nullptr
                               float* dA,        // (R, C), +=
                               float* dB,        // (OC, R), +=
                               const float* dy,  // (N, OC)
                               const float* x,   // (N, C)
                               const float* h,   // (N, R)
                               const void* W,    // (OC, C) in w_dtype
                               DType w_dtype,
                               const float* A,   // (R, C)
                               const float* B,   // (OC, R)
                               int64_t N, int64_t C, int64_t OC, int64_t R, float s,
                               float dropout_p, uint64_t seed) = 0;

  // W += s·B·A (unmerge passes -s). Computed in fp32 and rounded once for BF16 weights.
  virtual Status lora_merge(void* W,         // (OC, C) in w_dtype, +=
                            DType w_dtype,
                            const float* A,  // (R, C)
                            const float* B,  // (OC, R)
                            int64_t OC, int64_t C, int64_t R, float s) = 0;

  // ---- optimizers (one call over every parameter of an optimizer) ---------------------------
  // PyTorch's AdamW: p -= lr·wd·p; m = b1·m + (1-b1)·g; v = b2·v + (1-b2)·g²;
  //   p -= lr·(m / (1-b1^step)) / (sqrt(v / (1-b2^step)) + eps)
  virtual Status adamw_step(int32_t count, float* const* p, const float* const* g, float* const* m,
                            float* const* v, const int64_t* n, float lr, float beta1, float beta2,
                            float eps, float weight_decay, int64_t step) = 0;
  // PyTorch's SGD: g += wd·p; buf = g at step 1, else momentum·buf + (1-dampening)·g;
  //   g = nesterov ? g + momentum·buf : buf (when momentum != 0); p -= lr·g. buf may be nullptr
  //   entries when momentum == 0.
  virtual Status sgd_step(int32_t count, float* const* p, const float* const* g,
                          float* const* buf, const int64_t* n, float lr, float momentum,
                          float dampening, float weight_decay, bool nesterov, int64_t step) = 0;

  // ---- general ops for autograd -------------------------------------------------------------
  // C = alpha·op(A)·op(B) + beta·C for each of `batch` matrices; op(A) is (M, K), op(B) (K, N).
  // lda/ldb/ldc are row strides of the stored matrices; stride_* step between batch entries
  // (0 broadcasts one matrix over the batch).
  virtual Status gemm(float* Cm, const float* Am, const float* Bm, int64_t M, int64_t Nn,
                      int64_t K, bool trans_a, bool trans_b, int64_t lda, int64_t ldb,
                      int64_t ldc, float alpha, float beta, int64_t batch, int64_t stride_a,
                      int64_t stride_b, int64_t stride_c) = 0;
  // The same with B stored as bf16 bits (a frozen bf16 weight: y = x·Wᵀ, dx = dy·W read W in
  // place), A and C fp32, fp32 accumulation, A never rounded. Optional: a backend without it
  // returns Unsupported and the caller widens B to fp32 for gemm instead.
  virtual Status gemm_bf16(float* Cm, const float* Am, const uint16_t* Bm, int64_t M, int64_t Nn,
                           int64_t K, bool trans_a, bool trans_b, int64_t lda, int64_t ldb,
                           int64_t ldc, float alpha, float beta, int64_t batch, int64_t stride_a,
                           int64_t stride_b, int64_t stride_c) {
    (void)Cm; (void)Am; (void)Bm; (void)M; (void)Nn; (void)K; (void)trans_a; (void)trans_b;
    (void)lda; (void)ldb; (void)ldc; (void)alpha; (void)beta; (void)batch; (void)stride_a;
    (void)stride_b; (void)stride_c;
    return Status::Unsupported;
  }
  // out (contiguous, layout.shape) = a op b, each read through its own strides (broadcasting).
  virtual Status binary(BinaryOp op, float* out, const float* a, const float* b,
                        const Layout& a_layout, const Layout& b_layout) = 0;
  // out = a op scalar (or scalar op a when scalar_first), contiguous, n elements.
  virtual Status binary_scalar(BinaryOp op, float* out, const float* a, float scalar,
                               bool scalar_first, int64_t n) = 0;
  virtual Status unary(UnaryOp op, float* out, const float* in, int64_t n) = 0;
  // dx = dy · f'(x) (y = f(x) passed too, for ops whose derivative reads it)
  virtual Status unary_backward(UnaryOp op, float* dx, const float* dy, const float* x,
                                const float* y, int64_t n) = 0;
  // y += a·x
  virtual Status axpy(float* y, const float* x, float a, int64_t n) = 0;
  // Input viewed as (outer, dim, inner); out (outer, inner) = reduce over dim.
  virtual Status reduce(ReduceOp op, float* out, const float* in, int64_t outer, int64_t dim,
                        int64_t inner) = 0;
  // dst[dst_layout] = src[src_layout] for every index of src_layout.shape (the shapes match);
  // serves transpose, permute, slice, concat and their backwards.
  virtual Status copy_strided(float* dst, const Layout& dst_layout, const float* src,
                              const Layout& src_layout) = 0;

  // ---- ops with their own kernels (training issue; optional until implemented) -------------
  // softmax (or log-softmax) over the last dim of a (rows, cols) matrix.
  virtual Status softmax(float* out, const float* in, int64_t rows, int64_t cols, bool log) {
    (void)out; (void)in; (void)rows; (void)cols; (void)log;
    return Status::Unsupported;
  }
  virtual Status softmax_backward(float* dx, const float* dy, const float* y, int64_t rows,
                                  int64_t cols, bool log) {
    (void)dx; (void)dy; (void)y; (void)rows; (void)cols; (void)log;
    return Status::Unsupported;
  }
  // out = x·mask/(1-p) with the mask from the counter RNG (native/rng.h) at (seed, index).
  // The same call on dy is the backward.
  virtual Status dropout(float* out, const float* in, int64_t n, float p, uint64_t seed) {
    (void)out; (void)in; (void)n; (void)p; (void)seed;
    return Status::Unsupported;
  }

  // ---- normalisation, embedding, cross-entropy, attention (training issue; optional) -------
  // More sizes: V vocabulary (rows of an embedding table, classes of a cross-entropy);
  // attention's sizes are in AttentionArgs (q laid out (B, T, H, D) = (B, T, C), C = H·D).
  // int32 ids/targets outside [0, V) (other than ignore_index) make a kernel return
  // InvalidArgument before it writes anything.

  // y = (x - μ)·rstd·w + b over each row; μ, rstd = 1/sqrt(var + eps) kept for the backward.
  virtual Status layer_norm(float* y,           // (N, C)
                            float* mean,        // (N)
                            float* rstd,        // (N)
                            const float* x,     // (N, C)
                            const float* w,     // (C) or nullptr (ones)
                            const float* b,     // (C) or nullptr (zeros)
                            int64_t N, int64_t C, float eps) {
    (void)y; (void)mean; (void)rstd; (void)x; (void)w; (void)b; (void)N; (void)C; (void)eps;
    return Status::Unsupported;
  }
  // x̂ = (x - μ)·rstd; g = dy⊙w;  dx = rstd·(g - mean(g) - x̂·mean(g⊙x̂));
  // dw += Σ_rows dy⊙x̂;  db += Σ_rows dy
  virtual Status layer_norm_backward(float* dx,         // (N, C)
                                     float* dw,         // (C), += (or nullptr)
                                     float* db,         // (C), += (or nullptr)
                                     const float* dy,   // (N, C)
                                     const float* x,    // (N, C)
                                     const float* w,    // (C) or nullptr
                                     const float* mean, // (N)
                                     const float* rstd, // (N)
                                     int64_t N, int64_t C) {
    (void)dx; (void)dw; (void)db; (void)dy; (void)x; (void)w; (void)mean; (void)rstd; (void)N; (void)C;
    return Status::Unsupported;
  }
  // y = x·rstd·w, rstd = 1/sqrt(mean(x²) + eps) kept for the backward.
  virtual Status rms_norm(float* y,        // (N, C)
                          float* rstd,     // (N)
                          const float* x,  // (N, C)
                          const float* w,  // (C) or nullptr (ones)
                          int64_t N, int64_t C, float eps) {
    (void)y; (void)rstd; (void)x; (void)w; (void)N; (void)C; (void)eps;
    return Status::Unsupported;
  }
  // x̂ = x·rstd; g = dy⊙w;  dx = rstd·(g - x̂·mean(g⊙x̂));  dw += Σ_rows dy⊙x̂
  virtual Status rms_norm_backward(float* dx,         // (N, C)
                                   float* dw,         // (C), += (or nullptr)
                                   const float* dy,   // (N, C)
                                   const float* x,    // (N, C)
                                   const float* w,    // (C) or nullptr
                                   const float* rstd, // (N)
                                   int64_t N, int64_t C) {
    (void)dx; (void)dw; (void)dy; (void)x; (void)w; (void)rstd; (void)N; (void)C;
    return Status::Unsupported;
  }
  // out[n] = table[ids[n]]
  virtual Status embedding(float* out,            // (N, C)
                           const float* table,    // (V, C)
                           const int32_t* ids,    // (N)
                           int64_t N, int64_t V, int64_t C) {
    (void)out; (void)table; (void)ids; (void)N; (void)V; (void)C;
    return Status::Unsupported;
  }
  // dtable[ids[n]] += dout[n]
  virtual Status embedding_backward(float* dtable,        // (V, C), +=
                                    const float* dout,    // (N, C)
                                    const int32_t* ids,   // (N)
                                    int64_t N, int64_t V, int64_t C) {
    (void)dtable; (void)dout; (void)ids; (void)N; (void)V; (void)C;
    return Status::Unsupported;
  }
  // Per-row cross-entropy with label smoothing ε toward the uniform distribution q:
  //   lse = log Σ exp(z);  q = (1-ε)·onehot(t) + ε/V;  loss = lse - Σ q⊙z  (0 where t == ignore)
  virtual Status cross_entropy(float* loss,            // (N)
                               float* lse,             // (N), kept for the backward
                               const float* logits,    // (N, V)
                               const int32_t* targets, // (N)
                               int64_t N, int64_t V, int32_t ignore_index, float smoothing) {
    (void)loss; (void)lse; (void)logits; (void)targets; (void)N; (void)V; (void)ignore_index; (void)smoothing;
    return Status::Unsupported;
  }
  // dlogits = dloss[n]·(softmax(z) - q)  (0 for ignored rows)
  virtual Status cross_entropy_backward(float* dlogits,         // (N, V)
                                        const float* dloss,     // (N)
                                        const float* logits,    // (N, V)
                                        const float* lse,       // (N)
                                        const int32_t* targets, // (N)
                                        int64_t N, int64_t V, int32_t ignore_index,
                                        float smoothing) {
    (void)dlogits; (void)dloss; (void)logits; (void)lse; (void)targets; (void)N; (void)V;
    (void)ignore_index; (void)smoothing;
    return Status::Unsupported;
  }
  // Scaled dot-product attention, FlashAttention-2 style (AttentionArgs has the sizes and masks):
  //   s_ij = scale·q_i·k_j where visible(i, j), else -inf;  p_ij = softmax_j(s_ij);
  //   out_i = Σ_j p_ij·v_j;  lse_i = log Σ_j exp(s_ij)
  // Query head h reads key/value head h / (H/KVH) (GQA). A row with no visible key gets out_i = 0
  // and lse_i = +inf (so that the backward's exp(s - lse) is 0). Never stores the (T, S) matrix.
  virtual Status attention(float* out,       // (B, T, H, D)
                           float* lse,       // (B, H, T)
                           const float* q,   // (B, T, H, D)
                           const float* k,   // (B, S, KVH, D), batch stride kv_batch_stride
                           const float* v,   // (B, S, KVH, D), batch stride kv_batch_stride
                           const AttentionArgs& args) {
    (void)out; (void)lse; (void)q; (void)k; (void)v; (void)args;
    return Status::Unsupported;
  }
  // p_ij = exp(s_ij - lse_i) recomputed blockwise; δ_i = dout_i·out_i; dp_ij = dout_i·v_j;
  //   ds_ij = p_ij·(dp_ij - δ_i);  dq_i = scale·Σ_j ds_ij·k_j;
  //   dk_j = scale·Σ_i ds_ij·q_i, dv_j = Σ_i p_ij·dout_i, summed over the query heads of a kv head.
  // dk, dv are written (not accumulated) for keys 0..S-1; 0 where no query sees the key.
  virtual Status attention_backward(float* dq,          // (B, T, H, D)
                                    float* dk,          // (B, S, KVH, D), batch stride kv_batch_stride
                                    float* dv,          // (B, S, KVH, D), batch stride kv_batch_stride
                                    const float* dout,  // (B, T, H, D)
                                    const float* q,     // (B, T, H, D)
                                    const float* k,     // (B, S, KVH, D)
                                    const float* v,     // (B, S, KVH, D)
                                    const float* out,   // (B, T, H, D)
                                    const float* lse,   // (B, H, T)
                                    const AttentionArgs& args) {
    (void)dq; (void)dk; (void)dv; (void)dout; (void)q; (void)k; (void)v; (void)out; (void)lse; (void)args;
    return Status::Unsupported;
  }
};

// Human-readable name of a status, for error messages.
inline const char* status_name(Status s) {
  switch (s) {
    case Status::Ok: return "ok";
    case Status::OutOfMemory: return "out of memory";
    case Status::InvalidArgument: return "invalid argument";
    case Status::Unsupported: return "not supported by this backend";
    case Status::DeviceError: return "device error";
    case Status::Unusable: return "backend unusable after an earlier device error";
  }
  return "unknown status";
}

}  // namespace lora
