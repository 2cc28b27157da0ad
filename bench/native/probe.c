/* Machine ceilings for the bench suite, measured on every run: the fp32 FMA peak and the bf16 dot
 * peak of 1 and of T threads at once (each thread's rate from its own CPU time, so a thread that a
 * busy machine descheduled reads its core's rate, and two threads on one physical core read half
 * each), memory bandwidth (read, and read+write update) over a buffer far larger than the caches,
 * the clock (a chain of 1-cycle integer adds) and what the CPU says about itself (cpuid). Prints
 * one JSON object. Not a benchmark of lora-native itself.
 *   cc -O3 -pthread probe.c -o probe && ./probe <max threads> */
#include <cpuid.h>
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}
static double thread_now(void) {
  struct timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

#define CHAINS 24 /* 24 independent accumulators cover 2 pipes x 4-6 cycles of latency */
__attribute__((target("avx512f"))) static float fma512(long iters) {
  __m512 a[CHAINS], m = _mm512_set1_ps(0.9999f), c = _mm512_set1_ps(1e-4f);
  for (int i = 0; i < CHAINS; ++i) a[i] = _mm512_set1_ps((float)i);
  for (long it = 0; it < iters; ++it)
#pragma GCC unroll 24
    for (int i = 0; i < CHAINS; ++i) a[i] = _mm512_fmadd_ps(a[i], m, c);
  __m512 s = a[0];
  for (int i = 1; i < CHAINS; ++i) s = _mm512_add_ps(s, a[i]);
  return _mm512_reduce_add_ps(s); /* every chain summed: none is dead code */
}
/* 12 ymm chains twice per iteration: 24 would not fit 16 registers */
__attribute__((target("avx2,fma"))) static float fma256(long iters) {
  __m256 a[12], m = _mm256_set1_ps(0.9999f), c = _mm256_set1_ps(1e-4f);
  for (int i = 0; i < 12; ++i) a[i] = _mm256_set1_ps((float)i);
  for (long it = 0; it < iters; ++it)
#pragma GCC unroll 24
    for (int i = 0; i < 24; ++i) a[i % 12] = _mm256_fmadd_ps(a[i % 12], m, c);
  __m256 s = a[0];
  for (int i = 1; i < 12; ++i) s = _mm256_add_ps(s, a[i]);
  float f[8];
  _mm256_storeu_ps(f, s);
  return f[0] + f[7];
}
/* vdpbf16ps: 16 lanes x 2 products, 64 flops per instruction */
__attribute__((target("avx512f,avx512bf16"))) static float dpbf16(long iters) {
  __m512 a[CHAINS];
  const __m512bh x = (__m512bh)_mm512_set1_epi32(0x3f803f80), y = (__m512bh)_mm512_set1_epi32(0x3c003c00);
  for (int i = 0; i < CHAINS; ++i) a[i] = _mm512_set1_ps((float)i);
  for (long it = 0; it < iters; ++it)
#pragma GCC unroll 24
    for (int i = 0; i < CHAINS; ++i) a[i] = _mm512_dpbf16_ps(a[i], x, y);
  __m512 s = a[0];
  for (int i = 1; i < CHAINS; ++i) s = _mm512_add_ps(s, a[i]);
  return _mm512_reduce_add_ps(s);
}

static volatile double sink;
enum { FMA, BF16 };
typedef struct {
  int kind, width;
  long iters;
  double gflops; /* this thread's best rate over its CPU time */
} PeakJob;
static void *peak_job(void *arg) {
  PeakJob *j = (PeakJob *)arg;
  double best = 1e30;
  for (int r = 0; r < 10; ++r) {
    double t0 = thread_now();
    sink = j->kind == BF16 ? dpbf16(j->iters) : j->width == 16 ? fma512(j->iters) : fma256(j->iters);
    double t = thread_now() - t0;
    if (t < best) best = t;
  }
  const double flops_per_iter = j->kind == BF16 ? CHAINS * 64.0 : CHAINS * j->width * 2.0;
  j->gflops = j->iters * flops_per_iter / best / 1e9;
  return 0;
}
/* threads running the same burst at once; returns the sum of their rates */
static double peak(int kind, int width, int threads) {
  pthread_t th[64];
  PeakJob jobs[64];
  double sum = 0;
  for (int t = 0; t < threads; ++t) {
    jobs[t].kind = kind; jobs[t].width = width; jobs[t].iters = 2000000;
    pthread_create(&th[t], 0, peak_job, &jobs[t]);
  }
  for (int t = 0; t < threads; ++t) { pthread_join(th[t], 0); sum += jobs[t].gflops; }
  return sum;
}

typedef struct { float *p; long n; int mode, streams; } BwJob;
/* The read loops walk their n floats as `streams` equal parts side by side: one stream is what a
 * plain sum does, while a GEMV reads several rows of W at once, and on the machines of this kind
 * one core reads faster from 4-8 streams (2 threads: 49-57 GB/s from one stream each, 60-72 from
 * 4 or 8 in one measurement), so the ceiling is the best of 1, 4 and 8. */
__attribute__((target("avx512f"))) static double read512(const float *p, long n, int streams) {
  __m512 s[8];
  for (int u = 0; u < 8; ++u) s[u] = _mm512_setzero_ps();
  const long part = n / streams / 128 * 128;
  for (long i = 0; i < part; i += 128)
    for (int q = 0; q < streams; ++q)
#pragma GCC unroll 8
      for (int u = 0; u < 8; ++u) s[u] = _mm512_add_ps(s[u], _mm512_load_ps(p + q * part + i + 16 * u));
  for (int u = 1; u < 8; ++u) s[0] = _mm512_add_ps(s[0], s[u]);
  return _mm512_reduce_add_ps(s[0]);
}
static double read_any(const float *p, long n, int streams) {
  typedef float v8 __attribute__((vector_size(32)));
  v8 s[8] = {{0}};
  const long part = n / streams / 64 * 64;
  for (long i = 0; i < part; i += 64)
    for (int q = 0; q < streams; ++q) {
      const v8 *v = (const v8 *)(p + q * part + i);
      for (int u = 0; u < 8; ++u) s[u] += v[u];
    }
  for (int u = 1; u < 8; ++u) s[0] += s[u];
  return s[0][0] + s[0][7];
}
static void *bw_job(void *arg) {
  BwJob *j = (BwJob *)arg;
  if (j->mode == 0) {
    sink = __builtin_cpu_supports("avx512f") ? read512(j->p, j->n, j->streams) : read_any(j->p, j->n, j->streams);
  } else {
    for (long i = 0; i < j->n; ++i) j->p[i] = j->p[i] * 0.5f + 1.0f;
  }
  return 0;
}
static double bandwidth(float *p, long n, int threads, int mode) {
  static const int kStreams[] = {1, 4, 8};
  double best = 1e30;
  for (int v = 0; v < (mode ? 1 : 3); ++v)
    for (int r = 0; r < 5; ++r) {
      pthread_t th[64];
      BwJob jobs[64];
      double t0 = now();
      for (int t = 0; t < threads; ++t) {
        jobs[t].p = p + n / threads * t; jobs[t].n = n / threads; jobs[t].mode = mode; jobs[t].streams = kStreams[v];
        pthread_create(&th[t], 0, bw_job, &jobs[t]);
      }
      for (int t = 0; t < threads; ++t) pthread_join(th[t], 0);
      double t = now() - t0;
      if (t < best) best = t;
    }
  return (mode ? 2.0 : 1.0) * n * sizeof(float) / best / 1e9;
}

/* cycles per second of this thread: n dependent 1-cycle adds over its CPU time */
static double clock_ghz(void) {
  double best = 1e30;
  const long n = 50000000;
  for (int r = 0; r < 5; ++r) {
    unsigned long x = 0;
    double t0 = thread_now();
    for (long i = 0; i < n; i += 16) __asm__ volatile(".rept 16\n\taddq $1, %0\n\t.endr" : "+r"(x));
    double t = thread_now() - t0;
    if (t < best) best = t;
  }
  return n / best / 1e9;
}

static void json_string(const char *key, const char *v) {
  printf("\"%s\": \"", key);
  for (; *v; ++v) {
    if (*v == '"' || *v == '\\') putchar('\\');
    if ((unsigned char)*v >= 32) putchar(*v);
  }
  printf("\", ");
}

int main(int argc, char **argv) {
  int max_threads = argc > 1 ? atoi(argv[1]) : 1;
  if (max_threads < 1 || max_threads > 64) max_threads = 1;
  unsigned a = 0, b = 0, c = 0, d = 0;
  char brand[49] = {0}, model[256] = "unknown";
  for (unsigned i = 0; i < 3; ++i) __get_cpuid(0x80000002 + i, (unsigned *)(brand + 16 * i), (unsigned *)(brand + 16 * i + 4), (unsigned *)(brand + 16 * i + 8), (unsigned *)(brand + 16 * i + 12));
  __get_cpuid(1, &a, &b, &c, &d);
  const unsigned family = ((a >> 8) & 15) + (((a >> 8) & 15) == 15 ? (a >> 20) & 255 : 0);
  const unsigned cpu_model = ((a >> 4) & 15) | ((((a >> 8) & 15) >= 6 ? (a >> 16) & 15 : 0) << 4), stepping = a & 15;
  double mhz = 0;
  FILE *f = fopen("/proc/cpuinfo", "r");
  if (f) {
    char line[512];
    int got_model = 0;
    while (fgets(line, sizeof line, f)) {
      char *colon = strchr(line, ':');
      if (!colon) continue;
      if (!got_model && !strncmp(line, "model name", 10)) {
        snprintf(model, sizeof model, "%s", colon + 2);
        model[strcspn(model, "\n")] = 0;
        got_model = 1;
      }
      if (!mhz && !strncmp(line, "cpu MHz", 7)) mhz = atof(colon + 1);
    }
    fclose(f);
  }
  const int width = __builtin_cpu_supports("avx512f") ? 16 : __builtin_cpu_supports("fma") ? 8 : 0;
  const int has_bf16 = __builtin_cpu_supports("avx512bf16");
  printf("{");
  json_string("cpuModel", model);
  json_string("cpuidBrand", brand);
  printf("\"family\": %u, \"model\": %u, \"stepping\": %u, \"nominalMHz\": %.0f, \"clockGHz\": %.2f, \"vectorWidth\": %d, ",
         family, cpu_model, stepping, mhz, clock_ghz(), width);
  printf("\"perThreads\": {");
  long n = 64L << 20; /* 256 MB: far beyond any L3 of this kind of machine */
  float *p = aligned_alloc(64, n * sizeof(float));
  for (long i = 0; i < n; ++i) p[i] = 1.0f;
  for (int t = 1; t <= max_threads; ++t) {
    printf("%s\"%d\": {\"fmaGflops\": %.1f, \"bf16DotGflops\": %.1f, \"readGBs\": %.1f, \"updateGBs\": %.1f}", t > 1 ? ", " : "", t,
           width ? peak(FMA, width, t) : 0.0, has_bf16 ? peak(BF16, 16, t) : 0.0, bandwidth(p, n, t, 0), bandwidth(p, n, t, 1));
  }
  free(p);
  printf("}}\n");
  return 0;
}
