// Shared pieces of the CUDA backend: its state (Context, reached from every table entry through
// be->ctx), the registration each .cu file does for its kernels' entries, the launcher declarations
// the files share, the operand/epilogue descriptors of the GEMM engines, and small helpers. An op
// lives in three layers in its own file (after ggml): the __global__ kernel, a launcher that sizes
// the grid, launches on the backend's one stream and returns cudaGetLastError() (never
// synchronizing), and the table entry that checks its arguments and turns errors into a status.
// Nothing here knows about N-API; nothing reaches into native/ except native/backend/.
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "../native/backend/backend.h"
#include "../native/backend/rng.h"
#include "ptx.cuh"

namespace lora {
namespace cuda {

// Dimensions as in backend.h: N rows, C in-features, OC out-features, R rank.

// Dropout applied to a GEMM operand while it is loaded: element (row, col) of the stored matrix
// is kept when dropout_keep(seed, row*ld + col, p) and then scaled by 1/(1-p). p == 0: off.
struct OperandDropout {
  float p = 0.0f;
  float scale = 1.0f;  // 1/(1-p), computed on the host exactly as the CPU backend does
  uint64_t seed = 0;
  int64_t ld = 0;      // the row length used for the mask index (C for x)
};

__device__ __forceinline__ float apply_dropout(const OperandDropout& d, float v, int64_t row,
                                               int64_t col) {
  return dropout_keep(d.seed, static_cast<uint64_t>(row * d.ld + col), d.p) ? v * d.scale : 0.0f;
}

// The LoRA epilogue fused into a base GEMM's output tiles:
//   out[m][n] = acc + bias[n] + scale(m, n) · Σ_r L[m][r] · Rt(n, r)
// with Rt(n, r) = Rm[n*rs_n + r*rs_r] and scale(m, n) = s, times the dropout mask at
// (m*drop.ld + n) over (1-p) when drop.p > 0.
//   forward:  L = h (N, R), Rt(n, r) = B[n*R + r]   (rs_n = R, rs_r = 1), scale = s, no dropout
//   backward: L = dh (N, R), Rt(n, r) = A[r*C + n]  (rs_n = 1, rs_r = C), scale = mask/(1-p)
struct LoraEpilogue {
  const float* bias = nullptr;  // (Nn) or nullptr
  const float* L = nullptr;     // (M, R), row stride ldl; nullptr: no LoRA term
  int64_t ldl = 0;
  const float* Rm = nullptr;
  int64_t rs_n = 0, rs_r = 0;
  int64_t R = 0;
  float s = 1.0f;
  OperandDropout drop;  // on the output element (backward only)
};

// Everything the fp32 SIMT GEMM needs: C = alpha·op(A)·op(B) (+ beta·C | atomically +=) with an
// optional dropout on either operand and an optional LoRA epilogue. Batch entries step by
// stride_*; split_k > 1 splits K across blocks, which then add atomically (the caller has applied
// beta beforehand).
struct GemmArgs {
  float* Cm = nullptr;        // (M, Nn), row stride ldc
  const float* Am = nullptr;  // op(A) (M, K): stored (M, K) or, transposed, (K, M); row stride lda
  const float* Bm = nullptr;  // op(B) (K, Nn): stored (K, Nn) or, transposed, (Nn, K); row stride ldb
  const uint16_t* Bm16 = nullptr;  // instead of Bm: B stored as bf16 bits, widened as it is loaded
  int64_t M = 0, Nn = 0, K = 0;
  int64_t lda = 0, ldb = 0, ldc = 0;
  int64_t stride_a = 0, stride_b = 0, stride_c = 0, batch = 1;
  float alpha = 1.0f, beta = 0.0f;
  int split_k = 1;
  bool atomic = false;
  OperandDropout drop_a, drop_b;
  LoraEpilogue lora;
};

// ---- launchers -------------------------------------------------------------------------------
// gemm_simt.cu: fp32 FMA GEMM (B fp32, or bf16 through Bm16). Picks a tile shape for the problem
// (square, few columns, few rows) and a split-K factor when the grid would leave SMs idle.
cudaError_t launch_gemm_simt(cudaStream_t stream, GemmArgs args, bool trans_a, bool trans_b,
                             int sm_count);
// gemm_skinny.cu: the adapter GEMMs (Nn <= 64 wide, batch 1, no epilogue) on tensor cores in
// 3xTF32; out_trans stores element (m, n) at n*ldc + m. TT is not supported.
cudaError_t launch_gemm_skinny(cudaStream_t stream, GemmArgs args, bool trans_a, bool trans_b,
                               bool out_trans, int sm_count);
// gemm_tc.cu: out (M, Nn) = X (M, K) · op(W) + LoraEpilogue on tensor cores. W is BF16 or F16
// stored either (Nn, K) (w_nk = true: the forward's x·Wᵀ) or (K, Nn) (the backward's dy·W); fp32
// accumulation. X is fp32, rounded to W's type on the way: when X16 (M, K) is given (X already
// converted, contiguous; gemm_tc_pipelined_ok true) a cp.async pipeline reads it, else X is
// rounded as it is staged in shared memory.
bool gemm_tc_pipelined_ok(int64_t K, int64_t Nn, int64_t ldw, const void* W, bool w_nk);
cudaError_t launch_gemm_tc(cudaStream_t stream, float* out, int64_t ldo, const float* X,
                           int64_t ldx, const void* X16, const void* W, lora_dtype w_dtype, int64_t ldw,
                           bool w_nk, int64_t M, int64_t Nn, int64_t K, const LoraEpilogue& epi);

// elementwise.cu
cudaError_t launch_fill(cudaStream_t stream, float* out, float value, int64_t n);
// Cm (M, Nn) *= beta in each of `batch` matrices (a GEMM's beta before split-K atomics add in).
cudaError_t launch_scale(cudaStream_t stream, float* Cm, int64_t ldc, int64_t M, int64_t Nn,
                         int64_t batch, int64_t stride_c, float beta);
cudaError_t launch_convert(cudaStream_t stream, void* out, lora_dtype out_dtype, const void* in,
                           lora_dtype in_dtype, int64_t n);

// ---- the backend's state -------------------------------------------------------------------
// One device, one non-blocking stream, a size-bucketed caching allocator, the sticky error. Its
// methods may run on libuv worker threads (the async binding calls) as well as the JS thread.
class Context {
 public:
  Context(int device, cudaStream_t stream, int sm_count);
  ~Context();
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  cudaStream_t stream() const { return stream_; }
  int sm_count() const { return sm_count_; }
  int max_smem_optin() const { return max_smem_optin_; }  // bytes of shared memory a block may opt into
  bool tc_pipelined() const { return tc_pipelined_; }      // LORA_NATIVE_CUDA_TC != staged
  bool skinny_tc() const { return skinny_tc_; }            // LORA_NATIVE_CUDA_SKINNY != simt
  // True after a sticky CUDA error: every entry returns LORA_UNUSABLE from then on.
  bool unusable() const { return unusable_; }
  const char* last_error() const { return error_; }

