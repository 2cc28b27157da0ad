// The GEMM leaf routines written once with GCC vector extensions and compiled once per ISA level:
// gemm_avx512.cc, gemm_avx2.cc and gemm_generic.cc each set `#pragma GCC target`, define the macros
// below and include this file. Everything here has internal linkage (an anonymous namespace, no
// standard-library templates), so no AVX-512 code can leak into another translation unit through a
// shared inline symbol. Not a public header; no driver logic (blocking, threads) lives here.
//
// Expects: LN_VL (floats per vector), LN_FMA(a, b, c) (= a*b + c), LN_SPLAT(x) (broadcast),
// LN_HSUM(v) (sum of the lanes, as a tree: a serial chain costs ~50 cycles per sum). Optional:
// LN_WIDEN_U16(p) (LN_VL uint16 at p zero-extended to a vector of uint32) and LN_STORE_U16(p, v)
// (the low 16 bits of each uint32 lane stored at p), where the generic conversions compile poorly;
// LN_KEEP(v) (an empty asm that keeps v in a register, so a load is not folded into each use) and
// LN_HAS_FMA (the level has a fused multiply-add: defines fma_burst), LN_PACK_A (a faster pack_a
// of the level, declared before this file is included).

#include <cstdint>

#include "../backend/rng.h"
#include "gemm_isa.h"

namespace {

typedef float vf __attribute__((vector_size(LN_VL * 4)));
typedef float vfu __attribute__((vector_size(LN_VL * 4), aligned(4)));
typedef uint16_t vhu __attribute__((vector_size(LN_VL * 2), aligned(2)));
typedef uint32_t vu __attribute__((vector_size(LN_VL * 4)));
typedef uint16_t vh __attribute__((vector_size(LN_VL * 2)));

#ifndef LN_KEEP
#define LN_KEEP(v) (void)0
#endif
#ifndef LN_PACK_A  // the level's packing of A where it has a faster one than pack_a below
#define LN_PACK_A pack_a
#endif

inline vf splat(float x) { return LN_SPLAT(x); }
inline vf loadu(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void storeu(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
inline vf load_bf16(const uint16_t* p) {
#ifdef LN_WIDEN_U16
  const vu w = (vu)LN_WIDEN_U16(p) << 16;
#else
  const vu w = __builtin_convertvector(*reinterpret_cast<const vhu*>(p), vu) << 16;
#endif
  return (vf)w;  // same-size vector cast: a bit reinterpretation
}
// fp32 -> bf16, nearest-even, NaN kept quiet: half.h's float_to_bf16 on every lane.
inline void store_bf16(uint16_t* p, vf v) {
  const vu bits = (vu)v;
  const vu rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const vu quiet_nan = (bits >> 16) | 0x40u;
  const vu out = (bits & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded;
#ifdef LN_STORE_U16
  LN_STORE_U16(p, out);
#else
  *reinterpret_cast<vhu*>(p) = __builtin_convertvector(out, vh);
#endif
}
inline float bf16f(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}
inline float hsum(vf v) { return LN_HSUM(v); }
inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// k steps of rank-1 updates of an MR x NV tile of sums held in registers: acc += a·b with a a
// packed (k, MR) micro-panel and b a (k, NV vectors) one with row stride ldb. The micro-kernels'
// main loop, and the GEMM's epilogue product (a2·b2: the adapter's h·Bᵀ or dh·A, the bias as a row
// of ones) as ke more steps into the same sums before the one store. (That product used to be a
// second kernel pass over the stored tile, which read back the tile just stored: perf put ~0.3 ms
// of a 512 x 1024 x 1024 r8 backward under the bf16 dot there. Summing it apart to keep that
// pass's rounding needs chains of its own per row, which ran latency-bound: 2048² r16, 17 steps,
// about 5 ms slower.)
template <int MR, int NV>
__attribute__((always_inline)) inline void fma_steps(vf (&acc)[MR][NV], int64_t k, const float* __restrict a,
                                                     const float* __restrict b, int64_t ldb) {
  for (int64_t p = 0; p < k; ++p) {
    vf bv[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) bv[j] = loadu(b + j * LN_VL);
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i) {
      const vf av = splat(a[i]);
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[i][j] = LN_FMA(av, bv[j], acc[i][j]);
    }
    a += MR;
    b += ldb;
  }
}

// c(MR, NV vectors) = (accumulate ? c : 0) + acc, row stride ldc.
template <int MR, int NV>
__attribute__((always_inline)) inline void store_tile(float* __restrict c, int64_t ldc, vf (&acc)[MR][NV],
                                                      int accumulate) {
  if (accumulate) {
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) storeu(c + i * ldc + j * LN_VL, loadu(c + i * ldc + j * LN_VL) + acc[i][j]);
  } else {
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) storeu(c + i * ldc + j * LN_VL, acc[i][j]);
  }
}

// The register-tiled micro-kernel: MR rows x NV vectors of accumulators, one broadcast of a per
// row and NV loads of b per k step (fma_steps). Everything unrolled so the accumulators stay in
// registers. BF16_OUT: c holds bf16 bits and becomes round(c + a·b) (the epilogue of a merge into
// a bf16 weight: one read and one write of c, one rounding); otherwise c is fp32, with the
// epilogue product a2·b2 of ke steps (b2 packed NV vectors wide; ke 0: none) in the same sums.
template <int MR, int NV, bool BF16_OUT>
__attribute__((always_inline)) inline void micro_tile(int64_t k, const float* __restrict a,
                                                      const float* __restrict b, int64_t ldb,
                                                      void* __restrict cv, int64_t ldc, int accumulate,
                                                      int64_t ke, const float* a2, const float* b2) {
  vf acc[MR][NV];
#pragma GCC unroll 32
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) acc[i][j] = vf{};
  fma_steps<MR, NV>(acc, k, a, b, ldb);
  if constexpr (BF16_OUT) {
    uint16_t* __restrict c = static_cast<uint16_t*>(cv);
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j)
        store_bf16(c + i * ldc + j * LN_VL, load_bf16(c + i * ldc + j * LN_VL) + acc[i][j]);
    return;
  }
  fma_steps<MR, NV>(acc, ke, a2, b2, NV * LN_VL);
  store_tile<MR, NV>(static_cast<float*>(cv), ldc, acc, accumulate);
}

