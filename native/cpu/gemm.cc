// The CPU GEMM engine behind lora::sgemm and lora::gemm_ex: BLIS-style cache blocking over packed
// panels, register-tiled micro-kernels chosen at run time per ISA (gemm_avx512.cc, gemm_avx2.cc,
// gemm_generic.cc), a streaming path for M <= 8 (decode), and the fusions the LoRA kernels use: an
// epilogue product per C tile and a narrow side product H from the same packed A blocks. Threads
// split C into independent rectangles. It is not a general BLAS (no complex, no double) and keeps
// no state between calls except per-thread packing buffers.
#include "gemm.h"

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include "../backend/half.h"
#include "../backend/rng.h"
#include "gemm_fused.h"

namespace lora {

// ---- ISA dispatch -------------------------------------------------------------------------------

namespace {

CpuIsa detect_isa() {
  CpuIsa best = CpuIsa::Generic;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (isa_table_avx2() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    best = CpuIsa::Avx2;
  if (isa_table_avx512() && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    best = CpuIsa::Avx512;
#endif
  CpuIsa want = best;
  if (const char* env = std::getenv("LORA_NATIVE_ISA")) {
    if (!std::strcmp(env, "generic")) want = CpuIsa::Generic;
    else if (!std::strcmp(env, "avx2")) want = CpuIsa::Avx2;
    else if (!std::strcmp(env, "avx512")) want = CpuIsa::Avx512;
  }
  return want < best ? want : best;  // only ever lower than what the CPU supports
}

bool detect_bf16_dot(CpuIsa isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (isa != CpuIsa::Avx512) return false;
  if (const char* env = std::getenv("LORA_NATIVE_BF16_DOT"))
    if (!std::strcmp(env, "0")) return false;
  return __builtin_cpu_supports("avx512bf16");
#else
  (void)isa;
  return false;
#endif
}

const IsaTable& pick_table(CpuIsa isa) {
  if (isa == CpuIsa::Avx512) return *isa_table_avx512();
  if (isa == CpuIsa::Avx2) return *isa_table_avx2();
  return *isa_table_generic();
}

}  // namespace

CpuIsa cpu_isa() {
  static const CpuIsa isa = detect_isa();
  return isa;
}
const char* cpu_isa_name() { return isa_table().name; }
bool cpu_has_bf16_dot() {
  static const bool has = detect_bf16_dot(cpu_isa());
  return has;
}
const IsaTable& isa_table() {
  static const IsaTable& t = pick_table(cpu_isa());
  return t;
}

// ---- blocking -----------------------------------------------------------------------------------

namespace {

// The packed path's blocks (kc, mc, nc), the streaming path's k block and the threading threshold
// come from gemm_blocking() (gemm_blocking.cc: derived from this CPU's caches and FMA pipes).
// M up to this uses the streaming path (no packing of B: each B element is used M times only);
// also its row chunk when op(B) is narrow (kNarrowN columns or fewer).
// (decode: up to kDecodeRows rows in one call, with W streamed from memory once)
constexpr int64_t kSmallM = kDecodeRows;
constexpr int64_t kSmallMax = kSmallM;
constexpr int64_t kNarrowN = 32;
// Columns a narrow B's copy in the streaming path is padded to: whole vectors of every level.
constexpr int64_t kPadLanes = 16;
// Bytes of B from which the streaming path splits its columns across threads however few FMAs it
// does: 64 KB take one core ~3 µs from DRAM, several times a spinning worker's pick-up time.
constexpr int64_t kStreamParallelBytes = 64 << 10;
// Column block of a stored-(k, n) B when 9-16 rows of x take two kernel calls: the first streams
// the block from memory in k blocks of kDecodeKb rows, the second finds it in cache (4096 rows x
// 1024 bf16: 8 MB). Blocks of 32 columns walked all 4096 rows one strip at a time: 4096 x 4096,
// 16 rows, bf16, 1 thread 8.5 ms against 5.0 (256 columns 6.0, whole rows 5.6).
constexpr int64_t kDecodeN = 1024;
// Rows of a stored-(k, n) B per k block of the streaming path under a few rows of x.
constexpr int64_t kDecodeKb = 16;
// k block when B is read in place: that many stored rows are streamed side by side (the hardware
// prefetchers follow a few dozen streams); 1024 rows at once ran 4x slower.
constexpr int64_t kDirectKc = 32;
// Below this k per C tile, C's loads and stores outweigh the FMAs: walk C row-major.
constexpr int64_t kShortK = 64;
// Fewer rows than this widen bf16 B to fp32 while packing instead of dotting pairs (M = 16 ran
// 2x slower through the pair packing).
constexpr int64_t kBf16DotMinM = 64;
// Floats of packed B per column block of the bf16 update (256 KB): with the A panel it stays in
// L2 while every row panel of C sweeps it.
constexpr int64_t kUpdateBlockFloats = 1 << 16;

// Per-thread packing buffers, 64-byte aligned, grown on demand and kept for the next call.
struct PackBuffer {
  float* p = nullptr;
  size_t cap = 0;
  ~PackBuffer() { std::free(p); }
  float* get(size_t floats) {
    if (floats > cap) {
      std::free(p);
      cap = (floats + 4095) & ~size_t(4095);
      p = static_cast<float*>(std::aligned_alloc(64, cap * sizeof(float)));
    }
    return p;
  }
};
struct ThreadBuffers {
  PackBuffer a, b, a2, b2, small, h, hb, ah, scratch, pad;
  PackBuffer d_part;   // this thread's rows' share of the side product D (K, kSideCols)
  PackBuffer d_trans;  // Dᵀ when D is its own product (side_d_apart)
  PackBuffer split_k;  // the other threads' sums of a k split (run_split_k; the caller's)
};
ThreadBuffers& buffers() {
  static thread_local ThreadBuffers bufs;
  return bufs;
}

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline float bf16_to_f32(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
// The size of blocks of equal size, multiples of unit, at most `most` (rounded down to a unit),
// that cover total: 2048 columns in blocks of at most 2016 are 1024 + 1024, not 2016 + 32 (every
// column block repacks A).
inline int64_t balanced(int64_t total, int64_t most, int64_t unit) {
  const int64_t cap = imax(unit, most / unit * unit), blocks = (total + cap - 1) / cap;
  return imax(unit, round_up((total + blocks - 1) / imax(blocks, 1), unit));
}
// The k block of K: equal blocks of at most kc_max in multiples of 64 (of kc_max when smaller, as
// LORA_NATIVE_GEMM_BLOCKS may set it): k 1536 under a kc of 1024 is 768 + 768, not 1024 + 512
// (the short block loads and stores C for half the FMAs): 1% faster at 512 and 1024 x 576 x 1536
// on 1 and 2 threads, alternating builds. run_blocked and the side-by-side products block k alike,
// so that their sums are the same.
inline int64_t k_block(int64_t K, int64_t kc_max) { return K > 0 ? balanced(K, kc_max, imin(64, kc_max)) : kc_max; }
// Thread tid's share of [0, total) among nt threads, in whole units of `unit` (the last one ragged):
// [*begin, *end), empty when there is nothing left for it.
inline int64_t share_size(int64_t total, int64_t unit, int nt) { return ((total + unit - 1) / unit + nt - 1) / nt * unit; }
inline void thread_share(int64_t total, int64_t unit, int tid, int nt, int64_t* begin, int64_t* end) {
  const int64_t per = share_size(total, unit, nt);
  *begin = imin(total, tid * per);
  *end = imin(total, *begin + per);
}
// The threads thread_share gives a nonempty share: the first ones.
inline int threads_with_share(int64_t total, int64_t unit, int nt) {
  const int64_t per = share_size(total, unit, nt);
  return per > 0 ? static_cast<int>((total + per - 1) / per) : 0;
}

void scale_rect(float* C, int64_t ldc, int64_t m0, int64_t m1, int64_t n0, int64_t n1, float beta) {
  for (int64_t i = m0; i < m1; ++i) {
    float* c = C + i * ldc;
    if (beta == 0.0f)
      for (int64_t j = n0; j < n1; ++j) c[j] = 0.0f;
    else
      for (int64_t j = n0; j < n1; ++j) c[j] *= beta;
  }
}

// c[valid part] = (accumulate ? c : 0) + tile  (+ mask ⊙ tile2 + bias when given)
void write_tile(float* c, int64_t ldc, const float* tile, int nr, int64_t rows, int64_t cols,
                bool accumulate) {
  for (int64_t i = 0; i < rows; ++i) {
    float* cr = c + i * ldc;
    const float* t = tile + i * nr;
    if (accumulate)
      for (int64_t j = 0; j < cols; ++j) cr[j] += t[j];
    else
      for (int64_t j = 0; j < cols; ++j) cr[j] = t[j];
  }
}

// The masked epilogue (dx with dropout): c += mask(r, col) ⊙ tile2 (+ bias).
void add_masked(float* c, int64_t ldc, const float* tile2, int nr, int64_t rows, int64_t cols,
                int64_t r0, int64_t c0, const DropoutMask& d, const float* bias) {
  for (int64_t i = 0; i < rows; ++i) {
    float* cr = c + i * ldc;
    const float* t = tile2 + i * nr;
    for (int64_t j = 0; j < cols; ++j) {
      const uint64_t idx = static_cast<uint64_t>((r0 + i) * d.ld + c0 + j);
      float v = dropout_keep(d.seed, idx, d.p) ? t[j] * d.scale : 0.0f;
      if (bias) v += bias[c0 + j];
      cr[j] += v;
    }
  }
}

// The epilogue operands packed: op(A2) rows [i0, i0+mc) with a trailing column of ones, and
// op(B2) cols [j0, j0+nc) with a trailing row of bias, so bias rides in the same micro-kernel call.
int64_t epi_k(const GemmArgs& g) { return g.K2 + ((g.bias && !g.drop2) ? 1 : 0); }

void pack_a2(const IsaTable& t, float* dst, const GemmArgs& g, int64_t i0, int64_t mc, int mr) {
  const int64_t ke = epi_k(g);
  for (int64_t ip = 0; ip < mc; ip += mr) {
    float* d = dst + (ip / mr) * mr * ke;
    const int64_t rows = imin(mr, mc - ip);
    if (g.K2 > 0) t.pack_a(d, g.A2, g.lda2, g.trans_a2, i0 + ip, rows, 0, g.K2, mr, g.alpha2, nullptr);
    if (ke > g.K2)
      for (int i = 0; i < mr; ++i) d[g.K2 * mr + i] = i < rows ? 1.0f : 0.0f;
  }
}

void pack_b2(const IsaTable& t, float* dst, const GemmArgs& g, int64_t j0, int64_t nc, int nr) {
  const int64_t ke = epi_k(g);
  for (int64_t jp = 0; jp < nc; jp += nr) {
    float* d = dst + (jp / nr) * nr * ke;
    const int64_t cols = imin(nr, nc - jp);
    if (g.K2 > 0) t.pack_b(d, g.B2, false, g.ldb2, g.trans_b2, 0, g.K2, j0 + jp, cols, nr, nullptr);
    if (ke > g.K2)
      for (int j = 0; j < nr; ++j) d[g.K2 * nr + j] = j < cols ? g.bias[j0 + jp + j] : 0.0f;
  }
}

// Whether the streaming path takes the bf16 dot product for M rows of x against a stored-(n, k) bf16
// B where the caller allows it (gemm_ex's dot_small, and gemm_shared_a on decode rows, whose outputs
// must match it bit for bit).
bool streams_bf16_dot(const IsaTable& t, int64_t M) {
  return M >= kBf16DotMinRows && M <= kDecodeRows && t.small_m_bf16_dot && cpu_has_bf16_dot();
}

// The streaming path over the C rectangle [m0, m1) x [n0, n1), 8 rows of C at a time: B is read
// straight from its storage (no packing), k in blocks so the 8 rows of A stay in L1.
// dot: the bf16 dot product for a stored-(n, k) bf16 B (t.small_m_bf16_dot, x rounded to bf16).
void run_small(const IsaTable& t, const GemmArgs& g, bool dot, int64_t m0, int64_t m1, int64_t n0,
               int64_t n1) {
  const int64_t n = n1 - n0, K = g.alpha == 0.0f ? 0 : g.K;
  // A is read in place unless transposed or masked; alpha scales the finished rows where C is not
  // accumulated into (dh = s·dy·B): a scaled copy of A cost a third of 1024 x 1536 x 16
  const bool post_scale = !g.trans_a && !g.drop_a && g.alpha != 1.0f && g.alpha != 0.0f && g.beta == 0.0f;
  const bool direct = !g.trans_a && !g.drop_a && (g.alpha == 1.0f || post_scale);
  ThreadBuffers& bufs = buffers();
  const bool accumulate = g.beta != 0.0f;
  if (g.beta != 0.0f && g.beta != 1.0f) scale_rect(g.C, g.ldc, m0, m1, n0, n1, g.beta);
  // Narrow op(B) stored (n, k), many rows of A: transpose B once into (k, n) so the kernel
  // broadcasts A (dot products along k cost a horizontal sum each and ran 3x slower). The copy
  // has whole vectors of columns (zeros past n, kernel columns npad): the kernel's columns past
  // its last whole vector were scalar, and rank 8 (n = 8 < 16 lanes) ran all scalar (1024 rows,
  // dh = dy·B at 576 columns of dy, 2 threads: 413 us, 23 GFLOP/s; rank 16 took 110 us). A
  // narrow stored-(k, n) B that is not whole vectors wide is copied the same way.
  const void* B = g.B;
  bool trans_b = g.trans_b, b_bf16 = g.b_bf16;
  int64_t ldb = g.ldb, bn0 = n0, npad = n;
  // (not under the bf16 dot product: its dot form sums each output once per k block)
  if ((trans_b || n % kPadLanes != 0) && m1 - m0 > t.small_rows && n <= kNarrowN && K > 0 && !dot) {
    npad = round_up(n, kPadLanes);
    float* bt = bufs.b.get(static_cast<size_t>(K * npad));
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = n; j < npad; ++j) bt[k * npad + j] = 0.0f;
    for (int64_t j = 0; j < n; ++j)
      for (int64_t k = 0; k < K; ++k) {
        const int64_t off = trans_b ? (n0 + j) * g.ldb + k : k * g.ldb + n0 + j;
        bt[k * npad + j] = b_bf16 ? bf16_to_f32(static_cast<const uint16_t*>(g.B)[off])
                                  : static_cast<const float*>(g.B)[off];
      }
    B = bt;
    trans_b = b_bf16 = false;
    ldb = npad;
    bn0 = 0;
  }
  const bool padded = npad != n;
  auto b_ptr = [&](int64_t k, int64_t j) -> const void* {
    const int64_t off = trans_b ? (bn0 + j) * ldb + k : k * ldb + bn0 + j;
    return b_bf16 ? static_cast<const void*>(static_cast<const uint16_t*>(B) + off)
                  : static_cast<const void*>(static_cast<const float*>(B) + off);
  };
  // Rows [i0, i0+m) of C, columns [j0, j1) of this rectangle.
  auto chunk = [&](int64_t i0, int m, int64_t j0, int64_t j1) {
    const int64_t nj = j1 - j0;
    float* c = g.C + i0 * g.ldc + n0 + j0;
    // padded: the kernel writes all npad columns to a tile, added into c's n columns at the end
    float* kern_dst = padded ? bufs.pad.get(static_cast<size_t>(kSmallM * npad)) : c;
    const int64_t kern_ld = padded ? npad : g.ldc, kern_n = padded ? npad : nj;
    // k in blocks whose rows of x stay in L1, except where the kernel broadcasts a stored-(n, k) B
    // against x repacked (decode_broadcasts): that walks each row of B whole.
    // (the dot product kernel blocks k itself)
    // A stored-(k, n) B under at most kSmallMax rows of x (dx = dy·W for a few rows) is read from
    // memory once: k blocks of kDecodeKb rows, so its rows stream side by side rather than one
    // strip of columns walking down all of them (4096 x 4096, 1 thread: 1 row fp32 3.3 -> 2.4 ms,
    // bf16 2.0 -> 1.7; 8 rows fp32 5.2 -> 4.0, bf16 5.0 -> 2.8). Many rows against a narrow B held
    // in cache keep the long blocks (dh = dy·B at 1024 rows ran 1.6x slower with 16).
    const bool few_rows = m1 - m0 <= kSmallMax;
    const int64_t kblock = dot || (trans_b && decode_broadcasts(m, b_bf16, t.wide.nr1)) ? imax(K, 1)
                           : !trans_b && few_rows                                      ? kDecodeKb
                                                                                       : gemm_blocking().small_kc;
    for (int64_t kb = 0; kb < imax(K, 1); kb += kblock) {
      const int64_t kl = imin(kblock, K - kb);
      if (kl == 0 && accumulate) break;
      const float* a = g.A + i0 * g.lda + kb;
      int64_t lda = g.lda;
      if (!direct && kl > 0) {
        float* buf = bufs.small.get(static_cast<size_t>(kSmallM * kl));
        for (int i = 0; i < m; ++i)
          for (int64_t k = 0; k < kl; ++k) {
            const int64_t r = g.trans_a ? kb + k : i0 + i, cc = g.trans_a ? i0 + i : kb + k;
            float v = g.A[r * g.lda + cc];
            if (g.drop_a)
              v = dropout_keep(g.drop_a->seed, static_cast<uint64_t>(r * g.drop_a->ld + cc), g.drop_a->p)
                      ? v * g.drop_a->scale : 0.0f;
            buf[i * kl + k] = g.alpha * v;
          }
        a = buf;
        lda = kl;
      }
      float* scratch = bufs.scratch.get(static_cast<size_t>(small_scratch_floats(kl)));
      if (dot && kl > 0)
        t.small_m_bf16_dot(m, nj, kl, a, lda, static_cast<const uint16_t*>(b_ptr(kb, j0)), ldb, c, g.ldc,
                           accumulate || kb > 0, scratch);
      else
        t.small_m(m, kern_n, kl, a, lda, b_ptr(kb, j0), b_bf16, ldb, trans_b, kern_dst, kern_ld,
                  (padded ? 0 : accumulate) || kb > 0, scratch);
      if (kl == 0) break;
    }
    if (post_scale) {
      float* rows = padded ? kern_dst : c;
      const int64_t ld = padded ? npad : g.ldc, cols = padded ? npad : nj;
      for (int i = 0; i < m; ++i)
        for (int64_t j = 0; j < cols; ++j) rows[i * ld + j] *= g.alpha;
    }
    if (padded)
      for (int i = 0; i < m; ++i)
        for (int64_t j = 0; j < nj; ++j)
          c[i * g.ldc + j] = accumulate ? c[i * g.ldc + j] + kern_dst[i * npad + j] : kern_dst[i * npad + j];
    if (g.K2 > 0 || g.bias) {
      float* a2 = bufs.a2.get(static_cast<size_t>(imax(1, kSmallM * g.K2)));
      for (int i = 0; i < m; ++i)
        for (int64_t k = 0; k < g.K2; ++k)
          a2[i * g.K2 + k] = g.alpha2 * (g.trans_a2 ? g.A2[k * g.lda2 + i0 + i]
                                                    : g.A2[(i0 + i) * g.lda2 + k]);
      const int64_t cn0 = n0 + j0;
      const float* b2 = g.B2 ? (g.trans_b2 ? g.B2 + cn0 * g.ldb2 : g.B2 + cn0) : nullptr;
      if (!g.drop2) {
        float* scratch = bufs.scratch.get(static_cast<size_t>(small_scratch_floats(g.K2)));
        if (g.K2 > 0) t.small_m(m, nj, g.K2, a2, g.K2, b2, false, g.ldb2, g.trans_b2, c, g.ldc, 1, scratch);
        if (g.bias)
          for (int i = 0; i < m; ++i)
            for (int64_t j = 0; j < nj; ++j) c[i * g.ldc + j] += g.bias[cn0 + j];
      } else {
        float* tmp = bufs.b2.get(static_cast<size_t>(kSmallM * nj));
        float* scratch = bufs.scratch.get(static_cast<size_t>(small_scratch_floats(g.K2)));
        t.small_m(m, nj, g.K2, a2, g.K2, b2, false, g.ldb2, g.trans_b2, tmp, nj, 0, scratch);
        add_masked(c, g.ldc, tmp, static_cast<int>(nj), m, nj, i0, cn0, *g.drop2, g.bias);
      }
    }
  };
  // (a stored-(n, k) B takes every decode row in one pass: W is read from memory once)
  const int64_t rows_max = trans_b ? kDecodeRows : t.small_rows;
  // More rows than one kernel call takes (9-16 rows of x against a stored-(k, n) B: two calls):
  // blocks of kDecodeN columns, every row chunk per block, so the second chunk finds that block of
  // B in cache and B comes from memory once.
  const int64_t nblk = m1 - m0 > rows_max && m1 - m0 <= kSmallMax ? kDecodeN : n;
  for (int64_t j0 = 0; j0 < n; j0 += nblk)
    for (int64_t i0 = m0; i0 < m1; i0 += rows_max)
      chunk(i0, static_cast<int>(imin(rows_max, m1 - i0)), j0, imin(n, j0 + nblk));
}

// The blocked path over the C rectangle [m0, m1) x [n0, n1).
// d_part of d_parts: the row blocks whose side product D this call computes (a column split gives
// every thread all rows: thread tid of nt takes every nt-th block).
void run_blocked(const IsaTable& t, const GemmKernel& kern, bool bf16_dot, const GemmArgs& args,
                 int64_t m0, int64_t m1, int64_t n0, int64_t n1, int d_part = 0, int d_parts = 1) {
  const int mr = kern.mr, nr = kern.nr;
  GemmArgs g = args;
  ThreadBuffers& bufs = buffers();
  // The side product H from the packed A blocks (gemm_ex sends it here only when those hold
  // op(A) unscaled and unmasked, in fp32: never under the bf16 dot). The thread whose rectangle
  // starts at column 0 writes g.H; the others (column splits share rows) keep their own copy of
  // their rows for the epilogue.
  const bool fuse_h = g.H != nullptr;
  const GemmKernel& hkern = kern;
  const int nr1 = hkern.nr1;
  float* hrows = g.H;
  int64_t ldh = g.ldh;
  if (fuse_h) {
    if (n0 != 0) {
      hrows = bufs.h.get(static_cast<size_t>(m1 * g.NH));
      ldh = g.NH;
    }
    for (int64_t i = m0; i < m1; ++i)
      for (int64_t j = 0; j < g.NH; ++j) hrows[i * ldh + j] = 0.0f;
    if (g.A2 == g.H) {  // the epilogue reads the H this thread finishes
      g.A2 = hrows;
      g.lda2 = ldh;
    }
  }
  const int64_t K = g.alpha == 0.0f ? 0 : g.K;
  // The side product D from the blocks of A as they are packed (gemm_ex sends it here only with
  // op(A) unscaled and unmasked, ND <= kSideCols, and not transposed under the bf16 dot): this
  // call's share of the row blocks, in its first column block, summed in a buffer of its own (K,
  // kSideCols) and added into D at the end.
  const bool fuse_d = g.D != nullptr && K > 0;
  float* dl = nullptr;
  if (fuse_d) {
    dl = bufs.d_part.get(static_cast<size_t>(K * kSideCols));
    std::memset(dl, 0, static_cast<size_t>(K * kSideCols) * sizeof(float));
  }
  // Few rows of C: each element of B is used only (m1-m0) times, so packing it would cost as
  // much memory traffic as the product; a stored-row-major fp32 B is read in place instead.
  const bool direct_b = !bf16_dot && !g.trans_b && !g.b_bf16 && !g.drop_b && m1 - m0 <= 2 * mr;
  // bf16 panels hold twice the k per byte; B read in place streams kDirectKc rows at once
  const GemmBlocking& blk = gemm_blocking();
  const int64_t kc_max = direct_b ? kDirectKc : k_block(K, bf16_dot ? 2 * blk.kc : blk.kc);
  const int64_t nc_max = balanced(n1 - n0, blk.nc, nr), mc_max = balanced(m1 - m0, blk.mc, mr);
  const int64_t ke = epi_k(g);
  const bool has_epi = ke > 0 || g.drop2;
  if (g.beta != 0.0f && g.beta != 1.0f) scale_rect(g.C, g.ldc, m0, m1, n0, n1, g.beta);
  alignas(64) float tile[32 * 64];
  alignas(64) float tile2[32 * 64];

  for (int64_t jc = n0; jc < n1; jc += nc_max) {
    const int64_t nc = imin(nc_max, n1 - jc), ncp = round_up(nc, nr);
    float* b2buf = nullptr;
    if (has_epi && g.K2 + ke > 0) {
      b2buf = bufs.b2.get(static_cast<size_t>(ncp * imax(ke, g.K2)));
      if (g.drop2) t.pack_b(b2buf, g.B2, false, g.ldb2, g.trans_b2, 0, g.K2, jc, nc, nr, nullptr);
      else pack_b2(t, b2buf, g, jc, nc, nr);
    }
    for (int64_t pc = 0; pc < imax(K, 1); pc += kc_max) {
      const int64_t kc = imin(kc_max, K - pc), kstep = bf16_dot ? (kc + 1) / 2 : kc;
      const bool first = pc == 0, last = pc + kc_max >= K;
      const bool accumulate = !first || g.beta != 0.0f;
      float* bbuf = bufs.b.get(static_cast<size_t>(ncp * imax(kc, 1)));
      const bool h_now = fuse_h && jc == n0 && kc > 0;  // H over this k block, once per thread
      float* hbbuf = nullptr;
      if (h_now) {
        const int64_t nhp = round_up(g.NH, nr1);
        hbbuf = bufs.hb.get(static_cast<size_t>(nhp * kc));
        t.pack_b(hbbuf, g.HB, false, g.ldhb, g.trans_hb, pc, kc, 0, g.NH, nr1, nullptr);
        if (g.alpha_h != 1.0f)
          for (int64_t i = 0; i < nhp * kc; ++i) hbbuf[i] *= g.alpha_h;
      }
      if (direct_b) {
        // only a partial last panel is packed; whole panels are read in place
        if (nc % nr) {
          const int64_t jl = nc / nr * nr;
          t.pack_b(bbuf + jl * kc, g.B, false, g.ldb, false, pc, kc, jc + jl, nc - jl, nr, nullptr);
        }
      } else if (bf16_dot)
        t.pack_b_bf16(reinterpret_cast<uint16_t*>(bbuf), static_cast<const uint16_t*>(g.B), g.ldb,
                      g.trans_b, pc, kc, jc, nc, nr);
      else
        t.pack_b(bbuf, g.B, g.b_bf16, g.ldb, g.trans_b, pc, kc, jc, nc, nr, g.drop_b);
      for (int64_t ic = m0; ic < m1; ic += mc_max) {
        const int64_t mc = imin(mc_max, m1 - ic), mcp = round_up(mc, mr);
        float* abuf = bufs.a.get(static_cast<size_t>(mcp * imax(kc, 1)));
        if (bf16_dot)
          t.pack_a_bf16(reinterpret_cast<uint16_t*>(abuf), g.A, g.lda, g.trans_a, ic, mc, pc, kc, mr,
                        g.alpha);
        else
          t.pack_a(abuf, g.A, g.lda, g.trans_a, ic, mc, pc, kc, mr, g.alpha, g.drop_a);
        if (fuse_d && jc == n0 && kc > 0 && (ic - m0) / mc_max % d_parts == d_part) {
          if (bf16_dot)  // (its panels hold A rounded to bf16: the block as stored, just read)
            t.side_rows(kc, g.A + ic * g.lda + pc, g.lda, mc, g.TD + ic * g.ldtd, g.ldtd, static_cast<int>(g.ND),
                        dl + pc * kSideCols);
          else
            for (int64_t ir = 0; ir < mc; ir += mr)
              t.side_panel(mr, kc, abuf + ir * kc, static_cast<int>(imin(mr, mc - ir)), g.TD + (ic + ir) * g.ldtd,
                           g.ldtd, static_cast<int>(g.ND), dl + pc * kSideCols);
        }
        if (h_now) {
          // H rows [ic, ic+mc) += this block of A (a masked copy when drop_h: the x block is
          // still in L2) times the packed op(HB) panels, before the epilogue below needs them.
          const float* ah = abuf;
          if (g.drop_h) {
            float* m = bufs.ah.get(static_cast<size_t>(mcp * kc));
            t.pack_a(m, g.A, g.lda, false, ic, mc, pc, kc, mr, 1.0f, g.drop_h);
            ah = m;
          }
          for (int64_t ir = 0; ir < mc; ir += mr) {
            const int64_t rows = imin(mr, mc - ir);
            for (int64_t q = 0; q < g.NH; q += nr1) {
              const int64_t cols = imin(nr1, g.NH - q);
              float* hc = hrows + (ic + ir) * ldh + q;
              if (rows == mr && cols == nr1) {
                hkern.run1(kc, ah + ir * kc, hbbuf + q * kc, nr1, hc, ldh, 1);
              } else {
                hkern.run1(kc, ah + ir * kc, hbbuf + q * kc, nr1, tile, nr1, 0);
                write_tile(hc, ldh, tile, nr1, rows, cols, true);
              }
            }
          }
        }
        float* a2buf = nullptr;
        const bool epi_now = last && has_epi;
        if (epi_now && g.K2 + ke > 0) {
          a2buf = bufs.a2.get(static_cast<size_t>(mcp * imax(ke, g.K2)));
          if (g.drop2)
            t.pack_a(a2buf, g.A2, g.lda2, g.trans_a2, ic, mc, 0, g.K2, mr, g.alpha2, nullptr);
          else
            pack_a2(t, a2buf, g, ic, mc, mr);
        }
        const int64_t kx = g.drop2 ? g.K2 : ke;  // k of the epilogue product
        // One micro-tile (jr, ir) of this block, with its epilogue.
        auto tile_at = [&](int64_t jr, int64_t ir) {
          const int64_t cols = imin(nr, nc - jr);
          const bool in_place = direct_b && cols == nr;
          const float* bp = in_place ? static_cast<const float*>(g.B) + pc * g.ldb + jc + jr
                                     : bbuf + jr * kstep;
          const int64_t ldbp = in_place ? g.ldb : nr;
          const float* b2p = b2buf ? b2buf + jr * kx : nullptr;
          const int64_t rows = imin(mr, mc - ir);
          const float* ap = abuf + ir * kstep;
          float* c = g.C + (ic + ir) * g.ldc + jc + jr;
          const bool full = rows == mr && cols == nr;
          float* dst = full ? c : tile;
          const int64_t ldd = full ? g.ldc : nr;
          const int acc_dst = full && accumulate;
          if (epi_now && !g.drop2 && kx > 0) {
            // alpha2·A2·B2 (+ bias) added to the sums while they are still in registers
            kern.run_epi(kstep, ap, bp, ldbp, dst, ldd, acc_dst, kx, a2buf + ir * kx, b2p);
          } else {
            kern.run(kstep, ap, bp, ldbp, dst, ldd, acc_dst);
          }
          if (!full) write_tile(c, g.ldc, tile, nr, rows, cols, accumulate);
          if (epi_now && g.drop2) {
            const GemmKernel& k32 = bf16_dot ? t.wide : kern;
            k32.run(g.K2, a2buf + ir * g.K2, b2p, nr, tile2, nr, 0);
            add_masked(c, g.ldc, tile2, nr, rows, cols, ic + ir, jc + jr, *g.drop2, g.bias);
          }
        };
        if (kstep + kx < kShortK) {
          // Short k (merge, h·Bᵀ): the C traffic dominates, so sweep C row panel by row panel,
          // left to right, which the prefetchers follow (column strips of 144 rows they did not).
          for (int64_t ir = 0; ir < mc; ir += mr)
            for (int64_t jr = 0; jr < nc; jr += nr) tile_at(jr, ir);
        } else {
          // B micro-panel reused across the A block (the BLIS order).
          for (int64_t jr = 0; jr < nc; jr += nr)
            for (int64_t ir = 0; ir < mc; ir += mr) tile_at(jr, ir);
        }
      }
      if (K == 0) break;
    }
  }
  if (fuse_d) {
    static std::mutex mu;  // threads splitting rows each add their part
    std::lock_guard<std::mutex> lock(mu);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t r = 0; r < g.ND; ++r) g.D[k * g.ldd + r] += g.alpha_d * dl[k * kSideCols + r];
  }
}

// The side product D as its own product, then the GEMM without it: for N = 0 and the paths whose
// blocks of A cannot serve it (gemm_ex lists them: streaming, transposed A under the bf16 dot,
// scaled or masked A, ND outside 9..kSideCols). Computed as Dᵀ (ND, K) = alpha_d·TDᵀ·op(A), so
// op(A) is read in place row by row (reduce_k for ND <= kReduceMax), then added into D in blocks
// of 16 rows of D.
void side_d_apart(ThreadPool& pool, const GemmArgs& g) {
  float* dbt = buffers().d_trans.get(static_cast<size_t>(g.ND * g.K));
  GemmArgs tg;
  tg.trans_a = true;
  tg.M = g.ND; tg.N = g.K; tg.K = g.M;
  tg.alpha = g.alpha_d;
  tg.A = g.TD; tg.lda = g.ldtd;
  tg.B = g.A; tg.ldb = g.lda; tg.trans_b = g.trans_a;
  tg.C = dbt; tg.ldc = g.K;
  gemm_ex(pool, tg);
  // (row by row of D, each of ND reads fell a whole Dᵀ row apart: 1536 x 16 took ~0.2 ms)
  for (int64_t k0 = 0; k0 < g.K; k0 += 16) {
    const int64_t k1 = imin(k0 + 16, g.K);
    for (int64_t r = 0; r < g.ND; ++r)
      for (int64_t k = k0; k < k1; ++k) g.D[k * g.ldd + r] += dbt[r * g.K + k];
  }
  GemmArgs rest = g;
  rest.D = nullptr;
  gemm_ex(pool, rest);
}

// The side product H as its own pass, then the GEMM without it: for the paths whose packed A
// cannot serve it (streaming, transposed, scaled or masked A) and for N = 0.
void side_product_apart(ThreadPool& pool, const GemmArgs& g) {
  GemmArgs hg;
  hg.trans_a = g.trans_a;
  hg.M = g.M; hg.N = g.NH; hg.K = g.K;
  hg.alpha = g.alpha_h;
  hg.A = g.A; hg.lda = g.lda;
  hg.B = g.HB; hg.ldb = g.ldhb; hg.trans_b = g.trans_hb;
  hg.C = g.H; hg.ldc = g.ldh;
  hg.drop_a = g.drop_h;
  gemm_ex(pool, hg);
  GemmArgs rest = g;
  rest.H = nullptr;
  gemm_ex(pool, rest);
}

// A long sum into few outputs splits k rather than C: the LM head's dx = dlogits·W of 512 rows is
// 512 x 576 from k 49152, and a split of its rows or columns has every thread pack all of one
// operand of 100 MB (2 threads 90.6 -> 85.2 ms with an fp32 W, 91.5 -> 84.0 with bf16; 159 on one).
// A plain product (split_k) with fp32 products (the bf16 dot's sums stay those gemmSharedA makes),
// k at least kSplitKRatio times M and N and kSplitKBlocks k blocks, C at most kSplitKMaxFloats
// (each thread past the first sums into a copy of its own).
constexpr int64_t kSplitKRatio = 16;
constexpr int64_t kSplitKBlocks = 4;
constexpr int64_t kSplitKMaxFloats = int64_t(1) << 22;

bool split_k_ok(const GemmArgs& g, bool bf16_dot, int threads) {
  const int64_t kc = gemm_blocking().kc;
  return g.split_k && !bf16_dot && threads > 1 && g.alpha != 0.0f && !g.H && !g.D && g.K2 == 0 && !g.bias && !g.drop2 &&
         !g.drop_a && !g.drop_b && g.K >= kSplitKRatio * imax(g.M, g.N) && g.K >= kSplitKBlocks * kc &&
         g.M * g.N <= kSplitKMaxFloats;
}

// C = alpha·op(A)·op(B) + beta·C with thread tid summing k [k0, k1): thread 0 into C (with beta),
// the others into their part of `parts` (M x N each), added into C once all are done. fp32 products
// (split_k_ok: never under the bf16 dot).
void run_split_k(ThreadPool& pool, const IsaTable& t, const GemmKernel& kern, const GemmArgs& g) {
  const int nt = pool.size();
  const int64_t MN = g.M * g.N;
  float* parts = buffers().split_k.get(static_cast<size_t>((nt - 1) * MN));
  bool whole = false;  // a nested call runs on one thread: the whole product, nothing to add
  pool.run([&](int tid, int nt_run) {
    if (nt_run != nt) {
      whole = true;
      run_blocked(t, kern, false, g, 0, g.M, 0, g.N);
      return;
    }
    int64_t k0, k1;
    thread_share(g.K, 64, tid, nt, &k0, &k1);
    GemmArgs p = g;
    p.K = k1 - k0;
    p.A = g.trans_a ? g.A + k0 * g.lda : g.A + k0;
    const int64_t b_off = g.trans_b ? k0 : k0 * g.ldb;
    p.B = g.b_bf16 ? static_cast<const void*>(static_cast<const uint16_t*>(g.B) + b_off)
                   : static_cast<const void*>(static_cast<const float*>(g.B) + b_off);
    if (tid > 0) {
      p.C = parts + (tid - 1) * MN;
      p.ldc = g.N;
      p.beta = 0.0f;
      if (p.K <= 0) {
        std::memset(p.C, 0, static_cast<size_t>(MN) * sizeof(float));
        return;
      }
    }
    run_blocked(t, kern, false, p, 0, g.M, 0, g.N);
  });
  if (whole) return;
  pool.parallel_for(g.M, imax(1, 65536 / imax(g.N, 1)), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      float* c = g.C + i * g.ldc;
      for (int q = 0; q < nt - 1; ++q) {
        const float* s = parts + q * MN + i * g.N;
        for (int64_t j = 0; j < g.N; ++j) c[j] += s[j];
      }
    }
  });
}

}  // namespace

