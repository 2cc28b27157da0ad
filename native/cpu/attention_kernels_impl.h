// The CPU attention kernel's block routines, written once with GCC vector extensions and compiled
// once per ISA level: attention_avx512.cc, attention_avx2.cc and attention_generic.cc each set
// `#pragma GCC target`, define the macros below and include this file (as the GEMM engine's
// gemm_kernels_impl.h is used). Internal linkage only. No threading or allocation here: the driver
// (attention.cc) hands each routine its block and its scratch.
//
// Expects: LN_VL (floats per vector), LN_FMA(a, b, c) (= a*b + c), LN_SPLAT(x); AT_NVMAX (most
// vectors of columns in one register tile) and AT_MR1..AT_MR4 (rows of a tile that is 1..4 vectors
// wide; only up to AT_NVMAX are used).
//
// The math (FlashAttention-2, in base 2: q is pre-scaled by scale·log2(e), so exp becomes exp2):
//   forward, per key block:  S' = K·Qᵀ;  m' = max(m, max_j S');  P' = 2^(S' - m');
//                            l = l·2^(m - m') + Σ_j P';  O = O·2^(m - m') + P'ᵀ·V
//                            finally out = O / l, lse = (m + log2 l)·ln 2
//   backward, per (key block, query block):  P' = 2^(S' - lse·log2 e);  dP' = V·dOᵀ;
//                            dV += P'·dO;  dS' = P' ⊙ (dP' - δ);  dK += dS'·Q;  dQ += dS'ᵀ·K
// where S', P', dP', dS' are (keys, query rows) tiles: query rows are the vector lanes.

#include <cmath>
#include <cstdint>
#include <cstring>

#include "attention_isa.h"

namespace {

typedef float vf __attribute__((vector_size(LN_VL * 4)));
typedef int32_t vi __attribute__((vector_size(LN_VL * 4)));
typedef float vfu __attribute__((vector_size(LN_VL * 4), aligned(4)));
typedef int32_t viu __attribute__((vector_size(LN_VL * 4), aligned(4)));

constexpr int kVL = LN_VL;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

inline vf splat(float x) { return LN_SPLAT(x); }
inline vi splati(int32_t x) { return vi{} + x; }
inline vf loadu(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void storeu(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
inline vi loadi(const int32_t* p) { return *reinterpret_cast<const viu*>(p); }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// 2^x per lane, relative error ~2e-7; exactly 0 below 2^-126 (so -inf gives 0, never NaN).
// x = n + f with n = round(x), |f| <= 1/2; 2^f by its Taylor series to degree 6 (the next term
// is below 1.2e-7); 2^n built in the exponent bits.
inline vf exp2v(vf x) {
  const vf lo = splat(-126.0f);
  const vf xc = x < lo ? lo : x;
  const vf r = (xc + splat(12582912.0f)) - splat(12582912.0f);  // 1.5·2^23: rounds to an integer
  const vf f = xc - r;
  vf p = splat(1.5403530393381606e-4f);  // ln2^6/6!
  p = LN_FMA(p, f, splat(1.3333558146428443e-3f));  // ln2^5/5!
  p = LN_FMA(p, f, splat(9.6181291076284770e-3f));  // ln2^4/4!
  p = LN_FMA(p, f, splat(5.5504108664821580e-2f));  // ln2^3/3!
  p = LN_FMA(p, f, splat(2.4022650695910071e-1f));  // ln2^2/2!
  p = LN_FMA(p, f, splat(6.9314718055994531e-1f));  // ln2
  p = LN_FMA(p, f, splat(1.0f));
  const vi n = __builtin_convertvector(r, vi);
  const vf scale = (vf)((n + 127) << 23);
  return x < lo ? splat(0.0f) : p * scale;
}

// ---- register-tiled products ------------------------------------------------------------------
// c(M, nvec·VL) {=, +=, = c·rs[i] +} Σ_p a(i, p)·b(p, :) with b rows ldb apart and a either
// "packed" a(i, p) = a[i + p·acs] (a tile whose lanes are the rows) or row-major
// a(i, p) = a[i·ars + p].
enum Mode { kStore = 0, kAdd = 1, kScaleAdd = 2 };

constexpr int mr_for(int nv) {
  return nv == 1 ? AT_MR1 : nv == 2 ? AT_MR2 : nv == 3 ? AT_MR3 : AT_MR4;
}

template <int MR, int NV, bool PK>
__attribute__((noinline)) void tile(int64_t k, const float* __restrict a, int64_t ars, int64_t acs,
                                    const float* __restrict b, int64_t ldb, float* __restrict c,
                                    int64_t ldc, int mode, const float* __restrict rs) {
  vf acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[i][j] = vf{};
  const float* ap[MR];  // row-major a: one pointer per row
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) ap[i] = a + i * ars;
  for (int64_t p = 0; p < k; ++p) {
    vf bv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) bv[j] = loadu(b + j * kVL);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const vf av = splat(PK ? a[p * acs + i] : ap[i][p]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] = LN_FMA(av, bv[j], acc[i][j]);
    }
    b += ldb;
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    float* ci = c + i * ldc;
    if (mode == kStore) {
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) storeu(ci + j * kVL, acc[i][j]);
    } else if (mode == kAdd) {
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) storeu(ci + j * kVL, loadu(ci + j * kVL) + acc[i][j]);
    } else {
      const vf si = splat(rs[i]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) storeu(ci + j * kVL, LN_FMA(loadu(ci + j * kVL), si, acc[i][j]));
    }
  }
}