template <int MR, int NV>
void micro_kernel(int64_t k, const float* a, const float* b, int64_t ldb, float* c, int64_t ldc,
                  int accumulate) {
  micro_tile<MR, NV, false>(k, a, b, ldb, c, ldc, accumulate, 0, nullptr, nullptr);
}
// micro_kernel with the epilogue product (GemmKernel::run_epi).
template <int MR, int NV>
void micro_kernel_epi(int64_t k, const float* a, const float* b, int64_t ldb, float* c, int64_t ldc,
                      int accumulate, int64_t ke, const float* a2, const float* b2) {
  micro_tile<MR, NV, false>(k, a, b, ldb, c, ldc, accumulate, ke, a2, b2);
}
template <int MR, int NV>
void micro_kernel_bf16_out(int64_t k, const float* a, const float* b, int64_t ldb, uint16_t* c,
                           int64_t ldc) {
  micro_tile<MR, NV, true>(k, a, b, ldb, c, ldc, 1, 0, nullptr, nullptr);
}
// A level's table entry for its MR x NV fp32 register tile: the tile, its one-vector variant for
// side products over the same packed A (run1) and the epilogue-fused run.
template <int MR, int NV>
constexpr lora::GemmKernel fp32_kernel() {
  return {MR, NV * LN_VL, micro_kernel<MR, NV>, LN_VL, micro_kernel<MR, 1>, micro_kernel_epi<MR, NV>};
}

inline float masked(float v, const lora::DropoutMask* d, int64_t r, int64_t c) {
  return lora::dropout_keep(d->seed, static_cast<uint64_t>(r * d->ld + c), d->p) ? v * d->scale
                                                                                 : 0.0f;
}

void pack_a(float* __restrict dst, const float* __restrict a, int64_t lda, bool trans, int64_t i0,
            int64_t mc, int64_t k0, int64_t kc, int mr, float alpha,
            const lora::DropoutMask* drop) {
  if (trans) {
    // op(A)[i][k] = a[k*lda + i]: walk the stored rows (k) once each, filling every panel, so
    // each stored row is read contiguously (a panel-at-a-time walk touched a new page per k).
    const int64_t panels = (mc + mr - 1) / mr;
    for (int64_t k = 0; k < kc; ++k) {
      const float* src = a + (k0 + k) * lda + i0;
      for (int64_t p = 0; p < panels; ++p) {
        const int64_t ip = p * mr, rows = imin(mr, mc - ip);
        float* d = dst + p * mr * kc + k * mr;
        if (drop) {
          for (int64_t i = 0; i < rows; ++i) d[i] = alpha * masked(src[ip + i], drop, k0 + k, i0 + ip + i);
        } else {
          for (int64_t i = 0; i < rows; ++i) d[i] = alpha * src[ip + i];
        }
        for (int64_t i = rows; i < mr; ++i) d[i] = 0.0f;
      }
    }
    return;
  }
  for (int64_t ip = 0; ip < mc; ip += mr) {
    const int64_t rows = imin(mr, mc - ip);
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t r = i0 + ip + i;
      const float* src = a + r * lda + k0;
      if (drop) {
        for (int64_t k = 0; k < kc; ++k) dst[k * mr + i] = alpha * masked(src[k], drop, r, k0 + k);
      } else {
        for (int64_t k = 0; k < kc; ++k) dst[k * mr + i] = alpha * src[k];
      }
    }
    for (int64_t i = rows; i < mr; ++i)
      for (int64_t k = 0; k < kc; ++k) dst[k * mr + i] = 0.0f;
    dst += mr * kc;
  }
}

template <typename T>
inline float to_f32(T v);
template <>
inline float to_f32<float>(float v) { return v; }
template <>
inline float to_f32<uint16_t>(uint16_t v) { return bf16f(v); }

template <typename T>
void pack_b_t(float* __restrict dst, const T* __restrict b, int64_t ldb, bool trans, int64_t k0,
              int64_t kc, int64_t j0, int64_t nc, int nr, const lora::DropoutMask* drop) {
  if (!trans) {
    // op(B)[k][j] = b[k*ldb + j]: each stored row once, contiguous, scattered over the panels.
    const int64_t panels = (nc + nr - 1) / nr;
    for (int64_t k = 0; k < kc; ++k) {
      const T* src = b + (k0 + k) * ldb + j0;
      for (int64_t q = 0; q < panels; ++q) {
        const int64_t jp = q * nr, cols = imin(nr, nc - jp);
        float* d = dst + q * nr * kc + k * nr;
        if (drop) {
          for (int64_t j = 0; j < cols; ++j) d[j] = masked(to_f32(src[jp + j]), drop, k0 + k, j0 + jp + j);
        } else if (cols == nr) {
          for (int64_t j = 0; j < nr; ++j) d[j] = to_f32(src[jp + j]);
        } else {
          for (int64_t j = 0; j < cols; ++j) d[j] = to_f32(src[jp + j]);
        }
        for (int64_t j = cols; j < nr; ++j) d[j] = 0.0f;
      }
    }
    return;
  }
  for (int64_t jp = 0; jp < nc; jp += nr) {
    const int64_t cols = imin(nr, nc - jp);
    // op(B)[k][j] = b[j*ldb + k]: 16 k at a time across the panel's rows, so the writes of one
    // chunk stay within 16 lines of the panel.
    for (int64_t kk = 0; kk < kc; kk += 16) {
      const int64_t kl = imin(16, kc - kk);
      for (int64_t j = 0; j < cols; ++j) {
        const int64_t r = j0 + jp + j;
        const T* src = b + r * ldb + k0 + kk;
        float* d = dst + kk * nr + j;
        if (drop) {
          for (int64_t k = 0; k < kl; ++k) d[k * nr] = masked(to_f32(src[k]), drop, r, k0 + kk + k);
        } else {
          for (int64_t k = 0; k < kl; ++k) d[k * nr] = to_f32(src[k]);
        }
      }
      for (int64_t j = cols; j < nr; ++j)
        for (int64_t k = 0; k < kl; ++k) dst[(kk + k) * nr + j] = 0.0f;
    }
    dst += nr * kc;
  }
}

