// The GEMM engine's extended entry point, for kernels that fuse work into the GEMM: dropout applied
// while packing an operand, bf16 B widened (or bf16-dotted) on the fly, and an epilogue product
// alpha2·op(A2)·op(B2) (+ bias) accumulated into each C tile while it is still in L1, so a fused
// LoRA output is finished in one pass. lora::sgemm (gemm.h) is the plain case of this call.
#pragma once

#include <cstdint>

#include "gemm_isa.h"
#include "thread_pool.h"

namespace lora {

struct GemmArgs {
  bool trans_a = false, trans_b = false;
  int64_t M = 0, N = 0, K = 0;
  float alpha = 1.0f;
  const float* A = nullptr;  // op(A) (M, K)
  int64_t lda = 0;
  const void* B = nullptr;   // op(B) (K, N), fp32 or (b_bf16) bf16 bits
  bool b_bf16 = false;
  int64_t ldb = 0;
  float beta = 0.0f;         // beta == 0 never reads C
  float* C = nullptr;        // (M, N)
  int64_t ldc = 0;
  const DropoutMask* drop_a = nullptr;  // mask op(A) by A's stored coordinates
  const DropoutMask* drop_b = nullptr;  // mask op(B) by B's stored coordinates

  // Epilogue: C += alpha2·op(A2)·op(B2) + bias, with op(A2) (M, K2) and op(B2) (K2, N), added in
  // the last K block. drop2 masks that product by C's coordinates (r*drop2->ld + c) instead.
  const float* A2 = nullptr;
  int64_t lda2 = 0;
  bool trans_a2 = false;
  const float* B2 = nullptr;
  int64_t ldb2 = 0;
  bool trans_b2 = false;
  int64_t K2 = 0;
  float alpha2 = 1.0f;
  const DropoutMask* drop2 = nullptr;
  const float* bias = nullptr;  // (N)

  // Side product from the same packed A panels: H (M, NH) = alpha_h·op(A)·op(HB) with op(HB)
  // (K, NH), op(HB)[k][j] = trans_hb ? HB[j*ldhb+k] : HB[k*ldhb+j]; drop_h masks op(A) for this
  // product only (by A's stored coordinates). H is finished row block by row block before the
  // epilogue of the last K block, so A2 may be H (y = x·Wᵀ + s·h·Bᵀ with h = x̃·Aᵀ in one pass
  // over x; dx = dy·W + dh·A with dh = s·dy·B in one pass over dy). Requires !trans_a, alpha 1,
  // no drop_a; H (M, NH) with row stride ldh is overwritten.
  const float* HB = nullptr;
  int64_t ldhb = 0;
  bool trans_hb = false;
  int64_t NH = 0;
  float alpha_h = 1.0f;
  float* H = nullptr;
  int64_t ldh = 0;
  const DropoutMask* drop_h = nullptr;
  // Second side product from the same blocks of A: D (K, ND) += alpha_d·op(A)ᵀ·TD with TD
  // (M, ND) (row strides ldtd, ldd), accumulated into D (dB += s·dyᵀ·h in the pass of dx = dy·W
  // over dy). op(A) as given: alpha and drop_a do not apply to D. Computed from the blocked path's
  // blocks of A while they are packed (fp32 products always, under the bf16 dot too) where 9 <= ND
  // <= kSideCols and the packed blocks are op(A) itself (alpha 1, no drop_a); otherwise as a
  // product of its own before the GEMM (side_d_apart).
  const float* TD = nullptr;
  int64_t ldtd = 0;
  int64_t ND = 0;
  float alpha_d = 1.0f;
  float* D = nullptr;
  int64_t ldd = 0;
  // bf16 B: allow rounding A to bf16 for the avx512_bf16 dot product (fp32 accumulation).
  bool allow_bf16_dot = true;
  // ... also on the streaming path (up to kDecodeRows rows of A against a stored-(n, k) B): only
  // where the caller asked for bf16 products (matmulPrecision 'bf16'); the fused LoRA kernels keep
  // fp32 products at decode.
  bool bf16_dot_few_rows = false;
  // A plain product (sgemm, sgemm_bf16): where it is a long sum into few outputs, the threads may
  // split k (gemm_ex: split_k_ok), each summing its part into its own copy of C. Its sums then
  // group differently from the fused kernels' products of the same shape, which keep this off.
  bool split_k = false;
};

void gemm_ex(ThreadPool& pool, const GemmArgs& args);

}  // namespace lora