struct MmArgs {
  int64_t k;
  const float* a;
  int64_t ars, acs;
  const float* b;
  int64_t ldb;
  float* c;
  int64_t ldc;
  int mode;
  const float* rs;
};

// Rows i0.. of one column chunk: full tiles of MR rows, then one tile of the remaining rows.
template <int NV, bool PK, int MR>
void tail_rows(int rem, const MmArgs& m, int64_t i) {
  if constexpr (MR > 0) {
    if (rem == MR) {
      tile<MR, NV, PK>(m.k, m.a + i * (PK ? 1 : m.ars), m.ars, m.acs, m.b, m.ldb, m.c + i * m.ldc, m.ldc,
                       m.mode, m.rs ? m.rs + i : nullptr);
      return;
    }
    tail_rows<NV, PK, MR - 1>(rem, m, i);
  }
}

template <int NV, bool PK>
void rows(int64_t M, const MmArgs& m) {
  constexpr int MR = mr_for(NV);
  int64_t i = 0;
  for (; i + MR <= M; i += MR)
    tile<MR, NV, PK>(m.k, m.a + i * (PK ? 1 : m.ars), m.ars, m.acs, m.b, m.ldb, m.c + i * m.ldc, m.ldc,
                     m.mode, m.rs ? m.rs + i : nullptr);
  if (i < M) tail_rows<NV, PK, MR - 1>(static_cast<int>(M - i), m, i);
}

// c (M, nvec vectors) as above; columns go in chunks of at most AT_NVMAX vectors, spread evenly.
template <bool PK>
void mm(int64_t M, int64_t nvec, int64_t k, const float* a, int64_t ars, int64_t acs, const float* b,
        int64_t ldb, float* c, int64_t ldc, int mode, const float* rs) {
  if (M <= 0 || nvec <= 0) return;
  const int64_t chunks = (nvec + AT_NVMAX - 1) / AT_NVMAX;
  int64_t col = 0;
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const int64_t left = chunks - ch;
    const int nv = static_cast<int>((nvec - col + left - 1) / left);
    const MmArgs m{k, a, ars, acs, b + col * kVL, ldb, c + col * kVL, ldc, mode, rs};
    switch (nv) {
      case 1: rows<1, PK>(M, m); break;
      case 2: rows<2, PK>(M, m); break;
#if AT_NVMAX >= 3
      case 3: rows<3, PK>(M, m); break;
#endif
#if AT_NVMAX >= 4
      case 4: rows<4, PK>(M, m); break;
#endif
      default: break;
    }
    col += nv;
  }
}

// ---- masks ------------------------------------------------------------------------------------

// What a query block looks like to the masks: its positions [p0, p1] and, per lane, position and
// segment id (padding lanes repeat the last row's).
struct Lanes {
  int64_t p0, p1;
  const int32_t* pos;
  const int32_t* segq;
  bool seg_uniform;  // every row of the block is in one segment, segq[0]
};

void fill_lanes(const lora::AttnPlan& p, int64_t b, int64_t t0, int64_t rows, int64_t lanes,
                int32_t* pos, int32_t* segq) {
  const lora::AttentionArgs& A = p.a;
  const int64_t base = A.S - A.T + t0;
  for (int64_t r = 0; r < lanes; ++r) {
    const int64_t t = imin(r, rows - 1) / p.G;
    pos[r] = static_cast<int32_t>(base + t);
    segq[r] = A.segment_ids ? A.segment_ids[b * A.segment_stride + base + t] : 0;
  }
}

bool uniform(const int32_t* segq, int64_t lanes) {
  for (int64_t r = 1; r < lanes; ++r)
    if (segq[r] != segq[0]) return false;
  return true;
}

