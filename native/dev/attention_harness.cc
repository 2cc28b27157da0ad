// Standalone harness for the CPU attention kernel (native/cpu/attention*.cc): random shapes, GQA
// groups, masks (causal, padding, segments, sliding window, KV-cache strides) against a float64
// reference written from the math, then timings. Build and run:
//   g++ -O3 -std=c++17 -pthread native/dev/attention_harness.cc native/cpu/*.cc -o /tmp/ah
//   (the whole CPU backend: attention.cc's table entries reach its thread pool)
//   /tmp/ah check [iters]            (LORA_NATIVE_ISA=avx512|avx2|generic picks the level)
//   /tmp/ah time T S H KVH D causal threads reps [B]
// Not part of the addon or the test suite; the shipped test is test/attention.test.ts.
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "../cpu/attention.h"

using namespace lora;

static double wall() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
static double cpu_time() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

struct Problem {
  AttentionArgs a;
  int64_t Smax;
  std::vector<float> q, k, v, dout;
  std::vector<int32_t> mask, seg;
};

static bool visible(const AttentionArgs& a, int64_t b, int64_t i, int64_t j) {
  const int64_t p = a.S - a.T + i;
  if (a.causal && j > p) return false;
  if (a.window > 0 && j <= p - a.window) return false;
  if (a.key_mask && !a.key_mask[b * a.key_mask_stride + j]) return false;
  if (a.segment_ids && a.segment_ids[b * a.segment_stride + j] != a.segment_ids[b * a.segment_stride + p]) return false;
  return true;
}

// float64 forward and backward from the definitions (softmax over the visible keys; GQA head h
// reads kv head h / (H / KVH)); rows with no visible key give 0.
static void reference(const Problem& P, std::vector<double>& out, std::vector<double>& dq,
                      std::vector<double>& dk, std::vector<double>& dv) {
  const AttentionArgs& a = P.a;
  const int64_t G = a.H / a.KVH, D = a.D;
  out.assign(a.B * a.T * a.H * D, 0.0);
  dq.assign(out.size(), 0.0);
  dk.assign(a.B * a.kv_batch_stride, 0.0);
  dv.assign(dk.size(), 0.0);
  std::vector<double> s(a.S), pr(a.S), dp(a.S);
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t h = 0; h < a.H; ++h)
      for (int64_t i = 0; i < a.T; ++i) {
        const int64_t qo = ((b * a.T + i) * a.H + h) * D;
        auto ko = [&](int64_t j) { return b * a.kv_batch_stride + (j * a.KVH + h / G) * D; };
        double mx = -INFINITY;
        for (int64_t j = 0; j < a.S; ++j) {
          if (!visible(a, b, i, j)) continue;
          double d = 0.0;
          for (int64_t e = 0; e < D; ++e) d += double(P.q[qo + e]) * P.k[ko(j) + e];
          s[j] = d * a.scale;
          mx = std::max(mx, s[j]);
        }
        if (mx == -INFINITY) continue;
        double sum = 0.0;
        for (int64_t j = 0; j < a.S; ++j) sum += pr[j] = visible(a, b, i, j) ? std::exp(s[j] - mx) : 0.0;
        double delta = 0.0;
        for (int64_t j = 0; j < a.S; ++j) {
          pr[j] /= sum;
          double g = 0.0;
          for (int64_t e = 0; e < D; ++e) {
            out[qo + e] += pr[j] * P.v[ko(j) + e];
            g += double(P.dout[qo + e]) * P.v[ko(j) + e];
          }
          dp[j] = g;
          delta += pr[j] * g;
        }
        for (int64_t j = 0; j < a.S; ++j) {
          if (pr[j] == 0.0) continue;
          const double ds = pr[j] * (dp[j] - delta);
          for (int64_t e = 0; e < D; ++e) {
            dq[qo + e] += a.scale * ds * P.k[ko(j) + e];
            dk[ko(j) + e] += a.scale * ds * P.q[qo + e];
            dv[ko(j) + e] += pr[j] * P.dout[qo + e];
          }
        }
      }
}