void gemm_ex(ThreadPool& pool, const GemmArgs& g) {
  if (g.M <= 0) return;
  if (g.H && g.NH <= 0) {
    GemmArgs rest = g;
    rest.H = nullptr;
    return gemm_ex(pool, rest);
  }
  if (g.D && (g.ND <= 0 || g.K <= 0)) {  // nothing to add into D
    GemmArgs rest = g;
    rest.D = nullptr;
    return gemm_ex(pool, rest);
  }
  if (g.H && g.N <= 0) return side_product_apart(pool, g);
  if (g.D && g.N <= 0) return side_d_apart(pool, g);
  if (g.N <= 0) return;
  const IsaTable& t = isa_table();
  // A few rows of C, each a sum over k of op(A) = Aᵀ stored (K, M) against an fp32 B stored (K, N)
  // (the LoRA backward's dA and dBᵀ): reduce_k reads B in place, the threads splitting its columns.
  // The packed path copied all of B for them: 1024 x 576, rank 16, 2 threads, 169 us (111
  // GFLOP/s, slower than its 113 us on one thread), 1536 columns 403 us.
  if (g.trans_a && !g.trans_b && g.M <= kReduceMax && !g.b_bf16 && g.K > 0 && g.alpha != 0.0f && !g.drop_a &&
      !g.drop_b && !g.H && !g.D && g.K2 == 0 && !g.bias && !g.drop2 && t.reduce_k) {
    const bool serial = pool.size() == 1 || g.M * g.N * g.K < gemm_blocking().parallel_min_flops;
    auto body = [&](int tid, int nt) {
      int64_t n0, n1;
      thread_share(g.N, 48, tid, nt, &n0, &n1);  // whole strips of every level (8 x 3 zmm: 48 columns)
      if (n0 >= n1) return;
      if (g.beta != 0.0f && g.beta != 1.0f) scale_rect(g.C, g.ldc, 0, g.M, n0, n1, g.beta);
      // blocks of B's rows of an eighth of L2 each (the one being read and the next one coming in;
      // a quarter read as fast or slower: 1 thread, 2048 x 2048 from memory 1232-1392 us against
      // 1193-1209)
      const int64_t kb = imax(16, imin(512, gemm_blocking().l2 / 8 / ((n1 - n0) * 4)));
      t.reduce_k(static_cast<int>(g.M), n1 - n0, g.K, g.A, g.lda, static_cast<const float*>(g.B) + n0, g.ldb,
                 g.C + n0, g.ldc, g.alpha, g.beta != 0.0f, kb);
    };
    if (serial) body(0, 1);
    else pool.run(body);
    return;
  }
  // streaming: decode (M <= 8; M <= 16 for x·Wᵀ, whose W rows are read once), or narrow op(B)
  // (a bf16 B stored (k, n) under 9-16 rows streams too: the packed path widened all of W for
  // them, 4096 x 4096 x 16 rows 10.7 ms on 1 thread against 5.0 streaming; an fp32 B reads in
  // place there and keeps it, 5.2 ms against 9.3)
  const bool small = (g.M <= 8 || (g.M <= kSmallMax && g.trans_b) || (g.N <= kNarrowN && !g.trans_a) ||
                      (g.M <= kSmallMax && g.b_bf16 && !g.trans_a && !g.trans_b)) &&
                     !g.drop_b;
  // decode rows with bf16 products asked for: the streaming bf16 dot product (W read once, as
  // stored; each vdpbf16ps does twice an FMA's multiply-adds, so 8 and 16 rows stay memory-bound)
  const bool dot_small = small && g.trans_b && g.b_bf16 && g.bf16_dot_few_rows && g.allow_bf16_dot &&
                         streams_bf16_dot(t, g.M) && !g.drop_b;
  // (the pairwise bf16 packing of B is scalar: worth it only over enough rows of A)
  const bool bf16_dot = !small && g.M >= kBf16DotMinM && g.b_bf16 && g.allow_bf16_dot && cpu_has_bf16_dot() &&
                        t.bf16_kernel.run && !g.drop_a && !g.drop_b && g.alpha != 0.0f;

  // Under the bf16 dot, H is its own streaming pass (fp32 products over x in place), at every
  // rank: riding along from an fp32 packing of each block (the kernel's panels are bf16 pairs)
  // cost a second packing of x, and below whole vectors of H (rank 4, 8, 12, 24) half-empty tiles.
  // Per SmolLM2 layer (1024 rows, 2 threads, bf16 weights), the adapter's share of the forward,
  // along -> apart: r4 27 -> 16%, r8 30 -> 16-20%, r12 26 -> 20%, r24 34 -> 22%; 512 x 1024 x 1024
  // r8, 1 thread: 20 -> 12%. (The pass was slower below rank 16 while the streaming path's
  // columns past its last whole vector were scalar: 6 GFLOP/s at rank 8.) With fp32 products it
  // rides along (apart was 0.5-1 point slower at r8 and r16).
  if (g.H && (small || bf16_dot || g.trans_a || g.alpha != 1.0f || g.drop_a))
    return side_product_apart(pool, g);
  // D rides along under the same conditions, with its columns in one row of kSideCols, from more
  // than half of them: at rank 8 half of every FMA is padding, and the pass of its own was faster
  // (512 x 1024 x 1024 r8, 1 thread, bf16 W: dB 0.07 ms apart, 0.11-0.14 riding along)
  if (g.D && (small || (bf16_dot && g.trans_a) || g.alpha != 1.0f || g.drop_a || g.ND <= kSideCols / 2 ||
              g.ND > kSideCols || !t.side_panel))
    return side_d_apart(pool, g);

  // The tile shape with the least padding (the wide kernel on ties and for bf16).
  const GemmKernel* kern = bf16_dot ? &t.bf16_kernel : &t.wide;
  if (!small && !bf16_dot) {
    auto padded = [&](const GemmKernel& k) { return round_up(g.M, k.mr) * round_up(g.N, k.nr); };
    int64_t best = padded(t.wide);
    // the narrow and short shapes run at ~85-90% of the wide one's speed
    if (padded(t.narrow) * 10 < best * 9) { kern = &t.narrow; best = padded(t.narrow); }
    if (padded(t.short_m) * 10 < best * 9) kern = &t.short_m;
  }
  const int64_t work = g.M * (g.N * (g.K + g.K2 + 1) + (g.H ? g.NH * g.K : 0));
  // The streaming path is bound by reading B, not by its few FMAs per element: a second core adds
  // its own share of the memory bandwidth, worth it from kStreamParallelBytes of B on.
  const int64_t b_bytes = g.N * g.K * (g.b_bf16 ? 2 : 4);
  const bool serial = pool.size() == 1 ||
                      (work < gemm_blocking().parallel_min_flops && !(small && b_bytes >= kStreamParallelBytes));
  if (!serial && !small && split_k_ok(g, bf16_dot, pool.size())) return run_split_k(pool, t, *kern, g);
  auto splits_n = [&](int nt) {
    if (small) return g.M <= kSmallMax && g.N > kNarrowN;
    if (g.M < kern->mr * nt) return true;
    if (!g.H) {
      // The split whose busiest thread has fewer register tiles (the threads split whole tiles, so
      // 512 rows of 12-row tiles are 22 + 21 tiles, while 576 columns of 32 are 9 + 9); either packs
      // about as much (all of B and its rows of A, or all of A and its columns of B).
      const int64_t tm = (g.M + kern->mr - 1) / kern->mr, tn = (g.N + kern->nr - 1) / kern->nr;
      const int64_t by_rows = (tm + nt - 1) / nt * tn, by_cols = tm * ((tn + nt - 1) / nt);
      if (by_rows != by_cols) return by_cols < by_rows;
    }
    // (a side product H is computed by every thread for all its rows: a column split repeats it)
    return g.N >= g.M * 2;
  };
  // Column splits give every thread all rows, so each computes H for all of them: cheap for the
  // product, but a dropout mask regenerated per thread cost more than the separate pass saves.
  if (g.H && g.drop_h && !serial && splits_n(pool.size())) return side_product_apart(pool, g);
  auto body = [&](int tid, int nt) {
    const bool split_n = splits_n(nt);
    if (split_n) {
      int64_t n0, n1;
      const int64_t unit = small ? 16 : kern->nr;
      thread_share(g.N, unit, tid, nt, &n0, &n1);
      if (n0 >= n1) return;
      if (small) run_small(t, g, dot_small, 0, g.M, n0, n1);
      // (the threads given columns share D's row blocks)
      else run_blocked(t, *kern, bf16_dot, g, 0, g.M, n0, n1, tid, threads_with_share(g.N, unit, nt));
    } else {
      int64_t m0, m1;
      thread_share(g.M, small ? kSmallM : kern->mr, tid, nt, &m0, &m1);
      if (m0 >= m1) return;
      if (small) run_small(t, g, dot_small, m0, m1, 0, g.N);
      else run_blocked(t, *kern, bf16_dot, g, m0, m1, 0, g.N);
    }
  };
  if (serial) body(0, 1);
  else pool.run(body);
}