// True when some (query row, key) pair of the block is not visible.
bool needs_mask(const lora::AttnPlan& p, int64_t b, int64_t j0, int64_t nb, const Lanes& L) {
  const lora::AttentionArgs& A = p.a;
  if (A.causal && j0 + nb - 1 > L.p0) return true;
  if (A.window > 0 && j0 <= L.p1 - A.window) return true;
  if (A.key_mask) {
    const int32_t* km = A.key_mask + b * A.key_mask_stride + j0;
    for (int64_t j = 0; j < nb; ++j)
      if (!km[j]) return true;
  }
  if (A.segment_ids) {
    if (!L.seg_uniform) return true;
    const int32_t* sg = A.segment_ids + b * A.segment_stride + j0;
    for (int64_t j = 0; j < nb; ++j)
      if (sg[j] != L.segq[0]) return true;
  }
  return false;
}

// Sets the invisible entries of the (nb, nv·VL) score tile s (row stride lds) to -inf.
void apply_mask(const lora::AttnPlan& p, int64_t b, int64_t j0, int64_t nb, const Lanes& L, float* s,
                int64_t lds, int64_t nv) {
  const lora::AttentionArgs& A = p.a;
  const int32_t* km = A.key_mask ? A.key_mask + b * A.key_mask_stride : nullptr;
  const int32_t* sg = A.segment_ids ? A.segment_ids + b * A.segment_stride : nullptr;
  const vf ninf = splat(-INFINITY);
  const vi w = splati(static_cast<int32_t>(A.window));
  for (int64_t j = 0; j < nb; ++j) {
    const int64_t jj = j0 + j;
    float* row = s + j * lds;
    if (km && !km[jj]) {
      for (int64_t c = 0; c < nv; ++c) storeu(row + c * kVL, ninf);
      continue;
    }
    const vi jv = splati(static_cast<int32_t>(jj));
    const vi sj = splati(sg ? sg[jj] : 0);
    for (int64_t c = 0; c < nv; ++c) {
      const vi pv = loadi(L.pos + c * kVL);
      vi ok = splati(-1);
      if (A.causal) ok &= jv <= pv;
      if (A.window > 0) ok &= jv > pv - w;
      if (sg) ok &= loadi(L.segq + c * kVL) == sj;
      storeu(row + c * kVL, ok ? loadu(row + c * kVL) : ninf);
    }
  }
}

// The keys a query block can see at all: [lo, hi] (empty when lo > hi).
void key_range(const lora::AttnPlan& p, int64_t b, const Lanes& L, int64_t* lo, int64_t* hi) {
  const lora::AttentionArgs& A = p.a;
  int64_t l = A.window > 0 ? imax(0, L.p0 - A.window + 1) : 0;
  int64_t h = A.causal ? imin(A.S - 1, L.p1) : A.S - 1;
  if (A.key_mask) {
    const int32_t* km = A.key_mask + b * A.key_mask_stride;
    while (l <= h && !km[l]) ++l;
    while (h >= l && !km[h]) --h;
  }
  *lo = l;
  *hi = h;
}

// Rows (nb, Dp) of a k or v block with zero columns D..Dp, when D is not a multiple of VL.
void pad_rows(float* dst, const float* src, int64_t ld, int64_t nb, int64_t D, int64_t Dp) {
  for (int64_t j = 0; j < nb; ++j) {
    std::memcpy(dst + j * Dp, src + j * ld, static_cast<size_t>(D) * sizeof(float));
    std::memset(dst + j * Dp + D, 0, static_cast<size_t>(Dp - D) * sizeof(float));
  }
}

// Σ_d x[d]·y[d] in float, VL lanes at a time (the tail scalar).
inline float dot(const float* x, const float* y, int64_t n) {
  vf acc = vf{};
  int64_t d = 0;
  for (; d + kVL <= n; d += kVL) acc = LN_FMA(loadu(x + d), loadu(y + d), acc);
  float s = 0.0f;
  for (int64_t c = 0; c < kVL; ++c) s += acc[c];
  for (; d < n; ++d) s += x[d] * y[d];
  return s;
}

// The in-register transpose of VL vectors: stage h swaps, for each pair of rows i and i + h (bit h
// of i clear), row i's columns with bit h set and row i + h's with bit h clear.
struct TransposeMasks {
  int32_t lo[6][kVL], hi[6][kVL];
};
constexpr TransposeMasks transpose_masks() {
  TransposeMasks t{};
  int stage = 0;
  for (int h = 1; h < kVL; h *= 2, ++stage)
    for (int c = 0; c < kVL; ++c) {
      t.lo[stage][c] = (c & h) ? kVL + c - h : c;
      t.hi[stage][c] = (c & h) ? kVL + c : c + h;
    }
  return t;
}
alignas(64) constexpr TransposeMasks kTranspose = transpose_masks();