void pack_b(float* dst, const void* b, bool bf16, int64_t ldb, bool trans, int64_t k0, int64_t kc,
            int64_t j0, int64_t nc, int nr, const lora::DropoutMask* drop) {
  if (bf16)
    pack_b_t(dst, static_cast<const uint16_t*>(b), ldb, trans, k0, kc, j0, nc, nr, drop);
  else
    pack_b_t(dst, static_cast<const float*>(b), ldb, trans, k0, kc, j0, nc, nr, drop);
}

// ---- small-M path: c(M, n) = a(M, k)·op(B), streaming B once ----------------------------------

template <typename T>
inline vf loadv(const T* p);
template <>
inline vf loadv<float>(const float* p) { return loadu(p); }
template <>
inline vf loadv<uint16_t>(const uint16_t* p) { return load_bf16(p); }

// A bf16 row of B read as pairs: 2·LN_VL bf16 loaded as LN_VL uint32 lanes, lane i holding elements
// 2i (low half) and 2i + 1 (high half). The even elements are the lanes shifted left by 16, the odd
// ones the lanes with the low half cleared: two plain lane ops, where widening LN_VL bf16 to LN_VL
// floats is a cross-lane shuffle per vector. x is repacked to match: its even elements, then its
// odd. Cache-resident GEMVs gain (576 x 8192 bf16, one core: 1 row 62-82 -> 85-88 GB/s, 4 rows
// 33-42 -> 42-44); from DRAM the loop waits on memory either way (~25 GB/s per core here).
inline vf bf16_even(vu w) { return (vf)(w << 16); }
inline vf bf16_odd(vu w) { return (vf)(w & 0xffff0000u); }
typedef uint32_t vuu __attribute__((vector_size(LN_VL * 4), aligned(4)));
inline vu load_pairs(const uint16_t* p) { return *reinterpret_cast<const vuu*>(p); }

// Vectors of each bf16 row of B per step of the dot form (read as pairs: a 64-byte line each under
// AVX-512): a step loads U of each of its G rows before its FMAs. As many as the vector registers
// hold beside the M·G accumulators and x, at most 4, on up to 4 rows of x. (fp32 B read no faster
// so; 6 and 8 rows of x at K = 4096 read 3-9% slower, at K = 576 5-27% faster.)
template <int M, int G>
constexpr int kDotLines = [] {
  constexpr int regs = LN_VL >= 16 ? 32 : 16;
  if (M > 4) return 1;
  for (int u = 4; u > 1; u /= 2)
    if (M * G + u * G + 2 <= regs) return u;
  return 1;
}();

// B stored (n, k): each output is a dot product along a stored row; G rows of B at a time share
// the loads of x. x is first repacked into xi as (k/LN_VL, M, LN_VL): the M rows of one k vector
// side by side, so rows of x a power of two apart (C = 4096) do not all fall in one L1 set. For a
// bf16 B the first kp columns (whole pairs of vectors) go as pairs (load_pairs): xi holds each
// 2·LN_VL columns of a row as (even elements, odd elements).
template <int M, int G, typename T>
void small_m_nt(int64_t n, int64_t k, const float* __restrict a, int64_t lda, const T* __restrict b, int64_t ldb,
                float* __restrict c, int64_t ldc, int accumulate, float* __restrict xi) {
  constexpr bool kPairs = sizeof(T) == 2;
  const int64_t kv = k - k % LN_VL;
  const int64_t kp = kPairs ? k - k % (2 * LN_VL) : 0;
  for (int64_t p = 0; p < kp; p += 2 * LN_VL)
    for (int m = 0; m < M; ++m)
      for (int i = 0; i < LN_VL; ++i) {
        xi[p * M + m * 2 * LN_VL + i] = a[m * lda + p + 2 * i];
        xi[p * M + m * 2 * LN_VL + LN_VL + i] = a[m * lda + p + 2 * i + 1];
      }
  for (int64_t p = kp; p < kv; p += LN_VL)
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) storeu(xi + p * M + m * LN_VL, loadu(a + m * lda + p));
  int64_t j = 0;
  for (; j + G <= n; j += G) {
    vf acc[M][G];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) acc[m][g] = vf{};
    // The next group's rows start a new stream each (a fresh page per k block): prefetch them
    // one group ahead, or every group waits on DRAM latency (39% of cycles on the loads of B).
    const T* next = b + (j + G < n ? j + G : j) * ldb;
    const float* xp = xi;
    int64_t p = 0;
    // U vectors of each row per step, all loaded before the FMAs. A step read one line of each of
    // the G rows in turn, and one core streamed bf16 W from memory at 17-22 GB/s (1 row, K = 576,
    // 576 to 49152 rows), now 24-33; at K = 4096 +5-10%; two threads at K = 576 36 -> 60 GB/s
    // (alternating calls in one process).
    constexpr int U = kDotLines<M, G>;
    if constexpr (kPairs && U > 1) {
      for (; p + U * 2 * LN_VL <= kp; p += U * 2 * LN_VL, xp += U * 2 * M * LN_VL) {
        vu bw[U][G];
#pragma GCC unroll 4
        for (int g = 0; g < G; ++g)
#pragma GCC unroll 4
          for (int u = 0; u < U; ++u) {
            __builtin_prefetch(next + g * ldb + p + u * 2 * LN_VL);
            bw[u][g] = load_pairs(b + (j + g) * ldb + p + u * 2 * LN_VL);
          }
#pragma GCC unroll 4
        for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
          for (int m = 0; m < M; ++m) {
            vf ae = loadu(xp + (u * M + m) * 2 * LN_VL), ao = loadu(xp + (u * M + m) * 2 * LN_VL + LN_VL);
            LN_KEEP(ae);
            LN_KEEP(ao);
#pragma GCC unroll 4
            for (int g = 0; g < G; ++g)
              acc[m][g] = LN_FMA(ao, bf16_odd(bw[u][g]), LN_FMA(ae, bf16_even(bw[u][g]), acc[m][g]));
          }
      }
    }
    if constexpr (kPairs) {
      for (; p < kp; p += 2 * LN_VL, xp += 2 * M * LN_VL) {
        vu bw[G];
#pragma GCC unroll 4
        for (int g = 0; g < G; ++g) {
          __builtin_prefetch(next + g * ldb + p);
          bw[g] = load_pairs(b + (j + g) * ldb + p);
        }
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          vf ae = loadu(xp + m * 2 * LN_VL), ao = loadu(xp + m * 2 * LN_VL + LN_VL);
          LN_KEEP(ae);
          LN_KEEP(ao);
#pragma GCC unroll 4
          for (int g = 0; g < G; ++g) acc[m][g] = LN_FMA(ao, bf16_odd(bw[g]), LN_FMA(ae, bf16_even(bw[g]), acc[m][g]));
        }
      }
    }
    for (; p < kv; p += LN_VL, xp += M * LN_VL) {
      vf bv[G];
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) {
        if ((p * sizeof(T)) % 64 == 0) __builtin_prefetch(next + g * ldb + p);
        bv[g] = loadv<T>(b + (j + g) * ldb + p);
      }
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        vf av = loadu(xp + m * LN_VL);
        LN_KEEP(av);  // one load per row of x, not one folded into each of the G FMAs