namespace {

// The GemmArgs of a plain C = alpha·op(A)·op(B) + beta·C, B fp32 or bf16 bits.
GemmArgs plain_gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                    const float* A, int64_t lda, const void* B, bool b_bf16, int64_t ldb, float beta,
                    float* C, int64_t ldc) {
  GemmArgs g;
  g.trans_a = trans_a;
  g.trans_b = trans_b;
  g.M = M;
  g.N = N;
  g.K = K;
  g.alpha = alpha;
  g.A = A;
  g.lda = lda;
  g.B = B;
  g.b_bf16 = b_bf16;
  g.ldb = ldb;
  g.beta = beta;
  g.C = C;
  g.ldc = ldc;
  return g;
}

}  // namespace

void sgemm(ThreadPool& pool, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
           float alpha, const float* A, int64_t lda, const float* B, int64_t ldb, float beta,
           float* C, int64_t ldc) {
  GemmArgs g = plain_gemm(trans_a, trans_b, M, N, K, alpha, A, lda, B, false, ldb, beta, C, ldc);
  g.split_k = true;
  gemm_ex(pool, g);
}

namespace {

// One thread's share of sgemm_shared_a: the column panels [p0, p1) of the products laid side by
// side (every product's columns start a panel), over all rows. A block is packed once for all of
// them; each panel of B is packed from its own product, and each tile is written to its own C.
// With dot (bf16 B, the CPU's pair dot product), A and B are packed as bf16 pairs and the k blocks
// are those of run_blocked under the bf16 dot, so every sum is the one sgemm_bf16 makes.
void shared_a_rect(const IsaTable& t, bool dot, int64_t M, int64_t K, const float* A, int64_t lda,
                   int n, const void* const* B, bool b_bf16, const int64_t* N, float* const* C,
                   int64_t p0, int64_t p1) {
  const GemmKernel& kern = dot ? t.bf16_kernel : t.wide;
  const int mr = kern.mr, nr = kern.nr;
  ThreadBuffers& bufs = buffers();
  const GemmBlocking& blk = gemm_blocking();
  // panel q of the side-by-side products: product prod[q], its columns from col[q]
  std::vector<int> prod;
  std::vector<int64_t> col;
  for (int i = 0, q = 0; i < n; ++i)
    for (int64_t j = 0; j < N[i]; j += nr, ++q)
      if (q >= p0 && q < p1) {
        prod.push_back(i);
        col.push_back(j);
      }
  const int64_t np = p1 - p0;
  const int64_t pb_max = imax(1, blk.nc / nr);  // panels per block of packed B
  const int64_t mc_max = imax(mr, blk.mc / mr * mr);
  const int64_t kc_max = k_block(K, dot ? 2 * blk.kc : blk.kc);  // (bf16 panels hold twice the k per byte)
  alignas(64) float tile[32 * 64];
  for (int64_t qb = 0; qb < np; qb += pb_max) {
    const int64_t nq = imin(pb_max, np - qb);
    for (int64_t pc = 0; pc < K; pc += kc_max) {
      const int64_t kc = imin(kc_max, K - pc), kstep = dot ? (kc + 1) / 2 : kc;
      const bool accumulate = pc > 0;
      float* bbuf = bufs.b.get(static_cast<size_t>(nq * nr * kc));
      // runs of panels of one product are packed in one call
      for (int64_t q = 0; q < nq;) {
        int64_t e = q + 1;
        while (e < nq && prod[qb + e] == prod[qb + q]) ++e;
        const int i = prod[qb + q];
        const int64_t j0 = col[qb + q], j1 = imin(N[i], col[qb + e - 1] + nr);
        if (dot)
          t.pack_b_bf16(reinterpret_cast<uint16_t*>(bbuf + q * nr * kstep), static_cast<const uint16_t*>(B[i]), K,
                        true, pc, kc, j0, j1 - j0, nr);
        else
          t.pack_b(bbuf + q * nr * kc, B[i], b_bf16, K, true, pc, kc, j0, j1 - j0, nr, nullptr);
        q = e;
      }
      for (int64_t ic = 0; ic < M; ic += mc_max) {
        const int64_t mc = imin(mc_max, M - ic);
        float* abuf = bufs.a.get(static_cast<size_t>(round_up(mc, mr) * kc));
        if (dot) t.pack_a_bf16(reinterpret_cast<uint16_t*>(abuf), A, lda, false, ic, mc, pc, kc, mr, 1.0f);
        else t.pack_a(abuf, A, lda, false, ic, mc, pc, kc, mr, 1.0f, nullptr);
        for (int64_t q = 0; q < nq; ++q) {
          const int i = prod[qb + q];
          const int64_t j = col[qb + q], cols = imin(nr, N[i] - j);
          for (int64_t ir = 0; ir < mc; ir += mr) {
            const int64_t rows = imin(mr, mc - ir);
            float* c = C[i] + (ic + ir) * N[i] + j;
            const bool full = rows == mr && cols == nr;
            kern.run(kstep, abuf + ir * kstep, bbuf + q * nr * kstep, nr, full ? c : tile, full ? N[i] : nr, full && accumulate);
            if (!full) write_tile(c, N[i], tile, nr, rows, cols, accumulate);
          }
        }
      }
    }
  }
}

// sgemm_shared_a for decode rows (M <= kDecodeRows): each W streamed once from its storage by the
// streaming path, as a gemm call of each product alone runs it (run_small, the same kernel and k
// blocks for every output: bit for bit its outputs), with the threads splitting the products' rows
// laid end to end, so the pool is woken once for all of them (q/k/v: three short streams of one
// decode step, each only ~0.2-1 MB for a SmolLM2-sized layer).
void shared_a_streaming(ThreadPool& pool, const IsaTable& t, int64_t M, int64_t K, const float* A, int64_t lda,
                        int n, const void* const* B, bool b_bf16, const int64_t* N, float* const* C, bool bf16_dot) {
  // the bf16 dot where gemm_ex takes it for one product (gemm_bf16_dot: dot_small)
  const bool dot = bf16_dot && b_bf16 && streams_bf16_dot(t, M);
  int64_t total = 0, bytes = 0;
  for (int i = 0; i < n; ++i) {
    total += N[i];
    bytes += N[i] * K * (b_bf16 ? 2 : 4);
  }
  if (total == 0) return;
  auto body = [&](int tid, int nt) {
    int64_t c0, c1;
    thread_share(total, 16, tid, nt, &c0, &c1);
    int64_t off = 0;
    for (int i = 0; i < n && c0 < c1; off += N[i], ++i) {
      const int64_t lo = imax(c0, off), hi = imin(c1, off + N[i]);
      if (lo >= hi) continue;
      const GemmArgs g = plain_gemm(false, true, M, N[i], K, 1.0f, A, lda, B[i], b_bf16, K, 0.0f, C[i], N[i]);
      run_small(t, g, dot, 0, M, lo - off, hi - off);
    }
  };
  // as gemm_ex's streaming path: a second core from kStreamParallelBytes of weights on
  if (pool.size() == 1 || bytes < kStreamParallelBytes) body(0, 1);
  else pool.run(body);
}

}  // namespace

