/* Machine ceilings for the bench suite, measured here: fp32 FMA peak of one thread (independent
 * FMA chains at the widest ISA the CPU runs) and memory bandwidth (read, and read+write update)
 * over a buffer far larger than the caches. Prints JSON. Not a benchmark of lora-native itself.
 *   cc -O3 -pthread probe.c -o probe && ./probe <threads> */
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}
/* The FMA probe counts this thread's CPU time: the machine is shared, and time spent descheduled
 * says nothing about the core's peak. */
static double thread_now(void) {
  struct timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

#define CHAINS 24 /* 24 independent accumulators cover 2 pipes x 4-cycle latency with room */
__attribute__((target("avx512f"))) static double fma512(long iters) {
  __m512 a[CHAINS], m = _mm512_set1_ps(0.9999f), c = _mm512_set1_ps(1e-4f);
  for (int i = 0; i < CHAINS; ++i) a[i] = _mm512_set1_ps((float)i);
  for (long it = 0; it < iters; ++it)
#pragma GCC unroll 24
    for (int i = 0; i < CHAINS; ++i) a[i] = _mm512_fmadd_ps(a[i], m, c);
  __m512 s = a[0];
  for (int i = 1; i < CHAINS; ++i) s = _mm512_add_ps(s, a[i]);
  return _mm512_reduce_add_ps(s); /* every chain summed: none is dead code */
}
__attribute__((target("avx2,fma"))) static double fma256(long iters) {
  __m256 a[CHAINS], m = _mm256_set1_ps(0.9999f), c = _mm256_set1_ps(1e-4f);
  for (int i = 0; i < CHAINS; ++i) a[i] = _mm256_set1_ps((float)i);
  for (long it = 0; it < iters; ++it)
#pragma GCC unroll 24
    for (int i = 0; i < CHAINS; ++i) a[i] = _mm256_fmadd_ps(a[i], m, c);
  __m256 s = a[0];
  for (int i = 1; i < CHAINS; ++i) s = _mm256_add_ps(s, a[i]);
  float f[8];
  _mm256_storeu_ps(f, s);
  return f[0] + f[7];
}

static volatile double sink;
static double peak(int *width) {
  long iters = 2000000;
  int w = __builtin_cpu_supports("avx512f") ? 16 : __builtin_cpu_supports("fma") ? 8 : 0;
  *width = w;
  if (!w) return 0;
  double best = 1e30;
  for (int r = 0; r < 10; ++r) {
    double t0 = thread_now();
    sink = w == 16 ? fma512(iters) : fma256(iters);
    double t = thread_now() - t0;
    if (t < best) best = t;
  }
  return (double)iters * CHAINS * w * 2 / best / 1e9;
}

typedef struct { float *p; long n; int mode; } Job;
static void *bw_job(void *arg) {
  Job *j = (Job *)arg;
  if (j->mode == 0) {
    typedef float v8 __attribute__((vector_size(32)));
    v8 s[8] = {{0}};
    const v8 *q = (const v8 *)j->p;
    for (long i = 0; i < j->n / 8; i += 8)
      for (int u = 0; u < 8; ++u) s[u] += q[i + u];
    for (int u = 1; u < 8; ++u) s[0] += s[u];
    sink = s[0][0] + s[0][7];
  } else {
    for (long i = 0; i < j->n; ++i) j->p[i] = j->p[i] * 0.5f + 1.0f;
  }
  return 0;
}
static double bandwidth(int threads, int mode) {
  long n = 64L << 20; /* 256 MB: 8x the L3 */
  float *p = aligned_alloc(64, n * sizeof(float));
  for (long i = 0; i < n; ++i) p[i] = 1.0f;
  double best = 1e30;
  for (int r = 0; r < 5; ++r) {
    pthread_t th[64];
    Job jobs[64];
    double t0 = now();
    for (int t = 0; t < threads; ++t) {
      jobs[t].p = p + n / threads * t; jobs[t].n = n / threads; jobs[t].mode = mode;
      pthread_create(&th[t], 0, bw_job, &jobs[t]);
    }
    for (int t = 0; t < threads; ++t) pthread_join(th[t], 0);
    double t = now() - t0;
    if (t < best) best = t;
  }
  free(p);
  return (mode ? 2.0 : 1.0) * n * sizeof(float) / best / 1e9;
}

int main(int argc, char **argv) {
  int threads = argc > 1 ? atoi(argv[1]) : 1, width;
  double pk = peak(&width);
  printf("{\"fmaPeakGflops1\": %.1f, \"vectorWidth\": %d, \"threads\": %d, \"readGBs\": %.1f, \"updateGBs\": %.1f}\n",
         pk, width, threads, bandwidth(threads, 0), bandwidth(threads, 1));
  return 0;
}