// v[i][j] = v[j][i] for the VL x VL block held in v.
inline void transpose_block(vf* v) {
#pragma GCC unroll 8
  for (int h = 1, stage = 0; h < kVL; h *= 2, ++stage) {
    const vi lo = loadi(kTranspose.lo[stage]), hi = loadi(kTranspose.hi[stage]);
#pragma GCC unroll 16
    for (int i = 0; i < kVL; ++i)
      if (!(i & h)) {
        const vf a = v[i], b = v[i + h];
        v[i] = __builtin_shuffle(a, b, lo);
        v[i + h] = __builtin_shuffle(a, b, hi);
      }
  }
}

// dst (D, R) = mul·src(r, d) for the R rows of src (row stride Dp, R and Dp whole vectors): a
// transpose, VL x VL blocks at a time in registers (the forward's query block takes the same
// route: element by element that was a third of forward_block's own time).
inline void transpose_rows(float* dst, const float* src, int64_t D, int64_t R, int64_t Dp, float mul) {
  const vf m = splat(mul);
  for (int64_t r0 = 0; r0 < R; r0 += kVL)
    for (int64_t d0 = 0; d0 < D; d0 += kVL) {
      vf v[kVL];
#pragma GCC unroll 16
      for (int i = 0; i < kVL; ++i) v[i] = loadu(src + (r0 + i) * Dp + d0) * m;
      transpose_block(v);
      const int64_t nd = imin(kVL, D - d0);  // columns past D are the padding of src's rows
      for (int64_t i = 0; i < nd; ++i) storeu(dst + (d0 + i) * R + r0, v[i]);
    }
}

// ---- scores of a few query rows (decode) ---------------------------------------------------------
// The tile form computes a key block's scores as K·Qᵀ with the query rows as the lanes: one
// broadcast of each element of k and one FMA per vector of rows. A decode step has G query rows
// (1-8), so most of each FMA's lanes are padding: SmolLM2's 3 rows fill 3 of 16. Up to kDotRows
// rows, each score is instead a dot product along D (D/VL FMAs), kVL keys at a time, and their
// kVL sums are folded into one vector. One query position against 512 keys (9/3 heads, D 64, one
// thread): 34-35 -> 28-29 µs; 8 positions against 160 keys, 2 threads: 59-60 -> 50-52 µs.

constexpr int64_t kDotRows = kVL / 2;

// The masks of fold_keys: at level L each of a pair of vectors holds 2^L keys of S = VL/2^L lanes
// each; the output holds the first vector's keys then the second's, each folded to S/2 lanes
// (lanes from `lo` plus lanes from `hi`; indices past VL pick from the second vector).
struct FoldMasks {
  int32_t lo[6][kVL], hi[6][kVL];
};
constexpr FoldMasks fold_masks() {
  FoldMasks f{};
  int level = 0;
  for (int S = kVL; S > 1; S /= 2, ++level)
    for (int o = 0; o < kVL; ++o) {
      const int half = o / (kVL / 2), o2 = o % (kVL / 2), i = o2 / (S / 2), t = o2 % (S / 2);
      f.lo[level][o] = half * kVL + i * S + t;
      f.hi[level][o] = half * kVL + i * S + S / 2 + t;
    }
  return f;
}
alignas(64) constexpr FoldMasks kFold = fold_masks();

// v[0..VL) -> one vector whose lane j is the sum of v[j]'s lanes (v is overwritten).
inline vf fold_keys(vf* v) {
#pragma GCC unroll 8
  for (int level = 0, n = kVL; n > 1; ++level, n /= 2) {
    const vi lo = loadi(kFold.lo[level]), hi = loadi(kFold.hi[level]);
#pragma GCC unroll 16
    for (int i = 0; i < n / 2; ++i)
      v[i] = __builtin_shuffle(v[2 * i], v[2 * i + 1], lo) + __builtin_shuffle(v[2 * i], v[2 * i + 1], hi);
  }
  return v[0];
}