void sgemm_shared_a(ThreadPool& pool, int64_t M, int64_t K, const float* A, int64_t lda, int n,
                    const void* const* B, bool b_bf16, const int64_t* N, float* const* C, bool bf16_dot) {
  if (M <= 0 || n <= 0) return;
  if (K <= 0) {
    for (int i = 0; i < n; ++i) std::memset(C[i], 0, static_cast<size_t>(M * N[i]) * sizeof(float));
    return;
  }
  const IsaTable& t = isa_table();
  if (M <= kDecodeRows) return shared_a_streaming(pool, t, M, K, A, lda, n, B, b_bf16, N, C, bf16_dot);
  // the bf16 dot where sgemm_bf16 would take it for every one of the products (enough rows, none
  // narrow enough for its streaming path); otherwise fp32 products on B widened while packing
  bool dot = bf16_dot && b_bf16 && M >= kBf16DotMinM && cpu_has_bf16_dot() && t.bf16_kernel.run;
  for (int i = 0; i < n; ++i) dot = dot && N[i] > kNarrowN;
  const int nr = dot ? t.bf16_kernel.nr : t.wide.nr;
  int64_t panels = 0, cols = 0;
  for (int i = 0; i < n; ++i) {
    panels += (N[i] + nr - 1) / nr;
    cols += N[i];
  }
  if (panels == 0) return;
  const bool serial = pool.size() == 1 || M * cols * (K + 1) < gemm_blocking().parallel_min_flops;
  // the threads split the panels (every thread packs all of A once, for every product)
  auto body = [&](int tid, int nt) {
    int64_t p0, p1;
    thread_share(panels, 1, tid, nt, &p0, &p1);
    if (p0 < p1) shared_a_rect(t, dot, M, K, A, lda, n, B, b_bf16, N, C, p0, p1);
  };
  if (serial) body(0, 1);
  else pool.run(body);
}

