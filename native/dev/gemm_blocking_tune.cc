// Dev experiment: a plain blocked sgemm C = A·Bᵀ (2048^3, B stored (N, K) as linear() has W) over
// the engine's AVX-512 leaf routines, with the loop order, kc/mc/nc, a prefetching kernel, the C
// traffic (HOTC=1: every tile written to one place) and packing (NOPACK=1: packed once; FASTPACK=1:
// 16x16 register transposes, PFP=n prefetch n floats ahead) varied in one process, alternating.
//   g++ -O3 -std=c++17 native/dev/gemm_blocking_tune.cc -o /tmp/bt
//   FASTPACK=1 PFP=128 taskset -c 0 /tmp/bt <pf*10+order> kc mc nc ...   (order 0 Goto, 1 BLIS-
//   transposed: A micro-panel in L1 and B block in L2, 2 Goto with sub-k blocks of SUBK)
// Measured on the Zen 5 VM at load 7-12 (min of 7, ms): Goto kc 1024 mc 144 99.9 (172 GF); kc 256
// 107-111; BLIS-transposed kc 480 nc 512 99.8; NOPACK 86-88 and NOPACK+HOTC 84-86 (packing ~10%
// scalar, C traffic ~5%); FASTPACK+PFP=128 88-91 (packing ~1%); kernel prefetch of A/B/C, sub-k
// blocks and padded ldc: no gain beyond the noise (±3%). The engine ships Goto order, kc = L2/8,
// mc = 9/16 L2 and the fast packers.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <vector>
#include <algorithm>
#include <immintrin.h>
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,avx2,bmi2")
#define LN_VL 16
#define LN_FMA(a, b, c) _mm512_fmadd_ps((a), (b), (c))
#define LN_SPLAT(x) _mm512_set1_ps(x)
#define LN_HSUM(v) _mm512_reduce_add_ps(v)
#include "../cpu/gemm_kernels_impl.h"
static double now(){timespec t;clock_gettime(CLOCK_THREAD_CPUTIME_ID,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static inline uint64_t tsc(){return __rdtsc();}
int64_t LDC=2048; int64_t SUBK=256; int HOTC=0, NOPACK=0, packed_once=0;

int PFD=16; // prefetch distance in k steps
template <int MR, int NV, int PF>
void kpf(int64_t k, const float* __restrict a, const float* __restrict b, int64_t ldb, float* __restrict c, int64_t ldc, int accumulate) {
  __m512 acc[MR][NV];
#pragma GCC unroll 32
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_setzero_ps();
  if (PF & 4) {
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i) { __builtin_prefetch(c + i * ldc, 1, 3); __builtin_prefetch(c + i * ldc + NV * 16 - 1, 1, 3); }
  }
  const int64_t da = PFD * MR, db = PFD * ldb;
  for (int64_t p = 0; p < k; ++p) {
    if (PF & 1) { if ((p & 3) == 0) __builtin_prefetch(a + da, 0, 3); }
    if (PF & 2) {
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) __builtin_prefetch(b + db + j * 16, 0, 3);
    }
    __m512 bv[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) bv[j] = _mm512_loadu_ps(b + j * 16);
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(a[i]);
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_fmadd_ps(av, bv[j], acc[i][j]);
    }
    a += MR;
    b += ldb;
  }
#pragma GCC unroll 32
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) {
      float* q = c + i * ldc + j * 16;
      _mm512_storeu_ps(q, accumulate ? _mm512_add_ps(_mm512_loadu_ps(q), acc[i][j]) : acc[i][j]);
    }
}
typedef void (*KF)(int64_t, const float*, const float*, int64_t, float*, int64_t, int);
KF kfs[8] = {kpf<12,2,0>, kpf<12,2,1>, kpf<12,2,2>, kpf<12,2,3>, kpf<12,2,4>, kpf<12,2,5>, kpf<12,2,6>, kpf<12,2,7>};
KF kf = kfs[0];