// acc[jj] = the lanes of Σ_v k[jj·ld + v·VL ..]·q[v·VL ..] over DV vectors (DV = 0: dv of them), for
// the kVL keys of a group; keys from n on repeat key n - 1 (computed, not stored).
template <int DV>
inline void dot_keys(const float* __restrict k, int64_t ld, int64_t n, const float* __restrict q, int64_t dv, vf* acc) {
  const float* kr = k;
#pragma GCC unroll 16
  for (int jj = 0; jj < kVL; ++jj) {
    vf a = vf{};
    if constexpr (DV > 0) {
#pragma GCC unroll 8
      for (int v = 0; v < DV; ++v) a = LN_FMA(loadu(kr + v * kVL), loadu(q + v * kVL), a);
    } else {
      for (int64_t v = 0; v < dv; ++v) a = LN_FMA(loadu(kr + v * kVL), loadu(q + v * kVL), a);
    }
    acc[jj] = a;
    kr += jj + 1 < n ? ld : 0;
  }
}

// A decode step reads its group's K and V rows from memory (the step's weights have evicted them),
// a row of each per key, KVH·D apart: left to the hardware they came at ~10 GB/s on one core (512
// keys, 9/3 heads, D 64). So each group of keys prefetches the K rows kPrefetchKeys keys ahead (into
// the next block while `avail` keys from k on can be read) and the V rows of its own keys, which the
// product after the softmax reads.
constexpr int64_t kPrefetchKeys = 2 * kVL;
inline void prefetch_rows(const float* p, int64_t ld, int64_t n, int64_t D) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t d = 0; d < D; d += 64 / static_cast<int64_t>(sizeof(float))) __builtin_prefetch(p + j * ld + d);
}

// s[j·lds + r] = Σ_d k[j·ld + d]·qs[r·D + d] for keys j < nb and rows r < rows (qs row-major), and 0
// in the lanes rows..lds of each key's row (where the tile form's zero-padded q gives 0); v: the V rows
// of these keys, avail: the keys from k on that can be read (for the prefetches).
void scores_dot(int64_t nb, int64_t rows, int64_t D, const float* __restrict k, int64_t ld,
                const float* __restrict qs, float* __restrict s, int64_t lds, const float* v, int64_t avail) {
  const int64_t dv = D / kVL, Dv = dv * kVL;
  for (int64_t j = 0; j < nb; ++j)
    for (int64_t c = 0; c < lds; c += kVL) storeu(s + j * lds + c, vf{});
  prefetch_rows(k, ld, imin(kPrefetchKeys, avail), D);
  for (int64_t j0 = 0; j0 < nb; j0 += kVL) {
    const int64_t n = imin(kVL, nb - j0);
    const float* kg = k + j0 * ld;
    if (j0 % kPrefetchKeys == 0 && j0 + kPrefetchKeys < avail)
      prefetch_rows(k + (j0 + kPrefetchKeys) * ld, ld, imin(kPrefetchKeys, avail - j0 - kPrefetchKeys), D);
    prefetch_rows(v + j0 * ld, ld, n, D);
    for (int64_t r = 0; r < rows; ++r) {
      const float* q = qs + r * D;
      vf acc[kVL];
      switch (dv) {  // head dims of whole vectors up to 8 (64 and 128 under AVX-512) fully unrolled
        case 1: dot_keys<1>(kg, ld, n, q, dv, acc); break;
        case 2: dot_keys<2>(kg, ld, n, q, dv, acc); break;
        case 4: dot_keys<4>(kg, ld, n, q, dv, acc); break;
        case 8: dot_keys<8>(kg, ld, n, q, dv, acc); break;
        default: dot_keys<0>(kg, ld, n, q, dv, acc); break;
      }
      for (int64_t jj = 0; jj < n; ++jj)
        for (int64_t d = Dv; d < D; ++d) acc[jj][0] += kg[jj * ld + d] * q[d];
      alignas(64) float sums[kVL];
      storeu(sums, fold_keys(acc));
      for (int64_t jj = 0; jj < n; ++jj) s[(j0 + jj) * lds + r] = sums[jj];
    }
  }
}

// ---- forward ----------------------------------------------------------------------------------