namespace {

// The bf16 update over the C rectangle [m0, m1) x [n0, n1): op(B) packed a column block at a time,
// alpha·A packed one row panel at a time, each tile of C widened, updated and rounded in registers.
void update_bf16_rect(const IsaTable& t, int64_t K, float alpha, const float* A, int64_t lda,
                      const float* B, int64_t ldb, uint16_t* C, int64_t ldc, int64_t m0, int64_t m1,
                      int64_t n0, int64_t n1) {
  const GemmKernel& kern = t.wide;
  const int mr = kern.mr, nr = kern.nr;
  ThreadBuffers& bufs = buffers();
  const int64_t ncb = imax(nr, kUpdateBlockFloats / K / nr * nr);
  alignas(64) float tile[32 * 64];
  for (int64_t jc = n0; jc < n1; jc += ncb) {
    const int64_t nc = imin(ncb, n1 - jc);
    float* bbuf = bufs.b.get(static_cast<size_t>(round_up(nc, nr) * K));
    t.pack_b(bbuf, B, false, ldb, false, 0, K, jc, nc, nr, nullptr);
    float* abuf = bufs.a.get(static_cast<size_t>(mr * K));
    for (int64_t i0 = m0; i0 < m1; i0 += mr) {
      const int64_t rows = imin(mr, m1 - i0);
      t.pack_a(abuf, A, lda, false, i0, rows, 0, K, mr, alpha, nullptr);
      for (int64_t jr = 0; jr < nc; jr += nr) {
        const int64_t cols = imin(nr, nc - jr);
        uint16_t* c = C + i0 * ldc + jc + jr;
        const float* bp = bbuf + jr * K;
        if (rows == mr && cols == nr) {
          t.wide_bf16_out(K, abuf, bp, nr, c, ldc);
          continue;
        }
        // an edge tile: the same sum through an fp32 tile, rounded by the same rule
        for (int i = 0; i < mr; ++i)
          for (int j = 0; j < nr; ++j) tile[i * nr + j] = i < rows && j < cols ? bf16_to_f32(c[i * ldc + j]) : 0.0f;
        kern.run(K, abuf, bp, nr, tile, nr, 1);
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t j = 0; j < cols; ++j) c[i * ldc + j] = float_to_bf16(tile[i * nr + j]);
      }
    }
  }
}

}  // namespace

