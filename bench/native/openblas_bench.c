/* OpenBLAS baseline for the bench suite: the same work as bench/cases/<op>.ts done as a BLAS call
 * sequence (what a user without lora-native's fusion gets). fp32 only. Prints JSON with the kernel
 * OpenBLAS picked (openblas_get_corename: the bench runs this with OPENBLAS_CORETYPE and
 * OPENBLAS_L2_SIZE unset, so the library chooses for the CPU) and its build configuration.
 *   cc -O2 openblas_bench.c -lopenblas -o openblas_bench
 *   ./openblas_bench <gemm|lora_forward|lora_step|lora_merge> N C OC R threads reps warmup [copies]
 * copies: gemm takes turns over that many copies of W (bench/common.ts weightCopies; default 1) */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

void openblas_set_num_threads(int);
int openblas_get_num_threads(void);
char *openblas_get_corename(void);
char *openblas_get_config(void);

static double now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e3 + t.tv_nsec * 1e-6;
}
static float *buf(long n, unsigned seed) {
  float *p = aligned_alloc(64, ((n * 4 + 63) / 64) * 64 + 64);
  for (long i = 0; i < n; ++i) { seed = seed * 1664525u + 1013904223u; p[i] = (seed >> 8) / 16777216.0f - 0.5f; }
  return p;
}
static int cmp(const void *a, const void *b) { double x = *(double *)a, y = *(double *)b; return x < y ? -1 : x > y; }

int main(int argc, char **argv) {
  if (argc < 9) return 2;
  const char *op = argv[1];
  int N = atoi(argv[2]), C = atoi(argv[3]), OC = atoi(argv[4]), R = atoi(argv[5]);
  int reps = atoi(argv[7]), warmup = atoi(argv[8]);
  openblas_set_num_threads(atoi(argv[6]));
  float *x = buf((long)N * C, 1), *W = buf((long)OC * C, 2), *b = buf(OC, 3), *A = buf((long)R * C, 4),
        *B = buf((long)OC * R, 5), *y = buf((long)N * OC, 6), *h = buf((long)N * R, 7), *dy = buf((long)N * OC, 8),
        *dx = buf((long)N * C, 9), *dA = buf((long)R * C, 10), *dB = buf((long)OC * R, 11), *dh = buf((long)N * R, 12),
        *ones = buf(N, 13);
  for (int i = 0; i < N; ++i) ones[i] = 1.0f;
  int copies = argc > 9 ? atoi(argv[9]) : 1;
  if (copies < 1) copies = 1;
  if (copies > 64) copies = 64;
  float *Ws[64];
  Ws[0] = W;
  for (int i = 1; i < copies; ++i) Ws[i] = buf((long)OC * C, 100 + i);
  const float s = 2.0f;
  double ts[512];
  int n = 0;
  double start = 0;
  for (int it = 0; it < warmup + 512; ++it) {
    if (it == warmup) start = now_ms();
    if (it >= warmup + reps && now_ms() - start > 300) break;
    double t0 = now_ms();
    if (!strcmp(op, "gemm")) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, OC, C, 1, x, C, Ws[it % copies], C, 0, y, OC);
    } else if (!strcmp(op, "linear")) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, OC, C, 1, x, C, W, C, 0, y, OC);
      cblas_sger(CblasRowMajor, N, OC, 1, ones, 1, b, 1, y, OC);  /* + bias */
    } else if (!strcmp(op, "lora_forward") || !strcmp(op, "lora_step")) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, R, C, 1, x, C, A, C, 0, h, R);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, OC, C, 1, x, C, W, C, 0, y, OC);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, OC, R, s, h, R, B, R, 1, y, OC);
      cblas_sger(CblasRowMajor, N, OC, 1, ones, 1, b, 1, y, OC);  /* + bias */
      if (!strcmp(op, "lora_step")) {
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, OC, R, N, s, dy, OC, h, R, 1, dB, R);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, R, OC, s, dy, OC, B, R, 0, dh, R);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, R, C, N, 1, dh, R, x, C, 1, dA, C);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, C, OC, 1, dy, OC, W, C, 0, dx, C);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, C, R, 1, dh, R, A, C, 1, dx, C);
      }
    } else if (!strcmp(op, "lora_merge")) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, OC, C, R, (it & 1) ? -1 : 1, B, R, A, C, 1, W, C);
    } else {
      return 3;
    }
    if (it >= warmup) ts[n++] = now_ms() - t0;
  }
  qsort(ts, n, sizeof(double), cmp);
  printf("{\"medianMs\": %.4f, \"minMs\": %.4f, \"reps\": %d, \"corename\": \"%s\", \"config\": \"%s\", \"threads\": %d}\n", ts[n / 2],
         ts[0], n, openblas_get_corename(), openblas_get_config(), openblas_get_num_threads());
  return 0;
}