static Problem make(std::mt19937_64& rng, int64_t B, int64_t T, int64_t S, int64_t Smax, int64_t H,
                    int64_t KVH, int64_t D, bool causal, int64_t window, bool pad, bool segs) {
  Problem P;
  AttentionArgs& a = P.a;
  a.B = B; a.T = T; a.S = S; a.H = H; a.KVH = KVH; a.D = D;
  a.causal = causal;
  a.window = window;
  a.scale = 1.0f / std::sqrt(float(std::max<int64_t>(D, 1)));
  a.kv_batch_stride = Smax * KVH * D;
  P.Smax = Smax;
  std::uniform_real_distribution<float> U(-1.0f, 1.0f);
  auto fill = [&](std::vector<float>& x, size_t n, float sc) { x.resize(n); for (auto& e : x) e = U(rng) * sc; };
  fill(P.q, B * T * H * D, 2.0f);
  fill(P.k, B * Smax * KVH * D, 2.0f);
  fill(P.v, B * Smax * KVH * D, 1.0f);
  fill(P.dout, B * T * H * D, 1.0f);
  if (pad) {
    P.mask.assign(B * S, 1);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = int64_t(rng() % (S + 1));
      const bool left = rng() & 1;
      for (int64_t j = 0; j < n; ++j) P.mask[b * S + (left ? j : S - 1 - j)] = 0;
    }
    a.key_mask = P.mask.data();
    a.key_mask_stride = S;
  }
  if (segs) {
    P.seg.resize(B * S);
    for (int64_t b = 0; b < B; ++b) {
      int32_t id = 0;
      for (int64_t j = 0; j < S; ++j) {
        if (rng() % 37 == 0) ++id;
        P.seg[b * S + j] = id;
      }
    }
    a.segment_ids = P.seg.data();
    a.segment_stride = S;
  }
  return P;
}

static double worst(const float* x, const std::vector<double>& r, size_t n, size_t stride_ok_mask_n, double atol, double rtol, size_t* at) {
  (void)stride_ok_mask_n;
  double w = 0.0;
  for (size_t i = 0; i < n; ++i) {
    const double e = std::fabs(double(x[i]) - r[i]) / (atol + rtol * std::fabs(r[i]));
    if (!(e <= w)) { w = e; *at = i; }
  }
  return w;
}

static int check(int iters) {
  std::mt19937_64 rng(7);
  ThreadPool pool(2);
  int bad = 0;
  const int64_t Ds[] = {1, 7, 16, 40, 64, 80, 96, 128};
  const int64_t groups[] = {1, 3, 8};
  for (int it = 0; it < iters; ++it) {
    const int64_t D = Ds[rng() % 8], G = groups[rng() % 3], KVH = 1 + rng() % 2, H = G * KVH;
    const int64_t B = 1 + rng() % 2;
    int64_t S = 1 + rng() % 150, T = (rng() % 3 == 0) ? 1 + rng() % std::min<int64_t>(S, 9) : S;
    if (rng() % 4 == 0) { S = 300; T = 1; }
    const int64_t Smax = S + (rng() % 2 ? 5 : 0);
    const bool causal = rng() % 4 != 0;
    const int64_t window = rng() % 4 == 0 ? 1 + rng() % 40 : 0;
    const bool pad = rng() % 2, segs = rng() % 4 == 0;
    Problem P = make(rng, B, T, S, Smax, H, KVH, D, causal, window, pad, segs);
    std::vector<double> ro, rdq, rdk, rdv;
    reference(P, ro, rdq, rdk, rdv);
    std::vector<float> out(ro.size(), NAN), lse(B * H * T), dq(ro.size(), NAN), dk(rdk.size(), NAN), dv(rdk.size(), NAN);
    lora_status st = cpu_attention(pool, out.data(), lse.data(), P.q.data(), P.k.data(), P.v.data(), P.a);
    std::vector<char> ws(cpu_attention_backward_workspace(P.a, pool.size()) + 64);
    if (st == LORA_OK)
      st = cpu_attention_backward(pool, ws.data(), dq.data(), dk.data(), dv.data(), P.dout.data(), P.q.data(), P.k.data(),
                                  P.v.data(), out.data(), lse.data(), P.a);
    // cache positions S..Smax-1 of dk, dv are not written: still NaN; 0 for the comparison
    bool untouched = true;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t e = S * KVH * D; e < Smax * KVH * D; ++e) {
        const size_t i = size_t(b * Smax * KVH * D + e);
        untouched = untouched && std::isnan(dk[i]) && std::isnan(dv[i]);
        dk[i] = dv[i] = 0.0f;
      }
    if (!untouched) st = LORA_UNUSABLE;  // reported as a failure below
    size_t at[4] = {0, 0, 0, 0};
    const double w[4] = {worst(out.data(), ro, ro.size(), 0, 1e-5, 1e-4, &at[0]), worst(dq.data(), rdq, rdq.size(), 0, 1e-4, 1e-3, &at[1]),
                         worst(dk.data(), rdk, rdk.size(), 0, 1e-4, 1e-3, &at[2]), worst(dv.data(), rdv, rdv.size(), 0, 1e-4, 1e-3, &at[3])};
    const bool ok = st == LORA_OK && w[0] <= 1 && w[1] <= 1 && w[2] <= 1 && w[3] <= 1;
    if (!ok) {
      ++bad;
      std::printf("FAIL B%ld T%ld S%ld(max %ld) H%ld KVH%ld D%ld causal%d win%ld pad%d seg%d: status %d, out %.2g@%zu dq %.2g@%zu dk %.2g@%zu dv %.2g@%zu\n",
                  (long)B, (long)T, (long)S, (long)Smax, (long)H, (long)KVH, (long)D, causal, (long)window, pad, segs, (int)st,
                  w[0], at[0], w[1], at[1], w[2], at[2], w[3], at[3]);
    }
  }
  std::printf("%s: %d of %d failed\n", cpu_attention_isa(), bad, iters);
  return bad ? 1 : 0;
}

