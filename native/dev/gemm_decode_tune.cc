// Dev experiment: decode y(M, 4096) = x(M, 4096)·Wᵀ with W fp32 streamed from memory: the dot form
// (MM rows x G W rows of accumulators, x plain or repacked "i", k blocks KB, W row blocks JB) and
// the broadcast form "bR" (R rows of W broadcast against x repacked as (k, 16) lanes), with the
// in-row prefetch distance PF (floats). NW=32 keeps W in L2 (compute only).
//   g++ -O3 -std=c++17 native/dev/gemm_decode_tune.cc -o /tmp/dt && taskset -c 0 /tmp/dt 16
// Measured on the Zen 5 VM at load 10-18 (min of 9): M=16 dot form 8x2 12-15 ms (x rows 16 KB apart
// share one L1 set; loads folded into each FMA), repacked 4.7-8; broadcast form b8/b10 3.6-3.7 ms
// with PF 256-512 (5.3 without prefetch, 4.6-5.4 at 1024), b16 5.0; M=8: broadcast 3.7-4.4 against
// dot 5.2; compute-only (NW=32) b8 3.1 ms = 80% of the FMA peak. The engine ships the broadcast form
// from 5 rows (9 for bf16, widened 64 at a time into L1) and the repacked dot form below.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <vector>
#include <algorithm>
#include <immintrin.h>
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,avx2,bmi2")
static double now(){timespec t;clock_gettime(CLOCK_THREAD_CPUTIME_ID,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int PF = 512; constexpr bool NOFOLD = true; // prefetch distance in floats along the row
// rows [0,M) of x (M <= MM), W rows [j0, j1), k range [k0, k1): c += 
template <int MM, int G>
void dot_block(int M, const float* x, int64_t ldx, const float* W, int64_t ldw, float* y, int64_t ldy, int64_t j0, int64_t j1, int64_t k0, int64_t k1, bool acc_out) {
  for (int64_t j = j0; j < j1; j += G) {
    __m512 acc[MM][G];
    for (int m = 0; m < MM; ++m) for (int g = 0; g < G; ++g) acc[m][g] = _mm512_setzero_ps();
    const float* w = W + j * ldw;
    for (int64_t p = k0; p < k1; p += 16) {
      __m512 wv[G];
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) { wv[g] = _mm512_loadu_ps(w + g * ldw + p); if (PF) _mm_prefetch((const char*)(w + g * ldw + p + PF), _MM_HINT_T0); }
#pragma GCC unroll 16
      for (int m = 0; m < MM; ++m) {
        const __m512 xv = _mm512_loadu_ps(x + m * ldx + p);
#pragma GCC unroll 8
        for (int g = 0; g < G; ++g) acc[m][g] = _mm512_fmadd_ps(xv, wv[g], acc[m][g]);
      }
    }
    for (int m = 0; m < MM; ++m) for (int g = 0; g < G; ++g) { float s = _mm512_reduce_add_ps(acc[m][g]); y[m * ldy + j + g] = acc_out ? y[m * ldy + j + g] + s : s; }
  }
}
template <int MM, int G>
void dot_block_i(const float* xi, const float* W, int64_t ldw, float* y, int64_t ldy, int64_t j0, int64_t j1, int64_t k0, int64_t k1, bool acc_out) {
  for (int64_t j = j0; j < j1; j += G) {
    __m512 acc[MM][G];
    for (int m = 0; m < MM; ++m) for (int g = 0; g < G; ++g) acc[m][g] = _mm512_setzero_ps();
    const float* w = W + j * ldw;
    const float* xp = xi;
    for (int64_t p = k0; p < k1; p += 16, xp += MM * 16) {
      __m512 wv[G];
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) { wv[g] = _mm512_loadu_ps(w + g * ldw + p); if (PF) _mm_prefetch((const char*)(w + g * ldw + p + PF), _MM_HINT_T0); }
#pragma GCC unroll 16
      for (int m = 0; m < MM; ++m) {
        __m512 xv = _mm512_load_ps(xp + m * 16);
        if (NOFOLD) __asm__("" : "+v"(xv));
#pragma GCC unroll 8
        for (int g = 0; g < G; ++g) acc[m][g] = _mm512_fmadd_ps(xv, wv[g], acc[m][g]);
      }
    }
    for (int m = 0; m < MM; ++m) for (int g = 0; g < G; ++g) { float s = _mm512_reduce_add_ps(acc[m][g]); y[m * ldy + j + g] = acc_out ? y[m * ldy + j + g] + s : s; }
  }
}
float* XI;
template <int MM, int G>
void v2(int M, int64_t N, int64_t K, const float* x, const float* W, float* y, int64_t JB, int64_t KB) {
  // interleave x: for each row chunk of MM, (K/16, MM, 16)
  for (int m0 = 0; m0 < M; m0 += MM)
    for (int64_t p = 0; p < K; p += 16)
      for (int m = 0; m < MM; ++m) memcpy(XI + m0 * K + p * MM + m * 16, x + (m0 + m) * K + p, 64);
  for (int64_t jb = 0; jb < N; jb += JB)
    for (int64_t kb = 0; kb < K; kb += KB)
      for (int m0 = 0; m0 < M; m0 += MM)
        dot_block_i<MM, G>(XI + m0 * K + kb * MM, W, K, y + m0 * N, N, jb, std::min(N, jb + JB), kb, std::min(K, kb + KB), kb > 0);
}
// broadcast form: xT (K, 16) packed; R W rows at a time over k range [k0,k1)
float* XT; float TILE[64*16];
template <int R>
void bcast_block(int M, const float* xT, const float* W, int64_t ldw, float* y, int64_t ldy, int64_t j0, int64_t j1, int64_t k0, int64_t k1, bool acc_out) {
  for (int64_t j = j0; j < j1; j += R) {
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    const float* w = W + j * ldw;
    for (int64_t p = k0; p < k1; ++p) {
      if (PF && (p & 15) == 0) {
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(w + r * ldw + p + PF), _MM_HINT_T0);
      }
      const __m512 xv = _mm512_load_ps(xT + p * 16);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(w[r * ldw + p]), xv, acc[r]);
    }
    for (int r = 0; r < R; ++r) _mm512_store_ps(TILE + r * 16, acc[r]);
    for (int m = 0; m < M; ++m) for (int r = 0; r < R; ++r) { float s = TILE[r * 16 + m]; y[m * ldy + j + r] = acc_out ? y[m * ldy + j + r] + s : s; }
  }
}
template <int R>
void v3(int M, int64_t N, int64_t K, const float* x, const float* W, float* y, int64_t JB, int64_t KB) {
  static bool packed = false;
  if (!packed || !getenv("NW")) { for (int64_t p = 0; p < K; ++p) for (int m = 0; m < 16; ++m) XT[p * 16 + m] = m < M ? x[m * K + p] : 0.0f; packed = true; }
  for (int64_t jb = 0; jb < N; jb += JB)
    for (int64_t kb = 0; kb < K; kb += KB)
      bcast_block<R>(M, XT, W, K, y, N, jb, std::min(N, jb + JB), kb, std::min(K, kb + KB), kb > 0);
}
// variant 1: for each block of JB W rows: for each k block KB: for row chunks of MM: dot_block
template <int MM, int G>
void v1(int M, int64_t N, int64_t K, const float* x, const float* W, float* y, int64_t JB, int64_t KB) {
  for (int64_t jb = 0; jb < N; jb += JB)
    for (int64_t kb = 0; kb < K; kb += KB)
      for (int m0 = 0; m0 < M; m0 += MM)
        dot_block<MM, G>(MM, x + m0 * K, K, W, K, y + m0 * N, N, jb, std::min(N, jb + JB), kb, std::min(K, kb + KB), kb > 0);
}
int main(int argc, char** argv) {
  int64_t N = getenv("NW") ? atoi(getenv("NW")) : 4096, K = 4096; int M = atoi(argv[1]); int REP = 4096 / N;
  if (getenv("PF")) PF = atoi(getenv("PF"));
  XI = (float*)aligned_alloc(64, 16*4096*4); XT = (float*)aligned_alloc(64, 16*4096*4); std::vector<float> W(N * K), x(16 * K), y(16 * N);
  for (size_t i = 0; i < W.size(); ++i) W[i] = 1.0f / (1 + i % 7);
  for (size_t i = 0; i < x.size(); ++i) x[i] = 1.0f / (1 + i % 5);
  struct Var { const char* name; void (*f)(int, int64_t, int64_t, const float*, const float*, float*, int64_t, int64_t); int64_t JB, KB; };
  // (row counts R and G divide 32, so NW=32 works for every variant)
  std::vector<Var> vs = {
    {"b8", v3<8>, 4096, 4096}, {"b16", v3<16>, 4096, 4096}, {"b4", v3<4>, 4096, 4096},
    {"i8x2 JB32 KB1024", v2<8, 2>, 32, 1024}, {"i4x4 JB32 KB2048", v2<4, 4>, 32, 2048},
    {"8x2 JB32 KB1024", v1<8, 2>, 32, 1024}, {"4x4 JB32 KB2048", v1<4, 4>, 32, 2048},
  };
  std::vector<std::vector<double>> ts(vs.size());
  for (int r = 0; r < 9; ++r) for (size_t v = 0; v < vs.size(); ++v) {
    double t0 = now(); for (int q = 0; q < REP; ++q) vs[v].f(M, N, K, x.data(), W.data(), y.data(), vs[v].JB, vs[v].KB); ts[v].push_back(now() - t0); }
  for (size_t v = 0; v < vs.size(); ++v) { auto s = ts[v]; std::sort(s.begin(), s.end()); printf("M=%d %-20s min %.2f ms (%.1f GB/s) med %.2f ms\n", M, vs[v].name, s[0] * 1e3, N * REP * K * 4 / s[0] / 1e9, s[4] * 1e3); }
}