  // nullptr on failure (last_error() says why). free() takes the size alloc() was given.
  void* alloc(size_t bytes);
  void free(void* ptr, size_t bytes);
  size_t cached_bytes() const;
  void release_cached();
  // The status of a failed workspace alloc().
  lora_status no_memory() const { return unusable_ ? LORA_UNUSABLE : LORA_OUT_OF_MEMORY; }

  // A CUDA error as a status, its text kept; sticky errors poison the backend.
  lora_status check(cudaError_t e, const char* what);
  lora_status note_error(cudaError_t e, const char* what);
  lora_status download(void* host_dst, const void* src, size_t bytes);

  // Pinned + device staging of the optimizers' pointer tables (optim.cu), reused across steps.
  struct Staging {
    std::mutex mu;
    void* dev = nullptr;
    void* host = nullptr;
    size_t capacity = 0;
    cudaEvent_t event = nullptr;
  } staging;

 private:
  void release_locked();
  void set_error_text(const char* text);

  int device_;
  cudaStream_t stream_;
  int sm_count_;
  int max_smem_optin_ = 48 * 1024;
  bool tc_pipelined_ = true;
  bool skinny_tc_ = true;
  std::atomic<bool> unusable_{false};
  std::mutex error_mu_;
  char error_[512] = {0};
  mutable std::mutex mu_;  // allocator state
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t cached_ = 0;
};

inline Context& ctx(lora_backend* be) { return *static_cast<Context*>(be->ctx); }

// Each .cu file fills in the table entries of its kernels (backend.cu assembles the table).
void register_elementwise(lora_backend& t);  // elementwise.cu
void register_reduce(lora_backend& t);       // reduce.cu: reduce, softmax
void register_gemm(lora_backend& t);         // gemm_simt.cu: gemm, gemm_bf16
void register_lora(lora_backend& t);         // lora.cu
void register_optim(lora_backend& t);        // optim.cu
void register_nn(lora_backend& t);           // nn.cu
void register_attention(lora_backend& t);    // attention.cu
void optim_release(Context& c);              // optim.cu: frees the staging buffers

// ---- helpers ---------------------------------------------------------------------------------
constexpr int kThreads = 256;  // elementwise block size: 8 warps, good occupancy on sm_80..sm_90

// Blocks for a grid-stride loop over n elements (capped: each thread loops).
inline unsigned grid_for(int64_t n, int threads = kThreads) {
  int64_t blocks = (n + threads - 1) / threads;
  const int64_t cap = 65536;  // enough blocks to fill any current GPU several times over
  if (blocks > cap) blocks = cap;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned>(blocks);
}

}  // namespace cuda
}  // namespace lora