void forward_block(const lora::AttnPlan& p, int64_t b, int64_t kvh, int64_t t0, float* scratch) {
  const lora::AttentionArgs& A = p.a;
  const int64_t G = p.G, D = A.D, Dp = p.Dp, H = A.H, T = A.T, bc = p.bc;
  const int64_t tq = imin(p.tq, T - t0), rows = tq * G;
  const int64_t nv = (rows + kVL - 1) / kVL, Rb = nv * kVL;
  float* qt = scratch;     // (D, Rb): q of the block scaled, transposed (row-major (rows, D) under dot_rows)
  float* s = qt + D * Rb;  // (bc, Rb): scores, then probabilities
  float* o = s + bc * Rb;  // (rows, Dp): unnormalised output
  float* vpad = o + Rb * Dp;
  float* m = vpad + bc * Dp;
  float* l = m + Rb;
  float* alpha = l + Rb;
  int32_t* pos = reinterpret_cast<int32_t*>(alpha + Rb);
  int32_t* segq = pos + Rb;

  const float cs = A.scale * kLog2e;
  const bool dot_rows = rows <= kDotRows;
  if (dot_rows) {  // qt = q of the block scaled, row-major (rows, D), for scores_dot
    for (int64_t r = 0; r < rows; ++r) {
      const float* src = p.q + ((b * T + t0 + r / G) * H + kvh * G + r % G) * D;
      for (int64_t d = 0; d < D; ++d) qt[r * D + d] = src[d] * cs;
    }
  } else {
    // qt = q of the block transposed, scaled, 0 past rows: VL x VL blocks in registers, the columns
    // past the last whole vector of D element by element
    const int64_t Dv = D - D % kVL;
    const vf csv = splat(cs);
    for (int64_t r0 = 0; r0 < Rb; r0 += kVL) {
      const float* src[kVL];
      for (int64_t r = 0; r < kVL; ++r)
        src[r] = r0 + r < rows ? p.q + ((b * T + t0 + (r0 + r) / G) * H + kvh * G + (r0 + r) % G) * D : nullptr;
      for (int64_t d0 = 0; d0 < Dv; d0 += kVL) {
        vf v[kVL];
#pragma GCC unroll 16
        for (int r = 0; r < kVL; ++r) v[r] = src[r] ? loadu(src[r] + d0) * csv : vf{};
        transpose_block(v);
#pragma GCC unroll 16
        for (int i = 0; i < kVL; ++i) storeu(qt + (d0 + i) * Rb + r0, v[i]);
      }
      for (int64_t d = Dv; d < D; ++d)
        for (int64_t r = 0; r < kVL; ++r) qt[d * Rb + r0 + r] = src[r] ? src[r][d] * cs : 0.0f;
    }
  }
  fill_lanes(p, b, t0, rows, Rb, pos, segq);
  Lanes L{A.S - T + t0, A.S - T + t0 + tq - 1, pos, segq, uniform(segq, Rb)};
  for (int64_t c = 0; c < nv; ++c) {
    storeu(m + c * kVL, splat(-INFINITY));
    storeu(l + c * kVL, splat(0.0f));
  }

  int64_t jlo, jhi;
  key_range(p, b, L, &jlo, &jhi);
  jlo = imax(jlo, p.kc0);
  jhi = imin(jhi, p.kc1 - 1);
  const int64_t ld = A.KVH * D;
  const float* kb = p.k + b * A.kv_batch_stride + kvh * D;
  const float* vb = p.v + b * A.kv_batch_stride + kvh * D;
  for (int64_t j0 = jlo; j0 <= jhi; j0 += bc) {
    const int64_t nb = imin(bc, jhi + 1 - j0);
    if (dot_rows) scores_dot(nb, rows, D, kb + j0 * ld, ld, qt, s, Rb, vb + j0 * ld, jhi + 1 - j0);
    else mm<false>(nb, nv, D, kb + j0 * ld, ld, 1, qt, Rb, s, Rb, kStore, nullptr);
    if (needs_mask(p, b, j0, nb, L)) apply_mask(p, b, j0, nb, L, s, Rb, nv);
    for (int64_t c = 0; c < nv; ++c) {
      const vf m_old = loadu(m + c * kVL);
      vf mx = m_old;
      for (int64_t j = 0; j < nb; ++j) mx = vmax(mx, loadu(s + j * Rb + c * kVL));
      // lanes that have seen no visible key yet keep m = -inf; subtract 0 there, not -inf
      const vf mu = mx == splat(-INFINITY) ? splat(0.0f) : mx;
      const vf al = exp2v(m_old - mu);
      vf sum = vf{};
      for (int64_t j = 0; j < nb; ++j) {
        const vf e = exp2v(loadu(s + j * Rb + c * kVL) - mu);
        storeu(s + j * Rb + c * kVL, e);
        sum += e;
      }
      storeu(l + c * kVL, LN_FMA(loadu(l + c * kVL), al, sum));
      storeu(m + c * kVL, mx);
      storeu(alpha + c * kVL, al);
    }
    const float* vp = vb + j0 * ld;
    int64_t ldv = ld;
    if (D != Dp) {
      pad_rows(vpad, vp, ld, nb, D, Dp);
      vp = vpad;
      ldv = Dp;
    }
    // the first block stores (o holds garbage before it); later ones rescale and add
    mm<true>(rows, Dp / kVL, nb, s, 1, Rb, vp, ldv, o, Dp, j0 == jlo ? kStore : kScaleAdd, alpha);
  }

  if (p.part) {  // this chunk's state, combined by the driver (o is unset where l is 0)
    for (int64_t r = 0; r < rows; ++r) {
      float* dst = p.part + r * p.part_row_floats();
      dst[0] = m[r];
      dst[1] = l[r];
      if (l[r] > 0.0f) std::memcpy(dst + 2, o + r * Dp, static_cast<size_t>(D) * sizeof(float));
    }
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = t0 + r / G, h = kvh * G + r % G;
    const float lr = l[r];
    const float inv = lr > 0.0f ? 1.0f / lr : 0.0f;
    float* dst = p.out + ((b * T + t) * H + h) * D;
    for (int64_t d = 0; d < D; ++d) dst[d] = lr > 0.0f ? o[r * Dp + d] * inv : 0.0f;
    p.lse[(b * H + h) * T + t] = lr > 0.0f ? (m[r] + std::log2(lr)) * kLn2 : INFINITY;
  }
}