#pragma GCC unroll 4
        for (int g = 0; g < G; ++g) acc[m][g] = LN_FMA(av, bv[g], acc[m][g]);
      }
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) {
        float s = hsum(acc[m][g]);
        for (int64_t q = kv; q < k; ++q) s += a[m * lda + q] * to_f32(b[(j + g) * ldb + q]);
        float* out = c + m * ldc + j + g;
        *out = accumulate ? *out + s : s;
      }
  }
  for (; j < n; ++j) {
    for (int m = 0; m < M; ++m) {
      vf acc = vf{};
      int64_t p = 0;
      if constexpr (kPairs)
        for (; p < kp; p += 2 * LN_VL) {
          const vu w = load_pairs(b + j * ldb + p);
          const float* xq = xi + p * M + m * 2 * LN_VL;
          acc = LN_FMA(loadu(xq + LN_VL), bf16_odd(w), LN_FMA(loadu(xq), bf16_even(w), acc));
        }
      for (; p < kv; p += LN_VL) acc = LN_FMA(loadu(xi + p * M + m * LN_VL), loadv<T>(b + j * ldb + p), acc);
      float s = hsum(acc);
      for (int64_t p = kv; p < k; ++p) s += a[m * lda + p] * to_f32(b[j * ldb + p]);
      float* out = c + m * ldc + j;
      *out = accumulate ? *out + s : s;
    }
  }
}

// B stored (n, k), more rows of x than the dot form uses well (decode_broadcasts, up to 16):
// yᵀ = B·xᵀ with the rows of x as the lanes. xt holds x repacked as (k, NV·LN_VL) (lanes past m
// zero); R rows of B are walked whole, side by side, each element broadcast once against NV
// vectors of x, so B streams from memory once in its stored order, with no horizontal sums.
template <typename T>
constexpr int64_t kBcastPrefetch = 1024 / sizeof(T);  // elements ahead on each row of B (1 KB)
// bf16 rows are widened kBcastWiden elements at a time into an L1 buffer, then broadcast from it
// (a broadcast of a bf16 pair split by shift and mask cost two vector ops per element: 2x slower).
constexpr int64_t kBcastWiden = 64;
template <int R, int NV, typename T>
inline void bcast_rows(int m, int64_t k, const T* __restrict w, int64_t ldb, const float* __restrict xt,
                       float* __restrict c, int64_t ldc, int accumulate) {
  constexpr int L = NV * LN_VL;
  vf acc[R][NV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = vf{};
  // one step: the R elements of B at k = p (read at ws[r * lds]) against x's column p
  auto step = [&](const float* __restrict ws, int64_t lds, int64_t p) __attribute__((always_inline)) {
    vf xv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) xv[v] = loadu(xt + p * L + v * LN_VL);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const vf wv = splat(ws[r * lds]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = LN_FMA(wv, xv[v], acc[r][v]);
    }
  };
  int64_t p = 0;
  if constexpr (sizeof(T) == 4) {
    // one cache line of each row at a time, unrolled: fixed offsets from the R row pointers (a
    // pointer bump and a prefetch test per k left the loop bound on integer work, at ~80% of peak)
    for (; p + 16 <= k; p += 16) {
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) __builtin_prefetch(w + r * ldb + p + kBcastPrefetch<T>);
#pragma GCC unroll 16
      for (int q = 0; q < 16; ++q) step(reinterpret_cast<const float*>(w) + p + q, ldb, p + q);
    }
  } else {
    alignas(64) float wide[R * kBcastWiden];
    for (; p + kBcastWiden <= k; p += kBcastWiden) {
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        __builtin_prefetch(w + r * ldb + p + kBcastPrefetch<T>);
#pragma GCC unroll 8
        for (int q = 0; q < kBcastWiden; q += LN_VL) storeu(wide + r * kBcastWiden + q, loadv<T>(w + r * ldb + p + q));
      }
#pragma GCC unroll 16
      for (int64_t q = 0; q < kBcastWiden; ++q) step(wide + q, kBcastWiden, p + q);
    }
  }
  for (; p < k; ++p) {
    if ((p * sizeof(T)) % 64 == 0)
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) __builtin_prefetch(w + r * ldb + p + kBcastPrefetch<T>);
    float ws[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) ws[r] = to_f32(w[r * ldb + p]);
    step(ws, 1, p);
  }
  float tile[R * L];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) storeu(tile + r * L + v * LN_VL, acc[r][v]);
  for (int i = 0; i < m; ++i)
    for (int r = 0; r < R; ++r) {
      float* out = c + i * ldc + r;
      *out = accumulate ? *out + tile[r * L + i] : tile[r * L + i];
    }
}

