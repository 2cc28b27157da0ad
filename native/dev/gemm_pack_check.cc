// Dev check: the AVX-512 packing routines (gemm_avx512_pack.h, pack_a_bf16/pack_b_bf16) against the
// scalar definitions, bit for bit, over random shapes, offsets, strides, alpha and transposes.
//   g++ -O2 -std=gnu++17 -pthread -I.. native/dev/gemm_pack_check.cc native/cpu/gemm*.cc -o /tmp/pc
// Not part of the addon or the test suite (test/gemm.test.ts runs the packers through the engine).
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "../cpu/gemm_isa.h"
#include "../backend/half.h"

using namespace lora;

// the scalar definitions: (k2, mr, 2) / (k2, nr, 2) pairs, odd kc padded with zero
static void ref_pack_a_bf16(uint16_t* dst, const float* a, int64_t lda, bool trans, int64_t i0, int64_t mc,
                            int64_t k0, int64_t kc, int mr, float alpha) {
  const int64_t kc2 = (kc + 1) / 2;
  for (int64_t ip = 0; ip < mc; ip += mr) {
    const int64_t rows = std::min<int64_t>(mr, mc - ip);
    for (int64_t i = 0; i < mr; ++i)
      for (int64_t k = 0; k < 2 * kc2; ++k) {
        float v = 0.0f;
        if (i < rows && k < kc) v = alpha * (trans ? a[(k0 + k) * lda + i0 + ip + i] : a[(i0 + ip + i) * lda + k0 + k]);
        dst[(k >> 1) * mr * 2 + i * 2 + (k & 1)] = float_to_bf16(v);
      }
    dst += mr * 2 * kc2;
  }
}
static void ref_pack_b_bf16(uint16_t* dst, const uint16_t* b, int64_t ldb, bool trans, int64_t k0, int64_t kc,
                            int64_t j0, int64_t nc, int nr) {
  const int64_t kc2 = (kc + 1) / 2;
  for (int64_t jp = 0; jp < nc; jp += nr) {
    const int64_t cols = std::min<int64_t>(nr, nc - jp);
    for (int64_t j = 0; j < nr; ++j)
      for (int64_t k = 0; k < 2 * kc2; ++k)
        dst[(k >> 1) * nr * 2 + j * 2 + (k & 1)] =
            (j < cols && k < kc) ? (trans ? b[(j0 + jp + j) * ldb + k0 + k] : b[(k0 + k) * ldb + j0 + jp + j]) : 0;
    dst += nr * 2 * kc2;
  }
}

int main() {
  const IsaTable* fast = isa_table_avx512();
  const IsaTable* ref = isa_table_generic();
  if (!fast || !__builtin_cpu_supports("avx512bw")) { printf("no avx512: nothing to check\n"); return 0; }
  std::mt19937_64 rng(7);
  auto R = [&](int64_t lo, int64_t hi) { return lo + (int64_t)(rng() % (uint64_t)(hi - lo + 1)); };
  int bad = 0, n = 0;
  for (int it = 0; it < 3000; ++it) {
    const bool trans = rng() & 1;
    const int64_t mc = R(1, 70), kc = R(1, 90), off_r = R(0, 5), off_k = R(0, 5);
    const int mrs[] = {8, 12, 16, 24, 32, 48};
    const int mr = mrs[rng() % 6];
    // one square-ish source serves every reading: max(rows, cols) stored rows of ld >= both
    const int64_t S = std::max(off_r + mc, off_k + kc), ld = S + R(0, 9);
    std::vector<float> src(S * ld + 1);
    std::normal_distribution<float> nd;
    for (auto& v : src) v = nd(rng);
    if (rng() % 4 == 0) src[rng() % src.size()] = NAN;
    std::vector<uint16_t> s16(src.size());
    for (size_t i = 0; i < src.size(); ++i) s16[i] = float_to_bf16(src[i]);
    const float alpha = (rng() & 1) ? 1.0f : -0.7f;
    const int64_t panels = (mc + mr - 1) / mr, size = (panels + (kc + mr - 1) / mr) * mr * (std::max(kc, mc) + 1) + 16;
    auto same = [&](const void* x, const void* y, size_t bytes, const char* what) {
      ++n;
      if (memcmp(x, y, bytes)) {
        if (++bad < 10) printf("FAIL %s trans=%d mc=%ld kc=%ld mr=%d off=(%ld,%ld) ld=%ld alpha=%g\n", what, trans, mc, kc, mr, off_r, off_k, ld, alpha);
      }
    };
    std::vector<float> a1(size, 1.0f), a2(size, 1.0f);
    // op(A) rows [off_r, off_r+mc), k [off_k, off_k+kc)
    if (mr <= 24) {
      ref->pack_a(a1.data(), src.data(), ld, trans, off_r, mc, off_k, kc, mr, alpha, nullptr);
      fast->pack_a(a2.data(), src.data(), ld, trans, off_r, mc, off_k, kc, mr, alpha, nullptr);
      same(a1.data(), a2.data(), panels * mr * kc * 4, "pack_a");
    }
    // op(B) k [off_r, off_r+mc) as kc = mc, cols [off_k, off_k+kc) as nc: B stored (k, n) or (n, k)
    if (mr % 16 == 0) {
      for (int bf = 0; bf < 2; ++bf) {
        std::fill(a1.begin(), a1.end(), 1.0f); std::fill(a2.begin(), a2.end(), 1.0f);
        const void* b = bf ? (const void*)s16.data() : (const void*)src.data();
        ref->pack_b(a1.data(), b, bf, ld, !trans, off_r, mc, off_k, kc, mr, nullptr);
        fast->pack_b(a2.data(), b, bf, ld, !trans, off_r, mc, off_k, kc, mr, nullptr);
        same(a1.data(), a2.data(), ((kc + mr - 1) / mr) * mr * mc * 4, bf ? "pack_b bf16" : "pack_b");
      }
    }
    std::vector<uint16_t> h1(size * 2, 7), h2(size * 2, 7);
    if (mr <= 24) {
      ref_pack_a_bf16(h1.data(), src.data(), ld, trans, off_r, mc, off_k, kc, mr, alpha);
      fast->pack_a_bf16(h2.data(), src.data(), ld, trans, off_r, mc, off_k, kc, mr, alpha);
      same(h1.data(), h2.data(), panels * mr * 2 * ((kc + 1) / 2) * 2, "pack_a_bf16");
    }
    if (mr % 16 == 0) {
      std::fill(h1.begin(), h1.end(), 7); std::fill(h2.begin(), h2.end(), 7);
      ref_pack_b_bf16(h1.data(), s16.data(), ld, !trans, off_r, mc, off_k, kc, mr);
      fast->pack_b_bf16(h2.data(), s16.data(), ld, !trans, off_r, mc, off_k, kc, mr);
      same(h1.data(), h2.data(), ((kc + mr - 1) / mr) * mr * 2 * ((mc + 1) / 2) * 2, "pack_b_bf16");
    }
  }
  printf("%d/%d packings differ\n", bad, n);
  return bad != 0;
}
