// The per-ISA leaf routines of the CPU GEMM engine (micro-kernels, packing, the small-M path) as a
// table of function pointers, one table per instruction-set level, plus the runtime dispatch that
// picks one. The driver in gemm.cc (blocking, threading, epilogues) is ISA-neutral and calls only
// through this table. Not a public header: the binding needs only cpu_isa_name().
#pragma once

#include <cstdint>

namespace lora {

enum class CpuIsa : int32_t { Generic = 0, Avx2 = 1, Avx512 = 2 };

// The level in use: the best the CPU supports, lowered by LORA_NATIVE_ISA=avx512|avx2|generic
// (a level above what the CPU supports falls back to the best supported one). Read once.
CpuIsa cpu_isa();
// "avx512", "avx2" or "generic": the level actually used, for the binding to report.
const char* cpu_isa_name();
// True when the avx512 level is in use and the CPU has avx512_bf16 (bf16 dot products).
bool cpu_has_bf16_dot();

// Dropout applied while packing or in an epilogue: element (r, c) of the stored x (N, C) is kept
// when dropout_keep(seed, r*ld + c, p), and then scaled by 1/(1-p).
struct DropoutMask {
  float p;
  float scale;
  uint64_t seed;
  int64_t ld;
};

struct GemmKernel {
  int mr, nr;
  // c(mr, nr) = (accumulate ? c : 0) + a·b over k steps; a is a packed (k, mr) micro-panel, b
  // a (k, nr) one with row stride ldb (nr when packed; the stored matrix's stride when B is read
  // in place). c has row stride ldc.
  void (*run)(int64_t k, const float* a, const float* b, int64_t ldb, float* c, int64_t ldc,
              int accumulate);
  // The same mr with one vector of columns (nr1 wide), over the same packed a: the fused side
  // product H += a·hb (h = x·Aᵀ, dh = s·dy·B) reads the A panels packed for this kernel.
  int nr1;
  void (*run1)(int64_t k, const float* a, const float* b, int64_t ldb, float* c, int64_t ldc,
               int accumulate);
  // run with the GEMM's epilogue product in the same sums: c = (accumulate ? c : 0) + a·b + a2·b2,
  // with a2 a packed (ke, mr) micro-panel and b2 a packed (ke, nr) one, fp32 (ke more k steps
  // before the store, under the bf16 dot too).
  void (*run_epi)(int64_t k, const float* a, const float* b, int64_t ldb, float* c, int64_t ldc,
                  int accumulate, int64_t ke, const float* a2, const float* b2);
};

struct IsaTable {
  const char* name;
  GemmKernel wide;    // the main kernel (most shapes)
  GemmKernel narrow;  // for op(B) with few columns (h = x·Aᵀ at small rank)
  GemmKernel short_m; // for few rows of C (dA at small rank)

  // Packs rows [i0, i0+mc) x cols [k0, k0+kc) of op(A) into ceil(mc/mr) (kc, mr) micro-panels,
  // scaled by alpha; rows past mc are zero. op(A)[i][k] = trans ? a[k*lda+i] : a[i*lda+k].
  // drop (or nullptr) masks by the stored coordinates of a.
  void (*pack_a)(float* dst, const float* a, int64_t lda, bool trans, int64_t i0, int64_t mc,
                 int64_t k0, int64_t kc, int mr, float alpha, const DropoutMask* drop);
  // Packs rows [k0, k0+kc) x cols [j0, j0+nc) of op(B) into ceil(nc/nr) (kc, nr) micro-panels;
  // op(B)[k][j] = trans ? b[j*ldb+k] : b[k*ldb+j]; bf16 set means b holds bf16 bits.
  void (*pack_b)(float* dst, const void* b, bool bf16, int64_t ldb, bool trans, int64_t k0,
                 int64_t kc, int64_t j0, int64_t nc, int nr, const DropoutMask* drop);