// fp32 B stored (n, k), m <= LN_VL / 2 rows of x past the dot form's: two k positions per
// vector. xt holds x repacked as (k/2, LN_VL), lane 2i+e = x[i][2q+e] (lanes past 2m zero), and each
// 8-byte pair of a row of B is broadcast to every lane pair, so one FMA takes 8 rows x 2 k where the
// rows-as-lanes form (bcast_rows) gives half its lanes to padding (timings at decode_broadcasts).
// Lane pairs are summed at the end; an odd k's last column is added in scalar.
#if LN_VL >= 16
typedef uint64_t vq __attribute__((vector_size(LN_VL * 4)));
inline vf pair_splat(const float* p) {
  uint64_t u;
  __builtin_memcpy(&u, p, 8);
  return (vf)(vq{} + u);  // every 64-bit lane = (p[0], p[1]): vpbroadcastq from memory
}
template <int R>
inline void pair_rows(int m, int64_t k, const float* __restrict w, int64_t ldb, const float* __restrict xt,
                      const float* __restrict a, int64_t lda, float* __restrict c, int64_t ldc, int accumulate) {
  vf acc[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc[r] = vf{};
  const int64_t kp = k & ~int64_t(1);
  auto step = [&](int64_t p) __attribute__((always_inline)) {
    const vf xv = loadu(xt + (p / 2) * LN_VL);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r] = LN_FMA(pair_splat(w + r * ldb + p), xv, acc[r]);
  };
  int64_t p = 0;
  // a cache line of each row at a time, unrolled (as bcast_rows)
  for (; p + 16 <= kp; p += 16) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) __builtin_prefetch(w + r * ldb + p + kBcastPrefetch<float>);
#pragma GCC unroll 8
    for (int q = 0; q < 16; q += 2) step(p + q);
  }
  for (; p < kp; p += 2) step(p);
  float tile[R * LN_VL];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) storeu(tile + r * LN_VL, acc[r]);
  for (int i = 0; i < m; ++i)
    for (int r = 0; r < R; ++r) {
      float s = tile[r * LN_VL + 2 * i] + tile[r * LN_VL + 2 * i + 1];
      if (kp < k) s += a[i * lda + kp] * w[r * ldb + kp];
      float* out = c + i * ldc + r;
      *out = accumulate ? *out + s : s;
    }
}

void small_m_pairs(int m, int64_t n, int64_t k, const float* __restrict a, int64_t lda, const float* b, int64_t ldb,
                   float* c, int64_t ldc, int accumulate, float* __restrict xt) {
  const int64_t kh = k / 2;
  for (int64_t q = 0; q < kh; ++q) {
    float* d = xt + q * LN_VL;
    for (int i = 0; i < LN_VL / 2; ++i) {
      d[2 * i] = i < m ? a[i * lda + 2 * q] : 0.0f;
      d[2 * i + 1] = i < m ? a[i * lda + 2 * q + 1] : 0.0f;
    }
  }
  int64_t j = 0;
  // 8 rows of B side by side (16 streams of B read slower, 4 slower still)
  for (; j + 8 <= n; j += 8) pair_rows<8>(m, k, b + j * ldb, ldb, xt, a, lda, c + j, ldc, accumulate);
  for (; j + 4 <= n; j += 4) pair_rows<4>(m, k, b + j * ldb, ldb, xt, a, lda, c + j, ldc, accumulate);
  for (; j < n; ++j) pair_rows<1>(m, k, b + j * ldb, ldb, xt, a, lda, c + j, ldc, accumulate);
}
#endif

// NV vectors of lanes (ceil(m / LN_VL)); R rows of B so that R·NV accumulators, NV of x and one
// broadcast fit the registers (32 zmm; 16 ymm or xmm).
template <int NV, typename T>
void small_m_bcast_nv(int m, int64_t n, int64_t k, const float* __restrict a, int64_t lda, const T* b, int64_t ldb,
                      float* c, int64_t ldc, int accumulate, float* __restrict xt) {
  constexpr int L = NV * LN_VL;
  constexpr int R = LN_VL == 16 ? 8 : NV == 1 ? 8 : NV == 2 ? 6 : NV == 3 ? 4 : 2;
  // x (m, k) as one packed L-row panel of A: (k, L), the rows past m zero
  LN_PACK_A(xt, a, lda, false, 0, m, 0, k, L, 1.0f, nullptr);
  int64_t j = 0;
  for (; j + R <= n; j += R) bcast_rows<R, NV, T>(m, k, b + j * ldb, ldb, xt, c + j, ldc, accumulate);
  for (; j < n; ++j) bcast_rows<1, NV, T>(m, k, b + j * ldb, ldb, xt, c + j, ldc, accumulate);
}

template <typename T>
void small_m_bcast(int m, int64_t n, int64_t k, const float* a, int64_t lda, const T* b, int64_t ldb, float* c,
                   int64_t ldc, int accumulate, float* xt) {
  static_assert(lora::kDecodeRows <= 4 * LN_VL, "at most 4 vectors of rows");
  switch ((m + LN_VL - 1) / LN_VL) {
    case 1: return small_m_bcast_nv<1, T>(m, n, k, a, lda, b, ldb, c, ldc, accumulate, xt);
    case 2: return small_m_bcast_nv<(LN_VL < 16 ? 2 : 1), T>(m, n, k, a, lda, b, ldb, c, ldc, accumulate, xt);
    case 3: return small_m_bcast_nv<(LN_VL < 8 ? 3 : 1), T>(m, n, k, a, lda, b, ldb, c, ldc, accumulate, xt);
    default: return small_m_bcast_nv<(LN_VL < 8 ? 4 : 1), T>(m, n, k, a, lda, b, ldb, c, ldc, accumulate, xt);
  }
}

