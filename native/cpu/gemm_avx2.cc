// The AVX2+FMA level of the GEMM engine: the shared leaf routines (gemm_kernels_impl.h) compiled
// for AVX2 and FMA3. Chosen at run time by gemm.cc; nothing here is visible outside but the table.
// No bf16 dot product at this level (bf16 weights are widened while packing).
#include <cstdint>
#include <immintrin.h>

#include "../backend/rng.h"
#include "gemm_isa.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")

#define LN_VL 8
static inline float hsum256(__m256 v) {
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}
#define LN_FMA(a, b, c) _mm256_fmadd_ps((a), (b), (c))
#define LN_SPLAT(x) _mm256_set1_ps(x)
#define LN_HSUM(v) hsum256(v)
#define LN_KEEP(v) __asm__("" : "+x"(v))
#define LN_HAS_FMA 1
#include "gemm_kernels_impl.h"

namespace {

// 6 x 16: 12 ymm accumulators + 2 for b + 1 broadcast (of 16 registers).
constexpr int kWideMr = 6, kWideNv = 2;
// 12 x 8: op(B) 8..16 wide without padding to 16.
constexpr int kNarrowMr = 12, kNarrowNv = 1;
// 4 x 24: few rows of C.
constexpr int kShortMr = 4, kShortNv = 3;

const lora::IsaTable kTable = {
    "avx2",
    fp32_kernel<kWideMr, kWideNv>(),
    fp32_kernel<kNarrowMr, kNarrowNv>(),
    fp32_kernel<kShortMr, kShortNv>(),
    pack_a,
    pack_b,
    8,  // small_rows: 8-16 accumulators of 16 registers
    small_m,
    {0, 0, nullptr, 0, nullptr, nullptr},
    nullptr,
    nullptr,
    micro_kernel_bf16_out<kWideMr, kWideNv>,
    fma_burst,
    nullptr,  // no bf16 dot product at this level
    reduce_k,
    side_panel,
    side_rows,
};

}  // namespace

#pragma GCC pop_options

namespace lora {
const IsaTable* isa_table_avx2() { return &kTable; }
}  // namespace lora

#else
namespace lora {
const IsaTable* isa_table_avx2() { return nullptr; }
}  // namespace lora
#endif
