// Standalone harness for the CPU GEMM engine (native/cpu/gemm*.cc): random shapes/transposes/strides,
// epilogue products and side products H (with dropout, and read back by the epilogue) against a
// float64 reference, then timings. Build and run:
//   g++ -O3 -std=gnu++17 -pthread -I.. native/dev/gemm_harness.cc native/cpu/gemm*.cc -o /tmp/gh
//   /tmp/gh [check|time M N K ta tb threads reps]
// Not part of the addon or the test suite; the shipped test is test/gemm.test.ts.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "../cpu/gemm.h"
#include "../cpu/gemm_fused.h"
#include "../backend/half.h"
#include "../backend/rng.h"

using namespace lora;

#include <algorithm>
#include <time.h>
// Thread CPU time: other processes share this machine's two cores, and descheduled time is not ours.
static double now() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int check(int iters) {
  std::mt19937_64 rng(42);
  auto R = [&](int64_t lo, int64_t hi) { return lo + (int64_t)(rng() % (uint64_t)(hi - lo + 1)); };
  int bad = 0;
  ThreadPool pool1(1), pool2(2);
  for (int it = 0; it < iters; ++it) {
    int64_t dims[3];
    for (auto& d : dims) {
      int r = (int)R(0, 9);
      d = r == 0 ? R(0, 1) : r < 4 ? R(2, 20) : r < 8 ? R(20, 300) : R(300, 700);
    }
    int64_t M = dims[0], N = dims[1], K = dims[2];
    bool ta = rng() & 1, tb = rng() & 1, bf = (rng() % 4) == 0;
    int64_t lda = (ta ? M : K) + R(0, 3), ldb = (tb ? K : N) + R(0, 3), ldc = N + R(0, 3);
    float alpha = (rng() % 5 == 0) ? 0.5f : 1.0f, beta = (float)(rng() % 3) * 0.5f;  // 0, .5, 1
    bool epi = rng() % 3 == 0;
    int64_t K2 = epi ? R(0, 20) : 0;
    // The side product H = alpha_h·op(A)·op(HB) (dropout on op(A) for it alone), and sometimes the
    // epilogue reading it as A2 (the LoRA forward/backward use).
    const bool use_h = rng() % 3 == 0;
    const int64_t NH = use_h ? ((rng() & 1) ? R(1, 20) : R(0, 70)) : 0, ldh = NH + R(0, 2);
    const bool thb = rng() & 1, h_epi = use_h && epi && (rng() & 1);
    const float alpha_h = (rng() & 1) ? 1.0f : 0.6f;
    DropoutMask hmask{0.3f, 1.0f / 0.7f, rng(), lda};
    const bool h_drop = use_h && rng() % 3 == 0;
    if (h_epi) K2 = NH;
    const int64_t ldhb = (thb ? K : NH) + R(0, 2), ld2 = K2 + 1;
    std::normal_distribution<float> nd;
    std::vector<float> A((ta ? K : M) * lda + 1), B((tb ? N : K) * ldb + 1), C(M * ldc + 1), A2(M * ld2), B2(N * ld2), bias(N + 1);
    std::vector<float> HB((thb ? NH : K) * ldhb + 1), H(M * ldh + 1, NAN);
    for (auto& v : HB) v = nd(rng);
    for (auto& v : A) v = nd(rng);
    for (auto& v : B) v = nd(rng);
    for (auto& v : A2) v = nd(rng);
    for (auto& v : B2) v = nd(rng);
    for (auto& v : bias) v = nd(rng);
    std::vector<uint16_t> Bh(B.size());
    for (size_t i = 0; i < B.size(); ++i) { Bh[i] = float_to_bf16(B[i]); if (bf) B[i] = bf16_to_float(Bh[i]); }
    for (auto& v : C) v = beta == 0 ? NAN : nd(rng);
    std::vector<float> C0 = C;
    GemmArgs g;
    g.trans_a = ta; g.trans_b = tb; g.M = M; g.N = N; g.K = K; g.alpha = alpha; g.A = A.data(); g.lda = lda;
    g.B = bf ? (const void*)Bh.data() : (const void*)B.data(); g.b_bf16 = bf; g.ldb = ldb; g.beta = beta; g.C = C.data(); g.ldc = ldc;
    bool use_bias = epi && (rng() & 1);
    if (epi) { g.A2 = A2.data(); g.lda2 = ld2; g.B2 = B2.data(); g.ldb2 = ld2; g.trans_b2 = true; g.K2 = K2; g.alpha2 = 0.7f; if (use_bias) g.bias = bias.data(); }
    if (use_h) {
      g.HB = HB.data(); g.ldhb = ldhb; g.trans_hb = thb; g.NH = NH; g.alpha_h = alpha_h;
      g.H = H.data(); g.ldh = ldh; g.drop_h = h_drop ? &hmask : nullptr;
      if (h_epi) { g.A2 = H.data(); g.lda2 = ldh; }
    }
    gemm_ex((rng() & 1) ? pool2 : pool1, g);
    // H against float64, then (h_epi) the reference epilogue reads the float64 H
    std::vector<double> Hr(M * (NH + 1)), Hm(M * (NH + 1));
    double hworst = 0;
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < NH; ++j) {
        double s = 0, mag = 0;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t st = ta ? k * lda + i : i * lda + k;
          double a = A[st];
          if (h_drop) a = dropout_keep(hmask.seed, (uint64_t)st, hmask.p) ? (double)(float)(A[st] * hmask.scale) : 0.0;
          double hb = thb ? HB[j * ldhb + k] : HB[k * ldhb + j];
          s += a * hb; mag += std::fabs(a * hb);
        }
        Hr[i * (NH + 1) + j] = alpha_h * s; Hm[i * (NH + 1) + j] = std::fabs(alpha_h) * mag;
        double err = std::fabs(H[i * ldh + j] - alpha_h * s) / (std::fabs(alpha_h) * mag + 1e-30);
        if (!(err <= hworst)) hworst = std::isnan(err) ? 1e30 : err;
      }
    bool bfdot = bf && cpu_has_bf16_dot() && M > 8;
    double worst = 0; int64_t wi = -1, wj = -1; double wr = 0, wg = 0;
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) {
        double s = 0, mag = 0;
        for (int64_t k = 0; k < K; ++k) {
          double a = ta ? A[k * lda + i] : A[i * lda + k];
          if (bfdot) a = bf16_to_float(float_to_bf16((float)(alpha * a))) / alpha;
          double b = tb ? B[j * ldb + k] : B[k * ldb + j];
          s += a * b; mag += std::fabs(a * b);
        }
        s *= alpha; mag *= std::fabs(alpha);
        if (beta != 0) { s += beta * C0[i * ldc + j]; mag += std::fabs(beta * C0[i * ldc + j]); }
        for (int64_t k = 0; k < K2; ++k) {
          const double a2 = h_epi ? Hr[i * (NH + 1) + k] : A2[i * ld2 + k];
          const double a2m = h_epi ? Hm[i * (NH + 1) + k] : std::fabs(a2);
          s += 0.7 * a2 * B2[j * ld2 + k]; mag += 0.7 * a2m * std::fabs(B2[j * ld2 + k]);
        }
        if (use_bias) { s += bias[j]; mag += std::fabs(bias[j]); }
        double err = std::fabs(C[i * ldc + j] - s) / (mag + 1e-30);
        if (!(err <= worst)) { worst = std::isnan(err) ? 1e30 : err; wi = i; wj = j; wr = s; wg = C[i * ldc + j]; }
      }
    // untouched padding
    for (int64_t i = 0; i < M; ++i) for (int64_t j = N; j < ldc && i * ldc + j < (int64_t)C.size(); ++j)
      if (!(std::isnan(C0[i * ldc + j]) && std::isnan(C[i * ldc + j])) && C[i * ldc + j] != C0[i * ldc + j]) { worst = 1e30; wi = i; wj = j; }
    double tol = bfdot ? 1e-2 : 2e-6;
    if (worst > tol || hworst > 2e-6) {
      ++bad;
      printf("FAIL it=%d M=%ld N=%ld K=%ld ta=%d tb=%d bf=%d alpha=%g beta=%g K2=%ld bias=%d NH=%ld thb=%d h_epi=%d h_drop=%d: worst %g at (%ld,%ld) ref %g got %g; H worst %g\n",
             it, M, N, K, ta, tb, bf, alpha, beta, K2, use_bias, NH, thb, h_epi, h_drop, worst, wi, wj, wr, wg, hworst);
    }
  }
  printf("isa=%s bf16dot=%d: %d/%d failed\n", cpu_isa_name(), cpu_has_bf16_dot(), bad, iters);
  return bad != 0;
}

