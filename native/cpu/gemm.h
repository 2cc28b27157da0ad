// The CPU GEMM engine's entry point, used by every CPU kernel that multiplies matrices.
// C(M, N) = alpha·op(A)·op(B) + beta·C with op(A) (M, K) and op(B) (K, N), row-major with row
// strides lda/ldb/ldc. beta == 0 never reads C (it may hold NaN). Any dimension may be 0.
#pragma once

#include <cstdint>

#include "thread_pool.h"

namespace lora {

void sgemm(ThreadPool& pool, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
           float alpha, const float* A, int64_t lda, const float* B, int64_t ldb, float beta,
           float* C, int64_t ldc);

// The same with B holding bf16 bits (a frozen bf16 weight), widened to fp32 while packing (or
// streamed and widened in registers for few rows): A is never rounded, accumulation is fp32, and
// the result is that of sgemm on the widened B. With bf16_dot, A may instead be rounded to bf16
// for the avx512_bf16 pair dot product (where the CPU has one, from enough rows of A; fp32
// accumulation): within 2^-8·Σ|a·b| of the exact sum (linear() with matmulPrecision 'bf16').
void sgemm_bf16(ThreadPool& pool, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                float alpha, const float* A, int64_t lda, const uint16_t* B, int64_t ldb,
                float beta, float* C, int64_t ldc, bool bf16_dot = false);

// C (M, N) of bf16 bits = round(C + alpha·A·B) for A (M, K) and B (K, N) fp32, row-major: each
// tile of C widened, updated in fp32 and rounded once to nearest-even in the micro-kernel's
// epilogue (merging an adapter into a bf16 weight in one pass over W). alpha == 0 or K == 0 leaves
// C untouched.
void sgemm_bf16_update(ThreadPool& pool, int64_t M, int64_t N, int64_t K, float alpha,
                       const float* A, int64_t lda, const float* B, int64_t ldb, uint16_t* C,
                       int64_t ldc);

// C_i (M, N_i) = A·B_iᵀ for the n products of one A (M, K) row-major (row stride lda) with B_i
// (N_i, K) row-major fp32 or bf16 bits (b_bf16), C_i contiguous: q/k/v or gate/up projections of
// one input. Each thread packs A once for all of them (separate sgemm calls pack it once per
// product and thread); the products are those of sgemm with trans_b, alpha 1 and beta 0. With
// bf16_dot (and b_bf16), A may be rounded to bf16 for the pair dot product as sgemm_bf16 does with
// bf16_dot: where that runs the dot for every product (the CPU has it, M >= 64, no product 32
// columns or fewer), the results are sgemm_bf16's bit for bit; elsewhere fp32 products. Decode rows
// (M <= kDecodeRows) stream each B as sgemm_bf16 streams it alone (its bf16 dot on 4..16 rows
// included): the same outputs bit for bit, the threads splitting the products' rows end to end.
void sgemm_shared_a(ThreadPool& pool, int64_t M, int64_t K, const float* A, int64_t lda, int n,
                    const void* const* B, bool b_bf16, const int64_t* N, float* const* C,
                    bool bf16_dot = false);

}  // namespace lora