void sgemm_bf16_update(ThreadPool& pool, int64_t M, int64_t N, int64_t K, float alpha,
                       const float* A, int64_t lda, const float* B, int64_t ldb, uint16_t* C,
                       int64_t ldc) {
  // alpha·A·B is then exactly zero and C + 0 rounds to C: nothing to write (as sgemm's alpha == 0
  // reads neither A nor B)
  if (M <= 0 || N <= 0 || K <= 0 || alpha == 0.0f) return;
  const IsaTable& t = isa_table();
  const int mr = t.wide.mr, nr = t.wide.nr;
  // memory bound at small K: count each element of C as a few multiply-adds of work
  const int64_t work = M * N * (K + 4);
  if (work < gemm_blocking().parallel_min_flops || pool.size() == 1)
    return update_bf16_rect(t, K, alpha, A, lda, B, ldb, C, ldc, 0, M, 0, N);
  pool.run([&](int tid, int nt) {
    // rows split in row panels, as the fp32 path splits C; columns where rows are too few
    int64_t b, e;
    if (N >= M * 2 || M < mr * nt) {
      thread_share(N, nr, tid, nt, &b, &e);
      if (b < e) update_bf16_rect(t, K, alpha, A, lda, B, ldb, C, ldc, 0, M, b, e);
    } else {
      thread_share(M, mr, tid, nt, &b, &e);
      if (b < e) update_bf16_rect(t, K, alpha, A, lda, B, ldb, C, ldc, b, e, 0, N);
    }
  });
}

void sgemm_bf16(ThreadPool& pool, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                float alpha, const float* A, int64_t lda, const uint16_t* B, int64_t ldb,
                float beta, float* C, int64_t ldc, bool bf16_dot) {
  GemmArgs g = plain_gemm(trans_a, trans_b, M, N, K, alpha, A, lda, B, true, ldb, beta, C, ldc);
  // linear() promises fp32 products of its input (the bf16 pair dot would round A to 8 bits)
  // unless its caller asked for bf16 products
  g.allow_bf16_dot = g.bf16_dot_few_rows = bf16_dot;
  g.split_k = true;
  gemm_ex(pool, g);
}

}  // namespace lora