// B stored (k, n): a block of NB vectors of columns at a time, all k, M rows of accumulators.
template <int M, int NB, typename T>
void small_m_nn(int64_t n, int64_t k, const float* __restrict a, int64_t lda, const T* __restrict b, int64_t ldb,
                float* __restrict c, int64_t ldc, int accumulate) {
  int64_t j = 0;
  for (; j + NB * LN_VL <= n; j += NB * LN_VL) {
    vf acc[M][NB];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
      for (int q = 0; q < NB; ++q) acc[m][q] = vf{};
    for (int64_t p = 0; p < k; ++p) {
      vf bv[NB];
#pragma GCC unroll 4
      for (int q = 0; q < NB; ++q) bv[q] = loadv<T>(b + p * ldb + j + q * LN_VL);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        const vf av = splat(a[m * lda + p]);
#pragma GCC unroll 4
        for (int q = 0; q < NB; ++q) acc[m][q] = LN_FMA(av, bv[q], acc[m][q]);
      }
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
      for (int q = 0; q < NB; ++q) {
        float* out = c + m * ldc + j + q * LN_VL;
        storeu(out, accumulate ? loadu(out) + acc[m][q] : acc[m][q]);
      }
  }
  for (; j + LN_VL <= n; j += LN_VL) {  // leftover whole vectors, one at a time
    vf acc[M];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) acc[m] = vf{};
    for (int64_t p = 0; p < k; ++p) {
      const vf bv = loadv<T>(b + p * ldb + j);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc[m] = LN_FMA(splat(a[m * lda + p]), bv, acc[m]);
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      float* out = c + m * ldc + j;
      storeu(out, accumulate ? loadu(out) + acc[m] : acc[m]);
    }
  }
  if (j < n) {
    const int64_t w = n - j;
    for (int m = 0; m < M; ++m)
      for (int64_t q = 0; q < w; ++q) {
        float* out = c + m * ldc + j + q;
        if (!accumulate) *out = 0.0f;
      }
    for (int64_t p = 0; p < k; ++p)
      for (int m = 0; m < M; ++m) {
        const float av = a[m * lda + p];
        for (int64_t q = 0; q < w; ++q) c[m * ldc + j + q] += av * to_f32(b[p * ldb + j + q]);
      }
  }
}

// ---- side products: d (kc, kSideCols) += op(A)ᵀ·td over a block of rows of op(A) ---------------
// The dx GEMM's blocks of dy, while in cache, give the LoRA backward's dB += s·dyᵀ·h too. Element
// (i, k) of the block is a[i*si + k*SK]: a packed panel (SK = MR rows, k-major, si = 1) or rows as
// stored (SK = 1, si = lda; under the bf16 dot, whose panels hold A rounded to bf16, so D keeps
// fp32 products). td holds the same rows of h (row stride ldtd, nd <= kSideCols columns read;
// columns past nd count as zero), d kc rows of kSideCols floats. k in blocks of KB held in
// registers; each row of td is loaded once per block and broadcast against KB elements of A.
template <int SK>
void side_block(int64_t kc, const float* __restrict a, int64_t si, int64_t rows, const float* __restrict td,
                int64_t ldtd, int nd, float* __restrict d) {
  constexpr int W = lora::kSideCols, NV = W / LN_VL, KB = LN_VL >= 16 ? 16 : 4, kChunk = 64;
  alignas(64) float tl[kChunk * W];
  for (int64_t r0 = 0; r0 < rows; r0 += kChunk) {
    const int64_t rn = rows - r0 < kChunk ? rows - r0 : kChunk;
    // td's rows as read: in place when whole, else copied with zeros past nd
    const float* tr = td + r0 * ldtd;
    int64_t ldt = ldtd;
    if (nd < W) {
      for (int64_t i = 0; i < rn; ++i)
        for (int c = 0; c < W; ++c) tl[i * W + c] = c < nd ? tr[i * ldtd + c] : 0.0f;
      tr = tl;
      ldt = W;
    }
    const float* ar = a + r0 * si;
    int64_t k = 0;
    for (; k + KB <= kc; k += KB) {
      vf acc[KB][NV];
#pragma GCC unroll 16
      for (int q = 0; q < KB; ++q)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[q][v] = loadu(d + (k + q) * W + v * LN_VL);
      for (int64_t i = 0; i < rn; ++i) {
        vf h[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) h[v] = loadu(tr + i * ldt + v * LN_VL);
#pragma GCC unroll 16
        for (int q = 0; q < KB; ++q) {
          const vf av = splat(ar[i * si + (k + q) * SK]);
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) acc[q][v] = LN_FMA(av, h[v], acc[q][v]);
        }
      }
#pragma GCC unroll 16
      for (int q = 0; q < KB; ++q)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) storeu(d + (k + q) * W + v * LN_VL, acc[q][v]);
    }
    for (; k < kc; ++k)
      for (int v = 0; v < NV; ++v) {
        vf acc = loadu(d + k * W + v * LN_VL);
        for (int64_t i = 0; i < rn; ++i) acc = LN_FMA(splat(ar[i * si + k * SK]), loadu(tr + i * ldt + v * LN_VL), acc);
        storeu(d + k * W + v * LN_VL, acc);
      }
  }
}

// op(A) stored row-major (row stride lda): `rows` rows of kc, read as stored.
void side_rows(int64_t kc, const float* a, int64_t lda, int64_t rows, const float* td, int64_t ldtd, int nd,
               float* d) {
  side_block<1>(kc, a, lda, rows, td, ldtd, nd, d);
}

// One packed panel (mr rows, k-major, as pack_a writes it); mr: the packing kernel's rows per panel
// (every level's wide, narrow and short kernels).
void side_panel(int mr, int64_t kc, const float* ap, int rows, const float* td, int64_t ldtd, int nd, float* d) {
  switch (mr) {
    case 4: return side_block<4>(kc, ap, 1, rows, td, ldtd, nd, d);
    case 6: return side_block<6>(kc, ap, 1, rows, td, ldtd, nd, d);
    case 8: return side_block<8>(kc, ap, 1, rows, td, ldtd, nd, d);
    case 12: return side_block<12>(kc, ap, 1, rows, td, ldtd, nd, d);
    case 24: return side_block<24>(kc, ap, 1, rows, td, ldtd, nd, d);
    default:  // (no kernel has another; kept correct, not fast)
      for (int64_t k = 0; k < kc; ++k)
        for (int i = 0; i < rows; ++i)
          for (int c = 0; c < nd; ++c) d[k * lora::kSideCols + c] += ap[k * mr + i] * td[i * ldtd + c];
  }
}