// ---- backward ---------------------------------------------------------------------------------

// Panel layout (AttnPlan::panel_floats): qt (D, R) scaled by scale·log2 e, dot (D, R), qn (R, Dp),
// don (R, Dp), lse2 (R) = lse·log2 e, delta (R), pos (R) and segq (R) as int32.
struct Panel {
  float *qt, *dot, *qn, *don, *lse2, *delta;
  int32_t *pos, *segq;
};
Panel panel_at(const lora::AttnPlan& p, float* base) {
  const int64_t D = p.a.D, R = p.R, Dp = p.Dp;
  Panel P;
  P.qt = base;
  P.dot = P.qt + D * R;
  P.qn = P.dot + D * R;
  P.don = P.qn + R * Dp;
  P.lse2 = P.don + R * Dp;
  P.delta = P.lse2 + R;
  P.pos = reinterpret_cast<int32_t*>(P.delta + R);
  P.segq = P.pos + R;
  return P;
}

void backward_prepare(const lora::AttnPlan& p, int64_t b, int64_t kvh, int64_t qb) {
  const lora::AttentionArgs& A = p.a;
  const int64_t G = p.G, D = A.D, Dp = p.Dp, H = A.H, T = A.T, R = p.R;
  const int64_t t0 = qb * p.tq, rows = imin(p.tq, T - t0) * G;
  const Panel P = panel_at(p, p.panel(b, kvh, qb));
  for (int64_t r = 0; r < R; ++r) {
    if (r >= rows) {  // padding rows: zeros
      std::memset(P.qn + r * Dp, 0, static_cast<size_t>(Dp) * sizeof(float));
      std::memset(P.don + r * Dp, 0, static_cast<size_t>(Dp) * sizeof(float));
      P.lse2[r] = P.delta[r] = 0.0f;
      continue;
    }
    const int64_t t = t0 + r / G, h = kvh * G + r % G;
    const int64_t off = ((b * T + t) * H + h) * D;
    std::memcpy(P.qn + r * Dp, p.q + off, static_cast<size_t>(D) * sizeof(float));
    std::memcpy(P.don + r * Dp, p.dout + off, static_cast<size_t>(D) * sizeof(float));
    for (int64_t d = D; d < Dp; ++d) P.qn[r * Dp + d] = P.don[r * Dp + d] = 0.0f;
    P.delta[r] = dot(p.dout + off, p.out_saved + off, D);
    P.lse2[r] = p.lse_saved[(b * H + h) * T + t] * kLog2e;  // +inf (no visible key) stays +inf
  }
  transpose_rows(P.qt, P.qn, D, R, Dp, A.scale * kLog2e);
  transpose_rows(P.dot, P.don, D, R, Dp, 1.0f);
  fill_lanes(p, b, t0, rows, R, P.pos, P.segq);
}

