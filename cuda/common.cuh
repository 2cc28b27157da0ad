// Shared pieces of the CUDA backend: the launcher declarations every .cu file implements, the
// operand/epilogue descriptors of the GEMM engines, and small device helpers. Launchers size the
// grid, launch on the backend's one stream and return cudaGetLastError(); they never synchronize.
// Nothing here knows about N-API or about lora::Backend's memory management.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#ifdef LORA_CUDA_EMU
#include "emu/emu.h"  // the kernels compiled as C++ for the CPU emulator (cuda/emu/)
#endif

#include "../native/backend.h"
#include "../native/rng.h"

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
                           int64_t ldx, const void* X16, const void* W, DType w_dtype, int64_t ldw,
                           bool w_nk, int64_t M, int64_t Nn, int64_t K, const LoraEpilogue& epi);

// lora.cu
cudaError_t launch_lora_merge(cudaStream_t stream, void* W, DType w_dtype, const float* A,
                              const float* B, int64_t OC, int64_t C, int64_t R, float s);

// optim.cu: the tables are device memory, `count` entries each; chunk_tensor/chunk_start list
// the (tensor, first element) of each block's chunk of kOptimChunk elements.
constexpr int64_t kOptimChunk = 16384;  // elements per block: 64 KiB of fp32, enough to amortise
struct AdamWArgs {
  float lr, beta1, beta2, eps, weight_decay;
  float step_size;              // lr / (1 - beta1^step), computed in double on the host
  float bias_correction2_sqrt;  // sqrt(1 - beta2^step), likewise
};
struct SgdArgs {
  float lr, momentum, dampening, weight_decay;
  bool nesterov, first_step;
};
cudaError_t launch_adamw_step(cudaStream_t stream, int64_t chunks, const int32_t* chunk_tensor,
                              const int64_t* chunk_start, float* const* p, const float* const* g,
                              float* const* m, float* const* v, const int64_t* n, AdamWArgs a);
cudaError_t launch_sgd_step(cudaStream_t stream, int64_t chunks, const int32_t* chunk_tensor,
                            const int64_t* chunk_start, float* const* p, const float* const* g,
                            float* const* buf, const int64_t* n, SgdArgs a);

// elementwise.cu
cudaError_t launch_fill(cudaStream_t stream, float* out, float value, int64_t n);
cudaError_t launch_scale(cudaStream_t stream, float* Cm, int64_t ldc, int64_t M, int64_t Nn,
                         int64_t batch, int64_t stride_c, float beta);
cudaError_t launch_binary(cudaStream_t stream, BinaryOp op, float* out, const float* a,
                          const float* b, const Layout& a_layout, const Layout& b_layout);
cudaError_t launch_binary_scalar(cudaStream_t stream, BinaryOp op, float* out, const float* a,
                                 float scalar, bool scalar_first, int64_t n);
cudaError_t launch_unary(cudaStream_t stream, UnaryOp op, float* out, const float* in, int64_t n);
cudaError_t launch_unary_backward(cudaStream_t stream, UnaryOp op, float* dx, const float* dy,
                                  const float* x, const float* y, int64_t n);
cudaError_t launch_axpy(cudaStream_t stream, float* y, const float* x, float a, int64_t n);
cudaError_t launch_copy_strided(cudaStream_t stream, float* dst, const Layout& dst_layout,
                                const float* src, const Layout& src_layout);
cudaError_t launch_convert(cudaStream_t stream, void* out, DType out_dtype, const void* in,
                           DType in_dtype, int64_t n);
cudaError_t launch_dropout(cudaStream_t stream, float* out, const float* in, int64_t n, float p,
                           uint64_t seed);

// reduce.cu
// reduce_splits: how many slices to cut `dim` into (1: one pass). With splits > 1, `partial`
// is a workspace of outer·inner·splits doubles.
int64_t reduce_splits(int64_t outer, int64_t dim, int64_t inner, int sm_count);
cudaError_t launch_reduce(cudaStream_t stream, ReduceOp op, float* out, const float* in,
                          int64_t outer, int64_t dim, int64_t inner, double* partial,
                          int64_t splits);
cudaError_t launch_softmax(cudaStream_t stream, float* out, const float* in, int64_t rows,
                           int64_t cols, bool log);
cudaError_t launch_softmax_backward(cudaStream_t stream, float* dx, const float* dy,
                                    const float* y, int64_t rows, int64_t cols, bool log);

// nn.cu (rms: the rms_norm variant, mean/b unused)
cudaError_t launch_layer_norm(cudaStream_t stream, float* y, float* mean, float* rstd,
                              const float* x, const float* w, const float* b, int64_t N, int64_t C,
                              float eps, bool rms);
cudaError_t launch_layer_norm_backward(cudaStream_t stream, float* dx, float* dw, float* db,
                                       const float* dy, const float* x, const float* w,
                                       const float* mean, const float* rstd, int64_t N, int64_t C,
                                       bool rms);
// *bad (device int) = 1 when an id is outside [0, V) (ignore allowed when allow_ignore).
cudaError_t launch_ids_check(cudaStream_t stream, int* bad, const int32_t* ids, int64_t N, int64_t V,
                             bool allow_ignore, int32_t ignore);
// forward: out (N, C) = table[ids]; backward: out = dtable (V, C) += table-shaped dout rows.
cudaError_t launch_embedding(cudaStream_t stream, float* out, const float* table, const int32_t* ids,
                             int64_t N, int64_t C, bool backward);
cudaError_t launch_cross_entropy(cudaStream_t stream, float* loss, float* lse, const float* logits,
                                 const int32_t* targets, int64_t N, int64_t V, int32_t ignore_index,
                                 float smoothing);
cudaError_t launch_cross_entropy_backward(cudaStream_t stream, float* dlogits, const float* dloss,
                                          const float* logits, const float* lse,
                                          const int32_t* targets, int64_t N, int64_t V,
                                          int32_t ignore_index, float smoothing);

// attention.cu: args valid (attention_args_valid). supported: D <= 256 and tiles that fit
// smem_limit bytes of shared memory per block (the device's opt-in maximum).
bool attention_supported(const AttentionArgs& a, size_t smem_limit);
cudaError_t launch_attention(cudaStream_t stream, float* out, float* lse, const float* q, const float* k,
                             const float* v, const AttentionArgs& a, size_t smem_limit);
cudaError_t launch_attention_backward(cudaStream_t stream, float* dq, float* dk, float* dv,
                                      float* delta /* (B, H, T) workspace */, const float* dout,
                                      const float* q, const float* k, const float* v, const float* out,
                                      const float* lse, const AttentionArgs& a, size_t smem_limit);

// ---- helpers ---------------------------------------------------------------------------------
#ifndef LORA_CUDA_EMU
// kernel<<<grid, block, smem, stream>>>(args...), written as a call so the emulator can supply its
// own (cuda/emu/emu.h). Errors surface through cudaGetLastError() as with the <<<>>> syntax.
template <typename... P, typename... A>
inline void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   A&&... args) {
  kernel<<<grid, block, smem, stream>>>(std::forward<A>(args)...);
}
// The kernel's dynamic shared memory as `type* name`.
#define LORA_DYNAMIC_SMEM(type, name) \
  extern __shared__ __align__(16) unsigned char name##_bytes[]; \
  type* name = reinterpret_cast<type*>(name##_bytes)
#endif

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