// ---- reduce_k: c(m, n) = alpha·aᵀ·b (+ c), a stored (k, m), b stored (k, n), m <= 16 ---------
// The LoRA backward's dA = dhᵀ·x and dBᵀ = hᵀ·dy: a handful of rows of C, each a sum over all the
// rows of x or dy. The packed path copied all of B for them (2 MB at 1024 x 576) and spent more on
// that than on the FMAs. Here B is read in place in blocks of kb rows, a strip of NB vectors of
// columns at a time, with RM rows of C in registers and each aᵀ element broadcast from a's own rows
// (a (k, m) row holds the m values one row of B meets: nothing to repack). A strip walks down its
// block's rows, which memory serves poorly (3 lines from each row, a row apart), so the first pass
// over a block prefetches the next block into L2 row by row, line by line, in the order it is
// stored: each block is then read from L2.

// One prefetch per call of the next block's lines, in storage order (rows of `bytes` bytes, ld apart).
struct NextBlock {
  const char* row = nullptr;
  int64_t ld = 0, bytes = 0, rows = 0, off = 0;
  inline void step() {
    if (rows == 0) return;
    __builtin_prefetch(row + off, 0, 2);
    off += 64;
    if (off >= bytes) {
      off = 0;
      row += ld;
      --rows;
    }
  }
};

// RM rows x NB vectors of C over rows [0, k) of b, accumulated into c (or written, alpha-scaled).
template <int RM, int NB>
inline void reduce_tile(int64_t k, const float* __restrict a, int64_t lda, const float* __restrict b, int64_t ldb,
                        float* __restrict c, int64_t ldc, float alpha, int accumulate, NextBlock* next) {
  vf acc[RM][NB];
#pragma GCC unroll 16
  for (int r = 0; r < RM; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < NB; ++q) acc[r][q] = vf{};
  for (int64_t p = 0; p < k; ++p) {
    if (next)
#pragma GCC unroll 4
      for (int q = 0; q < NB; ++q) next->step();
    vf bv[NB];
#pragma GCC unroll 4
    for (int q = 0; q < NB; ++q) bv[q] = loadu(b + p * ldb + q * LN_VL);
#pragma GCC unroll 16
    for (int r = 0; r < RM; ++r) {
      const vf av = splat(a[p * lda + r]);
#pragma GCC unroll 4
      for (int q = 0; q < NB; ++q) acc[r][q] = LN_FMA(av, bv[q], acc[r][q]);
    }
  }
  const vf al = splat(alpha);
#pragma GCC unroll 16
  for (int r = 0; r < RM; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < NB; ++q) {
      float* out = c + r * ldc + q * LN_VL;
      storeu(out, accumulate ? loadu(out) + al * acc[r][q] : al * acc[r][q]);
    }
}

// The register tile of this level: RM rows x NB vectors of accumulators, NB vectors of b and one
// broadcast (32 zmm: 8 x 3; 16 ymm/xmm: 4 x 3).
constexpr int kReduceRows = LN_VL >= 16 ? 8 : 4, kReduceNb = 3;

template <int V>
struct IntTag {
  static constexpr int value = V;
};

// kb: rows of b per block (the block being read and the next one coming in should fit in L2).
// (Copying each block strip by strip into a buffer first, in storage order, ran slower: 1 thread,
// 1024 x 576 r16 from memory 235-252 us against 164-190, 2048 x 2048 1443-1704 against 1193-1392.)
void reduce_k(int m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
              int64_t ldc, float alpha, int accumulate, int64_t kb) {
  constexpr int64_t kStrip = kReduceNb * LN_VL;
  for (int64_t p0 = 0; p0 < k; p0 += kb) {
    const int64_t kl = k - p0 < kb ? k - p0 : kb;
    const int acc = accumulate || p0 > 0;
    const float* bp = b + p0 * ldb;
    for (int r0 = 0; r0 < m; r0 += kReduceRows) {
      const float* ap = a + p0 * lda + r0;
      float* cp = c + r0 * ldc;
      NextBlock nb;
      if (r0 == 0 && p0 + kl < k) {  // the first pass over this block brings the next one in
        nb.row = reinterpret_cast<const char*>(bp + kl * ldb);
        nb.ld = ldb * 4;
        nb.bytes = n * 4;
        nb.rows = k - p0 - kl < kb ? k - p0 - kl : kb;
      }
      NextBlock* next = nb.rows ? &nb : nullptr;
      auto run = [&](auto rows_tag) {
        constexpr int RM = decltype(rows_tag)::value;
        int64_t j = 0;
        for (; j + kStrip <= n; j += kStrip) reduce_tile<RM, kReduceNb>(kl, ap, lda, bp + j, ldb, cp + j, ldc, alpha, acc, next);
        for (; j + LN_VL <= n; j += LN_VL) reduce_tile<RM, 1>(kl, ap, lda, bp + j, ldb, cp + j, ldc, alpha, acc, next);
        for (; j < n; ++j)
          for (int r = 0; r < RM; ++r) {
            float sum = 0.0f;
            for (int64_t p = 0; p < kl; ++p) sum += ap[p * lda + r] * bp[p * ldb + j];
            float* out = cp + r * ldc + j;
            *out = acc ? *out + alpha * sum : alpha * sum;
          }
      };
      switch (m - r0 < kReduceRows ? m - r0 : kReduceRows) {
        case 1: run(IntTag<1>{}); break;
        case 2: run(IntTag<2>{}); break;
        case 3: run(IntTag<3>{}); break;
#if LN_VL >= 16
        case 4: run(IntTag<4>{}); break;
        case 5: run(IntTag<5>{}); break;
        case 6: run(IntTag<6>{}); break;
        case 7: run(IntTag<7>{}); break;
#endif
        default: run(IntTag<kReduceRows>{}); break;
      }
    }
  }
}