  // Small-M path, memory bound on B: c(m, n) = (accumulate ? c : 0) + a(m, k)·op(B) with a's
  // rows contiguous (row stride lda). trans_b: B stored (n, k) with row stride ldb (y = x·Wᵀ), m <=
  // kDecodeRows; else (k, n), m <= small_rows. Also serves any M in chunks of small_rows rows when
  // op(B) is narrow. scratch holds at least small_scratch_floats(k) floats (a repacked there).
  int small_rows;  // the most rows (m) of the (k, n) case: its m x G accumulators fit the registers
  void (*small_m)(int m, int64_t n, int64_t k, const float* a, int64_t lda, const void* b, bool bf16,
                  int64_t ldb, bool trans_b, float* c, int64_t ldc, int accumulate, float* scratch);

  // bf16 dot-product kernel (avx512_bf16 only, else nullptr): c(mr, nr) (+)= a·b over k2 pairs of
  // k, with a packed as (k2, mr, 2) bf16 and b as (k2, nr, 2) bf16.
  GemmKernel bf16_kernel;
  void (*pack_a_bf16)(uint16_t* dst, const float* a, int64_t lda, bool trans, int64_t i0,
                      int64_t mc, int64_t k0, int64_t kc, int mr, float alpha);
  void (*pack_b_bf16)(uint16_t* dst, const uint16_t* b, int64_t ldb, bool trans, int64_t k0,
                      int64_t kc, int64_t j0, int64_t nc, int nr);

  // The wide kernel with a bf16-output epilogue: c(mr, nr) = round_bf16(c + a·b) with c bf16 bits
  // (row stride ldc), a and b packed as for `wide`; fp32 sum, rounded once to nearest-even.
  void (*wide_bf16_out)(int64_t k, const float* a, const float* b, int64_t ldb, uint16_t* c,
                        int64_t ldc);

  // iters x 24 independent FMA chains of the level's widest vector (nullptr where the level has no
  // FMA): timed once against an integer add chain to count the FMA pipes (gemm_blocking.cc).
  float (*fma_burst)(int64_t iters);

