// The AVX-512 level's packing routines: the shared scalar ones (gemm_kernels_impl.h) with the
// common cases as 16 x 16 transposes in registers, each stored row of the source prefetched half a
// KB ahead (the rows are 16-32 streams at once, more than the hardware prefetchers follow). Packing
// a 2048 x 2048 operand went from ~5 to ~1% of a 2048^3 product. Included by gemm_avx512.cc only,
// inside its target pragma and anonymous namespace; the dropout-masked cases stay scalar.

// Elements of a stored row fetched ahead while packing (512 bytes).
constexpr int64_t kPackPrefetch = 128;

// r[i] lane j -> r[j] lane i.
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
#pragma GCC unroll 16
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
    r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xDD);
  }
}

inline __mmask16 lanes(int64_t n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1); }

// 16 consecutive elements of a stored row (fewer under mask m), as fp32: a plain or a widening load.
inline __m512 load_row(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load_row(const uint16_t* p, __mmask16 m) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

// Rows [row0, row0 + nrows) of a row-major source (nrows <= 16, the rest zero), columns
// [col, col + ncols) (ncols <= 16), transposed: r[q] holds column col + q across the rows.
template <typename T>
inline void load_transposed(__m512 r[16], const T* src, int64_t ld, int64_t row0, int64_t nrows, int64_t col,
                            int64_t ncols) {
  const __mmask16 m = lanes(ncols);
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) {
    if (i < nrows) {
      const T* p = src + (row0 + i) * ld + col;
      r[i] = load_row(p, m);
      __builtin_prefetch(p + kPackPrefetch);
    } else {
      r[i] = _mm512_setzero_ps();
    }
  }
  transpose16(r);
}

// Rows [row0, row0 + rows) of row-major A (rows may exceed 16 or be <= 0) by k [col, col + kl),
// transposed and scaled by alpha, the padding rows +0 (as pack_a writes them).
inline void load_a_transposed(__m512 r[16], const float* a, int64_t lda, int64_t row0, int64_t rows, int64_t col,
                              int64_t kl, float alpha) {
  const int64_t n = rows > 0 ? imin(16, rows) : 0;
  load_transposed(r, a, lda, row0, n, col, kl);
  if (alpha != 1.0f)
    for (int64_t q = 0; q < kl; ++q) r[q] = _mm512_maskz_mul_ps(lanes(n), _mm512_set1_ps(alpha), r[q]);
}

// store(r, k, kl, h) for every block of 16 k by 16 rows of the mr-row panel whose rows are
// [row0, row0 + rows) of row-major A, loaded as load_a_transposed gives them.
template <typename Store>
inline void for_a_blocks(const float* a, int64_t lda, int64_t row0, int64_t rows, int64_t k0, int64_t kc, int mr,
                         float alpha, Store&& store) {
  for (int64_t k = 0; k < kc; k += 16) {
    const int64_t kl = imin(16, kc - k);
    for (int h = 0; h < mr; h += 16) {
      __m512 r[16];
      load_a_transposed(r, a, lda, row0 + h, rows - h, k0 + k, kl, alpha);
      store(r, k, kl, h);
    }
  }
}

void pack_a_fast(float* __restrict dst, const float* __restrict a, int64_t lda, bool trans, int64_t i0, int64_t mc,
                 int64_t k0, int64_t kc, int mr, float alpha, const lora::DropoutMask* drop) {
  if (drop) return pack_a(dst, a, lda, trans, i0, mc, k0, kc, mr, alpha, drop);
  const __m512 va = _mm512_set1_ps(alpha);
  for (int64_t ip = 0; ip < mc; ip += mr) {
    const int64_t rows = imin(mr, mc - ip);
    if (trans) {
      // op(A)[i][k] = a[k*lda + i]: each k is a contiguous run of the panel's rows
      for (int64_t k = 0; k < kc; ++k) {
        const float* src = a + (k0 + k) * lda + i0 + ip;
        for (int h = 0; h < mr; h += 16) {
          const __mmask16 m = lanes(rows - h > 0 ? rows - h : 0);  // padding rows +0, as pack_a
          _mm512_mask_storeu_ps(dst + k * mr + h, lanes(mr - h), _mm512_maskz_mul_ps(m, va, _mm512_maskz_loadu_ps(m, src + h)));
        }
      }
    } else {
      for_a_blocks(a, lda, i0 + ip, rows, k0, kc, mr, alpha, [&](const __m512* r, int64_t k, int64_t kl, int h) {
        for (int64_t q = 0; q < kl; ++q) _mm512_mask_storeu_ps(dst + (k + q) * mr + h, lanes(mr - h), r[q]);
      });
    }
    dst += mr * kc;
  }
}

template <typename T>
void pack_b_fast_t(float* __restrict dst, const T* __restrict b, int64_t ldb, bool trans, int64_t k0, int64_t kc,
                   int64_t j0, int64_t nc, int nr) {
  const int64_t panels = (nc + nr - 1) / nr;
  if (!trans) {
    // op(B)[k][j] = b[k*ldb + j]: each stored row once, whole vectors into every panel
    for (int64_t k = 0; k < kc; ++k) {
      const T* src = b + (k0 + k) * ldb + j0;
      for (int64_t q = 0; q < panels; ++q)
        for (int h = 0; h < nr; h += 16) {
          const int64_t j = q * nr + h, n = nc - j;
          _mm512_storeu_ps(dst + q * nr * kc + k * nr + h, n > 0 ? load_row(src + j, lanes(n)) : _mm512_setzero_ps());
        }
    }
    return;
  }
  // op(B)[k][j] = b[j*ldb + k]: 16 stored rows by 16 k at a time, transposed
  for (int64_t q = 0; q < panels; ++q, dst += nr * kc) {
    const int64_t cols = imin(nr, nc - q * nr);
    for (int64_t k = 0; k < kc; k += 16) {
      const int64_t kl = imin(16, kc - k);
      for (int h = 0; h < nr; h += 16) {
        __m512 r[16];
        load_transposed(r, b, ldb, j0 + q * nr + h, cols - h > 0 ? imin(16, cols - h) : 0, k0 + k, kl);
        for (int64_t p = 0; p < kl; ++p) _mm512_storeu_ps(dst + (k + p) * nr + h, r[p]);
      }
    }
  }
}

void pack_b_fast(float* dst, const void* b, bool bf16, int64_t ldb, bool trans, int64_t k0, int64_t kc, int64_t j0,
                 int64_t nc, int nr, const lora::DropoutMask* drop) {
  if (drop || nr % 16) return pack_b(dst, b, bf16, ldb, trans, k0, kc, j0, nc, nr, drop);
  if (bf16) pack_b_fast_t(dst, static_cast<const uint16_t*>(b), ldb, trans, k0, kc, j0, nc, nr);
  else pack_b_fast_t(dst, static_cast<const float*>(b), ldb, trans, k0, kc, j0, nc, nr);
}

// The bf16 bits of each lane in its high half (low half garbage): nearest-even, NaN kept quiet
// (to_bf16 below, on every lane).
inline __m512i bf16_high(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i rounded = _mm512_add_epi32(
      bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1))));
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  return _mm512_mask_blend_epi32(nan, rounded, _mm512_or_si512(bits, _mm512_set1_epi32(0x400000)));
}
// (k even, k odd) of 16 lanes as the 32-bit pairs the bf16 kernels read.
inline __m512i bf16_pairs(__m512 even, __m512 odd) {
  return _mm512_or_si512(_mm512_srli_epi32(bf16_high(even), 16),
                         _mm512_and_si512(bf16_high(odd), _mm512_set1_epi32(int(0xffff0000u))));
}