// Rows of B per group of the dot form: M·G accumulators, G rows of B and one row of x in the
// vector registers (32 zmm: 8 rows x 3; 16 ymm/xmm: at most 8 accumulators past 2 rows).
template <int M>
constexpr int kDotGroup = M <= 2 ? 4 : LN_VL < 16 ? 2 : M <= 4 ? 4 : 3;

template <int M, typename T>
void small_m_dispatch(int64_t n, int64_t k, const float* a, int64_t lda, const T* b, int64_t ldb, bool trans_b,
                      float* c, int64_t ldc, int accumulate, float* scratch) {
  // M x G (M x NB vectors) accumulators stay within 16 of the 32 (or 16) vector registers
  if (trans_b) {
    if constexpr (M > 8) {
      small_m_bcast<T>(M, n, k, a, lda, b, ldb, c, ldc, accumulate, scratch);
    } else {
      if (lora::decode_broadcasts(M, sizeof(T) == 2, LN_VL)) {
#if LN_VL >= 16
        if constexpr (sizeof(T) == 4 && 2 * M <= LN_VL)
          small_m_pairs(M, n, k, a, lda, b, ldb, c, ldc, accumulate, scratch);
        else
#endif
          small_m_bcast<T>(M, n, k, a, lda, b, ldb, c, ldc, accumulate, scratch);
      }
      else
        small_m_nt<M, kDotGroup<M>, T>(n, k, a, lda, b, ldb, c, ldc, accumulate, scratch);
    }
  } else {
    small_m_nn<M, (M <= 4 ? 4 : M <= 8 ? 2 : 1), T>(n, k, a, lda, b, ldb, c, ldc, accumulate);
  }
}

template <typename T>
void small_m_t(int m, int64_t n, int64_t k, const float* a, int64_t lda, const T* b, int64_t ldb, bool trans_b,
               float* c, int64_t ldc, int accumulate, float* scratch) {
  switch (m) {
    case 1: return small_m_dispatch<1, T>(n, k, a, lda, b, ldb, trans_b, c, ldc, accumulate, scratch);
    case 2: return small_m_dispatch<2, T>(n, k, a, lda, b, ldb, trans_b, c, ldc, accumulate, scratch);
    case 3: return small_m_dispatch<3, T>(n, k, a, lda, b, ldb, trans_b, c, ldc, accumulate, scratch);
    case 4: return small_m_dispatch<4, T>(n, k, a, lda, b, ldb, trans_b, c, ldc, accumulate, scratch);
    case 5: return small_m_dispatch<5, T>(n, k, a, lda, b, ldb, trans_b, c, ldc, accumulate, scratch);
    case 6: return small_m_dispatch<6, T>(n, k, a, lda, b, ldb, trans_b, c, ldc, accumulate, scratch);
    case 7: return small_m_dispatch<7, T>(n, k, a, lda, b, ldb, trans_b, c, ldc, accumulate, scratch);
    case 8: return small_m_dispatch<8, T>(n, k, a, lda, b, ldb, trans_b, c, ldc, accumulate, scratch);
    case 9: return small_m_dispatch<9, T>(n, k, a, lda, b, ldb, trans_b, c, ldc, accumulate, scratch);
    case 10: return small_m_dispatch<10, T>(n, k, a, lda, b, ldb, trans_b, c, ldc, accumulate, scratch);
    case 11: return small_m_dispatch<11, T>(n, k, a, lda, b, ldb, trans_b, c, ldc, accumulate, scratch);
    case 12: return small_m_dispatch<12, T>(n, k, a, lda, b, ldb, trans_b, c, ldc, accumulate, scratch);
    case 13: return small_m_dispatch<13, T>(n, k, a, lda, b, ldb, trans_b, c, ldc, accumulate, scratch);
    case 14: return small_m_dispatch<14, T>(n, k, a, lda, b, ldb, trans_b, c, ldc, accumulate, scratch);
    case 15: return small_m_dispatch<15, T>(n, k, a, lda, b, ldb, trans_b, c, ldc, accumulate, scratch);
    default: return small_m_dispatch<16, T>(n, k, a, lda, b, ldb, trans_b, c, ldc, accumulate, scratch);
  }
}

void small_m(int m, int64_t n, int64_t k, const float* a, int64_t lda, const void* b, bool bf16, int64_t ldb,
             bool trans_b, float* c, int64_t ldc, int accumulate, float* scratch) {
  if (bf16)
    small_m_t(m, n, k, a, lda, static_cast<const uint16_t*>(b), ldb, trans_b, c, ldc, accumulate, scratch);
  else
    small_m_t(m, n, k, a, lda, static_cast<const float*>(b), ldb, trans_b, c, ldc, accumulate, scratch);
}

#ifdef LN_HAS_FMA
// 24 x iters FMAs in independent chains (24 zmm, or 12 ymm/xmm twice: no spills), for counting
// the FMA pipes. Returns a lane of the sum so none is dead code.
float fma_burst(int64_t iters) {
  constexpr int kChains = LN_VL == 16 ? 24 : 12, kRounds = 24 / kChains;
  vf acc[kChains];
  const vf mul = splat(0.9999f), add = splat(1e-4f);
#pragma GCC unroll 24
  for (int i = 0; i < kChains; ++i) acc[i] = splat(static_cast<float>(i));
  for (int64_t it = 0; it < iters; ++it)
#pragma GCC unroll 2
    for (int q = 0; q < kRounds; ++q)
#pragma GCC unroll 24
      for (int i = 0; i < kChains; ++i) acc[i] = LN_FMA(acc[i], mul, add);
  vf sum = acc[0];
  for (int i = 1; i < kChains; ++i) sum += acc[i];
  return sum[0];
}
#endif

}  // namespace
