// The AVX-512 level of the GEMM engine: the shared leaf routines (gemm_kernels_impl.h) compiled for
// AVX-512F/BW/VL/DQ, plus the avx512_bf16 dot-product kernel. Chosen at run time by gemm.cc; this
// file never runs on a CPU without AVX-512, and nothing in it is visible outside it but the table.
#include <cstdint>
#include <immintrin.h>

#include "../backend/rng.h"
#include "gemm_isa.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,avx2,bmi2")

#define LN_VL 16
#define LN_FMA(a, b, c) _mm512_fmadd_ps((a), (b), (c))
#define LN_SPLAT(x) _mm512_set1_ps(x)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positive in _mm512_reduce_add_ps
#define LN_HSUM(v) _mm512_reduce_add_ps(v)
// one vpmovzxwd / vpmovdw each (GCC 12 splits the generic conversions into 256-bit halves and
// word permutes: 5 instructions to widen 16 bf16 and 4 to narrow them)
#pragma GCC diagnostic ignored "-Wuninitialized"  // GCC 12 false positive in _mm512_undefined_* of these
#define LN_WIDEN_U16(p) _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))
#define LN_STORE_U16(p, v) _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16((__m512i)(v)))
#define LN_KEEP(v) __asm__("" : "+v"(v))
#define LN_HAS_FMA 1
#define LN_PACK_A pack_a_fast
namespace {
void pack_a_fast(float* dst, const float* a, int64_t lda, bool trans, int64_t i0, int64_t mc, int64_t k0,
                 int64_t kc, int mr, float alpha, const lora::DropoutMask* drop);  // gemm_avx512_pack.h
}  // namespace
#include "gemm_kernels_impl.h"

namespace {

// 12 x 32: 24 zmm accumulators + 2 for b + 1 broadcast (of 32); 2 loads of b per 24 FMAs keeps
// both FMA pipes fed, and 12 rows amortise the b loads over the 4-cycle FMA latency.
constexpr int kWideMr = 12, kWideNv = 2;
// 24 x 16: for op(B) only 16 wide (rank 16), so no column padding.
constexpr int kNarrowMr = 24, kNarrowNv = 1;
// 8 x 48: for C only 8/16 rows (dA at rank 8/16), 24 accumulators.
constexpr int kShortMr = 8, kShortNv = 3;

// bf16 pairs: c(mr, 32) (+)= a·b with a (k2, MR, 2) and b (k2, 32, 2) in bf16, fp32 accumulation.
template <int MR>
void bf16_kernel(int64_t k2, const float* af, const float* bf, int64_t /*ldb: always packed*/,
                 float* __restrict c, int64_t ldc, int accumulate) {
  const uint16_t* a = reinterpret_cast<const uint16_t*>(af);
  const uint16_t* b = reinterpret_cast<const uint16_t*>(bf);
  __m512 acc[MR][2];
#pragma GCC unroll 32
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < k2; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_load_si512(b);
    const __m512bh b1 = (__m512bh)_mm512_load_si512(b + 32);
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i) {
      uint32_t pair;
      __builtin_memcpy(&pair, a + 2 * i, 4);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], av, b0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], av, b1);
    }
    a += 2 * MR;
    b += 64;
  }
#pragma GCC unroll 32
  for (int i = 0; i < MR; ++i) {
    float* r = c + i * ldc;
    if (accumulate) {
      _mm512_storeu_ps(r, _mm512_add_ps(_mm512_loadu_ps(r), acc[i][0]));
      _mm512_storeu_ps(r + 16, _mm512_add_ps(_mm512_loadu_ps(r + 16), acc[i][1]));
    } else {
      _mm512_storeu_ps(r, acc[i][0]);
      _mm512_storeu_ps(r + 16, acc[i][1]);
    }
  }
}