void backward_keys(const lora::AttnPlan& p, int64_t b, int64_t kvh, int64_t j0, float* dq_partial,
                   float* scratch) {
  const lora::AttentionArgs& A = p.a;
  const int64_t G = p.G, D = A.D, Dp = p.Dp, T = A.T, S = A.S, bc = p.bc, R = p.R;
  const int64_t nb = imin(bc, S - j0), j1 = j0 + nb - 1;
  const int64_t ld = A.KVH * D;
  const int64_t kvoff = b * A.kv_batch_stride + kvh * D + j0 * ld;
  const float* kb = p.k + kvoff;
  const float* vb = p.v + kvoff;
  float* s = scratch;         // (bc, R): scores, then P'
  float* dpm = s + bc * R;    // (bc, R): dP', then dS'
  float* dka = dpm + bc * R;  // (bc, Dp): dK (unscaled)
  float* dva = dka + bc * Dp; // (bc, Dp): dV
  float* kpad = dva + bc * Dp;

  // the query rows that can see some key of the block: positions p with j0 <= p (causal) and
  // p < j1 + window; none when every key is padding
  const int64_t base = S - T;
  int64_t tlo = A.causal ? imax(0, j0 - base) : 0;
  int64_t thi = A.window > 0 ? imin(T - 1, j1 + A.window - 1 - base) : T - 1;
  if (A.key_mask) {
    const int32_t* km = A.key_mask + b * A.key_mask_stride + j0;
    bool any = false;
    for (int64_t j = 0; j < nb && !any; ++j) any = km[j] != 0;
    if (!any) thi = -1;
  }
  const float* kp = kb;
  int64_t ldkp = ld;
  if (D != Dp && tlo <= thi) {
    pad_rows(kpad, kb, ld, nb, D, Dp);
    kp = kpad;
    ldkp = Dp;
  }
  const int64_t nvd = Dp / kVL;
  int first = 1;  // dK, dV sums: the first query block stores, later ones add
  for (int64_t qb = tlo <= thi ? tlo / p.tq : 1, qe = tlo <= thi ? thi / p.tq : 0; qb <= qe; ++qb) {
    const int64_t t0 = qb * p.tq, tq = imin(p.tq, T - t0), rows = tq * G;
    const int64_t nv = (rows + kVL - 1) / kVL, lds = nv * kVL;
    const Panel P = panel_at(p, p.panel(b, kvh, qb));
    const Lanes L{base + t0, base + t0 + tq - 1, P.pos, P.segq, uniform(P.segq, lds)};
    // under the causal rule this query block sees only the block's keys up to its last position:
    // the first ne of them (at least one: the block's first query sees j0). Query blocks come in
    // order, so ne never shrinks; the first one zeroes the dK, dV rows past its ne for the later
    // blocks to add into. (Keys of 96 against query blocks of 32 computed a third more than this
    // at T = 256.)
    const int64_t ne = A.causal ? imin(nb, base + t0 + tq - j0) : nb;
    if (first && ne < nb) {
      std::memset(dva + ne * Dp, 0, static_cast<size_t>((nb - ne) * Dp) * sizeof(float));
      std::memset(dka + ne * Dp, 0, static_cast<size_t>((nb - ne) * Dp) * sizeof(float));
    }
    mm<false>(ne, nv, D, kb, ld, 1, P.qt, R, s, lds, kStore, nullptr);
    if (needs_mask(p, b, j0, ne, L)) apply_mask(p, b, j0, ne, L, s, lds, nv);
    for (int64_t j = 0; j < ne; ++j)
      for (int64_t c = 0; c < nv; ++c)
        storeu(s + j * lds + c * kVL, exp2v(loadu(s + j * lds + c * kVL) - loadu(P.lse2 + c * kVL)));
    mm<false>(ne, nv, D, vb, ld, 1, P.dot, R, dpm, lds, kStore, nullptr);
    mm<false>(ne, nvd, rows, s, lds, 1, P.don, Dp, dva, Dp, first ? kStore : kAdd, nullptr);
    for (int64_t j = 0; j < ne; ++j)
      for (int64_t c = 0; c < nv; ++c) {
        float* x = dpm + j * lds + c * kVL;
        storeu(x, loadu(s + j * lds + c * kVL) * (loadu(x) - loadu(P.delta + c * kVL)));
      }
    mm<false>(ne, nvd, rows, dpm, lds, 1, P.qn, Dp, dka, Dp, first ? kStore : kAdd, nullptr);
    first = 0;
    float* dqb = dq_partial + ((b * A.KVH + kvh) * p.nqb + qb) * R * Dp;
    mm<true>(rows, nvd, ne, dpm, 1, lds, kp, ldkp, dqb, Dp, kAdd, nullptr);
  }

  const float scale = A.scale;
  float* dkb = p.dk + kvoff;
  float* dvb = p.dv + kvoff;
  for (int64_t j = 0; j < nb; ++j)
    for (int64_t d = 0; d < D; ++d) {  // no query block: no query sees these keys
      dkb[j * ld + d] = first ? 0.0f : dka[j * Dp + d] * scale;
      dvb[j * ld + d] = first ? 0.0f : dva[j * Dp + d];
    }
}

}  // namespace