int PFP=0;
// 16x16 transpose in registers: r[i] lane j -> r[j] lane i
static inline void tr16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) { t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]); t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]); }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44); r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44); r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88); t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88); t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88); r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
    r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88); r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xDD);
  }
}
void pack_a_fast(float* dst, const float* a, int64_t lda, int64_t i0, int64_t mc, int64_t k0, int64_t kc, int mr) {
  for (int64_t ip = 0; ip < mc; ip += mr) {
    const int64_t rows = std::min<int64_t>(mr, mc - ip);
    for (int64_t k = 0; k < kc; k += 16) {
      const int64_t kl = std::min<int64_t>(16, kc - k);
      const __mmask16 lm = (__mmask16)((1u << kl) - 1);
      __m512 r[16];
      for (int i = 0; i < 16; ++i) { r[i] = i < rows ? _mm512_maskz_loadu_ps(lm, a + (i0 + ip + i) * lda + k0 + k) : _mm512_setzero_ps(); if (PFP && i < rows) __builtin_prefetch(a + (i0 + ip + i) * lda + k0 + k + PFP); }
      tr16(r);
      const __mmask16 sm = (__mmask16)((1u << mr) - 1);
      for (int q = 0; q < kl; ++q) _mm512_mask_storeu_ps(dst + (k + q) * mr, sm, r[q]);
    }
    dst += mr * kc;
  }
}
void pack_bt_fast(float* dst, const float* b, int64_t ldb, int64_t k0, int64_t kc, int64_t j0, int64_t nc, int nr) {
  for (int64_t jp = 0; jp < nc; jp += nr) {
    const int64_t cols = std::min<int64_t>(nr, nc - jp);
    for (int64_t k = 0; k < kc; k += 16) {
      const int64_t kl = std::min<int64_t>(16, kc - k);
      const __mmask16 lm = (__mmask16)((1u << kl) - 1);
      for (int h = 0; h < nr; h += 16) {
        __m512 r[16];
        for (int j = 0; j < 16; ++j) { r[j] = h + j < cols ? _mm512_maskz_loadu_ps(lm, b + (j0 + jp + h + j) * ldb + k0 + k) : _mm512_setzero_ps(); if (PFP && h + j < cols) __builtin_prefetch(b + (j0 + jp + h + j) * ldb + k0 + k + PFP); }
        tr16(r);
        for (int q = 0; q < kl; ++q) _mm512_storeu_ps(dst + (k + q) * nr + h, r[q]);
      }
    }
    dst += nr * kc;
  }
}
int FASTPACK=0;
uint64_t t_packa, t_packb, t_all;
constexpr int MR=12, NR=32;
float *abuf, *bbuf;
// order 0: Goto (B micro-panel in L1, A block in L2): jc, pc, packB, ic, packA, jr, ir
// order 1: BLIS-transposed (A micro-panel in L1, B block in L2): ic(L3), pc, packA(mc), jc(L2), packB, ir, jr
void gemm(int order, int64_t M, int64_t N, int64_t K, const float* A, const float* B, float* C, int64_t kc_, int64_t mc_, int64_t nc_){
  uint64_t T0=tsc();
  if(order==0){
    for(int64_t jc=0;jc<N;jc+=nc_){ int64_t nc=std::min(nc_,N-jc);
      for(int64_t pc=0;pc<K;pc+=kc_){ int64_t kc=std::min(kc_,K-pc);
        uint64_t t=tsc(); if(!NOPACK||!packed_once) (FASTPACK? pack_bt_fast(bbuf,B,K,pc,kc,jc,nc,NR) : pack_b(bbuf,B,false,K,true,pc,kc,jc,nc,NR,nullptr)); t_packb+=tsc()-t;
        for(int64_t ic=0;ic<M;ic+=mc_){ int64_t mc=std::min(mc_,M-ic);
          t=tsc(); if(!NOPACK||!packed_once) (FASTPACK? pack_a_fast(abuf,A,K,ic,mc,pc,kc,MR) : pack_a(abuf,A,K,false,ic,mc,pc,kc,MR,1.0f,nullptr)); t_packa+=tsc()-t;
          for(int64_t jr=0;jr<nc;jr+=NR) for(int64_t ir=0;ir<mc;ir+=MR)
            kf(kc,abuf+ir*kc,bbuf+jr*kc,NR,HOTC? C : C+(ic+ir)*LDC+jc+jr,LDC,pc>0);
        }}}
  } else if(order==2){
    for(int64_t jc=0;jc<N;jc+=nc_){ int64_t nc=std::min(nc_,N-jc);
      for(int64_t pc=0;pc<K;pc+=kc_){ int64_t kc=std::min(kc_,K-pc);
        uint64_t t=tsc(); if(!NOPACK||!packed_once) (FASTPACK? pack_bt_fast(bbuf,B,K,pc,kc,jc,nc,NR) : pack_b(bbuf,B,false,K,true,pc,kc,jc,nc,NR,nullptr)); t_packb+=tsc()-t;
        for(int64_t ic=0;ic<M;ic+=mc_){ int64_t mc=std::min(mc_,M-ic);
          t=tsc(); if(!NOPACK||!packed_once) (FASTPACK? pack_a_fast(abuf,A,K,ic,mc,pc,kc,MR) : pack_a(abuf,A,K,false,ic,mc,pc,kc,MR,1.0f,nullptr)); t_packa+=tsc()-t;
          for(int64_t jr=0;jr<nc;jr+=NR) for(int64_t s=0;s<kc;s+=SUBK) { int64_t sk=std::min(SUBK,kc-s); for(int64_t ir=0;ir<mc;ir+=MR)
            kf(sk,abuf+ir*kc+s*MR,bbuf+jr*kc+s*NR,NR,HOTC? C : C+(ic+ir)*LDC+jc+jr,LDC,pc>0||s>0); }
        }}}
  } else {
    for(int64_t ic=0;ic<M;ic+=mc_){ int64_t mc=std::min(mc_,M-ic);
      for(int64_t pc=0;pc<K;pc+=kc_){ int64_t kc=std::min(kc_,K-pc);
        uint64_t t=tsc(); if(!NOPACK||!packed_once) (FASTPACK? pack_a_fast(abuf,A,K,ic,mc,pc,kc,MR) : pack_a(abuf,A,K,false,ic,mc,pc,kc,MR,1.0f,nullptr)); t_packa+=tsc()-t;
        for(int64_t jc=0;jc<N;jc+=nc_){ int64_t nc=std::min(nc_,N-jc);
          t=tsc(); if(!NOPACK||!packed_once) (FASTPACK? pack_bt_fast(bbuf,B,K,pc,kc,jc,nc,NR) : pack_b(bbuf,B,false,K,true,pc,kc,jc,nc,NR,nullptr)); t_packb+=tsc()-t;
          for(int64_t ir=0;ir<mc;ir+=MR) for(int64_t jr=0;jr<nc;jr+=NR)
            kf(kc,abuf+ir*kc,bbuf+jr*kc,NR,HOTC? C : C+(ic+ir)*LDC+jc+jr,LDC,pc>0);
        }}}
  }
  t_all+=tsc()-T0; packed_once=1;
}
int main(int argc,char**argv){
  int64_t M=2048,N=2048,K=2048; if(getenv("LDC")) LDC=atoi(getenv("LDC")); if(getenv("SUBK")) SUBK=atoi(getenv("SUBK")); if(getenv("PFP")) PFP=atoi(getenv("PFP")); if(getenv("FASTPACK")) FASTPACK=1; if(getenv("HOTC")) HOTC=1; if(getenv("NOPACK")) NOPACK=1; if(getenv("PFD")) PFD=atoi(getenv("PFD"));
  std::vector<float> A(M*K),B(N*K),C((M+16)*(N+64));
  for(size_t i=0;i<A.size();i++)A[i]=1.0f/(1+i%7); for(size_t i=0;i<B.size();i++)B[i]=1.0f/(1+i%5);
  abuf=(float*)aligned_alloc(64,64<<20); bbuf=(float*)aligned_alloc(64,64<<20);
  memset(abuf,0,64<<20); memset(bbuf,0,64<<20);
  { std::vector<float> r1(1<<20), r2(1<<20);
    pack_a(r1.data(),A.data(),K,false,5,100,3,77,12,1.0f,nullptr); pack_a_fast(r2.data(),A.data(),K,5,100,3,77,12);
    if (memcmp(r1.data(),r2.data(),9*12*77*4)) printf("pack_a mismatch\n");
    pack_b(r1.data(),B.data(),false,K,true,3,77,5,100,32,nullptr); pack_bt_fast(r2.data(),B.data(),K,3,77,5,100,32);
    if (memcmp(r1.data(),r2.data(),4*32*77*4)) printf("pack_b mismatch\n"); }
  struct V{int order; int pf; int64_t kc,mc,nc;};
  std::vector<V> vs;
  for(int i=1;i+3<argc;i+=4) vs.push_back({atoi(argv[i])%10,atoi(argv[i])/10,atoi(argv[i+1]),atoi(argv[i+2]),atoi(argv[i+3])});
  int rounds=7;
  std::vector<std::vector<double>> ts(vs.size()); std::vector<double> pa(vs.size()),pb(vs.size());
  for(int r=0;r<rounds;r++) for(size_t v=0;v<vs.size();v++){
    t_packa=t_packb=t_all=0; kf=kfs[vs[v].pf]; double t0=now(); gemm(vs[v].order,M,N,K,A.data(),B.data(),C.data(),vs[v].kc,vs[v].mc,vs[v].nc); double t=now()-t0;
    ts[v].push_back(t); pa[v]=100.0*t_packa/t_all; pb[v]=100.0*t_packb/t_all;
  }
  for(size_t v=0;v<vs.size();v++){ auto s=ts[v]; std::sort(s.begin(),s.end());
    printf("pf %d order %d kc %4ld mc %4ld nc %4ld: min %.1f ms (%.1f GF) med %.1f ms  packA %.1f%% packB %.1f%%\n",vs[v].pf,vs[v].order,vs[v].kc,vs[v].mc,vs[v].nc,s[0]*1e3,2.0*M*N*K/s[0]/1e9,s[rounds/2]*1e3,pa[v],pb[v]);}
}