static int timing(int argc, char** argv) {
  const int64_t T = atol(argv[2]), S = atol(argv[3]), H = atol(argv[4]), KVH = atol(argv[5]), D = atol(argv[6]);
  const bool causal = atoi(argv[7]);
  const int threads = atoi(argv[8]), reps = atoi(argv[9]);
  const int64_t B = argc > 10 ? atol(argv[10]) : 1;
  std::mt19937_64 rng(1);
  Problem P = make(rng, B, T, S, S, H, KVH, D, causal, 0, false, false);
  ThreadPool pool(threads);
  std::vector<float> out(B * T * H * D), lse(B * H * T), dq(out.size()), dk(P.k.size()), dv(P.k.size());
  std::vector<char> ws(cpu_attention_backward_workspace(P.a, threads) + 64);
  std::vector<double> tf, tb, cf, cb;
  for (int r = 0; r < reps + 2; ++r) {
    double w0 = wall(), c0 = cpu_time();
    cpu_attention(pool, out.data(), lse.data(), P.q.data(), P.k.data(), P.v.data(), P.a);
    double w1 = wall(), c1 = cpu_time();
    cpu_attention_backward(pool, ws.data(), dq.data(), dk.data(), dv.data(), P.dout.data(), P.q.data(), P.k.data(), P.v.data(),
                           out.data(), lse.data(), P.a);
    double w2 = wall(), c2 = cpu_time();
    if (r >= 2) { tf.push_back(w1 - w0); tb.push_back(w2 - w1); cf.push_back(c1 - c0); cb.push_back(c2 - c1); }
  }
  auto med = [](std::vector<double> x) { std::sort(x.begin(), x.end()); return x[x.size() / 2]; };
  auto mn = [](const std::vector<double>& x) { return *std::min_element(x.begin(), x.end()); };
  // FlashAttention's count: forward 4·T·S·D·H (halved when causal and T == S), backward 2.5x
  const double fwd = 4.0 * B * T * S * D * H * (causal && T == S ? 0.5 : 1.0), bwd = 2.5 * fwd;
  std::printf("%s T%ld S%ld H%ld KVH%ld D%ld causal%d thr%d B%ld: fwd %.3f ms (min %.3f, cpu %.3f) %.1f GFLOP/s | bwd %.3f ms (min %.3f, cpu %.3f) %.1f GFLOP/s | fwd+bwd %.1f GFLOP/s (min-based %.1f)\n",
              cpu_attention_isa(), (long)T, (long)S, (long)H, (long)KVH, (long)D, causal, threads, (long)B,
              med(tf) * 1e3, mn(tf) * 1e3, med(cf) * 1e3, fwd / med(tf) / 1e9, med(tb) * 1e3, mn(tb) * 1e3, med(cb) * 1e3, bwd / med(tb) / 1e9,
              (fwd + bwd) / (med(tf) + med(tb)) / 1e9, (fwd + bwd) / (mn(tf) + mn(tb)) / 1e9);
  return 0;
}

int main(int argc, char** argv) {
  if (argc >= 2 && !std::strcmp(argv[1], "check")) return check(argc > 2 ? atoi(argv[2]) : 200);
  if (argc >= 10 && !std::strcmp(argv[1], "time")) return timing(argc, argv);
  std::fprintf(stderr, "usage: ah check [iters] | ah time T S H KVH D causal threads reps [B]\n");
  return 2;
}
