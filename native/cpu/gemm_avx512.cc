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

// bf16 pairs: c(mr, 32) (+)= a·b with a (k2, MR, 2) and b (k2, 32, 2) in bf16, fp32 accumulation,
// and the fp32 epilogue product a2·b2 of ke steps in the same sums (fma_steps; ke 0: none).
template <int MR>
__attribute__((always_inline)) inline void bf16_tile(int64_t k2, const float* af, const float* bf,
                                                     float* __restrict c, int64_t ldc, int accumulate,
                                                     int64_t ke, const float* a2, const float* b2) {
  const uint16_t* a = reinterpret_cast<const uint16_t*>(af);
  const uint16_t* b = reinterpret_cast<const uint16_t*>(bf);
  vf acc[MR][2];
#pragma GCC unroll 32
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = vf{};
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
  fma_steps<MR, 2>(acc, ke, a2, b2, 32);
  store_tile<MR, 2>(c, ldc, acc, accumulate);
}
template <int MR>
void bf16_kernel(int64_t k2, const float* af, const float* bf, int64_t /*ldb: always packed*/,
                 float* c, int64_t ldc, int accumulate) {
  bf16_tile<MR>(k2, af, bf, c, ldc, accumulate, 0, nullptr, nullptr);
}
template <int MR>
void bf16_kernel_epi(int64_t k2, const float* af, const float* bf, int64_t /*ldb: always packed*/,
                     float* c, int64_t ldc, int accumulate, int64_t ke, const float* a2, const float* b2) {
  bf16_tile<MR>(k2, af, bf, c, ldc, accumulate, ke, a2, b2);
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

// ---- streaming bf16 dot product: y = bf16(x)·Wᵀ for 4..16 rows of x, W bf16 stored (n, k) -------
// (an explicit request only: matmulPrecision 'bf16'). Each vdpbf16ps does 32 multiply-adds, twice an
// FMA's, so 8 and 16 rows stay bound by reading W: W streams from memory once, in its stored order,
// and x is rounded to bf16 once per call.

// The dot form: products along W's rows, x in L1 as 32-wide k vectors, G rows of W per group sharing
// each load of x. Up to this many rows in one pass; more rows (to 16) take two passes per group, the
// second reading the group's W from L1. (One broadcast of each W pair against the rows of x held as
// 16 lanes ran 3.1 ms at 16 rows x 4096², a 16-row dot form 10 ms; the two passes: see bench.)
constexpr int kDotFormRows = 8;
// Rows of W per group of the dot form: M·G accumulators + G rows of W + one of x in the 32 zmm.
template <int M>
constexpr int kBf16DotGroup = M <= 4 ? 4 : 3;
// Bytes of rounded x per k block of the dot form: three quarters of the smallest L1d of an avx512_bf16
// CPU (32 KB; 8 rows x 4096 k held in L2 instead ran 1.8x slower).
constexpr int64_t kDotBlockBytes = 24 << 10;

// x (m, k) rounded to bf16 as (ceil(k/32), m, 32): the m rows of one 32-wide k vector side by side,
// zero past k (so a masked load of W's last vector dots zeros).
void round_rows_dot(uint16_t* __restrict xi, int m, int64_t k, const float* __restrict a, int64_t lda) {
  const int64_t kv = (k + 31) / 32;
  for (int64_t p = 0; p < kv; ++p)
    for (int i = 0; i < m; ++i) {
      const float* src = a + i * lda + p * 32;
      const int64_t left = k - p * 32;
      const __m512 lo = _mm512_maskz_loadu_ps(lanes(left), src);
      const __m512 hi = _mm512_maskz_loadu_ps(lanes(left > 16 ? left - 16 : 0), src + 16);
      uint16_t* d = xi + (p * m + i) * 32;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_high(lo), 16)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + 16), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_high(hi), 16)));
    }
}

// The lane sums of 16 vectors as one vector, lane i = Σ v[i] (a transposing tree: 15 adds and 30
// shuffles, against 16 reductions of ~8 operations each).
inline __m512 sums16(const __m512 v[16]) {
  __m512 t[8], u[4], w[2];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)  // 128-bit blocks: [a0+a2, a1+a3, b0+b2, b1+b3]
    t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44), _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)  // block j: 4 partial sums of v[4i + j]
    u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0x88), _mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0xDD));
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)  // block j: 2 partials each of v[8i + j], v[8i + 4 + j]
    w[i] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * i], u[2 * i + 1], 0x44), _mm512_shuffle_ps(u[2 * i], u[2 * i + 1], 0xEE));
  // lane 4j + q: the sum of v[j + 4q]; permuted into lane order
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], 0x88), _mm512_shuffle_ps(w[0], w[1], 0xDD));
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), r);
}

