// Dev experiment: the AVX-512 micro-kernels' ceiling with their operands in L1 ("kc np"), and with
// one operand streaming from L2 ("kc np A": B micro-panel hot, A panels streaming), for the
// 12x32, 8x48, 6x64, 14x32 and 24x16 register tiles. Rates in GFLOP/s of this thread's CPU time.
//   g++ -O3 -std=c++17 native/dev/gemm_kernel_ceiling.cc -o /tmp/kc && taskset -c 0 /tmp/kc 256 16 [A]
// Measured on the Zen 5 VM (2 FMA pipes, peak 213-227 GFLOP/s), load 3-10: every tile 208-219 in
// L1 (kc 64-256, one panel); A streaming from L2 with the B panel hot 212-217 (kc 128-384); B
// streaming from L2 with A hot 192-205 (kc 256-480, 16 panels). The tile shape does not matter at
// 2 pipes; keeping the B micro-panel in L1 is worth ~5%, but kc <= 384 costs more C traffic than
// that in the full product (gemm_blocking_tune.cc), so the engine keeps kc = L2/8.
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
template<int MR,int NV> double run(int64_t kc, int npanels, int reps){
  const int NR=NV*16;
  float* a=(float*)aligned_alloc(64,MR*kc*4); float* b=(float*)aligned_alloc(64,NR*kc*4*npanels);
  float* c=(float*)aligned_alloc(64,MR*NR*4*npanels);
  for(int i=0;i<MR*kc;i++)a[i]=1e-3f; for(int i=0;i<NR*kc*npanels;i++)b[i]=1e-3f; memset(c,0,MR*NR*4*npanels);
  double best=1e9;
  for(int r=0;r<reps;r++){double t0=now(); for(int it=0;it<200;it++) for(int p=0;p<npanels;p++) micro_kernel<MR,NV>(kc,a,b+p*NR*kc,NR,c+p*MR*NR,NR,1); double t=now()-t0; best=std::min(best,t);}
  return 2.0*MR*NR*kc*npanels*200/best/1e9;
}
template<int MR,int NV> double runA(int64_t kc, int npanels, int reps){
  const int NR=NV*16;
  float* a=(float*)aligned_alloc(64,MR*kc*4*npanels); float* b=(float*)aligned_alloc(64,NR*kc*4);
  float* c=(float*)aligned_alloc(64,MR*NR*4*npanels);
  for(int i=0;i<MR*kc*npanels;i++)a[i]=1e-3f; for(int i=0;i<NR*kc;i++)b[i]=1e-3f; memset(c,0,MR*NR*4*npanels);
  double best=1e9;
  for(int r=0;r<reps;r++){double t0=now(); for(int it=0;it<200;it++) for(int p=0;p<npanels;p++) micro_kernel<MR,NV>(kc,a+p*MR*kc,b,NR,c+p*MR*NR,NR,1); double t=now()-t0; best=std::min(best,t);}
  return 2.0*MR*NR*kc*npanels*200/best/1e9;
}
int main(int argc,char**argv){
  int64_t kc=atoi(argv[1]); int np=atoi(argv[2]);
  if(argc>3){printf("A-stream kc=%ld np=%d 12x32 %.1f  8x48 %.1f  6x64 %.1f 14x32 %.1f\n",kc,np,runA<12,2>(kc,np,7),runA<8,3>(kc,np,7),runA<6,4>(kc,np,7),runA<14,2>(kc,np,7));return 0;}
  printf("kc=%ld np=%d 12x32 %.1f  8x48 %.1f  6x64 %.1f 14x32 %.1f 24x16 %.1f\n",kc,np,run<12,2>(kc,np,7),run<8,3>(kc,np,7),run<6,4>(kc,np,7),run<14,2>(kc,np,7),run<24,1>(kc,np,7));
}