int main(int argc, char** argv) {
  if (argc >= 2 && !strcmp(argv[1], "info")) {
    const GemmBlocking& b = gemm_blocking();
    printf("isa %s caches (%s) L1d %ld KB L2 %ld KB L3/core %ld KB; FMA %.2f/cycle -> %d pipes; kc %ld mc %ld nc %ld small_kc %ld parallel_min %ld\n",
           cpu_isa_name(), b.cache_source, b.l1d >> 10, b.l2 >> 10, b.l3 >> 10, b.fmas_per_cycle, b.fma_pipes, b.kc, b.mc, b.nc,
           b.small_kc, b.parallel_min_flops);
    return 0;
  }
  if (argc < 2 || !strcmp(argv[1], "check")) return check(argc > 2 ? atoi(argv[2]) : 300);
  int64_t M = atoi(argv[2]), N = atoi(argv[3]), K = atoi(argv[4]);
  bool ta = atoi(argv[5]), tb = atoi(argv[6]);
  int threads = atoi(argv[7]), reps = argc > 8 ? atoi(argv[8]) : 5;
  bool bf = argc > 9 && atoi(argv[9]);
  ThreadPool pool(threads);
  std::vector<float> A(M * K), B(K * N), C(M * N);
  std::vector<uint16_t> Bh(K * N);
  for (auto& v : A) v = 1.0f / (1 + (&v - A.data()) % 7);
  for (size_t i = 0; i < B.size(); ++i) { B[i] = 1.0f / (1 + i % 5); Bh[i] = float_to_bf16(B[i]); }
  GemmArgs g;
  g.trans_a = ta; g.trans_b = tb; g.M = M; g.N = N; g.K = K; g.A = A.data(); g.lda = ta ? M : K;
  g.B = bf ? (const void*)Bh.data() : B.data(); g.b_bf16 = bf; g.ldb = tb ? K : N; g.C = C.data(); g.ldc = N;
  std::vector<double> ts;
  for (int r = 0; r < reps + 2; ++r) {
    double t0 = now();
    gemm_ex(pool, g);
    ts.push_back(now() - t0);
  }
  std::vector<double> s(ts.begin() + 2, ts.end());
  std::sort(s.begin(), s.end());
  double med = s[s.size() / 2];
  printf("%s M=%ld N=%ld K=%ld ta=%d tb=%d thr=%d bf=%d: median %.3f ms min %.3f ms  %.1f GFLOP/s (min %.1f)\n",
         cpu_isa_name(), M, N, K, ta, tb, threads, bf, med * 1e3, s[0] * 1e3, 2.0 * M * N * K / med / 1e9, 2.0 * M * N * K / s[0] / 1e9);
}