// Lines of each row of W per step of the dot form: a step loads U of each of its G rows before its
// dot products (as small_m_nt does), as many as the 32 registers hold beside the M·G accumulators
// and x, at most 4. Alternating calls in one process, 4096 x 4096, one line at a time / U lines:
// 1 thread 5 rows 19.3 / 21.9 GB/s, 6 rows 23.3 / 25.5, 8 rows 18.2-21.0 / 20.2-22.6, 12 rows
// 15.1 / 16.8, 16 rows 10.6-12.5 / 11.5-13.5; 2 threads 8 rows 34.4 / 38.0, 16 rows 20.7 / 22.5;
// 4 rows (U = 2) even within the noise (16.3-23.9 / 15.9-25.2).
template <int M, int G>
constexpr int kBf16DotLines = M * G + 4 * G + 1 <= 32 ? 4 : M * G + 2 * G + 1 <= 32 ? 2 : 1;

// G rows of W (from b) against the M rows of x in xi: c(M, G) (+)= the fp32 sums. next: the rows
// of the following group, prefetched one group ahead (each starts a new stream).
template <int M, int G>
__attribute__((always_inline)) inline void dot_group(int64_t k, const uint16_t* __restrict xi, const uint16_t* __restrict b,
                                                     int64_t ldb, const uint16_t* next, float* __restrict c, int64_t ldc,
                                                     int accumulate) {
  __m512 acc[M][G];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) acc[m][g] = _mm512_setzero_ps();
  auto step = [&](int64_t p, __mmask32 mask) __attribute__((always_inline)) {
    __m512bh w[G];
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      __builtin_prefetch(next + g * ldb + p * 32);
      w[g] = (__m512bh)_mm512_maskz_loadu_epi16(mask, b + g * ldb + p * 32);
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const __m512bh xv = (__m512bh)_mm512_load_si512(xi + (p * M + m) * 32);
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) acc[m][g] = _mm512_dpbf16_ps(acc[m][g], xv, w[g]);
    }
  };
  const int64_t kv = k / 32;
  int64_t p = 0;
  constexpr int U = kBf16DotLines<M, G>;
  if constexpr (U > 1) {
    for (; p + U <= kv; p += U) {
      __m512bh w[U][G];
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g)
#pragma GCC unroll 4
        for (int u = 0; u < U; ++u) {
          __builtin_prefetch(next + g * ldb + (p + u) * 32);
          w[u][g] = (__m512bh)_mm512_loadu_si512(b + g * ldb + (p + u) * 32);
        }
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          const __m512bh xv = (__m512bh)_mm512_load_si512(xi + ((p + u) * M + m) * 32);
#pragma GCC unroll 8
          for (int g = 0; g < G; ++g) acc[m][g] = _mm512_dpbf16_ps(acc[m][g], xv, w[u][g]);
        }
    }
  }
  for (; p < kv; ++p) step(p, ~__mmask32(0));
  if (k % 32) step(kv, (__mmask32(1) << (k % 32)) - 1);
  constexpr int S = M * G;
  alignas(64) float sums[(S + 15) / 16 * 16];
  if constexpr (S < 8) {
#pragma GCC unroll 8
    for (int i = 0; i < S; ++i) sums[i] = _mm512_reduce_add_ps(acc[i / G][i % G]);
  } else {
#pragma GCC unroll 2
    for (int q = 0; q < S; q += 16) {
      __m512 v[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) v[i] = q + i < S ? acc[(q + i) / G][(q + i) % G] : _mm512_setzero_ps();
      _mm512_store_ps(sums + q, sums16(v));
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      float* out = c + m * ldc + g;
      *out = accumulate ? *out + sums[m * G + g] : sums[m * G + g];
    }
}

template <int M>
void dot_rows(int64_t n, int64_t k, const uint16_t* xi, const uint16_t* b, int64_t ldb, float* c, int64_t ldc,
              int accumulate) {
  constexpr int G = kBf16DotGroup<M>;
  int64_t j = 0;
  for (; j + G <= n; j += G)
    dot_group<M, G>(k, xi, b + j * ldb, ldb, b + (j + G < n ? j + G : j) * ldb, c + j, ldc, accumulate);
  for (; j < n; ++j) dot_group<M, 1>(k, xi, b + j * ldb, ldb, b + j * ldb, c + j, ldc, accumulate);
}