  // The streaming path's bf16 dot product (avx512_bf16 only, else nullptr), for explicit requests
  // (matmulPrecision 'bf16'): c(m, n) = (accumulate ? c : 0) + bf16(a)(m, k)·Bᵀ with B bf16 stored
  // (n, k) (row stride ldb), a's rows rounded to bf16 once, fp32 sums; kBf16DotMinRows <= m <= kDecodeRows.
  // scratch holds at least small_scratch_floats(k) floats (the rounded rows go there).
  void (*small_m_bf16_dot)(int m, int64_t n, int64_t k, const float* a, int64_t lda, const uint16_t* b,
                           int64_t ldb, float* c, int64_t ldc, int accumulate, float* scratch);
  // Few rows of C, each a sum over k: c(m, n) = alpha·aᵀ·b + (accumulate ? c : 0) with a stored
  // (k, m) (row stride lda) and b fp32 stored (k, n) (row stride ldb), m <= kReduceMax; b read in
  // place in blocks of kb rows, the next block prefetched into L2 (the LoRA backward's dA = dhᵀ·x
  // and dBᵀ = hᵀ·dy).
  void (*reduce_k)(int m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                   float* c, int64_t ldc, float alpha, int accumulate, int64_t kb);
  // d (kc, kSideCols) += Pᵀ·td for one packed panel P of op(A) (mr rows, k-major, as pack_a writes
  // it) and the panel's `rows` rows of td (row stride ldtd, nd <= kSideCols columns): the side
  // product D of gemm_ex (gemm_fused.h) from the packed blocks of A.
  void (*side_panel)(int mr, int64_t kc, const float* ap, int rows, const float* td, int64_t ldtd, int nd,
                     float* d);
  // The same with op(A) read as stored, row-major (row stride lda): `rows` rows of kc.
  void (*side_rows)(int64_t kc, const float* a, int64_t lda, int64_t rows, const float* td, int64_t ldtd,
                    int nd, float* d);
};
// Columns of the side product D a packed panel serves (one 16-float row per k).
constexpr int kSideCols = 16;
// The most rows of C reduce_k takes.
constexpr int kReduceMax = 16;

// The most rows of x the streaming path takes in one pass over a stored-(n, k) B (decode: y = x·Wᵀ
// with W read from memory once for all of them).
constexpr int kDecodeRows = 16;
// Whether the streaming path broadcasts a stored-(n, k) B against m rows of x held as lanes (whole
// rows of B, x repacked as (k, lanes)) rather than dotting rows (x in L1, k in blocks): from 5 rows
// of an fp32 B and 9 of a bf16 one (each row of a bf16 B widened first), where the dot form's x
// traffic overtakes the broadcast form's wasted lanes (measured at 4096 x 4096 on Zen 5: fp32 8 rows
// 3.7 ms against 5.3, 4 rows equal; bf16 8 rows 2.3 ms against 3.4). With 4-lane vectors and no
// FMA (the portable level) the dot form stays ahead up to 8 rows (8.8 ms against 12.8).
// (more than 8 rows always broadcast: the dot form's registers hold 8. With 16-lane vectors, 5-8 rows
// of an fp32 B broadcast pairs of B elements, two k positions per vector (small_m_pairs): 4096 x
// 4096, 8 rows, 1 thread, alternating runs: 2.9-3.1 ms against 3.9-4.1 ms for the lanes form.)
constexpr bool decode_broadcasts(int m, bool bf16, int lanes) { return m >= (bf16 || lanes < 8 ? 9 : 5); }
// Rows of x from which the streaming path takes the bf16 dot product when asked for: below, the
// widened bf16 W reads as fast or faster (both bound by memory; 4096 x 4096 on Zen 5, 1 thread: 2
// rows 0.78-1.04 ms fp32 products against 0.82-1.09 dot, 3 rows even, 4 rows 0.89-1.13 against
// 0.82-0.97).
constexpr int kBf16DotMinRows = 4;
// Scratch floats small_m needs for k: x repacked as (k, 16) (rows as lanes) or (k/VL, m, VL).
inline int64_t small_scratch_floats(int64_t k) { return kDecodeRows * (k + 16) + 64; }

// The blocking of the packed path and the streaming path, chosen once per process from the CPU it
// runs on (gemm_blocking.cc): cache sizes from cpuid (sysconf, then defaults, where cpuid says
// nothing), the FMA pipes measured, and the level's register tile.
struct GemmBlocking {
  int64_t l1d, l2, l3;  // bytes per core (l3: the share of one core), as used
  const char* cache_source;  // "cpuid", "sysconf", "default" or "env"
  int fma_pipes;        // FMA instructions per cycle at the level's vector width (1 or 2)
  double fmas_per_cycle;  // as measured (0 where the level has no FMA)
  int64_t kc, mc, nc;   // the packed path: k block, rows of A per L2 block, columns of B per L3 block
  int64_t small_kc;     // the streaming path: k block of up to small_rows rows of x held in L1
  int64_t parallel_min_flops;  // below this many multiply-adds one thread does the whole product
};
// The blocking in use; LORA_NATIVE_GEMM_BLOCKS="kc,mc,nc" overrides the three packed-path blocks
// (tests and native/dev experiments: small blocks put every block edge within small shapes).
const GemmBlocking& gemm_blocking();
// For native/dev tuners only (not reachable from JavaScript): replace the blocking in use. Not to
// be called while a product runs.
void set_gemm_blocking_for_dev(const GemmBlocking& b);

const IsaTable* isa_table_generic();
const IsaTable* isa_table_avx2();    // nullptr when the compiler could not build it
const IsaTable* isa_table_avx512();  // nullptr when the compiler could not build it
const IsaTable& isa_table();          // the table in use

}  // namespace lora
