// The CPU matrix products of the kernel interface: gemm and gemm_bf16 over the GEMM engine
// (gemm.h), one call per batch entry, and gemm_shared_a (several products of one A; with the bf16
// dot product too).
#include <type_traits>

#include "cpu.h"
#include "gemm.h"

namespace lora {
namespace {

// One engine call per batch entry; B fp32 (sgemm) or bf16 bits (sgemm_bf16, with the bf16 dot
// product allowed for gemm_bf16_dot).
template <typename TB, bool kBf16Dot = false>
lora_status gemm_batched(lora_backend* be, float* Cm, const float* Am, const TB* Bm, int64_t M,
                         int64_t Nn, int64_t K, bool trans_a, bool trans_b, int64_t lda,
                         int64_t ldb, int64_t ldc, float alpha, float beta, int64_t batch,
                         int64_t stride_a, int64_t stride_b, int64_t stride_c) {
  for (int64_t i = 0; i < batch; ++i) {
    if constexpr (std::is_same_v<TB, float>)
      sgemm(cpu_pool(be), trans_a, trans_b, M, Nn, K, alpha, Am + i * stride_a, lda,
            Bm + i * stride_b, ldb, beta, Cm + i * stride_c, ldc);
    else
      sgemm_bf16(cpu_pool(be), trans_a, trans_b, M, Nn, K, alpha, Am + i * stride_a, lda,
                 Bm + i * stride_b, ldb, beta, Cm + i * stride_c, ldc, kBf16Dot);
  }
  return LORA_OK;
}

lora_status gemm_shared_a(lora_backend* be, int32_t n, float* const* C, const float* A, int64_t lda,
                          const void* const* B, bool b_bf16, const int64_t* N, int64_t M, int64_t K) {
  if (n < 0 || M < 0 || K < 0 || lda < K) return LORA_INVALID_ARGUMENT;
  for (int32_t i = 0; i < n; ++i)
    if (N[i] < 0) return LORA_INVALID_ARGUMENT;
  sgemm_shared_a(cpu_pool(be), M, K, A, lda, n, B, b_bf16, N, C);
  return LORA_OK;
}

lora_status gemm_shared_a_bf16_dot(lora_backend* be, int32_t n, float* const* C, const float* A,
                                   int64_t lda, const uint16_t* const* B, const int64_t* N, int64_t M,
                                   int64_t K) {
  if (n < 0 || n > 3 || M < 0 || K < 0 || lda < K) return LORA_INVALID_ARGUMENT;
  const void* Bv[3];
  for (int32_t i = 0; i < n; ++i) {
    if (N[i] < 0) return LORA_INVALID_ARGUMENT;
    Bv[i] = B[i];
  }
  sgemm_shared_a(cpu_pool(be), M, K, A, lda, n, Bv, true, N, C, true);
  return LORA_OK;
}

}  // namespace

void cpu_register_linalg(lora_backend& t) {
  t.gemm = gemm_batched<float>;
  t.gemm_bf16 = gemm_batched<uint16_t>;
  t.gemm_shared_a = gemm_shared_a;
  t.gemm_bf16_dot = gemm_batched<uint16_t, true>;
  t.gemm_shared_a_bf16_dot = gemm_shared_a_bf16_dot;
}

}  // namespace lora