// 9..16 rows: the first 8 (in xi) and the other M2 (in xi2) as two dot forms over each group of W
// rows, the second reading the group from L1 (a 16-row dot form spilled its accumulators).
template <int M2>
void dot_rows_split(int64_t n, int64_t k, const uint16_t* xi, const uint16_t* xi2, const uint16_t* b, int64_t ldb,
                    float* c, int64_t ldc, int accumulate) {
  constexpr int G = kBf16DotGroup<8>;
  int64_t j = 0;
  for (; j + G <= n; j += G) {
    dot_group<8, G>(k, xi, b + j * ldb, ldb, b + (j + G < n ? j + G : j) * ldb, c + j, ldc, accumulate);
    dot_group<M2, G>(k, xi2, b + j * ldb, ldb, b + j * ldb, c + 8 * ldc + j, ldc, accumulate);
  }
  for (; j < n; ++j) {
    dot_group<8, 1>(k, xi, b + j * ldb, ldb, b + j * ldb, c + j, ldc, accumulate);
    dot_group<M2, 1>(k, xi2, b + j * ldb, ldb, b + j * ldb, c + 8 * ldc + j, ldc, accumulate);
  }
}

void small_m_bf16_dot(int m, int64_t n, int64_t k, const float* a, int64_t lda, const uint16_t* b, int64_t ldb,
                      float* c, int64_t ldc, int accumulate, float* scratch) {
  static_assert(lora::kDecodeRows <= 2 * kDotFormRows, "at most two dot forms per group of W rows");
  static_assert(lora::kBf16DotMinRows == 4, "the cases below start at 4 rows");
  uint16_t* xs = reinterpret_cast<uint16_t*>(scratch);  // 64-byte aligned
  // k in blocks whose rounded rows of x stay in L1 (8 rows or fewer: as many k as fit; more: 16 rows' worth)
  const int64_t kc = (kDotBlockBytes / 2 / (m > kDotFormRows ? 16 : m)) / 32 * 32;
  for (int64_t k0 = 0; k0 < k; k0 += kc) {
    const int64_t kl = imin(kc, k - k0);
    const int acc = accumulate || k0 > 0;
    const uint16_t* bk = b + k0;
    if (m > kDotFormRows) {
      uint16_t* xs2 = xs + kDotFormRows * ((kl + 31) / 32 * 32);
      round_rows_dot(xs, kDotFormRows, kl, a + k0, lda);
      round_rows_dot(xs2, m - kDotFormRows, kl, a + kDotFormRows * lda + k0, lda);
      switch (m - kDotFormRows) {
        case 1: dot_rows_split<1>(n, kl, xs, xs2, bk, ldb, c, ldc, acc); break;
        case 2: dot_rows_split<2>(n, kl, xs, xs2, bk, ldb, c, ldc, acc); break;
        case 3: dot_rows_split<3>(n, kl, xs, xs2, bk, ldb, c, ldc, acc); break;
        case 4: dot_rows_split<4>(n, kl, xs, xs2, bk, ldb, c, ldc, acc); break;
        case 5: dot_rows_split<5>(n, kl, xs, xs2, bk, ldb, c, ldc, acc); break;
        case 6: dot_rows_split<6>(n, kl, xs, xs2, bk, ldb, c, ldc, acc); break;
        case 7: dot_rows_split<7>(n, kl, xs, xs2, bk, ldb, c, ldc, acc); break;
        default: dot_rows_split<8>(n, kl, xs, xs2, bk, ldb, c, ldc, acc); break;
      }
      continue;
    }
    round_rows_dot(xs, m, kl, a + k0, lda);
    switch (m) {
      case 4: dot_rows<4>(n, kl, xs, bk, ldb, c, ldc, acc); break;
      case 5: dot_rows<5>(n, kl, xs, bk, ldb, c, ldc, acc); break;
      case 6: dot_rows<6>(n, kl, xs, bk, ldb, c, ldc, acc); break;
      case 7: dot_rows<7>(n, kl, xs, bk, ldb, c, ldc, acc); break;
      default: dot_rows<8>(n, kl, xs, bk, ldb, c, ldc, acc); break;
    }
  }
}

const lora::IsaTable kTable = {
    "avx512",
    fp32_kernel<kWideMr, kWideNv>(),
    fp32_kernel<kNarrowMr, kNarrowNv>(),
    fp32_kernel<kShortMr, kShortNv>(),
    pack_a_fast,
    pack_b_fast,
    8,  // small_rows: 8 rows x 2 W rows; 16 rows x 1 needed 17 loads per 16 FMAs (load-bound)
    small_m,
    {kWideMr, 32, bf16_kernel<kWideMr>, 0, nullptr, bf16_kernel_epi<kWideMr>},
    pack_a_bf16,
    pack_b_bf16,
    micro_kernel_bf16_out<kWideMr, kWideNv>,
    fma_burst,
    small_m_bf16_dot,
    reduce_k,
    side_panel,
    side_rows,
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