inline uint16_t to_bf16(float f) {
  uint32_t bits;
  __builtin_memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

#include "gemm_avx512_pack.h"

// (k2, mr, 2): element (i, k) at [(k/2)*mr*2 + i*2 + k%2]; odd kc pads with a zero k. Row-major A
// as 16 x 16 transposes, each pair of k rounded and interleaved in registers.
void pack_a_bf16(uint16_t* __restrict dst, const float* __restrict a, int64_t lda, bool trans,
                 int64_t i0, int64_t mc, int64_t k0, int64_t kc, int mr, float alpha) {
  const int64_t kc2 = (kc + 1) / 2;
  for (int64_t ip = 0; ip < mc; ip += mr) {
    const int64_t rows = imin(mr, mc - ip);
    if (trans) {
      for (int64_t i = 0; i < mr; ++i)
        for (int64_t k = 0; k < 2 * kc2; ++k) {
          const float v = i < rows && k < kc ? alpha * a[(k0 + k) * lda + i0 + ip + i] : 0.0f;
          dst[(k >> 1) * mr * 2 + i * 2 + (k & 1)] = to_bf16(v);
        }
    } else {
      for_a_blocks(a, lda, i0 + ip, rows, k0, kc, mr, alpha, [&](const __m512* r, int64_t k, int64_t kl, int h) {
        for (int64_t q = 0; q < kl; q += 2)
          _mm512_mask_storeu_epi32(dst + (k + q) * mr + 2 * h, lanes(mr - h),
                                   bf16_pairs(r[q], q + 1 < kl ? r[q + 1] : _mm512_setzero_ps()));
      });
    }
    dst += mr * 2 * kc2;
  }
}

// (k2, nr, 2) from bf16 bits, odd kc padded with a zero k: stored (n, k) as 32-bit pairs transposed
// 16 x 16; stored (k, n) as two rows widened and interleaved.
void pack_b_bf16(uint16_t* __restrict dst, const uint16_t* __restrict b, int64_t ldb, bool trans,
                 int64_t k0, int64_t kc, int64_t j0, int64_t nc, int nr) {
  const int64_t kc2 = (kc + 1) / 2;
  for (int64_t jp = 0; jp < nc; jp += nr, dst += nr * 2 * kc2) {
    const int64_t cols = imin(nr, nc - jp);
    if (!trans) {
      for (int64_t t = 0; t < kc2; ++t) {
        const uint16_t* r0 = b + (k0 + 2 * t) * ldb + j0 + jp;
        const bool has_odd = 2 * t + 1 < kc;
        for (int h = 0; h < nr; h += 16) {
          const __mmask16 m = lanes(cols - h > 0 ? cols - h : 0);
          const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, r0 + h));
          const __m512i hi = has_odd ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, r0 + ldb + h)) : _mm512_setzero_si512();
          _mm512_storeu_si512(dst + t * nr * 2 + 2 * h, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
      }
      continue;
    }
    for (int64_t k = 0; k < kc; k += 32) {
      const int64_t kl = imin(32, kc - k), pairs = kl / 2;
      for (int h = 0; h < nr; h += 16) {
        const int64_t nrows = cols - h > 0 ? imin(16, cols - h) : 0;
        __m512 r[16];
        for (int i = 0; i < 16; ++i) {
          const uint16_t* src = b + (j0 + jp + h + i) * ldb + k0 + k;
          r[i] = i < nrows ? _mm512_maskz_loadu_ps(lanes(pairs), src) : _mm512_setzero_ps();
          if (i < nrows) __builtin_prefetch(src + 2 * kPackPrefetch);
        }
        transpose16(r);
        for (int64_t t = 0; t < pairs; ++t) _mm512_storeu_ps(dst + (k / 2 + t) * nr * 2 + 2 * h, r[t]);
        if (kl & 1)  // the last, odd k with a zero partner
          for (int i = 0; i < 16; ++i) {
            const uint16_t lo = i < nrows ? b[(j0 + jp + h + i) * ldb + k0 + k + kl - 1] : 0;
            dst[(k / 2 + pairs) * nr * 2 + 2 * (h + i)] = lo;
            dst[(k / 2 + pairs) * nr * 2 + 2 * (h + i) + 1] = 0;
          }
      }
    }
  }
}

const lora::IsaTable kTable = {
    "avx512",
    {kWideMr, kWideNv * LN_VL, micro_kernel<kWideMr, kWideNv>, LN_VL, micro_kernel<kWideMr, 1>},
    {kNarrowMr, kNarrowNv * LN_VL, micro_kernel<kNarrowMr, kNarrowNv>, LN_VL, micro_kernel<kNarrowMr, 1>},
    {kShortMr, kShortNv * LN_VL, micro_kernel<kShortMr, kShortNv>, LN_VL, micro_kernel<kShortMr, 1>},
    pack_a_fast,
    pack_b_fast,
    8,  // small_rows: 8 rows x 2 W rows; 16 rows x 1 needed 17 loads per 16 FMAs (load-bound)
    small_m,
    {kWideMr, 32, bf16_kernel<kWideMr>, 0, nullptr},
    pack_a_bf16,
    pack_b_bf16,
    micro_kernel_bf16_out<kWideMr, kWideNv>,
    fma_burst,
};

}  // namespace

#pragma GCC pop_options

namespace lora {
const IsaTable* isa_table_avx512() { return &kTable; }
}  // namespace lora

#else
namespace lora {
const IsaTable* isa_table_avx512() { return nullptr; }
}  // namespace lora
#endif
